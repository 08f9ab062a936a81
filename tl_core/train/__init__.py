"""Training: the core loop (`loop.fit`) and `train`, which decides where it runs and stores the result."""

from __future__ import annotations

import functools
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tl_core import storage
from tl_core.checkpoints import load_checkpoint, read_checkpoint_bytes, save_checkpoint
from tl_core.config import TrainConfig, workdir
from tl_core.train.loop import fit
from tl_core.train.session import CHECKPOINT_FILE, LocalSession


@dataclass
class TrainResult:
    checkpoint_uri: str
    checkpoint: dict
    seconds: float
    reused: bool  # True: an identical run's checkpoint already existed and was reused


PACKAGE = Path(__file__).resolve().parent.parent  # tl_core, as installed or checked out


@functools.lru_cache(maxsize=None)
def code_version(root: Path = PACKAGE) -> str:
    """A hash of tl_core's files: a run of other code is another run, as a KFP step's cache key
    holds its image. (Without it, `tl run` after an upgrade reused checkpoints the old code had
    trained and printed their figures as the new code's.) Any change to tl_core trains anew."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.relative_to(root).parts):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def output_folder(cfg: TrainConfig) -> str:
    """Where a run's checkpoint goes: named by the strategy and a hash of everything that
    changes the result (the settings, the dataset, the bytes of the backbone, teacher and class
    descriptions, and tl_core's code)."""
    if cfg.output:
        return cfg.output
    # Files whose content can change under the same name: their bytes, not their names, count.
    # (Prepared datasets need not be here: their folder names carry their content hash.)
    inputs = [read_checkpoint_bytes(uri) for uri in (cfg.backbone, cfg.teacher) if uri]
    if cfg.attributes:
        inputs.append(storage.read_bytes(cfg.attributes))
    inputs_sha = "".join(storage.sha256_bytes(data) for data in inputs)
    key = storage.sha256_bytes((cfg.fingerprint(exclude={"output"}) + inputs_sha + code_version()).encode())[:16]
    return storage.join(workdir(), "models", f"{cfg.strategy}-{key}")


def train(cfg: TrainConfig, on_report: Callable[[dict], None] | None = None, force: bool = False) -> TrainResult:
    """Run one training (in this process or on Ray Train) and store its checkpoint.

    A run whose output folder already holds a checkpoint is not repeated (force=True repeats it
    into the same folder, replacing the checkpoint atomically).
    """
    started = time.perf_counter()
    out = output_folder(cfg)
    ckpt_uri = storage.join(out, CHECKPOINT_FILE)
    with storage.exclusive(out):  # the same run started twice at once: the second waits, then reuses
        if storage.exists(ckpt_uri) and not force:
            return TrainResult(ckpt_uri, load_checkpoint(ckpt_uri), time.perf_counter() - started, reused=True)
        if cfg.resolved_runner() == "local":
            ckpt = fit(cfg, LocalSession(cfg.use_gpu, on_report))
        else:
            from tl_core.train.ray_runner import fit_on_ray

            # Same name, same Ray storage: an interrupted run resumes from its latest checkpoint.
            # A forced rerun takes a new name, or it would "resume" the finished run.
            name = out.rstrip("/").split("/")[-1] + (f"-{int(time.time())}" if force else "")
            ckpt = fit_on_ray(cfg, run_name=name)
        storage.write_bytes(storage.join(out, "config.json"), json.dumps(cfg.model_dump(), indent=2).encode())
        ckpt["sha256"] = save_checkpoint(ckpt, ckpt_uri)  # the checkpoint last: its presence means done
    return TrainResult(ckpt_uri, ckpt, time.perf_counter() - started, reused=False)


__all__ = ["TrainResult", "train", "fit"]
