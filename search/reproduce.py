#!/usr/bin/env python
"""Reproduce a paper's numbers: the paper point (or a search's champion) over seeds, side by side.

    python search/reproduce.py darl                     # paper budget, the paper's run count of seeds
    python search/reproduce.py darl --seeds 3 --epochs 400 --tracking-uri http://host:5000
    python search/reproduce.py la --seeds 2 --epochs 2 --preset smoke --protocol offline   # CPU-sized
    python search/reproduce.py darl --champion          # the registered champion's searched values
    python search/reproduce.py darl --resume NAME       # continue an interrupted reproduction

Each seed is one trial under Ray Tune (a grid over the seeds), trained on the papers' exact split
(CIFAR-10 IR100: 12,406 images, n_max 5000; validation from the training images the build leaves
unused), at fp32 unless `--precision` says otherwise, scored under the paper's protocol, and
reported at its final epoch. The table (metric | paper | ours mean ± std | diff) is printed and
logged to a parent MLflow run tagged `tailtune.kind=reproduction`, one child run per seed.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import textwrap

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from search.run import (PRESETS, UsageError, check_large_scale, check_pretrained,  # noqa: E402
                        check_tracking_uri, check_writable_folder, dataset_tag, paper_space, preset_budget,
                        preset_config, resolve_protocol)
from trainables import data, engine, papers, protocols, recipes, registry  # noqa: E402
from trainables.config import LARGE_DATASETS, default_test_ood  # noqa: E402

STATE_FILE = "reproduction.json"
CHECKPOINT_RULE = "final epoch (as the papers report; nothing is selected)"
PRECISIONS = ("fp32", "bf16", "auto")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="search/reproduce.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("method", nargs="?", help=f"method to reproduce: {', '.join(papers.methods())}")
    p.add_argument("--dataset", default="cifar10",
                   help=f"cifar10 | cifar100 (long-tailed, IR 100) | {' | '.join(LARGE_DATASETS)} (the paper's "
                        "recipe, trainables.recipes)")
    p.add_argument("--seeds", type=int, help="number of seeds (default: the paper's run count, else 3)")
    p.add_argument("--seed-list", help="comma-separated training seeds, e.g. 0,1,2 (instead of --seeds)")
    p.add_argument("--epochs", type=int, help="epochs per seed (default: the method's paper schedule; "
                                              "the preset's for smoke and small)")
    p.add_argument("--preset", default="paper", help=f"data and evaluation budget: {', '.join(PRESETS)} "
                                                     "(default paper: the full data)")
    p.add_argument("--protocol", help="evaluation protocol (default: the one the paper's numbers used)")
    p.add_argument("--allow-missing-ood", action="store_true",
                   help="run without the protocol's test OOD sets that are missing (the average then differs)")
    p.add_argument("--precision", default="fp32", help="training precision: fp32 (default, as the papers), "
                                                       "bf16 (opt-in, faster on GPUs) or auto")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--champion", action="store_true",
                        help="use the searched values of the registered champion METHOD-DATASET@champion")
    source.add_argument("--from-search", metavar="NAME", help="use the searched values of search NAME's champion")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="set a config field")
    p.add_argument("--data-dir", default=os.environ.get("TAILTUNE_DATA_DIR"),
                   help="folder with offline archives or torchvision data [env TAILTUNE_DATA_DIR]")
    p.add_argument("--cache-dir", default=os.environ.get("TAILTUNE_CACHE_DIR"),
                   help="decoded-image cache [env TAILTUNE_CACHE_DIR, ~/.cache/tailtune]")
    p.add_argument("--no-download", action="store_true", help="never download missing data")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="MLflow server; default: local SQLite store in ./mlruns [env MLFLOW_TRACKING_URI]")
    p.add_argument("--cpus-per-trial", type=float, help="CPUs per seed (default: all on a CPU-only machine, else 1)")
    p.add_argument("--gpus-per-trial", type=float, default=None, help="fractional GPUs per seed")
    p.add_argument("--max-concurrent", type=int, help="seeds training at once (default: 1 on CPU, up to 4 on GPU)")
    p.add_argument("--address", default=None, help="Ray cluster address (auto or HOST:PORT); default local")
    p.add_argument("--storage", default=os.path.abspath("ray_results"), help="Ray Tune results folder")
    p.add_argument("--name", help="reproduction name (default reproduce-METHOD-DATASET-TIMESTAMP)")
    p.add_argument("--resume", metavar="NAME", help="continue an interrupted reproduction")
    p.add_argument("--verbose", action="store_true", help="show the frameworks' own messages")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- the table


def summarize(entry: papers.PaperResult, per_seed: list[dict[str, float]]) -> list[dict]:
    """Returns one row per paper metric: the paper's value (and ±), our mean and sample standard
    deviation (ddof 1; nan for one seed) over the seeds, in %, and ours minus the paper's."""
    rows = []
    for key in papers.METRICS:
        if key not in entry.values:
            continue
        ours = [100 * float(m[key]) for m in per_seed if m.get(key) is not None and math.isfinite(m[key])]
        mean = float(np.mean(ours)) if ours else math.nan
        std = float(np.std(ours, ddof=1)) if len(ours) > 1 else math.nan
        rows.append({"metric": key, "label": papers.METRICS[key], "paper": entry.values[key],
                     "paper_std": entry.std.get(key, math.nan), "mean": mean, "std": std, "n": len(ours),
                     "diff": mean - entry.values[key]})
    return rows


def _pm(value: float, std: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:.2f}" + ("" if math.isnan(std) else f" ± {std:.2f}")


def format_table(rows: list[dict]) -> str:
    """Returns the rows as a Markdown table: metric | paper | ours mean ± std (n) | diff."""
    lines = ["| metric | paper | ours (n seeds) | diff |", "|---|---:|---:|---:|"]
    for r in rows:
        diff = "-" if math.isnan(r["diff"]) else f"{r['diff']:+.2f}"
        lines.append(f"| {r['label']} | {_pm(r['paper'], r['paper_std'])} | {_pm(r['mean'], r['std'])} "
                     f"({r['n']}) | {diff} |")
    return "\n".join(lines)


def describe(plan: dict, record: dict[str, str]) -> list[str]:
    """Returns the lines that say what the table compares: the paper's row, our setting, the rules."""
    entry, cfg = plan["entry"], plan["config"]
    protocol = protocols.get(cfg["protocol"])
    lines = [f"paper:      {entry.source}" + (f" ({entry.runs} runs)" if entry.runs else ""),
             f"ours:       {plan['method']} at {plan['params_from']}, seeds {','.join(map(str, plan['seeds']))}, "
             f"{cfg['epochs']} epochs, {cfg['precision']}",
             f"split:      {record['train_size']} training images, n_max {record['n_max']} ({record['lt_rule']}); "
             f"validation {record['val_size']} images"
             + (f" (per class {record['val_counts']})" if "val_counts" in record else ""),
             f"protocol:   {protocol.name}: {protocol.title}; OOD average over {record['ood_sets_covered']}"
             + ("" if record["ood_sets_missing"] == "-" else f" (partial: missing {record['ood_sets_missing']})"),
             *([f"recipe:     {cfg['recipe']}"] if cfg.get("recipe") else []),
             f"checkpoint: {CHECKPOINT_RULE}",
             "FPR95 and AUPR rows name their convention; values in %, diff = ours - paper"]
    if protocol.name != entry.protocol:
        lines.append(f"NOTE: the paper's numbers use protocol '{entry.protocol}', this run '{protocol.name}': "
                     "the OOD rows are not comparable")
    if entry.note:
        lines.append(f"note:       {entry.note}")
    return lines


# ----------------------------------------------------------------------------- the plan


def seeds_of(args: argparse.Namespace, entry: papers.PaperResult, first: int) -> list[int]:
    """Returns the training seeds: --seed-list, or --seeds (default the paper's run count, else 3)
    consecutive seeds from the method's default seed (its paper code's)."""
    if args.seed_list is not None:
        if args.seeds is not None:
            raise UsageError(f"--seeds {args.seeds} with --seed-list {args.seed_list}: give one of them")
        try:
            seeds = [int(s) for s in args.seed_list.split(",") if s.strip()]
        except ValueError:
            raise UsageError(f"--seed-list {args.seed_list}: expected comma-separated integers >= 0") from None
        if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
            raise UsageError(f"--seed-list {args.seed_list}: expected distinct integers >= 0")
        return seeds
    count = args.seeds if args.seeds is not None else (entry.runs or 3)
    if count < 1:
        raise UsageError(f"--seeds {count}: expected an integer >= 1")
    return [first + i for i in range(count)]


def build_plan(args: argparse.Namespace, searched: dict | None = None) -> dict:
    """Returns the validated reproduction plan; UsageError (one line) on bad input."""
    if not args.method:
        raise UsageError(f"no method given; expected one of: {', '.join(papers.methods())}")
    try:
        method_cls = registry.get(args.method)
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        entry = papers.get(args.method, args.dataset)
    except ValueError as e:
        raise UsageError(str(e)) from None
    check_large_scale(args.method, method_cls, args.dataset)
    if args.preset not in PRESETS:
        raise UsageError(f"unknown preset {args.preset!r}; expected one of: {', '.join(PRESETS)}")
    if args.precision not in PRECISIONS:
        raise UsageError(f"--precision {args.precision}: expected one of {', '.join(PRECISIONS)}")
    if args.epochs is not None and args.epochs < 1:
        raise UsageError(f"--epochs {args.epochs}: expected an integer >= 1")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise UsageError(f"--max-concurrent {args.max_concurrent}: expected an integer >= 1")
    if args.cpus_per_trial is not None and args.cpus_per_trial <= 0:
        raise UsageError(f"--cpus-per-trial {args.cpus_per_trial:g}: expected > 0")
    name = args.protocol or entry.protocol
    protocol = resolve_protocol(name, args.dataset)[0]
    preset = PRESETS[args.preset]
    defaults = method_cls.config_cls()
    # On a large set the paper point trains with the paper's recipe, whatever the preset's budget.
    recipe = recipes.get(args.method, args.dataset)
    if recipe is not None:
        epochs = args.epochs or preset_budget(args.preset, recipe)["epochs"]
    else:
        epochs = args.epochs or (defaults.epochs if args.preset == "paper" else preset["epochs"])
    point = {**paper_space(args.method, args.dataset, recipe).paper_point, **(searched or {})}
    config = {**preset_config(args.preset, method_cls, entry.imbalance_ratio, recipe), **point,
              "dataset": args.dataset, "imbalance_ratio": entry.imbalance_ratio,
              "protocol": protocol.name, "allow_missing_ood": args.allow_missing_ood,
              "data_dir": os.path.abspath(args.data_dir) if args.data_dir else None,
              "download": not args.no_download, "epochs": epochs, "precision": args.precision}
    if args.dataset not in LARGE_DATASETS:   # the papers' CIFAR split: nothing held out before the LT build
        config["val_source"] = "unused"
    if args.cache_dir:
        config["cache_dir"] = os.path.abspath(args.cache_dir)
    if protocol.name == "offline":   # the offline sets, the other CIFAR as near-OOD (as search/run.py)
        config["test_ood"] = default_test_ood(args.dataset)
    elif set(protocol.sets_for(args.dataset)) & set(defaults.val_ood):
        config["val_ood"] = ("tin_aux_holdout",)   # its noise sets are test sets here
    for item in args.set:
        key, sep, text = item.partition("=")
        if not sep:
            raise UsageError(f"--set {item!r}: expected KEY=VALUE")
        if key in ("seed", "epochs", "protocol", "precision", "dataset"):
            raise UsageError(f"--set {key}: use --{'seed-list' if key == 'seed' else key}")
        config[key] = engine.parse_value(text)
    check_pretrained(recipe, config, f"--dataset {args.dataset}")
    seeds = seeds_of(args, entry, defaults.seed)
    try:
        method_cls.config_cls.from_dict({**config, "seed": seeds[0]})
    except (TypeError, ValueError) as e:
        raise UsageError(f"bad config: {e}") from None
    gpus = _gpu_count()
    budget = {"epochs": epochs,
              "max_concurrent": args.max_concurrent or (min(len(seeds), 4) if gpus else 1),
              "cpus_per_trial": args.cpus_per_trial or (1.0 if gpus else float(os.cpu_count() or 1))}
    return {"method": args.method, "entry": entry, "config": config, "seeds": seeds, "budget": budget,
            "params_from": "the paper point" if searched is None else args.params_from}


def _gpu_count() -> int:
    import torch
    return torch.cuda.device_count()


def champion_values(args: argparse.Namespace, uri: str) -> dict | None:
    """Returns the searched values of a champion (--champion or --from-search) read from MLflow,
    or None for the paper point; sets args.params_from to what they came from."""
    if not (args.champion or args.from_search):
        return None
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from search import tracking
    client = MlflowClient(uri)
    if args.champion:
        model = f"{args.method}-{dataset_tag(args.dataset, 100)}"
        try:
            version = client.get_model_version_by_alias(model, "champion")
        except MlflowException:
            raise UsageError(f"--champion: no registered model {model}@champion at {uri}; run "
                             f"search/run.py {args.method} first or pass --from-search NAME") from None
        run_id, args.params_from = version.run_id, f"champion models:/{model}/{version.version}"
    else:
        found = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                   f"tags.`tailtune.search` = '{args.from_search}'")
        found = [r for r in found if r.data.tags.get("tailtune.best_run_id")]
        if not found:
            raise UsageError(f"--from-search {args.from_search}: no finished search of that name with a "
                             f"champion at {uri}")
        if found[0].data.tags.get("tailtune.method") != args.method:
            raise UsageError(f"--from-search {args.from_search}: a search of "
                             f"{found[0].data.tags.get('tailtune.method')}, not of {args.method}")
        run_id, args.params_from = found[0].data.tags["tailtune.best_run_id"], f"search {args.from_search}'s champion"
    run = client.get_run(run_id)
    names = [n for n in run.data.tags.get(tracking.SEARCHED_TAG, "").split(",") if n]
    args.params_from += f" (run {run_id})"
    return {n: engine.parse_value(run.data.params[n]) for n in names if n in run.data.params}


def check_data(plan: dict) -> dict[str, str]:
    """Loads the data once (warming the cache for the workers); returns the data record."""
    method_cls = registry.get(plan["method"])
    cfg = method_cls.config_cls.from_dict({**plan["config"], "seed": plan["seeds"][0]})
    try:
        return engine.prepare(cfg, method_cls.uses_outliers).record
    except ValueError as e:
        raise UsageError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.params_from = "the paper point"
    try:
        if args.resume:
            from search import reproduction
            state, path = reproduction.load_state(args.storage, args.resume)
            check_tracking_uri(state["tracking_uri"])
        else:
            build_plan(args)   # bad input is refused before MLflow or the data are touched
            check_writable_folder(args.storage, "--storage")
            check_tracking_uri(args.tracking_uri)
            from search import tracking
            uri = args.tracking_uri or tracking.default_tracking_uri()
            plan = build_plan(args, champion_values(args, uri))
            record = check_data(plan)
            for line in describe(plan, record):
                print("\n".join(textwrap.wrap(line, 100, subsequent_indent="  ", break_long_words=False,
                                               break_on_hyphens=False)), flush=True)
    except (UsageError, data.MissingDataError, ConnectionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from search import reproduction   # heavy imports (ray, mlflow) only once the input is valid
    if args.resume:
        return reproduction.resume(state, path, args)
    return reproduction.start(plan, record, args, uri)


if __name__ == "__main__":
    sys.exit(main())
