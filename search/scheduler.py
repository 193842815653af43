"""ASHA whose decisions survive an interrupted search.

Ray Tune saves the trials and the searcher with the experiment but not the scheduler: a
restored search starts ASHA with empty rungs, so the first trial to reach a rung after a resume
is never pruned, and later cutoffs ignore every result recorded before the interruption. This
ASHA writes its rungs (and the trials it stopped) to a JSON file in the search's folder after
every decision and reads them back the first time it is used after a restore, so a resumed
search prunes exactly as an uninterrupted one would.
"""
from __future__ import annotations

import json
import os

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

# Not *.json or *.pkl: Tune copies those from the search's folder to its staging folder on a
# restore and back at the end, which would put the state read at the restore over the newer one.
STATE_FILE = "asha.state"


class ResumableASHA(ASHAScheduler):
    def __init__(self, state_dir: str, **asha):
        super().__init__(**asha)
        self.state_path = os.path.join(state_dir, STATE_FILE)
        self._stopped: set[str] = set()
        self._loaded = False

    def _load_once(self) -> None:
        """Reads the saved rungs on first use (after a restore, Tune hands back the scheduler as
        it was when the search started, with empty rungs)."""
        if self._loaded:
            return
        self._loaded = True
        if not os.path.exists(self.state_path):
            return
        with open(self.state_path) as f:
            saved = json.load(f)
        for bracket, rungs in zip(self._brackets, saved["brackets"]):
            bracket._rungs = [(milestone, dict(recorded)) for milestone, recorded in rungs]
        self._stopped = set(saved["stopped"])
        self._num_stopped = saved["num_stopped"]

    def _save(self) -> None:
        state = {"brackets": [[[m, r] for m, r in b._rungs] for b in self._brackets],
                 "stopped": sorted(self._stopped), "num_stopped": self._num_stopped}
        tmp = f"{self.state_path}.tmp"
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.replace(tmp, self.state_path)   # a kill mid-write leaves the previous state whole

    def on_trial_add(self, tune_controller, trial) -> None:
        self._load_once()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        self._load_once()
        if trial.trial_id in self._stopped:   # stopped before the interruption, rerun from a checkpoint
            return TrialScheduler.STOP
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP:
            self._stopped.add(trial.trial_id)
        self._save()
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._load_once()
        super().on_trial_complete(tune_controller, trial, result)
        self._save()
