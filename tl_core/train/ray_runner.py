"""Run the training core as the `train_loop_per_worker` of a Ray Train `TorchTrainer`.

N workers (`--workers`), GPUs where the cluster has them, the cluster named by `RAY_ADDRESS`
(else a local Ray). Checkpoints go to `RunConfig(storage_path=<workdir>/ray)`, local or s3://;
running the same config again under the same name resumes from its latest checkpoint.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from tl_core import storage
from tl_core.config import TrainConfig, workdir
from tl_core.errors import UserError
from tl_core.train.session import CHECKPOINT_FILE


def train_loop_per_worker(config: dict) -> None:
    from tl_core.train.loop import fit
    from tl_core.train.session import RaySession

    # The run's work directory travels with its config: one Ray can serve runs of several.
    os.environ["TL_WORKDIR"] = config.pop("workdir")
    fit(TrainConfig(**config), RaySession())


def preflight(cfg: TrainConfig) -> None:
    """Check data, shots and backbone here, before paying for a worker group: bad input fails in
    a second with a clear message instead of inside a remote worker."""
    from tl_core.checkpoints import load_checkpoint
    from tl_core.data import load_prepared, sample_shots
    from tl_core.strategies import create_strategy

    data = load_prepared(cfg.data)
    sample_shots(data.split("train")[1], cfg.shots, cfg.seed, data.classes, cfg.val_per_class)
    backbone = load_checkpoint(cfg.backbone) if cfg.backbone else None
    create_strategy(cfg).build_model(len(data.classes), data.shape[0], backbone)


def _absolute(path: str | None) -> str | None:
    """Workers run in another folder: send local paths as absolute ones (s3:// and MLflow URIs as they are)."""
    if path is None or storage.is_s3(path) or ":/" in path:
        return path
    return os.path.abspath(path)


def _user_error_in(err: BaseException) -> str | None:
    """The message of a UserError raised inside a worker, if that is what failed."""
    match = re.search(r"UserError: (.+)", str(err))
    return match.group(1).strip() if match else None


def fit_on_ray(cfg: TrainConfig, run_name: str) -> dict:
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tl_core.ray_cluster import absolute_workdir, cluster_cpus_and_gpus, init_ray, storage_for

    preflight(cfg)
    cfg = cfg.model_copy(update={"data": _absolute(cfg.data), "backbone": _absolute(cfg.backbone)})
    init_ray()
    cpus, gpus = cluster_cpus_and_gpus()
    use_gpu = gpus > 0 if cfg.use_gpu is None else cfg.use_gpu
    # Each worker gets an equal share of the CPUs (Ray sets its torch threads to that share).
    cpus_per_worker = max(1, cpus // cfg.workers)
    storage_path, filesystem = storage_for(storage.join(workdir(), "ray"))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**cfg.model_dump(), "workdir": absolute_workdir()},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as err:
        message = _user_error_in(err)
        if message:
            raise UserError(message) from None
        raise
    if result.checkpoint is None:
        raise RuntimeError(f"the Ray Train run {run_name} finished without a checkpoint")
    with result.checkpoint.as_directory() as folder:
        return torch.load(Path(folder, CHECKPOINT_FILE), map_location="cpu", weights_only=True)
