"""Named evaluation protocols: which OOD sets, how many images, which FPR95 is the headline.

A protocol fixes what a paper's OOD numbers were computed on, so our number can be put next to
the paper's: its test-OOD sets (for CIFAR-10 as ID; the other CIFAR swaps in for CIFAR-100), the
per-set cap and subsampling rule, the resize rule, the SC-OOD `sc_label` relabelling, the FPR95
convention of the headline `test_fpr95`, the checkpoint rule and the spec section it comes from.
`offline` is today's list of offline sets: not a paper protocol, missing sets skipped.

Under a paper protocol a missing set is an error naming it and where it was looked for, unless
`allow_missing_ood`; the averages then cover fewer sets, and `ood_sets_covered` names them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from trainables import data, large_lt, metrics, ood_sets

CHECKPOINT_LAST = "last epoch (no selection on test data)"


@dataclass(frozen=True)
class Protocol:
    name: str
    title: str
    sets: tuple[str, ...]                   # for CIFAR-10 as ID
    headline_fpr: str                       # the ood_metrics key reported as `test_fpr95`
    resize: str                             # a key of ood_sets.RESIZE_RULES
    source: str                             # where the protocol is written down
    max_images: int | None = None           # per-set cap (seeded random subset, original order)
    sc_relabel: bool = False                # SC-OOD images with sc_label >= 0 count as ID
    groups: tuple[tuple[str, tuple[str, ...]], ...] = ()   # named averages besides the overall one
    checkpoint: str = CHECKPOINT_LAST
    paper: bool = True                      # False: not a paper's protocol
    note: str = ""
    # The large benchmarks (trainables.large_lt): dataset -> its sets, and its named groups.
    large_sets: tuple[tuple[str, tuple[str, ...]], ...] = ()
    large_groups: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def sets_for(self, dataset: str) -> tuple[str, ...]:
        """Returns the protocol's sets for an ID set (CIFAR-100 as ID takes CIFAR-10 as near-OOD;
        a large set takes its own, ValueError if the protocol has none for it)."""
        if large_lt.is_large(dataset):
            sets = dict(self.large_sets).get(dataset)
            if sets is None:
                having = [n for n, p in PROTOCOLS.items() if dataset in dict(p.large_sets)]
                raise ValueError(f"protocol '{self.name}' has no OOD sets for dataset {dataset}; accepted "
                                 f"for {dataset}: {', '.join(having + ['offline'])}")
            return sets
        if self.large_sets and not self.sets:
            having = [n for n, p in PROTOCOLS.items() if p.sets or n == "offline"]
            raise ValueError(f"protocol '{self.name}' has OOD sets only for "
                             f"{', '.join(d for d, _ in self.large_sets)}, not for dataset {dataset}; "
                             f"accepted for {dataset}: {', '.join(having)}")
        return tuple(_for_id(name, dataset) for name in self.sets)

    def groups_for(self, dataset: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
        if large_lt.is_large(dataset):
            return self.large_groups
        return tuple((g, tuple(_for_id(n, dataset) for n in names)) for g, names in self.groups)

    def subsample_rule(self) -> str:
        return "all images" if self.max_images is None else f"seeded random {self.max_images} per set"


def _for_id(name: str, dataset: str) -> str:
    if dataset == "cifar100":
        return {"cifar100_test": "cifar10_test", "scood_cifar100": "scood_cifar10"}.get(name, name)
    return name


_SCOOD = ("scood_texture", "scood_svhn", "scood_cifar100", "scood_tin", "scood_lsun", "scood_places365")
_OPENOOD_NEAR = ("cifar100_test", "tin_val")
_OPENOOD_FAR = ("mnist", "svhn", "dtd", "places365")
_IN1K_OOD = (("imagenet-lt", ("imagenet_1k_ood",)),)
_INAT2018 = (("imagenet-lt", ("inaturalist2018",)),)
_OPENOOD_IN_NEAR = ("openood_ssb_hard", "openood_ninco")
_OPENOOD_IN_FAR = ("openood_inaturalist", "openood_textures", "openood_openimage_o")
_OLTR_OPEN = (("imagenet-lt", ("imagenet_lt_open",)), ("places-lt", ("places_lt_open",)))
_OPENOOD_NOTE = ("OpenOOD v1.5's own image lists (which drop TinyImageNet/Places365 images of ID "
                 "classes) are not read: the full TinyImageNet val and Places365 val are used")

_DARL = Protocol(
    "darl", "DARL: 7 sets, unweighted mean",
    ("svhn", "dtd", "places365", "tin_val", "inaturalist", "lsun_c", "lsun_r"),
    "fpr95_idpos", "crop", "darl.md §5 (OOD test sets), §6; ricasso.md §6",
    note="iNaturalist is the MOS 10,000-image subset (the specs name iNaturalist2018 val, "
         "24,426); Places365 is the full 36,500 val; on ImageNet-LT: PASCL's ImageNet-1k-OOD "
         "(darl.md §5; RICASSO's iNaturalist2018 val is the ricasso protocol's)",
    large_sets=_IN1K_OOD)

PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (
    Protocol("offline", "the offline archives' sets (test_ood); not a paper protocol",
             (), "fpr95_idpos", "crop", "README: the offline data", paper=False,
             note="stand-ins: CIFAR-100 is a pooled 10k sample, Textures 10 of 47 DTD classes, "
                  "TinyImageNet 96 val classes; missing sets are skipped"),
    _DARL,
    # DARL's CIFAR sets; on ImageNet-LT the paper tests against iNaturalist2018 val only (Table 2).
    dataclasses.replace(
        _DARL, name="ricasso", title="RICASSO: DARL's 7 sets on CIFAR; iNaturalist 2018 val on ImageNet-LT",
        source="ricasso.md §5 (OOD test sets), §6, §8 item 19; darl.md §5",
        note="on CIFAR as darl: iNaturalist is the MOS 10,000-image subset, Places365 the full 36,500 val; "
             "on ImageNet-LT the full iNaturalist 2018 val (24,426 images, 8,142 classes), which overlaps "
             "ImageNet's animal and plant classes semantically (ricasso.md §8 item 19)",
        large_sets=_INAT2018),
    Protocol("rna", "RNA: SC-OOD lists, sc_label >= 0 counted as ID, OOD-positive FPR95",
             _SCOOD, "fpr95_oodpos_oe", "square", "rna.md §4.5, §5.2; ltood_code_survey.md §1.3",
             sc_relabel=True, large_sets=_IN1K_OOD),
    Protocol("pascl", "PASCL: SC-OOD lists, sc_label >= 0 counted as ID, OOD-positive FPR95",
             _SCOOD, "fpr95_oodpos_oe", "square", "ltood_code_survey.md §1.3, §3.1 (PASCL test.py)",
             sc_relabel=True,
             checkpoint="last epoch of stage 1 for OOD metrics (test.py --ckpt latest); the paper's "
                        "ACC comes from a stage-2 fine-tune this method does not run", large_sets=_IN1K_OOD),
    Protocol("open_sampling", "Open-sampling: 10 sets (3 synthetic), 2,000 images each, OE protocol",
             ("gaussian", "rademacher", "blobs", "dtd", "svhn", "places365", "lsun_c", "lsun_r", "isun",
              "cifar100_test"),
             "fpr95_oodpos_oe", "crop", "open_sampling.md §6", max_images=2000,
             note="2,000 = len(ID test) // 5 per set (OE test.py); compare with Table 5's AUPR as aupr_out; "
                  "Places-LT (accuracy only in the paper): OLTR's open set",
             large_sets=_OLTR_OPEN[1:]),
    Protocol("cala", "CALA: the paper has no OOD evaluation; OpenOOD v1.5's sets",
             _OPENOOD_NEAR + _OPENOOD_FAR, "fpr95_oodpos", "crop", "cala.md §6, §8.3",
             groups=(("near", _OPENOOD_NEAR), ("far", _OPENOOD_FAR)), paper=False,
             note="CALA reports accuracy only; " + _OPENOOD_NOTE + "; Places-LT: OLTR's open set",
             large_sets=_OLTR_OPEN[1:]),
    Protocol("openood-v1.5", "OpenOOD v1.5 CIFAR benchmark: near and far averages",
             _OPENOOD_NEAR + _OPENOOD_FAR, "fpr95_oodpos", "crop",
             "ltood_code_survey.md §3.1 (OpenOOD metrics); data README",
             groups=(("near", _OPENOOD_NEAR), ("far", _OPENOOD_FAR)), note=_OPENOOD_NOTE,
             large_sets=(("imagenet-lt", _OPENOOD_IN_NEAR + _OPENOOD_IN_FAR),),
             large_groups=(("near", _OPENOOD_IN_NEAR), ("far", _OPENOOD_IN_FAR))),
    Protocol("oltr", "OLTR open-set test (Liu et al. 2019): the *_LT_open.txt lists",
             (), "fpr95_oodpos", "crop", "OLTR's split lists (ImageNet_LT_open.txt, Places_LT_open.txt)",
             paper=False, large_sets=_OLTR_OPEN,
             note="large benchmarks only; OLTR itself reports open-set F-measure, not FPR95"),
)}
# Each method's own paper; methods without one take the protocol of the papers that ran them.
METHOD_PROTOCOL = {"darl": "darl", "ricasso": "ricasso", "rna": "rna", "pascl": "pascl", "oe": "rna",
                   "energy_oe": "rna", "open_sampling": "open_sampling", "cala": "cala",
                   "cala_meta": "cala", "ce": "openood-v1.5", "la": "openood-v1.5"}


def names() -> list[str]:
    """Returns every protocol name."""
    return list(PROTOCOLS)


def get(name: str) -> Protocol:
    """Returns the protocol `name`; ValueError naming the accepted ones otherwise."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol '{name}'; accepted: {', '.join(names())}")
    return PROTOCOLS[name]


# A large set's own benchmark, the default where a method's paper protocol has no sets for it:
# ImageNet-1k-OOD on ImageNet-LT (RNA's and PASCL's benchmark, the `offline` default there; `rna`
# is the protocol of the paper numbers we hold on that set) and OLTR's open set on Places-LT (the
# `offline` default there, and what CALA's and Open-sampling's protocols take).
DATASET_PROTOCOL = {"imagenet-lt": "rna", "places-lt": "oltr"}


def for_method(method: str, dataset: str = "cifar10") -> str:
    """Returns the name of a method's default protocol on `dataset`: its paper's, or the large
    set's benchmark protocol (DATASET_PROTOCOL) where the paper's has no OOD sets for that set
    (LA's `openood-v1.5` on Places-LT, CALA's `cala` on ImageNet-LT)."""
    name = METHOD_PROTOCOL.get(method, "openood-v1.5")
    if large_lt.is_large(dataset) and dataset not in dict(PROTOCOLS[name].large_sets):
        return DATASET_PROTOCOL[dataset]
    return name


def load_sets(protocol: Protocol, dataset: str, data_dir: str | None, cache_dir: str, download: bool,
              seed: int, allow_missing: bool,
              store_side: int = 256) -> tuple[list[data.ImageSet], list[str]]:
    """Returns (the protocol's test-OOD sets that were found, the names of those missing).

    A missing set raises MissingDataError (naming it and where it was looked for) unless
    allow_missing; then a notice is printed and the set is left out. Synthetic sets are drawn
    with seeds of their own (never the validation draws)."""
    found, missing = [], []
    for i, name in enumerate(protocol.sets_for(dataset)):
        if name in data.synthetic_names():
            found.append(data.synthetic_ood(name, protocol.max_images or 2000, seed=10_000 + seed + i,
                                            size=store_side if large_lt.is_large(dataset) else data.IMAGE_SIZE))
            continue
        try:
            if large_lt.is_large(dataset):   # decoded at the ID images' stored side
                found.append(large_lt.load_ood(name, data_dir, cache_dir, store_side, protocol.max_images, seed))
            else:
                found.append(ood_sets.load(name, data_dir, cache_dir, download, protocol.resize,
                                           protocol.max_images, seed, id_name=dataset))
        except data.MissingDataError as e:
            if not allow_missing:
                raise data.MissingDataError(f"protocol '{protocol.name}': {e}; pass --allow-missing-ood "
                                            "(allow_missing_ood=true) to run without it") from None
            print(f"notice: protocol '{protocol.name}' runs without '{name}': {e}", flush=True)
            missing.append(name)
    if not found:
        raise data.MissingDataError(f"protocol '{protocol.name}': none of its OOD sets "
                                    f"{list(protocol.sets_for(dataset))} was found")
    return found, missing


def record(protocol: Protocol, covered: list[str], missing: list[str], dataset: str = "cifar10",
           store_side: int = 256) -> dict[str, str]:
    """Returns the params that say how a run's OOD numbers were computed."""
    if large_lt.is_large(dataset):
        resize = large_lt.store_rule(store_side)
    elif protocol.name == "offline":
        resize = data.OOD_RESIZE_RULE
    else:
        resize = ood_sets.RESIZE_RULES[protocol.resize]
    return {"protocol": protocol.name,
            "protocol_title": protocol.title,
            "protocol_is_paper": str(protocol.paper).lower(),
            "protocol_source": protocol.source,
            "protocol_checkpoint": protocol.checkpoint,
            "protocol_fpr95_headline": protocol.headline_fpr,
            "protocol_resize_rule": resize,
            "protocol_subsample": protocol.subsample_rule(),
            "protocol_sc_relabel": str(protocol.sc_relabel).lower(),
            "protocol_note": protocol.note or "-",
            "ood_sets_covered": ",".join(covered),
            "ood_sets_missing": ",".join(missing) or "-",
            "ood_average": ("partial: " if missing else "") + f"unweighted mean over {len(covered)} sets"}


def set_metrics(protocol: Protocol, conf_id: np.ndarray, conf_ood: np.ndarray,
                labels: np.ndarray) -> dict[str, float]:
    """Returns ood_metrics for one set; under SC-OOD relabelling, OOD-set images with
    sc_label >= 0 join the ID side and the rest stay OOD."""
    if protocol.sc_relabel:
        as_id = np.asarray(labels) >= 0
        conf_id, conf_ood = np.r_[conf_id, conf_ood[as_id]], conf_ood[~as_id]
    return metrics.ood_metrics(conf_id, conf_ood)


def averages(protocol: Protocol, dataset: str, per_set: dict[str, dict[str, float]]) -> dict[str, float]:
    """Returns the unweighted means over the covered sets (`<metric>`), over each named group
    (`<group>_<metric>`), and the headline `fpr95`."""
    keys = next(iter(per_set.values())).keys()
    out = {k: float(np.mean([m[k] for m in per_set.values()])) for k in keys}
    for group, members in protocol.groups_for(dataset):
        covered = [per_set[n] for n in members if n in per_set]
        if covered:
            out.update({f"{group}_{k}": float(np.mean([m[k] for m in covered])) for k in keys})
    out["fpr95"] = out[protocol.headline_fpr]
    return out
