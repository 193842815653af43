"""Live progress in the terminal: one line per trial event, with the counts and the best so far."""
from __future__ import annotations

import time

from ray import tune


class Progress(tune.Callback):
    def __init__(self, metric: str, epochs: int, total: int):
        self.metric, self.epochs, self.total = metric, epochs, total
        self.done = self.pruned = self.failed = 0
        self.running: set[str] = set()
        self.best: tuple[float, str] | None = None
        self.started = time.time()

    def _line(self, text: str) -> None:
        best = f"best {self.metric} {self.best[0]:.4f} ({self.best[1]})" if self.best else "best -"
        print(f"[{time.time() - self.started:6.0f}s] {text:<58} | running {len(self.running)} "
              f"done {self.done} pruned {self.pruned} failed {self.failed} of {self.total} | {best}",
              flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.running.add(trial.trial_id)
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in trial.config.items())
        self._line(f"start {trial.trial_id}: {params}"[:58])

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(self.metric)
        if value is not None and (self.best is None or value > self.best[0]):
            self.best = (float(value), trial.trial_id)
        self._line(f"{trial.trial_id} epoch {result.get('epoch')}/{self.epochs} "
                   f"{self.metric} {value:.4f}" if value is not None else trial.trial_id)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        epochs = (trial.last_result or {}).get("epoch", 0)
        if epochs >= self.epochs:
            self.done += 1
            self._line(f"{trial.trial_id} complete")
        else:
            self.pruned += 1
            self._line(f"{trial.trial_id} pruned after {epochs} epoch(s)")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        self.failed += 1
        self._line(f"{trial.trial_id} failed")
