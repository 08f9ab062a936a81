"""One trial of a search: the training core (`loop.fit`) as a Ray Tune function trainable.

A one-worker trial runs `fit` directly in the trial's process with a `TuneSession`: no worker
group to start, so ASHA can stop trials and start new ones freely. (The V2 Tune + Train pattern,
a TorchTrainer inside each trial, deadlocked here with ASHA on 2 CPUs: ../shared/STACK-NOTES.md.)

A trial with `workers > 1` does need a worker group: it runs a TorchTrainer inside the trial, and
every report of the workers travels to Tune through `ForwardReports`. The trial's own process then
only waits, so it asks for a token 0.01 CPU (Tune refuses 0) and its workers share the rest.
"""

from __future__ import annotations

import os
import threading

import torch
from ray.train import UserCallback

from tl_core.config import TrainConfig
from tl_core.train.ray_runner import make_trainer, quiet_ray_train_reports
from tl_core.train.session import LocalSession, read_ray_checkpoint, report_to_ray

TRIAL_PROCESS_CPU = 0.01


class TuneSession(LocalSession):
    """One process inside a Tune trial: metrics and checkpoints go to `ray.tune.report`, and a
    resumed trial starts from its latest checkpoint (`ray.tune.get_checkpoint`). Without
    `epoch_reports`, only the trial's end is reported (SearchConfig.epoch_reports); without
    `keep_models`, no checkpoint is (SearchConfig.keep_models)."""

    def __init__(self, use_gpu: bool | None = None, epoch_reports: bool = True, keep_models: bool = True):
        super().__init__(use_gpu)
        self.epoch_reports = epoch_reports
        self.keep_models = keep_models

    def restore(self) -> dict | None:
        from ray import tune

        return read_ray_checkpoint(tune.get_checkpoint())  # set when Tune restarts this trial

    def report(self, metrics: dict, checkpoint: dict | None = None) -> None:
        from ray import tune

        report_to_ray(tune.report, tune.Checkpoint, metrics, checkpoint if self.keep_models else None)


def run_trial(config: dict, cpus: float, workdir: str, storage_path: str, storage_filesystem=None,
              epoch_reports: bool = True, keep_models: bool = True) -> None:
    """The trainable: Tune calls it with one point of the search space (a whole TrainConfig)."""
    cfg = TrainConfig(**config)
    os.environ["TL_WORKDIR"] = workdir  # the search's work directory (caches), as Ray Train runs carry theirs
    quiet_ray_train_reports()  # a line per checkpoint (one per epoch here) on the driver's terminal
    if cfg.workers == 1:
        from tl_core.train.loop import fit

        torch.set_num_threads(max(1, int(cpus)))
        fit(cfg, TuneSession(cfg.use_gpu, epoch_reports, keep_models))
    else:
        run_trial_on_ray_train(cfg, cpus, workdir, storage_path, storage_filesystem)


class ForwardReports(UserCallback):
    """Puts each report of a Ray Train run's workers (rank 0's metrics, and the path of the
    checkpoint Ray Train kept) on a queue, for the trial's thread to hand to `tune.report`.

    Why not Ray's own `TuneReportCallback`: it has the trial actor's main thread report to Tune
    itself, beside the trial's thread, which reports once more when `fit` returns. When the main
    thread is slow with the last report (seen under load, 2 cores), both land in Tune's one-slot
    result queue and the trial waits on itself forever. Here only the trial's thread reports."""

    def __init__(self, queue):
        self.queue = queue

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        self.queue.put({**metrics[0], **({"checkpoint_path": checkpoint.path} if checkpoint else {})})


def run_trial_on_ray_train(cfg: TrainConfig, cpus: float, workdir: str, storage_path: str, storage_filesystem) -> None:
    from ray import tune
    from ray.util.queue import Queue

    context = tune.get_context()
    reports = Queue(actor_options={"num_cpus": 0})
    # A resumed trial reruns this with the same name: Ray Train restarts from the run's latest checkpoint.
    trainer = make_trainer(cfg, f"{context.get_experiment_name()}-{context.get_trial_id()}", workdir, storage_path,
                           storage_filesystem, cpus_per_worker=(cpus - TRIAL_PROCESS_CPU) / cfg.workers,
                           callbacks=[ForwardReports(reports)], num_to_keep=1)
    failure = []

    def run() -> None:
        try:
            trainer.fit()
        except BaseException as err:  # raised again in the trial's thread, where Tune sees it
            failure.append(err)
        finally:
            reports.put(None)  # the run's end, after its last report

    runner = threading.Thread(target=run, name="ray-train-run", daemon=True)
    runner.start()
    while (metrics := reports.get()) is not None:
        tune.report(metrics)
    runner.join()
    if failure:
        raise failure[0]


def trainable(cpus_per_trial: float, storage_path: str, storage_filesystem=None, epoch_reports: bool = True,
              keep_models: bool = True):
    """`run_trial` with its resources, as Tuner and Tuner.restore take it."""
    from ray import tune

    from tl_core.ray_cluster import absolute_workdir

    def resources(config: dict) -> dict:
        # A multi-worker trial's process only waits on its workers (they take cpus_per_trial).
        return {"cpu": TRIAL_PROCESS_CPU if config["workers"] > 1 else cpus_per_trial}

    fn = tune.with_parameters(run_trial, cpus=cpus_per_trial, workdir=absolute_workdir(), storage_path=storage_path,
                              storage_filesystem=storage_filesystem, epoch_reports=epoch_reports,
                              keep_models=keep_models)
    return tune.with_resources(fn, resources)
