"""MLflow tracking for a search: parent run, one nested child run per trial, registry.

Child runs are written from the driver by a Ray Tune callback, so workers need no MLflow access
and a trial stopped by the scheduler still ends with a status. A child run is found again by its
`tailtune.trial_id` tag, so a resumed search continues its runs instead of duplicating them.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import time
import warnings

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from ray import tune

from trainables import engine

# Keys Ray adds to every result; they are bookkeeping, not metrics.
FINAL_KEYS = ("val_score", "val_acc", "val_auroc")
RAY_KEYS = {"timestamp", "checkpoint_dir_name", "done", "training_iteration", "trial_id", "date",
            "time_this_iter_s", "time_total_s", "pid", "hostname", "node_ip", "config",
            "time_since_restore", "iterations_since_restore", "should_checkpoint", "node_id"}
TRIAL_TAG = "tailtune.trial_id"
STATE_TAG = "tailtune.state"
SEARCHED_TAG = "tailtune.searched"   # on each child: the names of the parameters the search sampled
# MLflow shows a child's status and name in its run list: a pruned trial reads KILLED and ends in
# "-pruned", a failed one FAILED and "-failed", so neither passes for a completed trial.
CHAMPION_RULE = ("champion rule: the best val_score at the final epoch of a completed trial "
                 "(its final checkpoint is registered; pruned trials never count)")
RUN_STATUS = {"completed": "FINISHED", "pruned": "KILLED", "failed": "FAILED"}


def default_tracking_uri() -> str:
    """Returns the embedded local store: a SQLite file under ./mlruns (artifacts beside it)."""
    os.makedirs("mlruns", exist_ok=True)
    return f"sqlite:///{os.path.abspath('mlruns/mlflow.db')}"


def ensure_experiment(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """Returns the id of experiment `name`, creating it (with a local artifact root if embedded)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:"):
        location = "file://" + os.path.abspath(os.path.join("mlruns", "artifacts"))
    return client.create_experiment(name, artifact_location=location)


def as_params(values: dict) -> list[Param]:
    return [Param(k, str(v)[:6000]) for k, v in sorted(values.items())]


class TrialRuns(tune.Callback):
    """Mirrors every Tune trial into a nested MLflow run under the search's parent run."""

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str,
                 fixed_params: dict[str, str], epochs: int):
        self.tracking_uri, self.experiment_id = tracking_uri, experiment_id
        self.parent_run_id, self.fixed_params, self.epochs = parent_run_id, fixed_params, epochs
        self._runs: dict[str, str] = {}
        self._nodes: dict[str, list[str]] = {}
        self._client: MlflowClient | None = None

    def __getstate__(self):   # Tune pickles callbacks with the experiment state
        return {**self.__dict__, "_client": None, "_runs": {}, "_nodes": {}}

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def run_id(self, trial) -> str:
        """Returns the trial's child run id, finding an existing one before creating it."""
        if trial.trial_id in self._runs:
            return self._runs[trial.trial_id]
        existing = self.client.search_runs(
            [self.experiment_id],
            f"tags.`{TRIAL_TAG}` = '{trial.trial_id}' and tags.`mlflow.parentRunId` = '{self.parent_run_id}'")
        if existing:
            run_id = existing[0].info.run_id
        else:
            run = self.client.create_run(self.experiment_id, run_name=f"trial-{trial.trial_id}", tags={
                "mlflow.parentRunId": self.parent_run_id, TRIAL_TAG: trial.trial_id, STATE_TAG: "running",
                SEARCHED_TAG: ",".join(trial.config)})
            run_id = run.info.run_id
            params = {**self.fixed_params, **{k: v for k, v in trial.config.items()}}
            self.client.log_batch(run_id, params=as_params(params))
        self._runs[trial.trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info):
        self.run_id(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        step = int(result.get("epoch", 0))
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in result.items()
                 if k not in RAY_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)
                 and math.isfinite(float(v))]
        self.client.log_batch(self.run_id(trial), metrics=batch, tags=self.node_tags(trial, result))

    def node_tags(self, trial, result: dict) -> list[RunTag]:
        """Returns the trial's node tags when it runs on a node it has not reported from yet:
        `tailtune.node_id` (the latest) and `tailtune.nodes` (every node, in order; a trial
        retried elsewhere after losing its node lists both), with the device and speed settings
        the trial resolved there (`tailtune.device`, `tailtune.precision`, ...)."""
        node = result.get("node_id")
        if node is None:
            return []
        seen = self._nodes.setdefault(trial.trial_id, [])
        if not seen:   # a resumed search continues the list it recorded before
            seen += [n for n in self.client.get_run(self.run_id(trial)).data.tags
                     .get("tailtune.nodes", "").split(",") if n]
        if seen and seen[-1] == node:
            return []
        seen.append(node)
        # The device and speed settings ("auto" resolved there) belong to the node that ran it.
        resolved = [RunTag(f"tailtune.{k.removeprefix('resolved.')}", str(v)) for k, v in result.items()
                    if k.startswith("resolved.")]
        return [RunTag("tailtune.node_id", node), RunTag("tailtune.node_ip", str(result.get("node_ip"))),
                RunTag("tailtune.nodes", ",".join(seen)), *resolved]

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        done = last.get("epoch", 0)
        state = "completed" if done >= self.epochs else "pruned"
        run_id = self.run_id(trial)
        # final_* exist on completed trials only: a column that ranks trials by their last epoch,
        # where a pruned trial's partial score cannot outrank a finished one.
        finals = [Metric(f"final_{k}", float(last[k]), int(time.time() * 1000), int(done))
                  for k in FINAL_KEYS if state == "completed" and isinstance(last.get(k), (int, float))]
        self.client.log_batch(run_id, metrics=finals,
                              tags=[RunTag(STATE_TAG, state), RunTag("epochs_done", str(done))])
        self.end(run_id, trial, state)

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self.run_id(trial)
        self.client.set_tag(run_id, STATE_TAG, "failed")
        self.end(run_id, trial, "failed")

    def end(self, run_id: str, trial, state: str) -> None:
        """Ends the child run with the status and name suffix of its state."""
        name = f"trial-{trial.trial_id}" + ("" if state == "completed" else f"-{state}")
        self.client.update_run(run_id, name=name)
        self.client.set_terminated(run_id, RUN_STATUS[state])


def log_champion(client: MlflowClient, run_id: str, checkpoint_dir: str, model_name: str,
                 input_example, description: str, tags: dict[str, str]) -> int:
    """Logs the best trial's checkpoint and a pyfunc model (with `input_example`, real images) to
    its run, registers it as `model_name` with alias `champion`, and gives the registered model
    and the new version `description` and `tags`; returns the registered version."""
    client.log_artifacts(run_id, checkpoint_dir, "checkpoint")
    import trainables
    with mlflow.start_run(run_id=run_id, nested=True), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # MLflow's integer-schema hint for uint8 input
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=os.path.join(os.path.dirname(trainables.__file__), "champion.py"),
            artifacts={"state": os.path.join(checkpoint_dir, engine.STATE_FILE),
                       "meta": os.path.join(checkpoint_dir, engine.META_FILE)},
            code_paths=[os.path.dirname(trainables.__file__)],
            input_example=input_example,
            pip_requirements=_requirements(),
        )
    # register_model prints its own "Successfully registered" lines; the summary says it once.
    with contextlib.redirect_stderr(io.StringIO()):
        version = mlflow.register_model(info.model_uri, model_name, tags={**tags, "source_run": run_id})
    client.update_registered_model(model_name, description)
    for key, value in tags.items():
        client.set_registered_model_tag(model_name, key, value)
    client.update_model_version(model_name, version.version, description)
    client.set_registered_model_alias(model_name, "champion", version.version)
    return int(version.version)


def ui_link(tracking_uri: str, path: str) -> str | None:
    """Returns the MLflow UI address of `path` (e.g. `experiments/1/runs/abc`) on an HTTP server,
    None for a local store (browsed with `mlflow ui`, at an address this process cannot know)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    return f"{tracking_uri.rstrip('/')}/#/{path}"


def _requirements() -> list[str]:
    from importlib.metadata import version
    return [f"{name}=={version(name).split('+')[0]}"
            for name in ("torch", "numpy", "pandas", "scikit-learn", "mlflow")]


def protocol(fixed_params: dict[str, str]) -> str:
    """Returns the evaluation protocol the search used, as one line, from the protocol record every
    trial logs (trainables.protocols.record): its name, what selects the champion, the test OOD
    sets (reported only) and the FPR95 convention of test_fpr95."""
    p = fixed_params.get
    headline = p("protocol_fpr95_headline", "fpr95_idpos")
    positive = ("OOD positive (ID flagged at 95% OOD caught)" if "oodpos" in headline
                else "ID positive (OOD accepted at 95% ID kept)")
    tie_rule = ", reference tie rule" if headline.endswith("_oe") else ""
    return (f"{p('protocol', '?')}; select: val_score on val OOD {p('val_ood_sets', '?')}; "
            f"checkpoint: final epoch; test OOD (reported only): {p('test_ood_sets', '?')}; "
            f"fpr95: {positive}{tie_rule} [{headline}]")


def summary_items(state: dict, table, best: dict | None, protocol_text: str, best_run: str | None,
                  version: int | None) -> list[tuple[str, str, str | None]]:
    """Returns the search's description as (label, text, link or None) rows."""
    uri, budget, cfg = state["tracking_uri"], state["budget"], state["config"]
    experiment = f"experiments/{state['experiment_id']}"
    counts = ", ".join(f"{v} {k}" for k, v in table["state"].value_counts().items())
    items = [
        ("method", state["method"], None),
        ("dataset", cfg["dataset"] if cfg["dataset"].endswith("-lt")   # the large sets' lists fix the tail
         else f"{cfg['dataset']}-LT, imbalance ratio {cfg['imbalance_ratio']:g}", None),
        ("budget", f"{state.get('fixed_params', {}).get('search.preset', '?')} preset: "
                   f"{budget['trials']} trials x {budget['epochs']} epochs, sampler {state['sampler']}, "
                   f"ASHA grace {budget['grace_period']} reduction factor {budget['reduction_factor']:g}", None),
        ("searched", ", ".join(state["space"]), None),
        ("protocol", protocol_text, None),
        ("champion rule", CHAMPION_RULE.removeprefix("champion rule: "), None),
        ("trials", counts, None),
        ("search run", state["parent_run_id"], ui_link(uri, f"{experiment}/runs/{state['parent_run_id']}")),
    ]
    if best is None:
        items.append(("champion", "none: no trial completed", None))
    else:
        scores = ", ".join(f"{k} {best[k]:.4f}" for k in ("val_score", "test_acc", "test_auroc", "test_fpr95")
                           if best.get(k) is not None)
        items.append(("champion", f"trial {best['trial_id']}: {scores}",
                      ui_link(uri, f"{experiment}/runs/{best_run}")))
        if version is not None:
            items.append(("registered model", f"models:/{state['model_name']}/{version} (alias champion)",
                          ui_link(uri, f"models/{state['model_name']}/versions/{version}")))
    return items


def describe_search(state: dict, table, best: dict | None, protocol_text: str, best_run: str | None,
                    version: int | None) -> str:
    """Returns the search's description in Markdown (MLflow renders it on the run's page)."""
    lines = []
    for label, text, link in summary_items(state, table, best, protocol_text, best_run, version):
        lines.append(f"- **{label}**: " + (f"[{text}]({link})" if link else text))
    return f"Search `{state['name']}`\n\n" + "\n".join(lines) + "\n"
