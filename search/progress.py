"""Live progress in the terminal: one line per trial event, at most 100 columns.

A line reads `[elapsed] event | counts | ETA | best final`. "best final" follows the champion
rule (the best val_score at the final epoch of a completed trial, whose checkpoint is the one
registered), so a pruned trial's partial score or an early peak never shows as the best. The ETA
comes from the epochs done so far and assumes every unfinished trial runs to its last epoch (an
upper bound: ASHA prunes some).
"""
from __future__ import annotations

import logging
import os
import textwrap
import time

import optuna
from ray import tune

from search.tracking import CHAMPION_RULE

WIDTH = 100


def quiet() -> None:
    """Hides the frameworks' start-up and bookkeeping messages, which `--verbose` keeps: Ray's
    "Started a local Ray instance" and token-auth notice, Tune's experiment box and result-file
    notes, MLflow's database and signature INFO lines and its "View run" links, Optuna's study
    creation. Their other
    warnings and errors still show."""
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"   # Tune's classic reporter prints nothing at verbose=0
    logging.getLogger("ray").setLevel(logging.WARNING)
    # Ray 2.60 warns on every start that token auth is on (it is, on purpose: see the README).
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"   # "View run ... at:" per ended run
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def clock(seconds: float) -> str:
    """Returns `seconds` as m:ss, or h:mm:ss from an hour on."""
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def format_params(config: dict) -> list[str]:
    """Returns `name=value` for every sampled parameter (floats to 4 significant digits)."""
    return [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in config.items()]


def wrap(first: str, items: list[str], indent: int) -> list[str]:
    """Returns `first` followed by the comma-separated `items`, wrapped to WIDTH columns with
    continuation lines indented by `indent`; every item appears whole."""
    return textwrap.wrap(first + " " + ", ".join(items), WIDTH, subsequent_indent=" " * indent,
                         break_long_words=False, break_on_hyphens=False)


class Progress(tune.Callback):
    def __init__(self, metric: str, epochs: int, total: int, rule: str = CHAMPION_RULE):
        self.metric, self.epochs, self.total = metric, epochs, total
        self.done = self.pruned = self.failed = 0
        self.epochs_seen: dict[str, int] = {}     # trial -> last epoch reported
        self.finished: set[str] = set()           # completed, pruned or failed
        self.best: tuple[float, str] | None = None
        self.started = time.time()
        self.first_start: float | None = None
        self.epochs_before = 0                    # epochs done before a resume (not timed here)
        print(f"live lines: [elapsed] trial epoch/{epochs}: {metric} | trials done, pruned | ETA | "
              f"best final {metric}", flush=True)
        print(textwrap.fill(rule, WIDTH, subsequent_indent="  "), flush=True)

    def __setstate__(self, state: dict) -> None:   # a resumed search: time from now on
        self.__dict__.update(state)
        self.started, self.first_start = time.time(), None
        self.epochs_before = sum(self.epochs_seen.values())

    def remaining_epochs(self) -> int:
        """Epochs left if every unfinished trial (started or not) runs to its last epoch."""
        running = [t for t in self.epochs_seen if t not in self.finished]
        unstarted = self.total - len(self.epochs_seen)
        return sum(self.epochs - self.epochs_seen[t] for t in running) + unstarted * self.epochs

    def eta(self, now: float | None = None) -> str:
        done = sum(self.epochs_seen.values()) - self.epochs_before
        if done <= 0 or self.first_start is None:
            return "ETA -"
        rate = done / ((now or time.time()) - self.first_start)   # epochs per second, all trials together
        return f"ETA {clock(self.remaining_epochs() / rate)}"

    def _line(self, *texts: str) -> None:
        """Prints the first of `texts` (longest to shortest form of one event) that fits."""
        counts = f"done {self.done} pruned {self.pruned}" + (f" failed {self.failed}" if self.failed else "")
        best = f"best final {self.best[0]:.4f} {self.best[1]}" if self.best else "best final -"
        tail = f" | {counts} | {self.eta():<8} | {best:<26}"   # fixed widths keep the columns aligned
        head = f"[{clock(time.time() - self.started):>7}] "
        room = WIDTH - len(head) - len(tail)
        text = next((t for t in texts if len(t) <= room), texts[-1][:room])
        print(f"{head}{text:<{room}}{tail}".rstrip(), flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        if self.first_start is None:
            self.first_start = time.time()
        self.epochs_seen.setdefault(trial.trial_id, 0)
        self._line(f"start {trial.trial_id} ({len(self.epochs_seen)}/{self.total})")
        for line in wrap(f"{'':9}{trial.trial_id} params:", format_params(trial.config), 11):
            print(line, flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        epoch = int(result.get("epoch", 0))
        self.epochs_seen[trial.trial_id] = epoch
        value = result.get(self.metric)
        if value is None:
            self._line(f"{trial.trial_id} epoch {epoch}/{self.epochs}")
            return
        if epoch >= self.epochs and (self.best is None or value > self.best[0]):
            self.best = (float(value), trial.trial_id)
        self._line(f"{trial.trial_id} epoch {epoch}/{self.epochs}: {value:.4f}",
                   f"{trial.trial_id} {epoch}/{self.epochs}: {value:.4f}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.finished.add(trial.trial_id)
        epochs = (trial.last_result or {}).get("epoch", 0)
        if epochs >= self.epochs:
            self.done += 1
            self._line(f"{trial.trial_id} complete")
        else:
            self.pruned += 1
            self._line(f"{trial.trial_id} pruned after {epochs} epoch(s)", f"{trial.trial_id} pruned at {epochs}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.finished.add(trial.trial_id)
        self.failed += 1
        self._line(f"{trial.trial_id} failed")
