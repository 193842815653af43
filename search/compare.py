#!/usr/bin/env python
"""One trial per method at its paper point, on one shared budget: the comparison table.

    python search/compare.py --epochs 6 --set n_max=200 --out compare.csv [--methods ce,la,...]

Every method trains on the same long-tailed split, validation split and test sets, with its own
recipe (model, optimiser, schedule, batch composition, test-time score) and its paper's
hyperparameters; only the shared budget (`--epochs`, `--set`) is imposed on all. Trials run
without Ray, one after another, and the table (markdown) is printed and written as CSV.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from search.run import paper_space  # noqa: E402
from trainables import engine, registry  # noqa: E402

OFFLINE_TEST_OOD = ("cifar100", "tin", "textures", "mnist", "fashion_mnist")
COLUMNS = [("test_acc", "ACC"), ("test_acc_head", "head"), ("test_acc_middle", "middle"),
           ("test_acc_tail", "tail"), ("test_auroc", "AUROC"), ("test_fpr95", "FPR95"),
           ("val_score", "val score")]


def check_same_sets(rows: list[dict]) -> None:
    """Raises ValueError if the rows' OOD averages cover different sets: a column holds one
    average, over one list of sets."""
    lists = {row["ood_sets"] for row in rows}
    if len(lists) > 1:
        raise ValueError("OOD averages over different sets cannot share a column: " + "; ".join(
            f"{row['method']}: {row['ood_sets']}" for row in rows) + "; give every method the same sets")


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="search/compare.py", description=__doc__.split("\n")[0])
    p.add_argument("--methods", default=",".join(registry.names()),
                   help=f"comma-separated methods (default all: {','.join(registry.names())})")
    p.add_argument("--epochs", type=int, default=6, help="epochs per method (default 6)")
    p.add_argument("--data-dir", default=os.environ.get("TAILTUNE_DATA_DIR"),
                   help="folder with offline archives (cifar10.tar.gz, ...) [env TAILTUNE_DATA_DIR]")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a budget field imposed on every method (n_max, batch_size, ...)")
    p.add_argument("--out", default="compare.csv", help="CSV file for the table (default compare.csv)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = make_parser()
    args = p.parse_args(argv)
    shared = {"epochs": args.epochs, "data_dir": args.data_dir, "test_ood": OFFLINE_TEST_OOD}
    shared.update(engine.parse_settings(p, args.set))
    try:   # every method's config is checked before the first one trains
        configs = [(registry.get(name), name) for name in args.methods.split(",")]
        dataset = shared.get("dataset", "cifar10")   # each method at its paper point on this set (CALA's K)
        configs = [(m, m.config_cls.from_dict({**shared, **paper_space(name, dataset).paper_point}), name)
                   for m, name in configs]
    except (TypeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = []
    for method_cls, cfg, name in configs:
        started = time.time()
        prepared = engine.prepare(cfg, method_cls.uses_outliers)
        with tempfile.TemporaryDirectory() as out:
            last = engine.fit(method_cls, cfg, engine.LocalReporter(out), prepared)
        row = {"method": name, **{key: last[key] for key, _ in COLUMNS},
               "minutes": (time.time() - started) / 60, "ood_sets": prepared.record["ood_sets_covered"]}
        rows.append(row)
        try:
            check_same_sets(rows)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"{name}: " + ", ".join(f"{label} {row[key]:.3f}" for key, label in COLUMNS), flush=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nAUROC and FPR95: unweighted means over {rows[0]['ood_sets']}")
    print("| method | " + " | ".join(label for _, label in COLUMNS) + " | minutes |")
    print("|---|" + "---:|" * (len(COLUMNS) + 1))
    for row in rows:
        print(f"| {row['method']} | " + " | ".join(f"{100 * row[key]:.1f}" for key, _ in COLUMNS)
              + f" | {row['minutes']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
