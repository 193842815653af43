"""Runs a validated reproduction plan: one Tune trial per seed, MLflow runs, the table at the end.

The seeds are a Tune grid, so they run in parallel where resources allow, each trial is mirrored
into a child run of the reproduction's parent run (search.tracking.TrialRuns, as for searches),
and an interrupted reproduction resumes with Tune's own machinery: finished seeds are kept,
unfinished ones continue from their last checkpoint.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from datetime import datetime

import pandas as pd
import ray
from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient
from ray import tune

from search import orchestrate, tracking
from search.progress import Progress
from search.reproduce import CHECKPOINT_RULE, STATE_FILE, UsageError, describe, format_table, summarize
from search.run import METRIC, dataset_tag
from trainables import papers, protocols, registry

KIND_TAG = "tailtune.kind"
SEED_RULE = ("reproduction: every seed trains to its final epoch; the table reads each seed's "
             "final-epoch test metrics (val_score is shown, never used)")


def load_state(storage: str, name: str) -> tuple[dict, str]:
    """Returns (saved reproduction state, its folder); UsageError if there is none."""
    path = os.path.join(storage, name)
    if not os.path.exists(os.path.join(path, STATE_FILE)):
        raise UsageError(f"--resume {name}: no reproduction state at {path}")
    with open(os.path.join(path, STATE_FILE)) as f:
        return json.load(f), path


def save_state(path: str, state: dict) -> None:
    with open(os.path.join(path, STATE_FILE), "w") as f:
        json.dump(state, f, indent=1)


def start(plan: dict, record: dict[str, str], args: argparse.Namespace, uri: str) -> int:
    """Starts a new reproduction; returns the exit code."""
    method, cfg = plan["method"], plan["config"]
    tag = dataset_tag(cfg["dataset"], cfg["imbalance_ratio"])
    name = args.name or f"reproduce-{method}-{tag}-{datetime.now():%Y%m%d-%H%M%S}"
    path = os.path.join(args.storage, name)
    try:
        os.makedirs(args.storage, exist_ok=True)
        os.mkdir(path)
    except FileExistsError:
        print(f"error: a run named {name!r} exists at {path}; use --resume {name} or another --name",
              file=sys.stderr)
        return 2
    return orchestrate.start_guarded(path, uri, STATE_FILE,
                                     lambda ids: _start(plan, record, args, uri, name, path, tag, ids))


def _start(plan: dict, record: dict[str, str], args: argparse.Namespace, uri: str, name: str, path: str,
           tag: str, parent_ids: list[str]) -> int:
    method, entry, budget = plan["method"], plan["entry"], plan["budget"]
    per_trial = orchestrate.connect(args, budget)
    if per_trial is None:
        return 2
    client = MlflowClient(uri)
    experiment_id = tracking.ensure_experiment(client, f"tailtune/{method}/{tag}", uri)
    method_cls = registry.get(method)
    full = method_cls.config_cls.from_dict({**plan["config"], "seed": plan["seeds"][0]}).to_dict()
    full.pop("seed")   # each child logs its own
    fixed_params = {**full, **record, "augment": method_cls.augment_rule, "normalisation": method_cls.input_rule,
                    "reproduce.seeds": ",".join(map(str, plan["seeds"])),
                    "reproduce.params_from": plan["params_from"], "reproduce.paper_source": entry.source,
                    "reproduce.paper_protocol": entry.protocol, "reproduce.paper_runs": entry.runs or "not stated",
                    "reproduce.checkpoint_rule": CHECKPOINT_RULE}
    tags = {"tailtune.method": method, KIND_TAG: "reproduction", "tailtune.reproduction": name}
    if full.get("recipe"):   # the large-set recipe trained (trainables.recipes)
        tags["tailtune.recipe"] = full["recipe"]
    parent = client.create_run(experiment_id, run_name=name, tags=tags)
    parent_ids.append(parent.info.run_id)
    client.log_batch(parent.info.run_id, params=tracking.as_params(fixed_params))
    header = describe(plan, record)
    state = {"name": name, "method": method, "dataset": plan["config"]["dataset"], "budget": budget,
             "config": plan["config"], "seeds": plan["seeds"], "params_from": plan["params_from"],
             "tracking_uri": uri, "experiment_id": experiment_id, "parent_run_id": parent.info.run_id,
             "fixed_params": {k: str(v) for k, v in fixed_params.items()}, "header": header, "finalized": False}
    print(f"reproduction {name}: {len(plan['seeds'])} seed(s) x {budget['epochs']} epochs")
    print(f"tracking:   {uri}")
    print(f"experiment: tailtune/{method}/{tag}, parent run {parent.info.run_id}")
    try:
        tuner = tune.Tuner(
            tune.with_resources(orchestrate.make_trainable(method, plan["config"]), per_trial),
            param_space={"seed": tune.grid_search(plan["seeds"])},
            tune_config=tune.TuneConfig(max_concurrent_trials=budget["max_concurrent"], reuse_actors=True),
            run_config=tune.RunConfig(
                name=name, storage_path=args.storage, verbose=0,
                failure_config=tune.FailureConfig(max_failures=2),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                callbacks=[tracking.TrialRuns(uri, experiment_id, parent.info.run_id, state["fixed_params"],
                                              budget["epochs"]),
                           Progress(METRIC, budget["epochs"], len(plan["seeds"]), SEED_RULE)]))
        save_state(path, state)
        print(f"resume later with: python search/reproduce.py --resume {name}")
        return conclude(state, path, tuner.fit())
    finally:
        ray.shutdown()


def resume(state: dict, path: str, args: argparse.Namespace) -> int:
    """Continues an interrupted reproduction: finished seeds are kept, unfinished ones resume."""
    if state["finalized"]:
        print(f"reproduction {state['name']} already finished; its table is reproduction.md in run "
              f"{state['parent_run_id']}")
        return 0
    if not orchestrate.lock_search(path):
        print(f"error: reproduction {state['name']} is running in another driver", file=sys.stderr)
        return 2
    print(f"resuming reproduction {state['name']} from {path}")
    per_trial = orchestrate.connect(args, state["budget"])
    if per_trial is None:
        return 2
    MlflowClient(state["tracking_uri"]).update_run(state["parent_run_id"], status="RUNNING")
    try:
        results = tune.Tuner.restore(path, trainable=tune.with_resources(
            orchestrate.make_trainable(state["method"], state["config"]), per_trial),
            resume_unfinished=True, resume_errored=True).fit()
        return conclude(state, path, results)
    finally:
        ray.shutdown()


def conclude(state: dict, path: str, results) -> int:
    """Builds the table from the seeds that reached the final epoch, logs it (reproduction.md,
    reproduction.csv, repro_<metric>_mean/std) to the parent run, and prints it."""
    seeds, epochs = state["seeds"], state["budget"]["epochs"]
    if orchestrate.interrupted(results, len(seeds)):
        print(f"reproduction interrupted; finished seeds are kept. Continue with:\n"
              f"  python search/reproduce.py --resume {state['name']}")
        return 130
    finished = [r for r in results if not r.error and (r.metrics or {}).get("epoch", 0) >= epochs]
    per_seed = sorted(({"seed": r.config["seed"], **r.metrics} for r in finished), key=lambda m: m["seed"])
    client = MlflowClient(state["tracking_uri"])
    parent_id = state["parent_run_id"]
    entry = papers.get(state["method"], state["dataset"])
    rows = summarize(entry, per_seed)
    failed = sorted(set(seeds) - {m["seed"] for m in per_seed})
    lines = [*state["header"]] + ([f"failed seeds (left out): {','.join(map(str, failed))}"] if failed else [])
    text = "\n".join(lines) + "\n\n" + format_table(rows) + "\n"
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "reproduction.md"), "w") as f:
            f.write(f"# Reproduction `{state['name']}`\n\n" + "\n".join(f"- {line}" for line in lines)
                    + "\n\n" + format_table(rows) + "\n")
        pd.DataFrame(rows).to_csv(os.path.join(d, "reproduction.csv"), index=False)
        keys = [k for k in papers.METRICS if k in entry.values]
        pd.DataFrame([{"seed": m["seed"], **{k: m.get(k) for k in keys}} for m in per_seed]).to_csv(
            os.path.join(d, "seeds.csv"), index=False)
        for name in ("reproduction.md", "reproduction.csv", "seeds.csv"):
            client.log_artifact(parent_id, os.path.join(d, name))
    summary = [Metric(f"repro_{r['metric'].removeprefix('test_')}_{stat}", r[stat] / 100, 0, 0)
               for r in rows for stat in ("mean", "std") if math.isfinite(r[stat])]
    protocol = protocols.get(state["config"]["protocol"])
    client.log_batch(parent_id, metrics=summary + [Metric("repro_seeds_finished", len(per_seed), 0, 0)],
                     tags=[RunTag("mlflow.note.content", f"Reproduction `{state['name']}`\n\n" + text),
                           RunTag("tailtune.protocol", f"{protocol.name}; checkpoint: {CHECKPOINT_RULE}")])
    client.set_terminated(parent_id, "FINISHED" if per_seed else "FAILED")
    state["finalized"] = True
    save_state(path, state)
    print("\n" + text, flush=True)
    if not per_seed:
        print("no seed finished; see the trial errors above", flush=True)
        return 1
    print(f"logged: reproduction.md, reproduction.csv, seeds.csv in the parent run {parent_id}")
    return 0
