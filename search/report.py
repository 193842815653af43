"""One HTML report per search, self-contained (plots as embedded PNGs), logged to the parent run.

It holds: every trial's objective with pruned and failed trials marked, the learning curves
(val_score per validated epoch), Optuna's parallel coordinates of the searched parameters, Optuna's
importances when enough trials completed (a note otherwise), the Pareto front for nsga2, the
trials table and the champion's test metrics per OOD set. The same figures are written as PNGs.

A trial here is a plain dict: `trial_id`, `state` (completed | pruned | failed), `epochs_done`,
`params` (the sampled values), `history` ({epoch: val_score}) and `metrics` (its last report).
"""
from __future__ import annotations

import base64
import html
import io
import os
import re
import warnings

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
from optuna.visualization import matplotlib as ovm  # noqa: E402

METRIC = "val_score"
OBJECTIVES = ["val_auroc", "val_acc"]   # nsga2's two objectives
# fANOVA importances from fewer completed trials than this rank noise, not parameters.
MIN_TRIALS_FOR_IMPORTANCE = 4
OOD_COLUMNS = [("auroc", "AUROC"), ("aupr_in", "AUPR-in"), ("aupr_out", "AUPR-out"),
               ("fpr95_idpos", "FPR95 (ID pos.)"), ("fpr95_oodpos", "FPR95 (OOD pos.)")]
COLOURS = {"completed": "tab:blue", "pruned": "tab:orange", "failed": "tab:red"}


def build_study(trials: list[dict], space: dict, multi: bool) -> optuna.Study:
    """Returns an in-memory Optuna study holding the search's trials: completed ones with their
    final objective(s), pruned ones (single objective) with their partial learning curves."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize"] * (2 if multi else 1))
    for t in trials:
        curve = {int(e): float(v) for e, v in t["history"].items()}
        if t["state"] == "completed" and t["metrics"].get(METRIC) is not None:
            values = [t["metrics"][k] for k in OBJECTIVES] if multi else [t["metrics"][METRIC]]
            study.add_trial(optuna.trial.create_trial(
                params=t["params"], distributions=space, values=values, intermediate_values=curve,
                user_attrs={METRIC: t["metrics"][METRIC], "trial_id": t["trial_id"]}))
        elif t["state"] == "pruned" and curve and not multi:
            study.add_trial(optuna.trial.create_trial(
                params=t["params"], distributions=space, intermediate_values=curve,
                state=optuna.trial.TrialState.PRUNED, user_attrs={"trial_id": t["trial_id"]}))
    return study


def objective_figure(trials: list[dict], champion: str | None):
    """Each trial's val_score in start order: completed at their final epoch, pruned at their last
    (partial, not comparable) epoch, failed at the bottom; the champion starred."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for state, marker in (("completed", "o"), ("pruned", "v"), ("failed", "x")):
        points = [(i, 0.0 if state == "failed" or t["metrics"].get(METRIC) is None else t["metrics"][METRIC])
                  for i, t in enumerate(trials) if t["state"] == state]
        if points:
            label = {"completed": "completed (final epoch)", "pruned": "pruned (last epoch, partial)",
                     "failed": "failed (drawn at 0)"}[state]
            ax.scatter(*zip(*points), marker=marker, s=50, color=COLOURS[state], label=label,
                       facecolors="none" if state == "pruned" else None)
    best = [(i, t["metrics"][METRIC]) for i, t in enumerate(trials) if t["trial_id"] == champion]
    if best:
        ax.scatter(*zip(*best), marker="*", s=260, color="gold", edgecolors="black", zorder=3,
                   label="champion")
    ax.set_xticks(range(len(trials)), [t["trial_id"] for t in trials], rotation=30, fontsize=8)
    ax.set_xlabel("trial (in start order)")
    ax.set_ylabel(METRIC)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def curves_figure(trials: list[dict], champion: str | None):
    """val_score per validated epoch, one line per trial: dashed if pruned, bold for the champion."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for t in trials:
        if not t["history"]:
            continue
        epochs = sorted(t["history"])
        ax.plot(epochs, [t["history"][e] for e in epochs], marker=".", color=COLOURS[t["state"]],
                linestyle="--" if t["state"] == "pruned" else "-",
                linewidth=3 if t["trial_id"] == champion else 1.2,
                label=f"{t['trial_id']} ({t['state']}{', champion' if t['trial_id'] == champion else ''})")
    ax.set_xlabel("epoch")
    ax.set_ylabel(METRIC)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(alpha=0.3)
    return fig


def optuna_figures(study: optuna.Study, multi: bool) -> tuple[dict, dict[str, str]]:
    """Returns Optuna's figures by file name, and a note for each one that could not be drawn."""
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    target = (lambda t: t.user_attrs[METRIC]) if multi else None
    completed = study.get_trials(states=[optuna.trial.TrialState.COMPLETE])
    # A parameter every completed trial sampled alike (e.g. a one-choice K) has no axis to draw.
    varied = [k for k in (completed[0].params if completed else {})
              if len({repr(t.params[k]) for t in completed}) > 1]
    makers = {"history.png": lambda: ovm.plot_optimization_history(study, target=target, target_name=METRIC),
              "parallel_coordinates.png": lambda: ovm.plot_parallel_coordinate(
                  study, params=varied, target=target, target_name=METRIC)}
    notes = {}
    if completed and not varied:
        del makers["parallel_coordinates.png"]
        notes["parallel_coordinates.png"] = "Every completed trial sampled the same values: no axes to draw."
    if len(completed) >= MIN_TRIALS_FOR_IMPORTANCE:
        # fANOVA explicitly: Optuna 5's default (PED-ANOVA) ranks parameters for *low* values.
        makers["importances.png"] = lambda: ovm.plot_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0), target=target,
            target_name=METRIC)
    else:
        notes["importances.png"] = (f"Importances need at least {MIN_TRIALS_FOR_IMPORTANCE} completed "
                                    f"trials; this search has {len(completed)}, so none are shown.")
    if multi:
        makers["pareto_front.png"] = lambda: ovm.plot_pareto_front(study, target_names=OBJECTIVES)
    figures = {}
    for name, make in makers.items():
        if not completed:
            notes[name] = "No trial completed, so there is nothing to draw."
            continue
        try:
            ax = make()
        except (ValueError, RuntimeError) as e:   # e.g. every completed trial sampled one value
            notes[name] = f"Optuna could not draw this: {e}"
            continue
        figures[name] = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
    return figures, notes


def ood_table(metrics: dict) -> pd.DataFrame:
    """Returns the champion's test metrics, one row per test OOD set and their mean."""
    sets = [m.group(1) for k in metrics if (m := re.fullmatch(r"test_(.+)_auroc", k))]
    rows = {s: {label: metrics.get(f"test_{s}_{key}") for key, label in OOD_COLUMNS} for s in sets}
    rows["mean"] = {label: metrics.get(f"test_{key}") for key, label in OOD_COLUMNS}
    return pd.DataFrame.from_dict(rows, orient="index")


def trials_table(trials: list[dict], space: dict) -> pd.DataFrame:
    """One row per trial: state, epochs, sampled values, final val_score (completed trials only)
    and the last partial val_score of a pruned one, in separate columns."""
    rows = []
    for t in trials:
        value = t["metrics"].get(METRIC)
        rows.append({"trial": t["trial_id"], "state": t["state"], "epochs": t["epochs_done"],
                     **{k: t["params"].get(k) for k in space},
                     f"final {METRIC}": value if t["state"] == "completed" else None,
                     f"partial {METRIC}": value if t["state"] == "pruned" else None})
    return pd.DataFrame(rows)


def png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def section(title: str, image: bytes | None, note: str = "", anchor: str = "") -> str:
    body = (f'<img alt="{html.escape(title)}" src="data:image/png;base64,'
            f'{base64.b64encode(image).decode()}">' if image else "")
    note_html = f'<p class="note">{html.escape(note)}</p>' if note else ""
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>{note_html}{body}</section>'


def table_html(table: pd.DataFrame, index: bool = False) -> str:
    return table.to_html(index=index, na_rep="", float_format=lambda v: f"{v:.4f}", border=0,
                         classes="grid")


def write(out_dir: str, trials: list[dict], space: dict, multi: bool, info: dict) -> list[str]:
    """Writes `report.html` and the figures (PNGs, `pareto.csv` for nsga2) to `out_dir`; returns
    their paths. `info` holds `title`, `summary` (list of (label, text, link or None)) and
    `champion` (trial id or None)."""
    champion = info.get("champion")
    study = build_study(trials, space, multi)
    figures, notes = optuna_figures(study, multi)
    images = {"objective.png": png(objective_figure(trials, champion)),
              "learning_curves.png": png(curves_figure(trials, champion))}
    images.update({name: png(fig) for name, fig in figures.items()})
    written = []
    for name, data in images.items():
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(data)
        written.append(os.path.join(out_dir, name))
    if multi:
        front = pd.DataFrame([{"trial_id": t.user_attrs["trial_id"], **t.params,
                               OBJECTIVES[0]: t.values[0], OBJECTIVES[1]: t.values[1]}
                              for t in study.best_trials])
        front.to_csv(os.path.join(out_dir, "pareto.csv"), index=False)
        written.append(os.path.join(out_dir, "pareto.csv"))

    best = next((t for t in trials if t["trial_id"] == champion), None)
    summary = "".join(
        f"<tr><th>{html.escape(label)}</th><td>"
        + (f'<a href="{html.escape(link)}">{html.escape(text)}</a>' if link else html.escape(text))
        + "</td></tr>" for label, text, link in info["summary"])
    parts = [
        f"<h1>{html.escape(info['title'])}</h1>",
        f'<table class="summary">{summary}</table>',
        section("Objective per trial", images["objective.png"],
                f"Completed trials at their final epoch's {METRIC} (the champion rule); pruned "
                "trials at their last validated epoch (partial, not comparable); failed trials at 0.",
                "objective"),
        '<section id="trials"><h2>Trials</h2>' + table_html(trials_table(trials, space)) + "</section>",
        section("Learning curves (intermediate values)", images["learning_curves.png"],
                f"{METRIC} per validated epoch; dashed lines are pruned trials.", "curves"),
        section("Parallel coordinates of the searched parameters", images.get("parallel_coordinates.png"),
                notes.get("parallel_coordinates.png", "Completed trials over the parameters they varied, "
                          "coloured by final " + METRIC),
                "parallel"),
        section("Parameter importances", images.get("importances.png"),
                notes.get("importances.png", f"Optuna's fANOVA importances for the final {METRIC}."),
                "importances"),
    ]
    if multi:
        parts.append(section("Pareto front (val_auroc, val_acc)", images.get("pareto_front.png"),
                             notes.get("pareto_front.png", ""), "pareto"))
    if best is not None:
        m = best["metrics"]
        accuracy = pd.DataFrame([{k: m.get(f"test_{k}") for k in
                                  ("acc", "acc_head", "acc_middle", "acc_tail")}])
        parts.append('<section id="champion-test"><h2>Champion test metrics per OOD set</h2>'
                     f'<p class="note">Trial {html.escape(best["trial_id"])}; test sets are reported, '
                     "never searched on. FPR95 (ID pos.) is the papers' FPR95.</p>"
                     + table_html(accuracy) + table_html(ood_table(m), index=True) + "</section>")
    else:
        parts.append('<section id="champion-test"><h2>Champion test metrics per OOD set</h2>'
                     '<p class="note">No trial completed: there is no champion.</p></section>')
    page = HTML.format(title=html.escape(info["title"]), body="\n".join(parts))
    with open(os.path.join(out_dir, "report.html"), "w") as f:
        f.write(page)
    written.append(os.path.join(out_dir, "report.html"))
    return written


# The script records on <body> how many plots the browser decoded, so a headless check can tell
# a rendered report from one whose images are broken.
HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }}
h1 {{ font-size: 1.5em; }} h2 {{ font-size: 1.15em; margin-top: 1.6em; }}
table {{ border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }}
th, td {{ padding: 0.2em 0.7em; text-align: left; border-bottom: 1px solid #ddd; }}
table.summary th {{ white-space: nowrap; vertical-align: top; }}
img {{ max-width: 100%; }}
.note {{ color: #555; font-size: 0.9em; }}
</style></head>
<body>
{body}
<script>
window.addEventListener("load", () => {{
  const images = [...document.images];
  document.body.dataset.plots = images.length;
  document.body.dataset.plotsRendered = images.filter(i => i.complete && i.naturalWidth > 0).length;
}});
</script>
</body></html>
"""
