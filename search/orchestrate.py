"""Runs a validated search plan: Ray, the Tuner, MLflow runs, and the results at the end."""
from __future__ import annotations

import argparse
import fcntl
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable

import mlflow
import numpy as np
import optuna
import pandas as pd
import psutil
import ray
from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient
from optuna.distributions import distribution_to_json, json_to_distribution
from ray import tune
from ray.tune.search.optuna import OptunaSearch

import spaces
from search import progress, report, tracking
from search.progress import Progress
from search.scheduler import ResumableASHA
from search.run import METRIC, STATE_FILE, dataset_tag, default_name
from trainables import data, engine, large_lt, registry

# Per-epoch checkpoints are small; Tune's warning about frequent snapshots is noise here.
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
MULTI_OBJECTIVES = ["val_auroc", "val_acc"]
LOCK_FILE = "tailtune.lock"
_HELD_LOCKS: list[int] = []   # file descriptors kept open (and so locked) until the process ends
SUMMARY_KEYS = ["val_score", "val_acc", "val_auroc", "test_acc", "test_acc_head", "test_acc_middle",
                "test_acc_tail", "test_auroc", "test_fpr95", "test_aupr_in", "test_aupr_out"]


def make_trainable(method: str, fixed: dict):
    """Returns train(config) for Tune: the fixed config plus the sampled parameters."""
    method_cls = registry.get(method)

    def train(config: dict) -> None:
        cfg = method_cls.config_cls.from_dict({**fixed, **config})
        # Tune reuses the actor for the next trial (reuse_actors), so the data loads once per actor.
        engine.fit(method_cls, cfg, engine.TuneReporter(),
                   engine.prepare_shared(cfg, method_cls.uses_outliers))
    train.__name__ = f"train_{method}"
    return train


def init_ray(address: str | None, logging_level: int = logging.INFO) -> None:
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, log_to_driver=False, logging_level=logging_level)
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 object_store_memory=256 * 2**20, logging_level=logging_level)
        watch_local_ray()


def watch_local_ray() -> None:
    """Starts search/watchdog.py on the Ray processes this driver just started, so that they
    stop even if the driver is killed with SIGKILL (a normal exit stops them through Ray)."""
    ray_pids = [str(p.pid) for p in psutil.Process().children()]
    subprocess.Popen([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "watchdog.py"),
                      str(os.getpid()), *ray_pids], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def lock_search(path: str) -> bool:
    """Takes the search's lock (an flock on LOCK_FILE in its Tune folder) for the rest of this
    process's life; returns False if another driver holds it. The kernel drops it when the
    process ends, however it ends, so a killed driver never leaves a stale lock."""
    fd = os.open(os.path.join(path, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    _HELD_LOCKS.append(fd)
    return True


def resources(args: argparse.Namespace, budget: dict) -> dict[str, float]:
    """Returns per-trial resources; a GPU request on a GPU-less cluster is an error, not a hang."""
    gpus_available = ray.cluster_resources().get("GPU", 0)
    gpus = args.gpus_per_trial
    if gpus is None:
        gpus = min(1.0, gpus_available / budget["max_concurrent"]) if gpus_available else 0.0
    if gpus > 0 and gpus_available == 0:
        raise ValueError(f"--gpus-per-trial {gpus:g} but the Ray cluster has no GPU")
    cpus_available = ray.cluster_resources().get("CPU", 0)
    if budget["cpus_per_trial"] > cpus_available:
        raise ValueError(f"--cpus-per-trial {budget['cpus_per_trial']:g} but the Ray cluster has "
                         f"{cpus_available:g} CPUs")
    return {"cpu": budget["cpus_per_trial"], "gpu": gpus}


def connect(args: argparse.Namespace, budget: dict) -> dict[str, float] | None:
    """Starts or joins Ray; returns per-trial resources, or None after a one-line error if the
    cluster cannot meet them."""
    verbose = getattr(args, "verbose", False)
    if not verbose:
        progress.quiet()
    init_ray(args.address, logging.INFO if verbose else logging.WARNING)
    try:
        return resources(args, budget)
    except ValueError as e:
        ray.shutdown()
        print(f"error: {e}", file=sys.stderr)
        return None


def searcher(space: spaces.Space, sampler: str, seed: int) -> OptunaSearch:
    samplers = {"tpe": lambda: optuna.samplers.TPESampler(seed=seed),
                "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed),
                "random": lambda: optuna.samplers.RandomSampler(seed=seed),
                "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed)}
    if sampler == "nsga2":
        return OptunaSearch(space.distributions, metric=MULTI_OBJECTIVES, mode=["max", "max"],
                            points_to_evaluate=[space.paper_point], sampler=samplers[sampler]())
    return OptunaSearch(space.distributions, metric=METRIC, mode="max",
                        points_to_evaluate=[space.paper_point], sampler=samplers[sampler]())


def start(plan: dict, record: dict[str, str], args: argparse.Namespace) -> int:
    """Starts a new search; returns the exit code."""
    uri = args.tracking_uri or tracking.default_tracking_uri()
    method = plan["method"]
    tag = dataset_tag(plan["config"]["dataset"], plan["config"]["imbalance_ratio"])
    name = args.name or default_name(method, plan["config"]["dataset"], plan["config"]["imbalance_ratio"])
    path = os.path.join(args.storage, name)
    try:
        os.makedirs(args.storage, exist_ok=True)
        os.mkdir(path)   # atomic: of two starts with one name, exactly one gets the folder
    except FileExistsError:
        print(f"error: a search named {name!r} exists at {path}; use --resume {name} or another --name",
              file=sys.stderr)
        return 2
    return start_guarded(path, uri, STATE_FILE,
                         lambda ids: _start(plan, record, args, uri, name, path, tag, ids))


def start_guarded(path: str, uri: str, state_file: str, start: Callable[[list[str]], int]) -> int:
    """Runs `start(parent_ids)` holding the folder's lock. A start that fails leaves no RUNNING
    parent (the first id `start` appended is marked FAILED), unless Ctrl-C left a resumable
    run; a folder left without its state file (`state_file`) is removed."""
    lock_search(path)
    parent_ids: list[str] = []
    try:
        return start(parent_ids)
    except BaseException as e:
        resumable = isinstance(e, KeyboardInterrupt) and os.path.exists(os.path.join(path, state_file))
        if parent_ids and not resumable:
            MlflowClient(uri).set_terminated(parent_ids[0], "FAILED")
        raise
    finally:
        if not os.path.exists(os.path.join(path, state_file)):   # nothing to resume: leave nothing
            shutil.rmtree(path, ignore_errors=True)


def _start(plan: dict, record: dict[str, str], args: argparse.Namespace, uri: str, name: str, path: str,
           tag: str, parent_ids: list[str]) -> int:
    """Starts Ray, the parent run and the Tuner; appends the parent run's id to `parent_ids`."""
    budget, method = plan["budget"], plan["method"]
    per_trial = connect(args, budget)
    if per_trial is None:
        return 2
    client = MlflowClient(uri)
    experiment_id = tracking.ensure_experiment(client, f"tailtune/{method}/{tag}", uri)
    searched = set(plan["space"].distributions)
    method_cls = registry.get(method)
    full_config = method_cls.config_cls.from_dict(plan["config"]).to_dict()
    augment_rule, input_rule = method_cls.augment_rule, method_cls.input_rule
    if large_lt.is_large(full_config["dataset"]):   # the dataset's views replace the method's there
        augment_rule, input_rule = large_lt.View(full_config["image_size"], full_config["crop_min_scale"]).rules()
    fixed_params = {**{k: v for k, v in full_config.items() if k not in searched},
                    **record, "augment": augment_rule, "normalisation": input_rule,
                    "search.sampler": plan["sampler"], "search.seed": plan["seed"],
                    "search.preset": plan["preset"], "search.asha_grace_period": budget["grace_period"],
                    "search.asha_reduction_factor": budget["reduction_factor"]}
    tags = {"tailtune.method": method, "tailtune.search": name}
    if "data_rule" in record:   # how the large sets' images were stored (trainables.large_lt)
        tags["tailtune.data_rule"] = record["data_rule"]
    if full_config.get("recipe"):   # the large-set recipe the preset applied (trainables.recipes)
        tags["tailtune.recipe"] = full_config["recipe"]
    parent = client.create_run(experiment_id, run_name=name, tags=tags)
    parent_ids.append(parent.info.run_id)
    client.log_batch(parent.info.run_id, params=tracking.as_params({
        **fixed_params, "search.trials": budget["trials"], "search.metric": METRIC,
        **{f"space.{k}": spaces.describe(v) for k, v in plan["space"].distributions.items()}}))
    state = {"name": name, "method": method, "budget": budget, "config": plan["config"],
             "space": {k: distribution_to_json(v) for k, v in plan["space"].distributions.items()},
             "paper_point": plan["space"].paper_point, "sampler": plan["sampler"], "seed": plan["seed"],
             "tracking_uri": uri, "experiment_id": experiment_id, "parent_run_id": parent.info.run_id,
             "model_name": f"{method}-{tag}", "fixed_params": {k: str(v) for k, v in fixed_params.items()},
             "finalized": False}
    print(f"search {name}: {budget['trials']} trials x {budget['epochs']} epochs, sampler "
          f"{plan['sampler']}, ASHA grace {budget['grace_period']} rf {budget['reduction_factor']:g}")
    print(f"tracking:   {uri}")
    print(f"experiment: tailtune/{method}/{tag}, parent run {parent.info.run_id}")
    try:
        tuner = tune.Tuner(
            tune.with_resources(make_trainable(method, plan["config"]), per_trial),
            tune_config=tune.TuneConfig(
                search_alg=searcher(plan["space"], plan["sampler"], plan["seed"]),
                scheduler=ResumableASHA(path, metric=METRIC, mode="max", time_attr="epoch",
                                        max_t=budget["epochs"], grace_period=budget["grace_period"],
                                        reduction_factor=budget["reduction_factor"]),
                num_samples=budget["trials"], max_concurrent_trials=budget["max_concurrent"],
                reuse_actors=True),
            run_config=tune.RunConfig(
                name=name, storage_path=args.storage, verbose=0,
                failure_config=tune.FailureConfig(max_failures=2),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                callbacks=[tracking.TrialRuns(uri, experiment_id, parent.info.run_id,
                                              state["fixed_params"], budget["epochs"]),
                           Progress(METRIC, budget["epochs"], budget["trials"])]))
        save_state(path, state)
        print(f"resources per trial: {per_trial}")
        print(f"resume later with: python search/run.py {method} --resume {name}")
        results = tuner.fit()
        return conclude(state, path, results)
    finally:
        ray.shutdown()


def resume(state: dict, path: str, args: argparse.Namespace) -> int:
    """Continues an interrupted search: finished trials are kept, unfinished ones resume."""
    if state["finalized"]:
        print(f"search {state['name']} already finished; its champion is models:/{state['model_name']}@champion")
        return 0
    if not lock_search(path):
        print(f"error: search {state['name']} is running in another driver (it holds {path}/{LOCK_FILE}); "
              f"wait for it to end or stop it first", file=sys.stderr)
        return 2
    print(f"resuming search {state['name']} from {path}")
    per_trial = connect(args, state["budget"])
    if per_trial is None:
        return 2
    MlflowClient(state["tracking_uri"]).update_run(state["parent_run_id"], status="RUNNING")
    try:
        results = tune.Tuner.restore(path, trainable=tune.with_resources(
            make_trainable(state["method"], state["config"]), per_trial),
            resume_unfinished=True, resume_errored=True).fit()
        return conclude(state, path, results)
    finally:
        ray.shutdown()


def save_state(path: str, state: dict) -> None:
    with open(os.path.join(path, STATE_FILE), "w") as f:
        json.dump(state, f, indent=1)


def trial_rows(results, epochs: int, searched: list[str]) -> list[tuple[dict, object]]:
    """Returns one row per trial: parameters, state, epochs done and its last metrics."""
    rows = []
    for r in results:
        m = r.metrics or {}
        done = int(m.get("epoch", 0))
        state = "failed" if r.error else ("completed" if done >= epochs else "pruned")
        row = {"trial_id": m.get("trial_id", os.path.basename(r.path)), "state": state, "epochs_done": done}
        row.update({k: r.config.get(k) for k in searched})
        row.update({k: m.get(k) for k in SUMMARY_KEYS})
        rows.append((row, r))
    return rows


def interrupted(results, trials: int) -> bool:
    """Returns True if some trial neither finished nor failed (Ctrl-C, or a lost driver)."""
    return results.num_terminated + results.num_errors < trials


def conclude(state: dict, path: str, results) -> int:
    """Picks the champion, registers it, logs the trials CSV, the report and the plots to the
    parent run with its description, and prints the summary."""
    budget = state["budget"]
    if interrupted(results, budget["trials"]):
        print(f"search interrupted; its state is saved. Continue with:\n"
              f"  python search/run.py {state['method']} --resume {state['name']}")
        return 130
    mlflow.set_tracking_uri(state["tracking_uri"])
    client = MlflowClient(state["tracking_uri"])
    parent_id = state["parent_run_id"]
    space = {k: json_to_distribution(v) for k, v in state["space"].items()}
    rows = trial_rows(results, budget["epochs"], list(space))
    table = pd.DataFrame([row for row, _ in rows])
    # The champion rule: the best val_score at the final epoch of a completed trial. Tune keeps
    # each trial's last checkpoint only, and the test metrics come with the final epoch, so this
    # is the checkpoint that is registered and the numbers that describe it.
    completed = [(row, r) for row, r in rows if row["state"] == "completed" and row["val_score"] is not None]
    best_row, best = max(completed, key=lambda item: item[0]["val_score"]) if completed else (None, None)
    version, best_run = None, None
    protocol = tracking.protocol(state["fixed_params"])
    if best is not None:
        best_run = find_child(client, state, best_row["trial_id"])
        drop_unregistered_models(client, state["experiment_id"], best_run)
        with tempfile.TemporaryDirectory() as d:
            ckpt = best.checkpoint.to_directory(os.path.join(d, "ckpt"))
            description = tracking.describe_search(state, table, best_row, protocol, best_run, None)
            version = tracking.log_champion(
                client, best_run, ckpt, state["model_name"], input_example(ckpt), description,
                {"search": state["name"], "dataset": dataset_of(state), "val_score": f"{best_row['val_score']:.4f}",
                 "protocol": protocol, "method": state["method"], "trial_id": best_row["trial_id"]})
    description = tracking.describe_search(state, table, best_row, protocol, best_run, version)
    with tempfile.TemporaryDirectory() as d:
        table.to_csv(os.path.join(d, "trials.csv"), index=False)
        client.log_artifact(parent_id, os.path.join(d, "trials.csv"))
        records = trial_records(rows, list(space))
        written = report.write(d, records, space, state["sampler"] == "nsga2", {
            "title": f"Search {state['name']}", "champion": best_row and best_row["trial_id"],
            "summary": tracking.summary_items(state, table, best_row, protocol, best_run, version)})
        for p in written:
            client.log_artifact(parent_id, p, None if p.endswith("report.html") else "optuna")
        if state["sampler"] == "nsga2":
            print_pareto(os.path.join(d, "pareto.csv"))
    client.log_batch(parent_id, tags=[RunTag("mlflow.note.content", description),
                                      RunTag("tailtune.protocol", protocol),
                                      RunTag("tailtune.champion_rule", tracking.CHAMPION_RULE)])
    if best is None:
        client.set_terminated(parent_id, "FAILED")
        print("no trial completed; see the trial errors above", flush=True)
        return 1
    client.log_batch(parent_id, metrics=[mlflow.entities.Metric(f"best_{k}", float(v), 0, 0)
                                         for k, v in best_row.items()
                                         if k in SUMMARY_KEYS and v is not None and math.isfinite(v)])
    client.set_tag(parent_id, "tailtune.best_run_id", best_run)
    client.set_tag(parent_id, "tailtune.champion", f"models:/{state['model_name']}/{version}")
    client.set_terminated(parent_id, "FINISHED")
    state["finalized"] = True
    save_state(path, state)
    print_summary(table, best_row, state, version)
    return 0


def dataset_of(state: dict) -> str:
    return dataset_tag(state["config"]["dataset"], state["config"]["imbalance_ratio"])


def input_example(checkpoint_dir: str) -> np.ndarray:
    """Returns real images for the registered model's input example: the first validation image
    of each of the first four classes of the data the champion was trained on."""
    with open(os.path.join(checkpoint_dir, engine.META_FILE)) as f:
        meta = json.load(f)
    cfg = registry.get(meta["method"]).config_cls.from_dict(meta["config"])
    ident = data.load_id_data(engine.dataset_spec(cfg), cfg.data_dir, cfg.cache_dir, cfg.download)
    _, first = np.unique(ident.val.y, return_index=True)
    return ident.val.x[np.sort(first)[:4]]


def trial_records(rows, searched: list[str]) -> list[dict]:
    """Returns the trials as the report reads them, with their val_score per validated epoch."""
    records = []
    for row, r in rows:
        history = r.metrics_dataframe
        curve = ({int(e): float(v) for e, v in zip(history["epoch"], history[METRIC]) if v == v}
                 if history is not None and METRIC in history else {})
        records.append({"trial_id": row["trial_id"], "state": row["state"], "epochs_done": row["epochs_done"],
                        "params": {k: row[k] for k in searched}, "history": curve,
                        "metrics": {k: v for k, v in (r.metrics or {}).items()
                                    if isinstance(v, (int, float)) and not isinstance(v, bool)}})
    return records


def print_pareto(front: str) -> None:
    print("Pareto front (val_auroc, val_acc):")
    for _, t in pd.read_csv(front).iterrows():
        params = progress.format_params({k: v for k, v in t.items()
                                         if k not in ("trial_id", *report.OBJECTIVES)})
        for line in progress.wrap(f"  {t['val_auroc']:.4f} {t['val_acc']:.4f}  {t['trial_id']}:",
                                  params, 6):
            print(line)


def drop_unregistered_models(client: MlflowClient, experiment_id: str, run_id: str) -> list[str]:
    """Deletes the models logged under `run_id` that no registered version points at (what an
    interrupted champion registration leaves behind); returns their ids."""
    versions = client.search_model_versions(f"run_id = '{run_id}'")
    # A version names its model by model_id, or (registered from models:/<id>) by its source.
    registered = {v.model_id for v in versions} | {v.source.removeprefix("models:/") for v in versions}
    orphans = [m.model_id for m in client.search_logged_models([experiment_id], f"source_run_id = '{run_id}'")
               if m.model_id not in registered]
    for model_id in orphans:
        client.delete_logged_model(model_id)
    return orphans


def find_child(client: MlflowClient, state: dict, trial_id: str) -> str:
    runs = client.search_runs([state["experiment_id"]],
                              f"tags.`{tracking.TRIAL_TAG}` = '{trial_id}' and "
                              f"tags.`mlflow.parentRunId` = '{state['parent_run_id']}'")
    return runs[0].info.run_id


def print_summary(table: pd.DataFrame, best: dict, state: dict, version: int) -> None:
    counts = table["state"].value_counts().to_dict()
    print(f"\ntrials: {len(table)} ({', '.join(f'{v} {k}' for k, v in counts.items())})")
    print(f"champion: trial {best['trial_id']}, the best {METRIC} at the final epoch of a completed trial")
    print("  (pruned trials never count; validation picks it, test metrics are only reported)")
    width = max(len(k) for k in best)
    for k, v in best.items():
        text = f"{v:.4f}" if isinstance(v, float) else str(v)
        print(f"  {k:<{width}}  {text}")
    print(f"registered: models:/{state['model_name']}@champion (version {version})")
    print(f"report:     report.html in the parent run {state['parent_run_id']}")
    print("pull it:")
    print(f"  python search/pull.py {state['model_name']} IMAGES.npy \\\n    --tracking-uri {state['tracking_uri']}")
