"""Where the training core runs: in this process, or as one worker of a Ray Train run.

`fit` talks only to a session, so the same loop runs unchanged on a laptop (one process, no
Ray start-up cost) and on N Ray Train workers on CPUs or GPUs, one machine or a cluster. The
session knows its rank and world size; the loop shards the in-memory data by them, and the
session streams data too large for memory (`stream`): shard by shard in this process, through
Ray Data's `get_dataset_shard` on a Ray Train worker.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch

from tl_core.checkpoints import read_checkpoint_bytes, save_checkpoint, verify_integrity
from tl_core.data.batches import RayDataBatches, StreamedBatches

CHECKPOINT_FILE = "checkpoint.pt"


def auto_device(use_gpu: bool | None) -> torch.device:
    if use_gpu is None:
        use_gpu = torch.cuda.is_available()
    return torch.device("cuda" if use_gpu else "cpu")


class LocalSession:
    """One process: no DDP; reports go to an optional callback."""

    world_size = 1
    rank = 0
    epoch_reports = True  # report every epoch, not only the run's end (TuneSession may turn it off)

    def __init__(self, use_gpu: bool | None = None, on_report: Callable[[dict], None] | None = None):
        self.device = auto_device(use_gpu)
        self.on_report = on_report

    def prepare_model(self, net):
        return net.to(self.device)

    def stream(self, rows, normalise, batch_size: int, seed: int, augment: bool):
        """Batches of `rows` streamed from their shards, read ahead by a thread."""
        return StreamedBatches(rows, normalise, batch_size, seed, augment)

    def restore(self) -> dict | None:
        return None  # resuming an interrupted run is Ray Train's job (see RaySession.restore)

    def report(self, metrics: dict, checkpoint: dict | None = None) -> None:
        if self.on_report:
            self.on_report(metrics)

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        return t


class RaySession:
    """One Ray Train worker: DDP through Ray's prepare_model (the loop shards the data itself),
    checkpoints through ray.train.report."""

    epoch_reports = True

    def __init__(self):
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.world_size = context.get_world_size()
        self.rank = context.get_world_rank()
        self.device = ray.train.torch.get_device()

    def prepare_model(self, net):
        import ray.train.torch

        return ray.train.torch.prepare_model(net)

    def stream(self, rows, normalise, batch_size: int, seed: int, augment: bool):
        """This worker's share of the Ray Dataset the driver built from `rows` (see
        tl_core.train.ray_data); where the trainer got none (a Tune trial), its share of the shards
        read directly."""
        import ray.train

        shard = ray.train.get_dataset_shard("train")
        if shard is None:
            return StreamedBatches(rows, normalise, batch_size, seed, augment, self.rank, self.world_size)
        steps = math.ceil(len(rows) // self.world_size / batch_size)
        return RayDataBatches(shard, normalise, batch_size, steps, seed)

    def restore(self) -> dict | None:
        import ray.train

        return read_ray_checkpoint(ray.train.get_checkpoint())  # set when a run of this name resumes

    def report(self, metrics: dict, checkpoint: dict | None = None) -> None:
        import ray.train

        report_to_ray(ray.train.report, ray.train.Checkpoint, metrics, checkpoint)

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        parts = [torch.zeros_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t)
        return torch.stack(parts)


# Shared by Ray Train workers and Ray Tune trials (tl_core.tune.trial.TuneSession).
def read_ray_checkpoint(ckpt) -> dict | None:
    """The checkpoint dict inside a Ray Checkpoint (a folder holding checkpoint.pt), or None."""
    if ckpt is None:
        return None
    with ckpt.as_directory() as folder:
        path = str(Path(folder, CHECKPOINT_FILE))
        ckpt = torch.load(io.BytesIO(read_checkpoint_bytes(path)), map_location="cpu", weights_only=True)  # sha256 file checked
    verify_integrity(ckpt, path)
    return ckpt


def report_to_ray(report, checkpoint_type, metrics: dict, checkpoint: dict | None) -> None:
    """`report` and `checkpoint_type`: ray.train's report and Checkpoint, or ray.tune's (Ray
    warns, once a trial, when Tune is handed Train's); a checkpoint dict travels as a folder."""
    if checkpoint is None:
        report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(checkpoint, os.path.join(folder, CHECKPOINT_FILE))
        report(metrics, checkpoint=checkpoint_type.from_directory(folder))  # copied to storage here
