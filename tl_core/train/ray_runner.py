"""Run the training core as the `train_loop_per_worker` of a Ray Train `TorchTrainer`.

N workers (`--workers`), GPUs where the cluster has them, the cluster named by `RAY_ADDRESS`
(else a local Ray). Checkpoints go to `RunConfig(storage_path=<workdir>/ray)`, local or s3://;
running the same config again under the same name resumes from its latest checkpoint.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Sequence

from tl_core import storage
from tl_core.checkpoints import PACKAGED, load_checkpoint
from tl_core.config import TrainConfig, workdir
from tl_core.data import load_prepared, sample_shots
from tl_core.errors import UserError
from tl_core.strategies import create_strategy
from tl_core.train.loop import fit, streams, training_rows
from tl_core.train.session import RaySession, read_ray_checkpoint


def train_loop_per_worker(config: dict) -> None:
    # The run's work directory travels with its config: one Ray can serve runs of several.
    os.environ["TL_WORKDIR"] = config.pop("workdir")
    quiet_ray_train_reports()
    fit(TrainConfig(**config), RaySession())


def quiet_ray_train_reports() -> None:
    """Ray Train logs each report and checkpoint of each worker to the driver's terminal, a line or
    two a worker and epoch over tl's own progress. Its warnings and errors still show."""
    from ray.train.v2._internal.execution import context

    logging.getLogger("ray.train").setLevel(logging.WARNING)
    context.logger.setLevel(logging.WARNING)  # named after its file, outside "ray.train"


def preflight(cfg: TrainConfig):
    """Check data, shots and backbone here, before paying for a worker group: bad input fails in
    a second with a clear message instead of inside a remote worker. Returns the training rows
    when the workers are to stream their images (see tl_core.train.ray_data), else None."""
    data = load_prepared(cfg.data)
    train_idx, val_idx = sample_shots(data.labels("train"), cfg.shots, cfg.seed, data.classes, cfg.val_per_class)
    backbone = load_checkpoint(cfg.backbone) if cfg.backbone else None
    strategy = create_strategy(cfg)
    strategy.build_model(len(data.classes), data.shape, backbone)
    trained, _ = training_rows(data, strategy, train_idx, val_idx)
    # A strategy that trains on features it computes (linear-probe) streams its images only once,
    # itself; one that trains on episodes reads each episode's rows itself.
    shares = strategy.trains_on_images and strategy.streams_shares
    return trained if shares and streams(cfg, data, trained, strategy) else None


def _absolute(path: str | None) -> str | None:
    """Workers run in another folder: send local paths as absolute ones (s3://, MLflow and packaged:
    URIs as they are)."""
    if path is None or storage.is_s3(path) or ":/" in path or path.startswith(PACKAGED):
        return path
    return os.path.abspath(path)


def _user_error_in(err: BaseException) -> str | None:
    """The message of a UserError raised inside a worker, if that is what failed."""
    match = re.search(r"UserError: (.+)", str(err))
    return match.group(1).strip() if match else None


def make_trainer(cfg: TrainConfig, run_name: str, run_workdir: str, storage_path: str, storage_filesystem,
                 cpus_per_worker: float, callbacks: Sequence = (), num_to_keep: int = 2, datasets: dict | None = None):
    """The one `TorchTrainer` set-up, for `fit_on_ray` and for multi-worker Tune trials: `cfg.workers`
    workers running `train_loop_per_worker`, on GPUs where the cluster has them (unless
    `cfg.use_gpu` says), streaming `datasets` (see tl_core.train.ray_data), checkpoints kept in `storage_path` under `run_name` (the same name
    again resumes from the run's latest checkpoint)."""
    from ray import train
    from ray.train.torch import TorchTrainer

    from tl_core.ray_cluster import cluster_cpus_and_gpus

    use_gpu = cluster_cpus_and_gpus()[1] > 0 if cfg.use_gpu is None else cfg.use_gpu
    return TorchTrainer(
        train_loop_per_worker,
        # The run's work directory travels with its config (see train_loop_per_worker).
        train_loop_config={**cfg.model_dump(), "workdir": run_workdir},
        datasets=datasets or None,
        scaling_config=train.ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu,
                                           resources_per_worker={"CPU": cpus_per_worker}),
        run_config=train.RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            checkpoint_config=train.CheckpointConfig(num_to_keep=num_to_keep),
            # A lost worker or node (preempted, killed, out of memory) restarts the worker group,
            # which resumes from the last reported checkpoint (RaySession.restore).
            failure_config=train.FailureConfig(max_failures=cfg.max_failures),
            callbacks=list(callbacks) or None,
        ),
    )


def fit_on_ray(cfg: TrainConfig, run_name: str) -> dict:
    from tl_core.ray_cluster import absolute_workdir, cluster_cpus_and_gpus, init_ray, storage_for

    cfg = cfg.model_copy(update={"data": _absolute(cfg.data), "backbone": _absolute(cfg.backbone)})
    labelled = preflight(cfg)
    init_ray()
    datasets = {}
    if labelled is not None:
        from tl_core.train.ray_data import DATA_CPUS, labelled_dataset

        datasets["train"] = labelled_dataset(labelled.data, labelled, augment=cfg.augment > 0)
    # Each worker gets an equal share of the CPUs (Ray sets its torch threads to that share). A
    # streaming run leaves DATA_CPUS to Ray Data's read and decode tasks: Ray Data only uses what
    # the training workers do not hold, and with none it waits forever (seen here, 2 CPUs).
    cpus = cluster_cpus_and_gpus()[0]
    if datasets:
        cpus_per_worker = max(0.25, (cpus - DATA_CPUS) / cfg.workers)
    else:
        cpus_per_worker = max(1, cpus // cfg.workers)
    storage_path, filesystem = storage_for(storage.join(workdir(), "ray"))
    trainer = make_trainer(cfg, run_name, absolute_workdir(), storage_path, filesystem, cpus_per_worker,
                           datasets=datasets)
    try:
        result = trainer.fit()
    except Exception as err:
        message = _user_error_in(err)
        if message:
            raise UserError(message) from None
        raise
    ckpt = read_ray_checkpoint(result.checkpoint)
    if ckpt is None:
        raise RuntimeError(f"the Ray Train run {run_name} finished without a checkpoint")
    return ckpt
