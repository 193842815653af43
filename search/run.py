#!/usr/bin/env python
"""Search one method's hyperparameters with Ray Tune + Optuna, tracked in MLflow.

    python search/run.py darl                      # smoke budget, local Ray, local MLflow store
    python search/run.py darl --preset paper --gpus-per-trial 0.25 --tracking-uri http://host:5000
    python search/run.py darl --resume             # continue the latest interrupted darl search
    python search/run.py --list                    # methods and their search spaces
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import textwrap
from datetime import datetime

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import spaces  # noqa: E402
from trainables import data, engine, ood_sets, protocols, recipes, registry  # noqa: E402
from trainables.config import DEFAULT_VAL_OOD, LARGE_DATASETS, default_test_ood  # noqa: E402

# Each preset is a budget: trials, epochs, ASHA rungs, concurrency, and config overrides.
PRESETS = {
    # Every stage on 2 CPU cores in a few minutes: tiny LT subset, short trials, some pruned.
    # One trial at a time (on both cores): ASHA then sees results in a fixed order, so which
    # trials it prunes does not depend on which of two concurrent trials happened to finish first.
    "smoke": {"trials": 4, "epochs": 3, "grace_period": 1, "reduction_factor": 2, "max_concurrent": 1,
              "cpus_per_trial": 2.0,
              "config": {"n_max": 100, "val_per_class": 10, "test_per_class": 30, "ood_max_images": 100,
                         "val_ood_size": 100, "batch_size": 16, "warmup_epochs": 1,
                         "eval_batch_size": 100, "outlier_max_images": 1000}},
    # A first real look on one GPU: full data, a short proxy schedule, four trials sharing the GPU,
    # validation every 3 epochs (ASHA's rungs, 12 and 24, fall on validated epochs).
    "small": {"trials": 8, "epochs": 30, "grace_period": 12, "reduction_factor": 2, "max_concurrent": 4,
              "cpus_per_trial": 1.0, "config": {"ood_max_images": 2000, "eval_every": 3}},
    # The spec's search budget (DARL §4.2): 200-epoch proxy, grace 40% of it, full test sets,
    # validation every 5 epochs (rungs 80 and 160 are validated epochs).
    "paper": {"trials": 32, "epochs": 200, "grace_period": 80, "reduction_factor": 2, "max_concurrent": 4,
              "cpus_per_trial": 1.0, "config": {"eval_every": 5}},
}


# On a large set, these presets train the method's paper recipe (trainables.recipes): `paper` its
# whole schedule, `small` CIFAR small's 30-epoch proxy of it. The smoke preset stays a tiny check
# of every stage, with no recipe.
RECIPE_PRESETS = ("small", "paper")


def recipe_for(preset: str, method: str, dataset: str) -> recipes.Recipe | None:
    """Returns the large-set recipe a preset applies, or None (CIFAR, the smoke preset, or no
    recipe in the specs for this method and set)."""
    return recipes.get(method, dataset) if preset in RECIPE_PRESETS else None


def asha_grace(epochs: int, eval_every: int) -> int:
    """Returns ASHA's grace period: 40% of `epochs` (the spec's rule, DARL §4.2) rounded to a
    multiple of `eval_every` (at least one), so its rungs fall on validated epochs."""
    return eval_every * max(1, round(0.4 * epochs / eval_every))


def preset_budget(preset: str, recipe: recipes.Recipe | None = None) -> dict:
    """Returns the preset's budget (trials, epochs, ASHA, concurrency, config overrides). With a
    recipe, `paper` runs the recipe's own epochs and `small` at most its 30; ASHA's grace is 40%
    of them, on a validated epoch, as on CIFAR (30 -> 12, 200 -> 80)."""
    budget = dict(PRESETS[preset])
    if recipe is not None and preset in RECIPE_PRESETS:
        full = recipe.values["epochs"]
        epochs = full if preset == "paper" else min(budget["epochs"], full)
        budget.update(epochs=epochs, grace_period=asha_grace(epochs, budget["config"]["eval_every"]))
    return budget


def preset_config(preset: str, method_cls: type, imbalance_ratio: float,
                  recipe: recipes.Recipe | None = None) -> dict:
    """Returns the preset's config overrides for this method: the recipe's fields (if any, with
    the `recipe` record), then the preset's own, which win. The smoke preset's tiny n_max
    leaves its tail class n_max / IR images; a method that needs more per class (CALA: 2) gets
    the smallest n_max that keeps them (logged with the config like every other field)."""
    config = dict(PRESETS[preset]["config"])
    if recipe is not None:
        config = {**recipe.values, "recipe": recipe.describe(), **config}
    floor = method_cls.min_train_per_class
    if config.get("n_max") is not None and config["n_max"] / imbalance_ratio < floor:
        config["n_max"] = int(math.ceil(floor * imbalance_ratio))
    return config


SAMPLERS = ("tpe", "cmaes", "random", "nsga2")
DATASETS = ("cifar10", "cifar100", *LARGE_DATASETS)
METRIC = "val_score"
STATE_FILE = "tailtune.json"


class UsageError(ValueError):
    """Bad input: reported as one line, before anything starts."""


def check_large_scale(method: str, method_cls: type, dataset: str) -> None:
    """UsageError (one line) when `dataset` is a large set and the method has no setup for it."""
    if dataset in LARGE_DATASETS and not method_cls.large_scale:
        raise UsageError(f"--dataset {dataset}: method {method} has no large-scale setup (its network "
                         f"and views are CIFAR's); expected cifar10 or cifar100")


def resolve_protocol(name: str, dataset: str) -> tuple[protocols.Protocol, tuple[str, ...]]:
    """Returns the protocol `name` and its test sets on `dataset` (none for offline, whose sets
    are the config's); UsageError (one line) for an unknown protocol or one without sets there."""
    try:
        protocol = protocols.get(name)
        return protocol, protocol.sets_for(dataset) if protocol.name != "offline" else ()
    except ValueError as e:
        raise UsageError(f"--protocol {name}: {e}") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="search/run.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("method", nargs="?", help="method to search (see --list)")
    p.add_argument("--list", action="store_true", help="list methods and their search spaces")
    p.add_argument("--preset", default="smoke", help=f"budget: {', '.join(PRESETS)} (default smoke)")
    p.add_argument("--trials", type=int, help="number of trials (preset's by default)")
    p.add_argument("--epochs", type=int, help="epochs per trial (ASHA's max_t)")
    p.add_argument("--dataset", default="cifar10",
                   help=f"{' | '.join(DATASETS)} (CIFAR made long-tailed; the large sets from their split lists)")
    p.add_argument("--imbalance-ratio", type=float, default=100.0,
                   help="IR: 10, 50 or 100 (CIFAR; the large sets' lists fix their own)")
    p.add_argument("--data-dir", default=os.environ.get("TAILTUNE_DATA_DIR"),
                   help="folder with offline archives (cifar10.tar.gz, ...) or torchvision data "
                        "[env TAILTUNE_DATA_DIR]")
    p.add_argument("--cache-dir", default=os.environ.get("TAILTUNE_CACHE_DIR"),
                   help="decoded-image cache and downloads [env TAILTUNE_CACHE_DIR, ~/.cache/tailtune]")
    p.add_argument("--no-download", action="store_true", help="never download missing data")
    p.add_argument("--test-ood", help="comma-separated test OOD sets (reported, never searched on)")
    p.add_argument("--val-ood", help="comma-separated validation OOD sets: synthetic ones or "
                                     f"{ood_sets.VAL_HOLDOUT} (tin_aux classes held out of training)")
    p.add_argument("--protocol", help=f"evaluation protocol: {', '.join(protocols.names())} (default: the "
                                      "method's paper protocol, the large set's own where that has none for it; "
                                      "offline for the smoke preset)")
    p.add_argument("--allow-missing-ood", action="store_true",
                   help="under a paper protocol, run without the test OOD sets that are missing")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="MLflow server; default: local SQLite store in ./mlruns [env MLFLOW_TRACKING_URI]")
    p.add_argument("--sampler", default="tpe", help=f"Optuna sampler: {', '.join(SAMPLERS)}")
    p.add_argument("--seed", type=int, default=0, help="sampler seed and training seed")
    p.add_argument("--grace-period", type=int, help="ASHA: epochs before a trial can be pruned")
    p.add_argument("--reduction-factor", type=float, help="ASHA reduction factor (>= 2)")
    p.add_argument("--cpus-per-trial", type=float, help="CPUs per trial (preset's by default)")
    p.add_argument("--gpus-per-trial", type=float, default=None,
                   help="fractional GPUs per trial (default: 1/max-concurrent if GPUs exist, else 0)")
    p.add_argument("--max-concurrent", type=int, help="trials running at once")
    p.add_argument("--address", default=None, help="Ray cluster address (auto or HOST:PORT); default local")
    p.add_argument("--storage", default=os.path.abspath("ray_results"), help="Ray Tune results folder")
    p.add_argument("--name", help="search name (default METHOD-DATASET-TIMESTAMP)")
    p.add_argument("--resume", nargs="?", const="latest", metavar="NAME",
                   help="continue an interrupted search (the latest of this method if no NAME)")
    p.add_argument("--space", action="append", default=[], metavar="PARAM=LOW:HIGH|VALUE",
                   help="narrow or fix a searched parameter within its allowed range")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="set a non-searched config field, e.g. --set tau_gla=2.5")
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's, Tune's, MLflow's and Optuna's own start-up and progress messages")
    return p.parse_args(argv)


# Stores a search can track to: MLflow's server, its SQL stores and its file store.
TRACKING_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "file")


def local_store_uri() -> str:
    """Returns the tracking URI used when none is given: a SQLite file under ./mlruns."""
    return f"sqlite:///{os.path.abspath(os.path.join('mlruns', 'mlflow.db'))}"


def check_writable_folder(path: str, what: str) -> None:
    """Raises UsageError (one line) unless `path` is a folder we can write in, or can be created
    under one; probes with a temporary file that is removed at once, so nothing stays."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UsageError(f"{what} {path}: {probe} is a file; expected a folder")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise UsageError(f"{what} {path}: cannot write in {probe} ({e.strerror}); "
                         f"expected a writable folder") from None


def check_sqlite_store(uri: str, path: str) -> None:
    """Raises UsageError (one line) if a SQLite tracking store is read-only or locked by another
    writer; an existing store is probed in a transaction that is rolled back."""
    check_writable_folder(os.path.dirname(os.path.abspath(path)), "--tracking-uri")
    if not os.path.exists(path):
        return
    if not os.path.isfile(path):
        raise UsageError(f"--tracking-uri {uri}: {path} is not a file; expected a SQLite database")
    import sqlite3
    try:
        conn = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=2, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("CREATE TABLE main._tailtune_probe (x)")
            conn.execute("ROLLBACK")
        finally:
            conn.close()
    except sqlite3.Error as e:
        raise UsageError(f"--tracking-uri {uri}: the SQLite store cannot be written ({e}); "
                         f"expected a writable store no other program holds locked") from None


def check_tracking_uri(uri: str | None) -> None:
    """Raises UsageError or ConnectionError (one line) unless `uri` (None: the local store) is a
    store a search can write to: an MLflow server that answers, or a writable SQLite, SQL or
    file store."""
    uri = uri or local_store_uri()
    scheme = uri.partition("://")[0].split("+")[0].lower() if "://" in uri else ""
    if not scheme:   # a plain folder: MLflow's file store
        check_writable_folder(uri, "--tracking-uri")
        return
    if scheme not in TRACKING_SCHEMES:
        raise UsageError(f"--tracking-uri {uri}: unsupported scheme {scheme!r}; accepted: "
                         f"{', '.join(f'{s}://' for s in TRACKING_SCHEMES)} or a folder")
    if scheme == "sqlite":
        if not uri.startswith("sqlite:///") or len(uri) == len("sqlite:///"):
            raise UsageError(f"--tracking-uri {uri}: expected sqlite:///PATH to a database file")
        check_sqlite_store(uri, uri[len("sqlite:///"):])
    elif scheme == "file":
        check_writable_folder(uri[len("file://"):], "--tracking-uri")
    check_server(uri)


def check_server(uri: str, timeout_s: float = 10.0) -> None:
    """Raises ConnectionError (one line, naming the URI) if an HTTP tracking server is unreachable."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.request
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s).read()
    except OSError as e:
        raise ConnectionError(f"MLflow tracking server at {uri} is not reachable ({e}); "
                              f"start it or pass another --tracking-uri") from None


def list_methods() -> None:
    for name in registry.names():
        space, method_cls = spaces.get(name), registry.get(name)
        print(f"{name}: {method_cls.summary}")
        width = max(len(p) for p in space.distributions)
        for param, dist in space.distributions.items():
            print(f"  {param:<{width}}  {spaces.describe(dist):<34} paper {space.paper_point.get(param)}")
        for dataset in DATASETS[1:] if method_cls.large_scale else DATASETS[1:2]:
            other = paper_space(name, dataset)   # without a recipe: its lr is listed below
            changed = [f"{param} {spaces.describe(dist)} paper {other.paper_point[param]:.4g}"
                       if dist != space.distributions[param] else f"{param} paper {other.paper_point[param]:.4g}"
                       for param, dist in other.distributions.items()
                       if (dist, other.paper_point[param]) != (space.distributions[param], space.paper_point[param])]
            if changed:
                print(textwrap.fill(f"on {dataset}: {'; '.join(changed)}", 100, initial_indent="  ",
                                    subsequent_indent="    "))
    from trainables import posthoc, scores
    print(f"\nOOD scores, any method (--set ood_score=NAME; default: the method's own, rna's is rn): "
          f"{', '.join(scores.NAMES)}")
    print("  --set posthoc_sweep=true tunes the score on validation ID vs validation OOD after the last "
          "epoch, over:")
    for name, grid in posthoc.GRIDS.items():
        print(f"  {name:<7} " + " x ".join(f"{field} {list(values)}" for field, values in grid.items()))
    print(f"\nLarge-set recipes (--preset {' / '.join(RECIPE_PRESETS)} on that --dataset; sources in "
          f"trainables/recipes.py):")
    for recipe in recipes.RECIPES:
        v = recipe.values
        milestones = v.get("lr_milestones", ())
        schedule = ("cosine" if v["lr_schedule"] == "cosine" else
                    "steps " + ",".join(f"{m * v['epochs']:g}" for m in milestones) if milestones else "constant")
        print(f"  {recipe.name:<23} {v['backbone']}{' pretrained' if recipe.needs_pretrained else ''}, "
              f"{v['epochs']} epochs, batch {v['batch_size']}, {v['optimizer']} {v['lr']:g}, "
              f"wd {v['weight_decay']:.0e}, {schedule}".replace("e-0", "e-"))


def dataset_tag(dataset: str, ir: float) -> str:
    if dataset in LARGE_DATASETS:   # long-tailed by their split lists, no IR
        return dataset
    return f"{dataset}-lt-ir{ir:g}"


def build_plan(args: argparse.Namespace) -> dict:
    """Returns the validated search plan (method, budget, fixed config, space); UsageError on bad input."""
    if not args.method:
        raise UsageError(f"no method given; expected one of: {', '.join(registry.names())}")
    try:
        method_cls = registry.get(args.method)
        spaces.get(args.method)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.preset not in PRESETS:
        raise UsageError(f"unknown preset {args.preset!r}; expected one of: {', '.join(PRESETS)}")
    if args.sampler not in SAMPLERS:
        raise UsageError(f"unknown sampler {args.sampler!r}; expected one of: {', '.join(SAMPLERS)}")
    if args.dataset not in DATASETS:
        raise UsageError(f"unknown dataset {args.dataset!r}; expected one of: {', '.join(DATASETS)}")
    check_large_scale(args.method, method_cls, args.dataset)
    if args.imbalance_ratio not in (10, 50, 100):
        raise UsageError(f"--imbalance-ratio {args.imbalance_ratio:g}: expected 10, 50 or 100")
    recipe = recipe_for(args.preset, args.method, args.dataset)
    preset = preset_budget(args.preset, recipe)
    budget = {k: getattr(args, k) if getattr(args, k) is not None else preset[k]
              for k in ("trials", "epochs", "grace_period", "reduction_factor", "max_concurrent",
                        "cpus_per_trial")}
    if recipe is not None and args.grace_period is None:   # --epochs shortens the recipe: so does grace
        budget["grace_period"] = asha_grace(budget["epochs"], preset["config"]["eval_every"])
    for key in ("trials", "epochs", "grace_period", "max_concurrent"):
        if budget[key] < 1:
            raise UsageError(f"--{key.replace('_', '-')} {budget[key]}: expected an integer >= 1")
    if budget["grace_period"] > budget["epochs"]:
        raise UsageError(f"--grace-period {budget['grace_period']}: must not exceed --epochs {budget['epochs']}")
    if budget["reduction_factor"] < 2:
        raise UsageError(f"--reduction-factor {budget['reduction_factor']:g}: expected >= 2")
    if budget["cpus_per_trial"] <= 0:
        raise UsageError(f"--cpus-per-trial {budget['cpus_per_trial']:g}: expected > 0")
    if args.gpus_per_trial is not None and not 0 <= args.gpus_per_trial <= 8:
        raise UsageError(f"--gpus-per-trial {args.gpus_per_trial:g}: expected a number in [0, 8]")

    space = paper_space(args.method, args.dataset, recipe)
    config = {**preset_config(args.preset, method_cls, args.imbalance_ratio, recipe),
              "dataset": args.dataset, "imbalance_ratio": args.imbalance_ratio,
              "data_dir": os.path.abspath(args.data_dir) if args.data_dir else None,
              "download": not args.no_download, "epochs": budget["epochs"], "seed": args.seed}
    if args.cache_dir:
        config["cache_dir"] = os.path.abspath(args.cache_dir)
    for flag, key in (("test_ood", "test_ood"), ("val_ood", "val_ood")):
        if getattr(args, flag):
            config[key] = tuple(n.strip() for n in getattr(args, flag).split(",") if n.strip())
    config.setdefault("test_ood", default_test_ood(args.dataset))
    bad_val = [n for n in config.get("val_ood", ()) if n not in data.synthetic_names() + [ood_sets.VAL_HOLDOUT]]
    if bad_val:
        raise UsageError(f"--val-ood {','.join(bad_val)}: validation OOD must be synthetic, one of "
                         f"{', '.join(data.synthetic_names())}, or {ood_sets.VAL_HOLDOUT} "
                         "(test sets are never searched on)")
    # The smoke preset runs on the offline archives; every other budget defaults to the paper's protocol.
    name = args.protocol or ("offline" if args.preset == "smoke" else protocols.for_method(args.method, args.dataset))
    protocol, protocol_sets = resolve_protocol(name, args.dataset)
    config.update(protocol=protocol.name, allow_missing_ood=args.allow_missing_ood)
    if protocol.name != "offline":
        if args.test_ood:
            raise UsageError(f"--test-ood with --protocol {protocol.name}: a protocol fixes its test sets "
                             f"({', '.join(protocol_sets)}); use --protocol offline")
        config["test_ood"] = protocol_sets
        if not args.val_ood and set(config["test_ood"]) & set(DEFAULT_VAL_OOD):
            config["val_ood"] = (ood_sets.VAL_HOLDOUT,)   # its noise sets are test sets here
    for item in args.set:
        key, sep, text = item.partition("=")
        if not sep:
            raise UsageError(f"--set {item!r}: expected KEY=VALUE")
        if key in space.distributions:
            raise UsageError(f"--set {key}: {key} is searched; use --space {key}=VALUE to fix it")
        if key in ("protocol", "allow_missing_ood"):
            raise UsageError(f"--set {key}: use --{key.replace('_', '-')}, which also sets the protocol's sets")
        config[key] = engine.parse_value(text)
    for item in args.space:
        name, sep, text = item.partition("=")
        if not sep:
            raise UsageError(f"--space {item!r}: expected PARAM=LOW:HIGH or PARAM=VALUE")
        try:
            space = spaces.override(space, name, text)
        except ValueError as e:
            raise UsageError(str(e)) from None
    check_pretrained(recipe, config, f"--dataset {args.dataset} --preset {args.preset}")
    try:
        method_cls.config_cls.from_dict({**config, **space.paper_point})
    except (TypeError, ValueError) as e:
        raise UsageError(f"bad config: {e}") from None
    return {"method": args.method, "budget": budget, "config": config, "space": space,
            "sampler": args.sampler, "seed": args.seed, "preset": args.preset}


def paper_space(method: str, dataset: str, recipe: recipes.Recipe | None = None) -> spaces.Space:
    """Returns the method's search space with its paper point on `dataset`: the space's own ranges
    and point for the set (spaces.get: EAT's abstention classes, COCL's λs on the large sets), then
    a searched field the config fills per data set (CALA's K: 40 on CIFAR-10, 80 on CIFAR-100) or
    the recipe sets (its learning rate) moves the point, and a log-uniform range with it
    (spaces.moved)."""
    values = dict(getattr(registry.get(method).config_cls, "DATASET_DEFAULTS", {}).get(dataset, {}))
    if recipe is not None:
        values.update(recipe.values)
    try:
        return spaces.moved(spaces.get(method, dataset), values)
    except ValueError as e:
        raise UsageError(f"{method} on {dataset}: {e}") from None


def check_pretrained(recipe: recipes.Recipe | None, config: dict, where: str) -> None:
    """Raises UsageError (one line) if the recipe fine-tunes ImageNet weights and none were given."""
    if recipe is None or not recipe.needs_pretrained or config.get("pretrained"):
        return
    arch = config.get("backbone", "auto")
    raise UsageError(f"{where}: the {recipe.name} recipe fine-tunes an ImageNet-pretrained {arch}, but no "
                     f"weights were given; expected --set pretrained=FILE (a torchvision {arch} state dict) "
                     f"or --set pretrained=imagenet (torchvision's, downloaded)")


def recipe_line(plan: dict) -> str | None:
    """Returns the line saying which large-set recipe the search trains (or that none exists)."""
    config = plan["config"]
    if config.get("recipe"):
        return f"recipe {config['recipe']}"
    if config["dataset"] in LARGE_DATASETS and plan["preset"] in RECIPE_PRESETS:
        return (f"recipe: none for {plan['method']} on {config['dataset']} in the specs; the method's "
                f"defaults apply (set the schedule with --set)")
    return None


def check_data_and_space(plan: dict) -> dict[str, str]:
    """Loads the data once (warming the cache for the workers), checks every K the space allows;
    returns the data record (the arrays are dropped: the workers load their own)."""
    method_cls = registry.get(plan["method"])
    cfg = method_cls.config_cls.from_dict({**plan["config"], **plan["space"].paper_point})
    try:
        prepared = engine.prepare(cfg, method_cls.uses_outliers)   # checks names and split first
    except ValueError as e:
        raise UsageError(str(e)) from None
    k_dist = plan["space"].distributions.get("num_experts")
    for k in getattr(k_dist, "choices", ()):
        try:
            method_cls(dataclasses.replace(cfg, num_experts=k), prepared.id.counts, "cpu")
        except ValueError as e:
            raise UsageError(f"num_experts={k}: {e}") from None
    return prepared.record


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        list_methods()
        return 0
    try:
        if args.resume:
            state, path = load_state(args)
            check_writable_folder(path, "--storage")
            check_tracking_uri(state["tracking_uri"])
        else:
            plan = build_plan(args)
            check_writable_folder(args.storage, "--storage")
            check_tracking_uri(args.tracking_uri)
            record = check_data_and_space(plan)
            line = (f"protocol {record['protocol']}: {record['protocol_title']}; OOD average over "
                    f"{record['ood_sets_covered']}" + (f" (partial: missing {record['ood_sets_missing']})"
                                                       if record["ood_sets_missing"] != "-" else ""))
            for line in (line, recipe_line(plan)):
                if line:
                    print("\n".join(textwrap.wrap(line, 100, subsequent_indent="  ", break_long_words=False,
                                                   break_on_hyphens=False)), flush=True)
            state, path = None, None
    except (UsageError, data.MissingDataError, ConnectionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from search import orchestrate  # heavy imports (ray, mlflow) only once the input is valid
    if state is None:
        return orchestrate.start(plan, record, args)
    return orchestrate.resume(state, path, args)


def load_state(args: argparse.Namespace) -> tuple[dict, str]:
    """Returns (saved search state, experiment path) for --resume; UsageError if there is none."""
    root = args.storage
    if args.resume == "latest":
        if not args.method:
            raise UsageError("--resume without NAME needs the method, e.g. search/run.py darl --resume")
        found = sorted((d for d in os.listdir(root) if d.startswith(f"{args.method}-")
                        and os.path.exists(os.path.join(root, d, STATE_FILE))),
                       key=lambda d: os.path.getmtime(os.path.join(root, d))) if os.path.isdir(root) else []
        if not found:
            raise UsageError(f"--resume: no {args.method} search found in {root}")
        name = found[-1]
    else:
        name = args.resume
    path = os.path.join(root, name)
    if not os.path.exists(os.path.join(path, STATE_FILE)):
        raise UsageError(f"--resume {name}: no search state at {path}")
    with open(os.path.join(path, STATE_FILE)) as f:
        return json.load(f), path


def default_name(method: str, dataset: str, ir: float) -> str:
    return f"{method}-{dataset_tag(dataset, ir)}-{datetime.now():%Y%m%d-%H%M%S}"


if __name__ == "__main__":
    sys.exit(main())
