"""The papers' headline numbers, as data: what `search/reproduce.py` puts our runs next to.

Each entry is one row of one paper's table for one method of ours on a long-tailed CIFAR build
(imbalance ratio 100) or a large set (ImageNet-LT, Places-LT: trained with its recipe,
trainables.recipes), in percent, keyed by the metric we log for the same quantity: the paper's
FPR95 column sits under the key of the convention it was computed with (`test_fpr95_idpos`,
`test_fpr95_oodpos_oe`, ...), its AUPR under `test_aupr_out` or `test_aupr_in`, and head / middle /
tail under our group rule (`test_acc_head`, DARL's 1/3-2/3 split) or the PASCL `shot_acc` rule
(`test_pascl_acc_head`) as the paper's code used. The values are copied from the method specs'
results tables (written from the papers); `source` names the paper, table and row.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# The metrics a paper entry may hold, in table order, with the label the reproduction table uses.
METRICS = {
    "test_acc": "ACC",
    "test_acc_head": "ACC head",
    "test_acc_middle": "ACC middle",
    "test_acc_tail": "ACC tail",
    "test_pascl_acc_head": "ACC many (PASCL rule)",
    "test_pascl_acc_middle": "ACC medium (PASCL rule)",
    "test_pascl_acc_tail": "ACC few (PASCL rule)",
    "test_auroc": "AUROC",
    "test_auroc_head": "AUROC head",
    "test_auroc_middle": "AUROC middle",
    "test_auroc_tail": "AUROC tail",
    "test_aupr_in": "AUPR-In",
    "test_aupr_out": "AUPR-Out",
    "test_fpr95_idpos": "FPR95 (ID positive)",
    "test_fpr95_oodpos": "FPR95 (OOD positive)",
    "test_fpr95_idpos_oe": "FPR95 (ID positive, reference tie rule)",
    "test_fpr95_oodpos_oe": "FPR95 (OOD positive, reference tie rule)",
}
LOWER_IS_BETTER = ("test_fpr95",)   # a key starting with one of these: the smaller the better


@dataclass(frozen=True)
class PaperResult:
    method: str                   # our registry name
    dataset: str                  # cifar10 | cifar100 (long-tailed, imbalance ratio 100) | a large set
    source: str                   # paper, table, row (and the spec that copies it)
    protocol: str                 # the trainables.protocols name the OOD numbers were computed under
    values: dict[str, float]      # our metric key -> the paper's number, in %
    std: dict[str, float] = field(default_factory=dict)   # the paper's ± where it gives one
    runs: int | None = None       # how many seeds the paper averaged (None: not stated)
    note: str = ""                # how the paper's setting differs from ours, where it does
    imbalance_ratio: float = 100.0


_DARL = "DARL (darl.md §7)"
_RNA = "RNA (rna.md §6)"
_OS = "Open-sampling (open_sampling.md §7)"
_CALA = "CALA (cala.md §7)"
_RNA_BASELINE = ("a baseline run by RNA's authors with ResNet-18 (ours: ResNet-32), each with its "
                 "own score")
# RNA's ImageNet-LT columns Many / Medium / Few use the >100 / 20-100 / <20 image rule, which is
# neither of our group rules, so only the overall numbers are compared.
_RNA_IMAGENET = "ImageNet-LT, ResNet-50, OOD ImageNet-1k-OOD; many/medium/few left out (the >100/20-100/<20 rule)"

RESULTS: tuple[PaperResult, ...] = (
    PaperResult("darl", "cifar10", f"{_DARL}, Table 3 (CIFAR10-IR100), row 'DARL (Ours)'", "darl",
                {"test_acc": 89.06, "test_acc_head": 94.93, "test_acc_middle": 86.52, "test_acc_tail": 86.57,
                 "test_auroc": 89.76, "test_auroc_head": 84.70, "test_auroc_middle": 94.41,
                 "test_auroc_tail": 88.63, "test_fpr95_idpos": 40.35},
                note="OOD: mean over the paper's 7 sets"),
    PaperResult("darl", "cifar100", f"{_DARL}, Table 4 (CIFAR100-IR100), row 'DARL (Ours)'", "darl",
                {"test_acc": 57.58, "test_acc_head": 76.24, "test_acc_middle": 58.65, "test_acc_tail": 37.82,
                 "test_auroc": 80.62, "test_auroc_head": 81.06, "test_auroc_middle": 83.76,
                 "test_auroc_tail": 76.94, "test_fpr95_idpos": 55.32},
                note="OOD: mean over the paper's 7 sets"),
    PaperResult("ricasso", "cifar10", "RICASSO (ricasso.md §7), Table 1 (IR100 column), row 'RICASSO'", "ricasso",
                {"test_acc": 88.73, "test_auroc": 87.61, "test_fpr95_idpos": 44.28},
                note="the paper averages 6 OOD sets it does not list exactly; the ricasso protocol has DARL's 7"),
    PaperResult("ricasso", "cifar100", "RICASSO (ricasso.md §7), Table 1 (CIFAR-100-LT IR100), row 'RICASSO'",
                "ricasso", {"test_acc": 57.23}, note="accuracy only: the paper's OOD columns are CIFAR-10's"),
    PaperResult("rna", "cifar10", f"{_RNA}, Table 2 (ID CIFAR10-LT), row 'RNA (ours)'", "rna",
                {"test_auroc": 92.90, "test_aupr_out": 92.14, "test_fpr95_oodpos_oe": 29.18, "test_acc": 78.73,
                 "test_pascl_acc_head": 93.72, "test_pascl_acc_middle": 76.40, "test_pascl_acc_tail": 66.90},
                {"test_auroc": 0.27, "test_aupr_out": 0.36, "test_fpr95_oodpos_oe": 0.90, "test_acc": 0.23,
                 "test_pascl_acc_head": 0.17, "test_pascl_acc_middle": 0.85, "test_pascl_acc_tail": 1.06},
                runs=6),
    PaperResult("rna", "cifar100", f"{_RNA}, Table 2 (ID CIFAR100-LT), row 'RNA (ours)'", "rna",
                {"test_auroc": 75.06, "test_aupr_out": 70.71, "test_fpr95_oodpos_oe": 66.90, "test_acc": 44.80,
                 "test_pascl_acc_head": 68.35, "test_pascl_acc_middle": 44.97, "test_pascl_acc_tail": 19.84},
                {"test_auroc": 0.49, "test_aupr_out": 0.56, "test_fpr95_oodpos_oe": 1.05, "test_acc": 0.25,
                 "test_pascl_acc_head": 0.68, "test_pascl_acc_middle": 0.36, "test_pascl_acc_tail": 0.48},
                runs=6),
    PaperResult("oe", "cifar10", f"{_RNA}, Table 2 (ID CIFAR10-LT), row 'OE'", "rna",
                {"test_auroc": 89.69, "test_aupr_out": 86.47, "test_fpr95_oodpos_oe": 33.81, "test_acc": 74.85,
                 "test_pascl_acc_head": 93.90, "test_pascl_acc_middle": 73.30, "test_pascl_acc_tail": 57.60},
                {"test_auroc": 0.51, "test_aupr_out": 1.41, "test_fpr95_oodpos_oe": 0.51, "test_acc": 0.57,
                 "test_pascl_acc_head": 0.35, "test_pascl_acc_middle": 1.12, "test_pascl_acc_tail": 1.78},
                runs=6, note=_RNA_BASELINE),
    PaperResult("energy_oe", "cifar10", f"{_RNA}, Table 2 (ID CIFAR10-LT), row 'EnergyOE'", "rna",
                {"test_auroc": 88.78, "test_aupr_out": 88.91, "test_fpr95_oodpos_oe": 44.48, "test_acc": 76.25,
                 "test_pascl_acc_head": 93.94, "test_pascl_acc_middle": 74.37, "test_pascl_acc_tail": 61.01},
                {"test_auroc": 0.48, "test_aupr_out": 0.61, "test_fpr95_oodpos_oe": 0.78, "test_acc": 0.61,
                 "test_pascl_acc_head": 0.51, "test_pascl_acc_middle": 0.34, "test_pascl_acc_tail": 1.87},
                runs=6, note=_RNA_BASELINE),
    PaperResult("pascl", "cifar10", f"{_RNA}, Table 2 (ID CIFAR10-LT), row 'PASCL'", "rna",
                {"test_auroc": 91.00, "test_aupr_out": 89.35, "test_fpr95_oodpos_oe": 33.51, "test_acc": 75.86,
                 "test_pascl_acc_head": 92.50, "test_pascl_acc_middle": 72.84, "test_pascl_acc_tail": 63.67},
                {"test_auroc": 0.26, "test_aupr_out": 0.52, "test_fpr95_oodpos_oe": 0.87, "test_acc": 0.63,
                 "test_pascl_acc_head": 0.22, "test_pascl_acc_middle": 0.94, "test_pascl_acc_tail": 1.76},
                runs=6, note=_RNA_BASELINE + "; PASCL stage 1 (no fine-tune), as here"),
    PaperResult("open_sampling", "cifar10",
                f"{_OS}, Table 5 (CIFAR-10-LT r=100, 10 OOD sets), row 'Ours'; ACC ± from Table 1",
                "open_sampling",
                {"test_acc": 77.62, "test_fpr95_oodpos_oe": 20.68, "test_auroc": 92.40, "test_aupr_out": 58.38},
                {"test_acc": 0.28}, runs=5),
    PaperResult("open_sampling", "cifar100", f"{_OS}, Table 1 (C100 r=100), row 'Ours (CE + Open-sampling)'",
                "open_sampling", {"test_acc": 40.26}, {"test_acc": 0.65}, runs=5,
                note="accuracy only: the paper's OOD table is CIFAR-10's"),
    PaperResult("ce", "cifar10", f"{_OS}, Table 5 (CIFAR-10-LT r=100, 10 OOD sets), row 'MSP'",
                "open_sampling",
                {"test_acc": 71.83, "test_fpr95_oodpos_oe": 56.1, "test_auroc": 75.2, "test_aupr_out": 32.71},
                note="a cross-entropy model scored with MSP"),
    PaperResult("cala", "cifar10", f"{_CALA}, Table 1 (CIFAR10-LT 100:1), row 'Heuristic-CALA (Ours)'", "cala",
                {"test_acc": 83.91}, runs=3, note="CALA reports accuracy only"),
    PaperResult("cala", "cifar100", f"{_CALA}, Table 1 (CIFAR100-LT 100:1), row 'Heuristic-CALA (Ours)'",
                "cala", {"test_acc": 50.53}, runs=3, note="CALA reports accuracy only"),
    PaperResult("cala_meta", "cifar10", f"{_CALA}, Table 1 (CIFAR10-LT 100:1), row 'Meta-CALA (Ours)'", "cala",
                {"test_acc": 84.79}, runs=3, note="CALA reports accuracy only"),
    PaperResult("cala_meta", "cifar100", f"{_CALA}, Table 1 (CIFAR100-LT 100:1), row 'Meta-CALA (Ours)'",
                "cala", {"test_acc": 52.34}, runs=3, note="CALA reports accuracy only"),
    PaperResult("la", "cifar10", f"{_CALA}, Table 1 (CIFAR10-LT 100:1), row 'LA (Menon et al. 2021)'", "cala",
                {"test_acc": 77.67}, note="accuracy only; a baseline as run in the CALA paper"),
    PaperResult("la", "cifar100", f"{_CALA}, Table 1 (CIFAR100-LT 100:1), row 'LA (Menon et al. 2021)'", "cala",
                {"test_acc": 43.89}, note="accuracy only; a baseline as run in the CALA paper"),
    PaperResult("rna", "imagenet-lt", f"{_RNA}, Table 2 (ID ImageNet-LT), row 'RNA (ours)'", "rna",
                {"test_auroc": 75.55, "test_aupr_out": 74.60, "test_fpr95_oodpos_oe": 78.16, "test_acc": 47.81},
                {"test_auroc": 0.23, "test_aupr_out": 0.27, "test_fpr95_oodpos_oe": 0.81, "test_acc": 0.31},
                runs=6, note=_RNA_IMAGENET),
    PaperResult("oe", "imagenet-lt", f"{_RNA}, Table 2 (ID ImageNet-LT), row 'OE'", "rna",
                {"test_auroc": 67.12, "test_aupr_out": 69.20, "test_fpr95_oodpos_oe": 87.65, "test_acc": 40.87},
                {"test_auroc": 0.35, "test_aupr_out": 0.34, "test_fpr95_oodpos_oe": 0.20, "test_acc": 0.32},
                runs=6, note=f"a baseline run by RNA's authors; {_RNA_IMAGENET}"),
    PaperResult("ce", "imagenet-lt", f"{_RNA}, Table 2 (ID ImageNet-LT), row 'MSP'", "rna",
                {"test_auroc": 54.22, "test_aupr_out": 51.85, "test_fpr95_oodpos_oe": 89.67, "test_acc": 41.69},
                {"test_auroc": 0.66, "test_aupr_out": 0.54, "test_fpr95_oodpos_oe": 0.44, "test_acc": 1.45},
                runs=6, note=f"a CE model scored with MSP, run by RNA's authors; {_RNA_IMAGENET}"),
    PaperResult("cala", "places-lt", f"{_CALA}, Table 2 (Places-LT, ResNet-152), row 'Heuristic-CALA (Ours)'",
                "cala", {"test_acc": 43.42}, runs=3, note="CALA reports accuracy only"),
    PaperResult("open_sampling", "places-lt",
                f"{_OS}, Table 4 (Places-LT, ImageNet-pretrained ResNet-152), row 'Ours⋆', column Overall",
                "open_sampling", {"test_acc": 38.2},
                note="accuracy only (many/medium/few: a rule the paper does not define); the paper's model is "
                     "two-stage (decoupled), ours is trained once (see its recipe)"),
)


def methods() -> list[str]:
    """Returns the methods that have paper numbers, in registry-like order of first appearance."""
    return list(dict.fromkeys(r.method for r in RESULTS))


def get(method: str, dataset: str = "cifar10") -> PaperResult:
    """Returns the paper entry for `method` on `dataset`; ValueError naming what exists otherwise."""
    found = [r for r in RESULTS if r.method == method and r.dataset == dataset]
    if found:
        return found[0]
    if method not in methods():
        raise ValueError(f"no paper numbers for method {method!r}; accepted: {', '.join(methods())}")
    have = [r.dataset for r in RESULTS if r.method == method]
    name = dataset if dataset.endswith("-lt") else f"{dataset}-lt-ir100"
    raise ValueError(f"no paper numbers for {method} on {name}; accepted: --dataset {' or '.join(have)}")
