"""The shared engine: data on the device, the epoch loop, evaluation, reporting, checkpoints.

A method supplies a class with `config_cls`, `name`, `__init__(cfg, counts, device)`,
`uses_balanced_stream`, `build_model()` and `loss(model, batch, rng) -> (loss, stats)`.
`fit` runs it the same way under Ray Tune (`TuneReporter`) and standalone (`LocalReporter`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np
import torch

from trainables import augment, data, metrics, scores
from trainables.config import TrainConfig

STATE_FILE = "state.pt"
META_FILE = "meta.json"
SCORES_FILE = "scores.npz"


@dataclass
class Batch:
    """One training step's inputs, normalised: the long-tailed stream and, if asked, the balanced one."""
    x: torch.Tensor
    y: torch.Tensor
    x_bal: torch.Tensor | None = None
    y_bal: torch.Tensor | None = None


@dataclass
class Prepared:
    """Everything a trial reads, as uint8 arrays on the host."""
    id: data.LongTailData
    val_ood: list[data.ImageSet]
    test_ood: list[data.ImageSet]

    @property
    def record(self) -> dict[str, str]:
        """Returns the params that describe the data a trial actually used."""
        return {**self.id.record,
                "val_ood_sets": ",".join(s.name for s in self.val_ood),
                "test_ood_sets": ",".join(s.name for s in self.test_ood),
                "ood_resize_rule": data.OOD_RESIZE_RULE,
                "augment": augment.AUGMENT_RULE,
                "normalisation": f"mean {augment.CIFAR_MEAN} std {augment.CIFAR_STD} (CIFAR-10, all sets)",
                "group_rule": metrics.GROUP_RULE,
                "fpr_conventions": metrics.FPR_CONVENTIONS,
                "aupr_convention": metrics.AUPR_CONVENTION,
                "val_objective": "val_score = (val_acc + val_auroc) / 2; val_auroc = mean over val_ood_sets"}


def dataset_spec(cfg: TrainConfig) -> data.DatasetSpec:
    return data.DatasetSpec(name=cfg.dataset, imbalance_ratio=cfg.imbalance_ratio,
                            val_per_class=cfg.val_per_class, n_max=cfg.n_max,
                            test_per_class=cfg.test_per_class, seed=cfg.split_seed)


def prepare(cfg: TrainConfig) -> Prepared:
    """Returns the ID split, validation OOD (synthetic) and the test OOD sets that exist."""
    data.check_ood_names(list(cfg.test_ood), cfg.dataset)
    if cfg.val_per_class < 1:
        raise ValueError(f"val_per_class={cfg.val_per_class}: a search needs a validation split (>= 1)")
    ident = data.load_id_data(dataset_spec(cfg), cfg.data_dir, cfg.cache_dir, cfg.download)
    val_ood = [data.synthetic_ood(name, cfg.val_ood_size, seed=cfg.split_seed + i)
               for i, name in enumerate(cfg.val_ood)]
    test_ood = [s for name in cfg.test_ood
                if (s := data.load_ood(name, cfg.data_dir, cfg.cache_dir, cfg.download,
                                       cfg.ood_max_images, seed=cfg.split_seed)) is not None]
    if not test_ood:
        raise data.MissingDataError(f"none of the test OOD sets {list(cfg.test_ood)} could be found")
    return Prepared(ident, val_ood, test_ood)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Reporter(Protocol):
    def restore(self, load: Callable[[str], None]) -> None: ...
    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None: ...


def ensemble_logit_fn(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Returns x -> mean of the experts' raw logits [B, C] (no margin at test time)."""
    return lambda x: model(x)[0].mean(0)


def score_params(cfg: TrainConfig) -> dict[str, float]:
    if cfg.ood_score == "odin":
        return {"temperature": cfg.odin_temperature, "eps": cfg.odin_eps}
    return {}


def infer(model: torch.nn.Module, images: torch.Tensor, cfg: TrainConfig,
          with_logits: bool) -> tuple[np.ndarray | None, np.ndarray]:
    """Returns (ensemble logits [N, C] or None, OOD confidence [N]) for uint8 images [N,3,H,W]."""
    model.eval()
    logit_fn = ensemble_logit_fn(model)
    all_logits, all_conf = [], []
    for start in range(0, len(images), cfg.eval_batch_size):
        x = augment.normalize(images[start:start + cfg.eval_batch_size])
        if with_logits:
            with torch.no_grad():
                all_logits.append(logit_fn(x).float().cpu())
        all_conf.append(scores.confidence(cfg.ood_score, logit_fn, x, **score_params(cfg)).cpu())
    logits = torch.cat(all_logits).numpy() if with_logits else None
    return logits, torch.cat(all_conf).double().numpy()


class Trial:
    """One training run of one method and config: owns the device tensors, model and optimiser."""

    def __init__(self, method_cls, cfg: TrainConfig, prepared: Prepared):
        self.cfg, self.prepared = cfg, prepared
        self.device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        ident = prepared.id
        self.method = method_cls(cfg, ident.counts, self.device)
        self.model = self.method.build_model().to(self.device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
        to_dev = lambda s: augment.to_device_images(s.x, self.device)  # noqa: E731
        self.train_x, self.val_x, self.test_x = to_dev(ident.train), to_dev(ident.val), to_dev(ident.test)
        self.train_y = torch.from_numpy(ident.train.y).to(self.device)
        counts = torch.as_tensor(ident.counts, dtype=torch.float64)
        # Class-balanced stream: each draw is class-uniform (WeightedRandomSampler semantics, spec §3.1).
        self.balanced_weights = (1.0 / counts)[self.train_y.cpu()].to(self.device)
        self.val_ood_x = [to_dev(s) for s in prepared.val_ood]
        self.test_ood_x = [to_dev(s) for s in prepared.test_ood]
        self.groups = metrics.class_groups(ident.counts)
        self.pascl_groups = metrics.pascl_shot_groups(ident.counts)
        self.epoch = 0

    # -- training ---------------------------------------------------------------------------
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
        self.model.train()
        total, stats_sum, steps = torch.zeros((), device=dev), {}, math.ceil(n / cfg.batch_size)
        for step in range(steps):
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            batch = Batch(augment.normalize(augment.crop_flip_cutout(self.train_x[idx], gen)), self.train_y[idx])
            if balanced is not None:
                bidx = balanced[step * cfg.batch_size:(step + 1) * cfg.batch_size]
                batch.x_bal = augment.normalize(augment.crop_flip_cutout(self.train_x[bidx], gen))
                batch.y_bal = self.train_y[bidx]
            loss, stats = self.method.loss(self.model, batch, rng)
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
    def validate(self) -> tuple[dict[str, float], float]:
        """Returns (val metrics, the confidence threshold keeping 95% of validation ID)."""
        logits, conf_id = infer(self.model, self.val_x, self.cfg, with_logits=True)
        acc = float((logits.argmax(1) == self.prepared.id.val.y).mean())  # balanced set
        aurocs = {s.name: metrics.auroc(conf_id, infer(self.model, x, self.cfg, False)[1])
                  for s, x in zip(self.prepared.val_ood, self.val_ood_x)}
        auroc = float(np.mean(list(aurocs.values())))
        out = {"val_acc": acc, "val_auroc": auroc, "val_score": (acc + auroc) / 2}
        out.update({f"val_auroc_{k}": v for k, v in aurocs.items()})
        return out, metrics.threshold_at_tpr(conf_id, 0.95)

    def test(self) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """Returns (test metrics, per-sample arrays): ACC by group, per-set and averaged OOD metrics."""
        y = self.prepared.id.test.y
        logits, conf_id = infer(self.model, self.test_x, self.cfg, with_logits=True)
        pred = logits.argmax(1)
        out = {f"test_{k}": v for k, v in metrics.accuracy_by_group(pred, y, self.groups).items()}
        pascl = metrics.accuracy_by_group(pred, y, self.pascl_groups)
        out.update({f"test_pascl_{k}": v for k, v in pascl.items() if k != "acc"})
        arrays = {"id_confidence": conf_id, "id_label": y, "id_pred": pred}
        per_set = []
        for s, x in zip(self.prepared.test_ood, self.test_ood_x):
            conf_ood = infer(self.model, x, self.cfg, with_logits=False)[1]
            arrays[f"ood_{s.name}_confidence"] = conf_ood
            m = metrics.ood_metrics(conf_id, conf_ood)
            m.update(metrics.per_group_auroc(conf_id, y, conf_ood, self.groups))
            per_set.append(m)
            out.update({f"test_{s.name}_{k}": v for k, v in m.items()})
        for k in per_set[0]:
            out[f"test_{k}"] = float(np.mean([m[k] for m in per_set]))
        out["test_fpr95"] = out["test_fpr95_idpos"]   # the papers' headline convention (ID positive)
        return out, arrays

    # -- checkpoints ------------------------------------------------------------------------
    def save(self, directory: str, extra_meta: dict[str, Any], arrays: dict[str, np.ndarray] | None) -> None:
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "epoch": self.epoch}, os.path.join(directory, STATE_FILE))
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
        self.epoch = state["epoch"]


def fit(method_cls, cfg: TrainConfig, reporter: Reporter, prepared: Prepared | None = None) -> dict[str, float]:
    """Trains `cfg.epochs` epochs, reporting every epoch; returns the last report.

    The last epoch's report also carries the test metrics, so they exist even when a scheduler
    stops the trial right after it. Checkpoints carry the model, optimiser and epoch.
    """
    prepared = prepared or prepare(cfg)
    trial = Trial(method_cls, cfg, prepared)
    reporter.restore(trial.load)
    last: dict[str, float] = {}
    while trial.epoch < cfg.epochs:
        started = time.perf_counter()
        last = trial.train_epoch()
        val, threshold = trial.validate()
        last.update(val, epoch=trial.epoch, epoch_seconds=time.perf_counter() - started)
        final = trial.epoch == cfg.epochs
        arrays = None
        if final:
            test, arrays = trial.test()
            last.update(test)
        if final or trial.epoch % cfg.checkpoint_every == 0:
            with tempfile.TemporaryDirectory() as d:
                trial.save(d, {"val_confidence_threshold95": threshold, "metrics": last}, arrays)
                reporter.report(last, d)
        else:
            reporter.report(last, None)
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
        from ray import tune
        ckpt = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report(metrics, checkpoint=ckpt)


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


def main(method_cls, argv: list[str] | None = None) -> None:
    """Standalone entry point: `python -m trainables.<method> --epochs 2 --set key=value ...`."""
    p = argparse.ArgumentParser(description=f"Train one {method_cls.name} trial without Ray.")
    p.add_argument("--epochs", type=int)
    p.add_argument("--data-dir", default=os.environ.get("TAILTUNE_DATA_DIR"))
    p.add_argument("--out", default=f"runs/{method_cls.name}", help="checkpoint folder (resumes if present)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config field")
    args = p.parse_args(argv)
    values: dict[str, Any] = {"data_dir": args.data_dir}
    if args.epochs:
        values["epochs"] = args.epochs
    for item in args.set:
        key, sep, text = item.partition("=")
        if not sep:
            p.error(f"--set {item!r}: expected KEY=VALUE")
        values[key] = parse_value(text)
    try:
        cfg = method_cls.config_cls.from_dict(values)
        fit(method_cls, cfg, LocalReporter(args.out))
    except (ValueError, data.MissingDataError) as e:
        raise SystemExit(f"error: {e}")
