"""Searchers whose restored state agrees with the restored trials, so that a resumed search ends.

Why: Tune saves a search as two files, the trials (`experiment_state-*.json`) and the searcher
(`basic-variant-state-*.json`; Optuna's: `search_gen_state-*.json`), written together into a staging folder and then copied to storage
by a background thread, one file after the other. A driver killed during that copy (a lost pod;
the killed-driver test) leaves storage with one file newer than the other. Restored from such a
pair, the searcher can count as live a trial that the restored trial list holds as finished:
it never hears of that trial's end, so with `max_concurrent_trials` reached it never hands out
another trial and never finishes, while the controller, with nothing pending or running, waits
for it (`TuneController._update_trial_queue(blocking=True)`, 600 s at a time, forever). Seen in
CI: the resumed search sat at 0 % CPU with every trial done (issue 26). The opposite pair loses a
trial the searcher had handed out (never run, never finished) or hands out one again.

The fix: the trial list is the truth. On restore, a searcher takes its live trials from the
restored trials that will run again, and the variant generator replays its sequence from the
start, skipping the trials the controller already has; so a trial lost between the two files is
handed out again, and none twice. Written for the Ray that locks/ pins (2.60): the trial list's
format is Tune's (`tests/test_tune.py` resumes from inconsistent pairs of files).
"""

from __future__ import annotations

import copy
import glob
import itertools
import json
import os

from ray.tune.search import ConcurrencyLimiter, SearchGenerator
from ray.tune.search.basic_variant import BasicVariantGenerator

# Statuses of a restored trial that the controller queues again (resume_unfinished=True): these
# will report their end to the searcher; finished or errored ones never will.
UNFINISHED = {"PENDING", "RUNNING", "PAUSED"}


def restored_trial_states(dirpath: str) -> dict[str, str]:
    """{trial id: status} in the trial list the controller restored: the newest experiment state
    file in the staging folder that Tune downloaded the saved search into."""
    from ray.tune.execution.tune_controller import TuneController

    files = glob.glob(os.path.join(dirpath, TuneController.CKPT_FILE_TMPL.format("*")))
    if not files:
        return {}
    with open(max(files)) as f:  # the newest by name, as Tune picks it
        state = json.load(f)
    trials = (json.loads(trial_json) for trial_json, _runtime in state["trial_data"])
    return {t["trial_id"]: t["status"] for t in trials}


class ResumableVariantGenerator(BasicVariantGenerator):
    """Tune's grid/random generator, resumable from a searcher state older or newer than the trials."""

    def add_configurations(self, experiments):
        super().add_configurations(experiments)
        # The generator as it was before handing out any trial: a restore replays it from here (the
        # same trial ids and configs: ids count up, the sampler is seeded).
        self._unstarted = copy.deepcopy(self._iterators)
        self._restored: dict[str, str] = {}

    def restore_from_dir(self, dirpath: str):
        super().restore_from_dir(dirpath)
        self._restored = restored_trial_states(dirpath)
        self._live_trials = {tid for tid, status in self._restored.items() if status in UNFINISHED}
        if not hasattr(self, "_unstarted"):  # saved by a tl before this class: its live trials set right, no replay
            return
        self._iterators = copy.deepcopy(self._unstarted)
        self._trial_generator = itertools.chain(*self._iterators)
        self._trial_iter = None
        self._finished = False

    def next_trial(self):
        while True:
            live_before = set(self._live_trials)
            trial = super().next_trial()
            if trial is None or trial.trial_id not in self._restored:
                return trial
            if trial.trial_id not in live_before:  # the controller has it already: not handed out again
                self._live_trials.discard(trial.trial_id)


class ResumableSearchGenerator(SearchGenerator):
    """Tune's wrapper of a model-based searcher (Optuna): on restore, its concurrency limiter
    counts as live only the restored trials that will run again. A trial handed out but lost
    between the two files is not asked for again: the search then ends one trial short and says
    so (SearchInterrupted), and the next --resume has nothing left to add."""

    def restore_from_dir(self, dirpath: str):
        super().restore_from_dir(dirpath)
        unfinished = {tid for tid, status in restored_trial_states(dirpath).items() if status in UNFINISHED}
        searcher = self.searcher
        while searcher is not None:
            if isinstance(searcher, ConcurrencyLimiter):
                searcher.live_trials = searcher.live_trials & unfinished
                searcher.num_unfinished_live_trials = len(searcher.live_trials)
            searcher = getattr(searcher, "searcher", None)
