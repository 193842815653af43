"""Post-hoc tuning of the test-time OOD score, on validation data only.

After the last epoch (`posthoc_sweep=true`), the parameters of the trial's `ood_score` are tried on
a small grid, each point scored by the mean AUROC of validation ID against each validation OOD set
(the synthetic sets of `val_ood`; the test sets are never passed in). The best point replaces the
config's values; the trial then tests, saves its checkpoint and registers its model with them.
Ties keep the configured value: it is evaluated first and only a strictly better point replaces it.

Every forward pass is made once and reused: logits and features of each validation set once, the
training features once (feature-based scores refit their statistics from them per point), and for
ODIN one input gradient per temperature and one forward per non-zero eps.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from trainables import detectors, metrics, scores

# Config field -> values tried, per score. ODIN: the grid of the ODIN paper's CIFAR search, with
# eps 0 (temperature scaling alone); kNN: small k too, for small long-tailed training sets; ReAct:
# around the paper's 90th percentile; energy: the temperature. Scores without parameters (msp,
# max_logit, mahalanobis, mahalanobis_pp, a method's own score) have nothing to tune.
GRIDS: dict[str, dict[str, tuple]] = {
    "odin": {"odin_temperature": (1.0, 10.0, 100.0, 1000.0),
             "odin_eps": (0.0, 0.0005, 0.001, 0.0014, 0.002, 0.003)},
    "energy": {"ood_energy_temperature": (1.0, 2.0, 5.0, 10.0, 100.0)},
    "knn": {"ood_knn_k": (1, 5, 10, 20, 50, 100, 200)},
    "react": {"ood_react_percentile": (80.0, 85.0, 90.0, 95.0, 99.0)},
}
RULE = ("posthoc_sweep: after the last epoch, grid " + "; ".join(
    f"{name}: " + " x ".join(f"{field} {list(values)}" for field, values in grid.items())
    for name, grid in GRIDS.items()) + " (kNN: k up to the training-set size); best by mean AUROC of "
    "validation ID vs each val_ood set, ties keep the configured value; test sets never used")


@dataclass
class SweepResult:
    chosen: dict[str, float]                   # config field -> chosen value
    val_auroc: float                           # mean validation AUROC at the chosen point
    table: list[tuple[dict[str, float], float]]   # every point tried, with its validation AUROC

    @property
    def report(self) -> dict[str, float]:
        """Returns the metrics a trial reports: whether the sweep ran, the grid size, the chosen
        values and their validation AUROC, and the configured point's for comparison."""
        return {"posthoc_sweep_ran": float(len(self.table) > 1), "posthoc_grid_size": float(len(self.table)),
                "posthoc_val_auroc": self.val_auroc, "posthoc_val_auroc_configured": self.table[0][1],
                **{f"posthoc_{k}": float(v) for k, v in self.chosen.items()}}


def grid(cfg, n_train: int) -> list[dict[str, float]]:
    """Returns the points to try for cfg.ood_score: the configured one first, then the grid's
    others in order. kNN's k stops at the training-set size."""
    fields = GRIDS.get(cfg.ood_score, {})
    configured = {f: getattr(cfg, f) for f in fields}
    points = [configured] + [dict(zip(fields, values)) for values in itertools.product(*fields.values())]
    points = [p for p in points if p.get("ood_knn_k", 1) <= n_train]
    return [p for i, p in enumerate(points) if p not in points[:i]]


def sweep(method, model: torch.nn.Module, train_x: torch.Tensor, train_y: torch.Tensor,
          val_x: torch.Tensor, val_ood_x: list[torch.Tensor], batch_size: int) -> SweepResult:
    """Returns the best point of cfg.ood_score's grid on validation ID `val_x` vs each validation
    OOD set, and sets `method.cfg` to the config with the chosen values. Images are uint8
    [N, 3, H, W] on the model's device; `train_x`, `train_y` feed feature-based scores' statistics."""
    cfg, name = method.cfg, method.cfg.ood_score
    points = grid(cfg, len(train_x))
    if len(points) == 1:
        return SweepResult(points[0], float("nan"), [(points[0], float("nan"))])
    model.eval()
    sets = [val_x, *val_ood_x]
    if name == "odin":
        confs = _odin_confidences(method, model, sets, points, batch_size)
    elif name in detectors.NAMES:
        confs = _feature_confidences(method, model, train_x, train_y, sets, points, batch_size)
    else:
        with torch.no_grad():
            logits = [torch.cat([method.logits(model, method.eval_transform(s[i:i + batch_size]))
                                 for i in range(0, len(s), batch_size)]) for s in sets]
        confs = []
        for point in points:
            method.cfg = dataclasses.replace(cfg, **point)
            confs.append([scores.confidence(name, lambda z: z, z, **method.score_params()) for z in logits])
    table = []
    for point, per_set in zip(points, confs):
        conf_id, *conf_ood = [c.double().cpu().numpy() for c in per_set]
        table.append((point, float(np.mean([metrics.auroc(conf_id, c) for c in conf_ood]))))
    best = 0
    for i, (_, auroc) in enumerate(table):
        if auroc > table[best][1]:
            best = i
    method.cfg = dataclasses.replace(cfg, **table[best][0])
    return SweepResult(table[best][0], table[best][1], table)


def _odin_confidences(method, model, sets, points, batch_size) -> list[list[torch.Tensor]]:
    temperatures = sorted({p["odin_temperature"] for p in points})
    epsilons = sorted({p["odin_eps"] for p in points})
    per_set = []
    for images in sets:
        chunks = [scores.odin_grid(partial(method.logits, model), method.eval_transform(images[i:i + batch_size]),
                                   temperatures, epsilons, std=method.odin_std)
                  for i in range(0, len(images), batch_size)]
        per_set.append({key: torch.cat([c[key] for c in chunks]) for key in chunks[0]})
    return [[s[(p["odin_temperature"], p["odin_eps"])] for s in per_set] for p in points]


def _feature_confidences(method, model, train_x, train_y, sets, points, batch_size) -> list[list[torch.Tensor]]:
    cfg, name = method.cfg, method.cfg.ood_score
    train_feats = method.embed(model, train_x, batch_size)
    feats = [method.embed(model, s, batch_size) for s in sets]
    classify = partial(method.classify, model)
    out = []
    with torch.no_grad():
        for point in points:
            method.cfg = dataclasses.replace(cfg, **point)
            params = method.score_params()
            state = detectors.fit(name, train_feats, train_y, method.num_classes, **params)
            out.append([torch.cat([detectors.confidence(name, state, f[:, i:i + batch_size], classify, **params)
                                   for i in range(0, f.shape[1], batch_size)]) for f in feats])
    return out
