"""The shared engine: data on the device, the epoch loop, evaluation, reporting, checkpoints.

A method is a subclass of `trainables.method.Method` (its hooks and defaults are listed there).
`fit` runs it the same way under Ray Tune (`TuneReporter`) and standalone (`LocalReporter`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np
import torch

from trainables import data, large_lt, metrics, ood_sets, posthoc, protocols
from trainables.config import DEFAULT_TEST_OOD, TrainConfig, default_test_ood
from trainables.method import Batch, TrainData  # noqa: F401  (Batch is re-exported)

STATE_FILE = "state.pt"
META_FILE = "meta.json"
SCORES_FILE = "scores.npz"


@dataclass
class Prepared:
    """Everything a trial reads, as uint8 arrays on the host."""
    id: data.LongTailData
    val_ood: list[data.ImageSet]
    test_ood: list[data.ImageSet]
    outliers: data.ImageSet | None = None
    outlier_note: str = ""
    protocol_record: dict[str, str] | None = None
    outlier_params: dict[str, str] = field(default_factory=dict)   # source, rule, subset of the outliers

    @property
    def record(self) -> dict[str, str]:
        """Returns the params that describe the data a trial actually used."""
        return {**self.id.record,
                "val_ood_sets": ",".join(s.name for s in self.val_ood),
                "test_ood_sets": ",".join(s.name for s in self.test_ood),
                "ood_resize_rule": self.id.record.get("data_rule", data.OOD_RESIZE_RULE),
                "group_rule": metrics.GROUP_RULE,
                "fpr_conventions": metrics.FPR_CONVENTIONS,
                "aupr_convention": metrics.AUPR_CONVENTION,
                "val_objective": "val_score = (val_acc + val_auroc) / 2; val_auroc = mean over val_ood_sets",
                "posthoc_rule": posthoc.RULE,
                **self.outlier_record, **(self.protocol_record or {})}

    @property
    def outlier_record(self) -> dict[str, str]:
        if self.outliers is None:
            return {}
        out = {"outlier_set": self.outliers.name, "outlier_size": str(len(self.outliers)), **self.outlier_params}
        if self.outlier_note:
            out["outlier_overlap_note"] = self.outlier_note
        return out


def dataset_spec(cfg: TrainConfig) -> data.DatasetSpec:
    return data.DatasetSpec(name=cfg.dataset, imbalance_ratio=cfg.imbalance_ratio,
                            val_per_class=cfg.val_per_class, n_max=cfg.n_max,
                            test_per_class=cfg.test_per_class, seed=cfg.split_seed,
                            meta_per_class=cfg.meta_per_class, store_side=cfg.image_store_side,
                            val_source=cfg.val_source, meta_grouping=cfg.meta_grouping())


def test_ood_names(cfg: TrainConfig) -> list[str]:
    """Returns the offline protocol's test sets: cfg.test_ood, except that a large set left at
    the CIFAR default takes its own benchmark's sets (the 32x32 sets do not apply to it)."""
    if large_lt.is_large(cfg.dataset) and tuple(cfg.test_ood) == DEFAULT_TEST_OOD:
        return list(default_test_ood(cfg.dataset))
    return list(cfg.test_ood)


def load_test_ood(cfg: TrainConfig, name: str) -> data.ImageSet | None:
    """Returns the offline protocol's test set `name`, or None (with a notice) when missing."""
    if not large_lt.is_large(cfg.dataset):
        return data.load_ood(name, cfg.data_dir, cfg.cache_dir, cfg.download, cfg.ood_max_images,
                             seed=cfg.split_seed)
    try:
        return large_lt.load_ood(name, cfg.data_dir, cfg.cache_dir, cfg.image_store_side,
                                 cfg.ood_max_images, seed=cfg.split_seed)
    except data.MissingDataError as e:
        print(f"notice: {e}; skipped", flush=True)
        return None


def prepare(cfg: TrainConfig, uses_outliers: bool = False) -> Prepared:
    """Returns the ID split, validation OOD (synthetic, or tin_aux's held-out classes), the test
    OOD sets of the protocol (`offline`: those of test_ood that exist) and, for a method that
    trains with them, the auxiliary outliers."""
    protocol = protocols.get(cfg.protocol)
    test_names = list(protocol.sets_for(cfg.dataset)) if protocol.name != "offline" else test_ood_names(cfg)
    data.check_ood_names(test_names, cfg.dataset)
    shared = sorted(set(test_names) & set(cfg.val_ood))
    if shared:
        raise ValueError(f"val_ood {shared} is also a test set of protocol '{protocol.name}' (never tune "
                         f"on test sets); accepted: val_ood from {data.synthetic_names() + [ood_sets.VAL_HOLDOUT]} "
                         f"without {shared}")
    note, large = "", large_lt.is_large(cfg.dataset)
    if uses_outliers and large:
        large_lt.check_outlier_set(cfg.outlier_set, cfg.dataset, test_names, list(cfg.val_ood), cfg.data_dir)
    elif uses_outliers:
        note = data.check_outlier_set(cfg.outlier_set, test_names, list(cfg.val_ood))
    if cfg.val_per_class < 1:
        raise ValueError(f"val_per_class={cfg.val_per_class}: a search needs a validation split (>= 1)")
    ident = data.load_id_data(dataset_spec(cfg), cfg.data_dir, cfg.cache_dir, cfg.download)
    # Synthetic validation sets come at the ID images' size (32, or the large sets' stored side).
    side = ident.train.x.shape[1]
    val_ood = [ood_sets.tin_aux_part("holdout", cfg.data_dir, cfg.cache_dir, cfg.val_ood_size,
                                     seed=cfg.split_seed + i)[0] if name == ood_sets.VAL_HOLDOUT
               else data.synthetic_ood(name, cfg.val_ood_size, seed=cfg.split_seed + i, size=side)
               for i, name in enumerate(cfg.val_ood)]
    if protocol.name == "offline":
        test_ood = [s for name in test_names if (s := load_test_ood(cfg, name)) is not None]
        missing = [n for n in test_names if n not in {s.name for s in test_ood}]
    else:
        test_ood, missing = protocols.load_sets(protocol, cfg.dataset, cfg.data_dir, cfg.cache_dir,
                                                cfg.download, cfg.split_seed, cfg.allow_missing_ood,
                                                store_side=cfg.image_store_side)
    if not test_ood:
        raise data.MissingDataError(f"none of the test OOD sets {test_names} could be found")
    outliers, outlier_params = None, {}
    if uses_outliers and large:
        # At the stored side, disjoint from the test-OOD folder sets and the ID classes.
        outliers, outlier_params = large_lt.load_outliers(
            cfg.outlier_set, cfg.dataset, cfg.data_dir, cfg.cache_dir, cfg.image_store_side,
            cfg.outlier_max_images, cfg.split_seed, test_names, ident.class_names)
    elif uses_outliers:
        outliers = data.load_outliers(cfg.outlier_set, cfg.data_dir, cfg.cache_dir,
                                      cfg.outlier_max_images, seed=cfg.split_seed)
    if outliers is not None:
        if outliers.name in cfg.val_ood:   # "auto" fell back to noise that validation also uses
            raise ValueError(f"outlier_set={cfg.outlier_set!r} resolved to '{outliers.name}', which is "
                             f"also a validation OOD set; set val_ood without it")
        if outliers.name == "tin_aux" and ood_sets.VAL_HOLDOUT in cfg.val_ood:
            # Validation's classes stay out of training: outliers from the other tin_aux classes.
            outliers = ood_sets.tin_aux_part("train", cfg.data_dir, cfg.cache_dir,
                                             cfg.outlier_max_images, seed=cfg.split_seed)[0]
    record = protocols.record(protocol, [s.name for s in test_ood], missing, cfg.dataset, cfg.image_store_side)
    record["ood_set_sizes"] = ",".join(f"{s.name}:{len(s)}" for s in test_ood)
    if ood_sets.VAL_HOLDOUT in cfg.val_ood:
        record["val_ood_holdout_wnids"] = ",".join(ood_sets.tin_aux_part("holdout", cfg.data_dir, cfg.cache_dir)[1])
    return Prepared(ident, val_ood, test_ood, outliers, note, record, outlier_params)


# What `prepare` reads besides the split (`dataset_spec`): trials that agree on all of it train
# on the same arrays.
SOURCE_FIELDS = ("data_dir", "cache_dir", "download", "val_ood", "val_ood_size", "test_ood",
                 "ood_max_images", "outlier_set", "outlier_max_images", "protocol", "allow_missing_ood")
_last_prepared: dict[tuple, Prepared] = {}


def prepare_shared(cfg: TrainConfig, uses_outliers: bool = False) -> Prepared:
    """Returns `prepare(cfg, uses_outliers)`, kept for the next call in this process: a Ray actor
    that runs trial after trial of one search loads the data once. Holds one build at a time."""
    key = (uses_outliers, dataset_spec(cfg), *(getattr(cfg, f) for f in SOURCE_FIELDS))
    if key not in _last_prepared:
        _last_prepared.clear()
        _last_prepared[key] = prepare(cfg, uses_outliers)
    return _last_prepared[key]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Reporter(Protocol):
    def restore(self, load: Callable[[str], None]) -> None: ...
    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None: ...


def infer(method, model: torch.nn.Module, images: torch.Tensor, batch_size: int,
          with_logits: bool) -> tuple[np.ndarray | None, np.ndarray]:
    """Returns (test-time logits [N, C] or None, OOD confidence [N]) for uint8 images [N,3,H,W]."""
    model.eval()
    all_logits, all_conf = [], []
    for start in range(0, len(images), batch_size):
        x = method.eval_transform(images[start:start + batch_size])
        if with_logits:
            with torch.no_grad():
                all_logits.append(method.logits(model, x).float().cpu())
        all_conf.append(method.confidence(model, x).detach().cpu())
    logits = torch.cat(all_logits).numpy() if with_logits else None
    return logits, torch.cat(all_conf).double().numpy()


class Trial:
    """One training run of one method and config: owns the device tensors, model and optimiser."""

    def __init__(self, method_cls, cfg: TrainConfig, prepared: Prepared):
        self.cfg, self.prepared = cfg, prepared
        self.device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        ident = prepared.id
        self.speed = cfg.speed(self.device.type)
        # What "auto" became on this device, reported with every result (tracking tags the run).
        self.resolved = {f"resolved.{k}": str(v) for k, v in {"device": self.device.type, **self.speed}.items()}
        self.method = method_cls(cfg, ident.counts, self.device)
        self.model = self.method.build_model().to(self.device)
        if self.speed["channels_last"]:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = self.method.build_optimizer(self.model)
        # The training forward may be compiled; evaluation and checkpoints use the plain module
        # (same parameters), so state dicts keep their names.
        self.train_model = self.model
        if self.speed["compile"] != "none":
            if not self.method.compilable:
                raise ValueError(f"compile={cfg.compile!r}: method {self.method.name} does not support "
                                 f"torch.compile; use compile=none")
            mode = None if self.speed["compile"] == "default" else self.speed["compile"]
            self.train_model = torch.compile(self.model, mode=mode)
        # Sets beyond cfg.device_image_budget_gb stream from host memory (large_lt.Placement).
        self.placement = large_lt.Placement(self.device, cfg.device_image_budget_gb)
        to_dev = self.placement.place
        self.train_x, self.val_x, self.test_x = to_dev(ident.train), to_dev(ident.val), to_dev(ident.test)
        self.train_y = torch.from_numpy(ident.train.y).to(self.device)
        counts = torch.as_tensor(ident.counts, dtype=torch.float64)
        # Class-balanced stream: each draw is class-uniform (WeightedRandomSampler semantics, spec §3.1).
        self.balanced_weights = (1.0 / counts)[self.train_y.cpu()].to(self.device)
        self.val_ood_x = [to_dev(s) for s in prepared.val_ood]
        self.test_ood_x = [to_dev(s) for s in prepared.test_ood]
        self.outlier_x = to_dev(prepared.outliers) if prepared.outliers is not None else None
        if self.method.uses_outliers and self.outlier_x is None:
            raise ValueError(f"method {self.method.name} trains with outliers; prepare(cfg, "
                             f"uses_outliers=True) loads them")
        meta = ident.meta
        self.method.begin_training(TrainData(
            self.train_x, self.train_y,
            to_dev(meta) if meta is not None else self.train_x[:0],
            torch.from_numpy(meta.y).to(self.device) if meta is not None else self.train_y[:0]))
        self.resolved["resolved.streamed_sets"] = ",".join(self.placement.streamed) or "none"
        self.groups = metrics.class_groups(ident.counts)
        self.pascl_groups = metrics.pascl_shot_groups(ident.counts)
        self.epoch = 0
        self._detector_fitted_for = None

    # -- training ---------------------------------------------------------------------------
    def transform(self, x_uint8: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        x = self.method.train_transform(x_uint8, gen)
        return x.contiguous(memory_format=torch.channels_last) if self.speed["channels_last"] else x

    def train_epoch(self) -> dict[str, float]:
        """Runs one pass over the long-tailed set; returns mean train loss, stats and the LR."""
        cfg, dev = self.cfg, self.device
        # Per-epoch seeds make a resumed trial draw exactly what an uninterrupted one would.
        gen = torch.Generator(device=dev).manual_seed(cfg.seed * 100_003 + self.epoch)
        rng = np.random.RandomState((cfg.seed * 100_003 + self.epoch) % 2**32)
        lr = cfg.lr_at(self.epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        n = len(self.train_y)
        order = torch.randperm(n, device=dev, generator=gen)
        balanced = (torch.multinomial(self.balanced_weights, n, replacement=True, generator=gen)
                    if self.method.uses_balanced_stream else None)
        n_out = cfg.outlier_batch_size or cfg.batch_size
        outlier_order = None
        if self.outlier_x is not None:
            # Outliers are drawn without replacement; a set smaller than an epoch's need cycles.
            need = math.ceil(n / cfg.batch_size) * n_out
            laps = math.ceil(need / len(self.outlier_x))
            outlier_order = torch.cat([torch.randperm(len(self.outlier_x), device=dev, generator=gen)
                                       for _ in range(laps)])
        # Each stream's rows per step: (images, the epoch's order, rows per step). A streamed set
        # is indexed with a host copy of its order (copied once per epoch, not synced per step),
        # and with cfg.prefetch_streamed the next step's rows are gathered while this step runs.
        draws = {key: d for key, d in (("x", (self.train_x, order, cfg.batch_size)),
                                       ("bal", (self.train_x, balanced, cfg.batch_size)),
                                       ("out", (self.outlier_x, outlier_order, n_out))) if d[1] is not None}
        host = {key: d[1].cpu() for key, d in draws.items() if isinstance(d[0], large_lt.StreamedImages)}

        def rows(key: str, step: int) -> tuple[torch.Tensor, torch.Tensor]:
            """Returns (the step's indices on the device, those images)."""
            images, drawn, size = draws[key]
            part = slice(step * size, (step + 1) * size)
            return drawn[part], images[host[key][part] if key in host else drawn[part]]

        self.method.begin_epoch(self.epoch, self.model)
        self.model.train()
        bf16 = self.speed["precision"] == "bf16"
        total, stats_sum, steps = torch.zeros((), device=dev), {}, math.ceil(n / cfg.batch_size)
        for step in range(steps):
            transform = self.transform
            idx, x = rows("x", step)
            batch = Batch(transform(x, gen), self.train_y[idx], index=idx)
            if "bal" in draws:
                bidx, x_bal = rows("bal", step)
                batch.x_bal, batch.y_bal = transform(x_bal, gen), self.train_y[bidx]
            if "out" in draws:
                oidx, x_out = rows("out", step)
                batch.x_out, batch.out_index = transform(x_out, gen), oidx
            if cfg.prefetch_streamed and step + 1 < steps:
                for key, order_on_host in host.items():
                    images, _, size = draws[key]
                    images.prefetch(order_on_host[(step + 1) * size:(step + 2) * size])
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                loss, stats = self.method.loss(self.train_model, batch, rng)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total += loss.detach()
            for k, v in stats.items():
                stats_sum[k] = stats_sum.get(k, 0) + v
        self.epoch += 1
        out = {"train_loss": float(total) / steps, "lr": lr}
        out.update({k: float(v) / steps for k, v in stats_sum.items()})
        if not math.isfinite(out["train_loss"]):
            raise FloatingPointError(f"train loss is {out['train_loss']} at epoch {self.epoch}; "
                                     f"lower lr (now {cfg.lr}) or check the config")
        return out

    # -- evaluation -------------------------------------------------------------------------
    def infer(self, images: torch.Tensor, with_logits: bool) -> tuple[np.ndarray | None, np.ndarray]:
        return infer(self.method, self.model, images, self.cfg.eval_batch_size, with_logits)

    def fit_detector(self) -> None:
        """Fits a feature-based score's statistics on the training images for the current weights
        and score parameters (once per epoch and parameters); nothing for logit-based scores."""
        key = (self.epoch, repr(self.method.score_params()))
        if key != self._detector_fitted_for:
            self.method.fit_detector(self.model, self.train_x, self.train_y, self.cfg.eval_batch_size)
            self._detector_fitted_for = key

    def posthoc_sweep(self) -> dict[str, float]:
        """Tunes the score's parameters on validation ID vs validation OOD (trainables.posthoc);
        the trial tests and saves with the chosen values. Returns the metrics to report."""
        started = time.perf_counter()
        result = posthoc.sweep(self.method, self.model, self.train_x, self.train_y, self.val_x,
                               self.val_ood_x, self.cfg.eval_batch_size)
        self.cfg = self.method.cfg
        return {**result.report, "posthoc_seconds": time.perf_counter() - started}

    def validate(self) -> tuple[dict[str, float], float]:
        """Returns (val metrics, the confidence threshold keeping 95% of validation ID)."""
        self.fit_detector()
        logits, conf_id = self.infer(self.val_x, with_logits=True)
        acc = float((logits.argmax(1) == self.prepared.id.val.y).mean())  # balanced set
        aurocs = {s.name: metrics.auroc(conf_id, self.infer(x, False)[1])
                  for s, x in zip(self.prepared.val_ood, self.val_ood_x)}
        auroc = float(np.mean(list(aurocs.values())))
        out = {"val_acc": acc, "val_auroc": auroc, "val_score": (acc + auroc) / 2}
        out.update({f"val_auroc_{k}": v for k, v in aurocs.items()})
        return out, metrics.threshold_at_tpr(conf_id, 0.95)

    def test(self) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """Returns (test metrics, per-sample arrays): ACC by group, per-set and averaged OOD metrics."""
        y = self.prepared.id.test.y
        self.fit_detector()
        logits, conf_id = self.infer(self.test_x, with_logits=True)
        pred = logits.argmax(1)
        out = {f"test_{k}": v for k, v in metrics.accuracy_by_group(pred, y, self.groups).items()}
        pascl = metrics.accuracy_by_group(pred, y, self.pascl_groups)
        out.update({f"test_pascl_{k}": v for k, v in pascl.items() if k != "acc"})
        arrays = {"id_confidence": conf_id, "id_label": y, "id_pred": pred}
        per_set = {}
        protocol = protocols.get(self.cfg.protocol)
        for s, x in zip(self.prepared.test_ood, self.test_ood_x):
            conf_ood = self.infer(x, with_logits=False)[1]
            arrays[f"ood_{s.name}_confidence"] = conf_ood
            arrays[f"ood_{s.name}_label"] = s.y   # -1, or the SC-OOD sc_label
            m = protocols.set_metrics(protocol, conf_id, conf_ood, s.y)
            m.update(metrics.per_group_auroc(conf_id, y, conf_ood[s.y < 0], self.groups))
            per_set[s.name] = m
            out.update({f"test_{s.name}_{k}": v for k, v in m.items()})
        # Unweighted means over the covered sets; test_fpr95 is the protocol's headline convention.
        out.update({f"test_{k}": v for k, v in protocols.averages(protocol, self.cfg.dataset, per_set).items()})
        return out, arrays

    # -- checkpoints ------------------------------------------------------------------------
    def save(self, directory: str, extra_meta: dict[str, Any], arrays: dict[str, np.ndarray] | None) -> None:
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "method": self.method.state_dict(), "epoch": self.epoch,
                    "detector": self.method.detector},
                   os.path.join(directory, STATE_FILE))
        meta = {"method": self.method.name, "config": self.cfg.to_dict(), "epoch": self.epoch,
                "counts": self.prepared.id.counts, "class_names": self.prepared.id.class_names,
                **extra_meta}
        with open(os.path.join(directory, META_FILE), "w") as f:
            json.dump(meta, f, indent=1)
        if arrays is not None:
            np.savez_compressed(os.path.join(directory, SCORES_FILE), **arrays)

    def load(self, directory: str) -> None:
        state = torch.load(os.path.join(directory, STATE_FILE), map_location=self.device)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.method.load_state_dict(state.get("method", {}))
        self.method.detector = state.get("detector")
        self.epoch = state["epoch"]


def fit(method_cls, cfg: TrainConfig, reporter: Reporter, prepared: Prepared | None = None) -> dict[str, float]:
    """Trains `cfg.epochs` epochs; validates and reports every `cfg.eval_every` epochs and at the
    last; returns the last report.

    The last epoch's report also carries the test metrics, so they exist even when a scheduler
    stops the trial right after it. Checkpoints carry the model, optimiser and epoch; one is
    written with every `cfg.checkpoint_every`-th report and with the last.
    """
    prepared = prepared or prepare(cfg, method_cls.uses_outliers)
    trial = Trial(method_cls, cfg, prepared)
    reporter.restore(trial.load)
    last: dict[str, float] = {}
    since, started = 0, time.perf_counter()
    while trial.epoch < cfg.epochs:
        last = trial.train_epoch()
        since += 1
        final = trial.epoch == cfg.epochs
        if not (final or trial.epoch % cfg.eval_every == 0):
            continue
        trained = time.perf_counter()
        val, threshold = trial.validate()
        # epoch_seconds: wall time per epoch since the last report, its validation included.
        now = time.perf_counter()
        last.update(val, epoch=trial.epoch, epoch_seconds=(now - started) / since,
                    eval_seconds=now - trained, **trial.resolved)
        arrays = None
        if final:
            # Tuned on validation only; the reported val_* stay the configured score's, so every
            # epoch's val_score (what the search compares) is measured the same way.
            if cfg.posthoc_sweep:
                last.update(trial.posthoc_sweep())
                threshold = trial.validate()[1]   # the champion's threshold, at the chosen values
            else:
                last["posthoc_sweep_ran"] = 0.0
            test, arrays = trial.test()
            last.update(test)
        # Counted from the epoch, so a resumed trial keeps the same checkpoint epochs.
        if final or (trial.epoch // cfg.eval_every) % cfg.checkpoint_every == 0:
            with tempfile.TemporaryDirectory() as d:
                trial.save(d, {"val_confidence_threshold95": threshold, "metrics": last}, arrays)
                reporter.report(last, d)
        else:
            reporter.report(last, None)
        since, started = 0, time.perf_counter()
    return last


class TuneReporter:
    """Reports through Ray Tune; checkpoints become Tune checkpoints, so a trial resumes."""

    def restore(self, load: Callable[[str], None]) -> None:
        """Loads the trial's last Tune checkpoint, if it has one (a resumed or retried trial)."""
        from ray import tune
        ckpt = tune.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as directory:
                load(directory)

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        import ray
        from ray import tune
        ckpt = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        # Which Ray node ran this epoch: the driver tags the trial's run with it.
        tune.report({**metrics, "node_id": ray.get_runtime_context().get_node_id()}, checkpoint=ckpt)


class LocalReporter:
    """Standalone runs: prints one line per epoch and keeps the latest checkpoint in `out_dir`."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        os.makedirs(out_dir, exist_ok=True)

    def restore(self, load: Callable[[str], None]) -> None:
        if os.path.exists(os.path.join(self.out_dir, STATE_FILE)):
            load(self.out_dir)

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        keys = ("epoch", "train_loss", "lr", "val_acc", "val_auroc", "val_score", "test_acc", "test_auroc")
        print("  ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics), flush=True)
        if checkpoint_dir:
            for name in os.listdir(checkpoint_dir):
                os.replace(os.path.join(checkpoint_dir, name), os.path.join(self.out_dir, name))


def parse_value(text: str) -> Any:
    """Returns a CLI value as JSON if it parses (numbers, true/false, null, lists), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_settings(parser: argparse.ArgumentParser, items: list[str], flag: str = "--set") -> dict[str, Any]:
    """Returns {key: parse_value(value)} for KEY=VALUE command-line items; an item without "="
    is a usage error naming it (`parser.error`)."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            parser.error(f"{flag} {item!r}: expected KEY=VALUE")
        out[key] = parse_value(text)
    return out


def main(method_cls, argv: list[str] | None = None) -> None:
    """Standalone entry point: `python -m trainables.<method> --epochs 2 --set key=value ...`."""
    p = argparse.ArgumentParser(prog=f"python -m trainables {method_cls.name}",
                                description=f"Train one {method_cls.name} trial without Ray.")
    p.add_argument("--epochs", type=int)
    p.add_argument("--data-dir", default=os.environ.get("TAILTUNE_DATA_DIR"))
    p.add_argument("--out", default=f"runs/{method_cls.name}", help="checkpoint folder (resumes if present)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config field")
    args = p.parse_args(argv)
    values: dict[str, Any] = {"data_dir": args.data_dir}
    if args.epochs:
        values["epochs"] = args.epochs
    values.update(parse_settings(p, args.set))
    try:
        cfg = method_cls.config_cls.from_dict(values)
        fit(method_cls, cfg, LocalReporter(args.out))
    except (ValueError, data.MissingDataError) as e:
        raise SystemExit(f"error: {e}")
