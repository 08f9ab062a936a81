"""Checkpoints are plain dicts, saved with `torch.save` and loaded with `weights_only=True`.

    {"format", "model_spec": {name, num_classes, in_channels, kwargs}, "model": state_dict,
     "optimizer": state_dict, "epoch", "config", "history": [per-epoch metrics], "metrics",
     "data": {hash, classes, shape, mean, std}}

Every checkpoint carries its own digest (`"integrity"`: the sha256 of its contents, tensors and
values, computed before saving), so a copy is checked wherever it is read, also where no
`.sha256` file travels with it: an MLflow artifact, a registry version, an S3 copy. The `.sha256`
beside a file that `save_checkpoint` wrote checks its bytes as well.

They live at a local path, `s3://...`, or in MLflow (`runs:/RUN_ID/PATH`, `models:/NAME/VERSION`,
`models:/NAME@ALIAS`, `mlflow-artifacts:/...`). `packaged:NAME` is a pretrained backbone that an
installed package ships (`packaged:minilm-l6`, the text encoder; `packaged:efficientnet-lite0`, `-lite1`
and `-lite2`, the ImageNet networks): a bare backbone built on load.
"""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path

import torch

from tl_core import storage
from tl_core.errors import UserError

FORMAT = "tl-checkpoint/1"
MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")
CHECKSUM_SUFFIX = ".sha256"


INTEGRITY = "integrity"  # {"sha256": content_digest(the rest)}: inside the checkpoint, so it travels with every copy


def content_digest(ckpt: dict) -> str:
    """sha256 over a checkpoint's contents, in a fixed order: each tensor's dtype, shape and bytes,
    every other value as JSON. Leaves out the digest itself and the `sha256` that loading adds."""
    h = hashlib.sha256()

    def feed(value) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"tensor {t.dtype} {list(t.shape)}:".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            h.update(b"{")
            for key in sorted(value, key=str):
                h.update(json.dumps(str(key)).encode() + b":")
                feed(value[key])
            h.update(b"}")
        elif isinstance(value, (list, tuple)):
            h.update(b"[")
            for item in value:
                feed(item)
                h.update(b",")
            h.update(b"]")
        else:
            h.update(json.dumps(value, default=repr).encode())

    feed({k: v for k, v in ckpt.items() if k not in (INTEGRITY, "sha256")})
    return h.hexdigest()


def to_bytes(ckpt: dict) -> bytes:
    buf = io.BytesIO()
    torch.save({**ckpt, INTEGRITY: {"sha256": content_digest(ckpt)}}, buf)
    return buf.getvalue()


def verify_integrity(ckpt: dict, uri: str) -> None:
    """Refuse a checkpoint whose contents no longer match the digest it carries (a flipped byte
    in a weight, in a class name, ...). One written before checkpoints carried a digest loads,
    with a warning."""
    stored = ckpt.get(INTEGRITY)
    if not isinstance(stored, dict) or "sha256" not in stored:
        warnings.warn(f"checkpoint {uri} carries no integrity digest (written by an older tl): loaded unchecked; "
                      "train or save it again to add one", stacklevel=2)
        return
    if stored["sha256"] != content_digest(ckpt):
        raise UserError(f"checkpoint {uri} is corrupt: its contents do not match the sha256 it carries; "
                        "restore it from a copy or train it again")


def save_checkpoint(ckpt: dict, uri: str) -> str:
    """Write the checkpoint, and its sha256 beside it (`checkpoint.pt.sha256`, written first: the
    checkpoint's presence means both are complete); returns the sha256."""
    data = to_bytes(ckpt)
    digest = storage.sha256_bytes(data)
    storage.write_bytes(uri + CHECKSUM_SUFFIX, f"{digest}  {file_name(uri)}\n".encode())
    storage.write_bytes(uri, data)
    return digest


def file_name(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


def verify_checksum(uri: str, data: bytes) -> None:
    """Refuse a checkpoint whose bytes no longer match the sha256 written beside it (a flipped
    byte, a truncated copy). Checkpoints without one (older, or from MLflow) load as they are."""
    if not storage.exists(uri + CHECKSUM_SUFFIX):
        return
    expected = storage.read_bytes(uri + CHECKSUM_SUFFIX).decode(errors="replace").split()
    if not expected or expected[0] != storage.sha256_bytes(data):
        raise UserError(f"checkpoint {uri} is corrupt: its sha256 does not match {file_name(uri)}{CHECKSUM_SUFFIX}; "
                        "restore it from a copy or train it again")


def _read_mlflow(uri: str) -> bytes:
    import mlflow

    from tl_core import tracking

    # tl's tracking store (the work directory's SQLite where no MLFLOW_TRACKING_URI names a server):
    # a process that reads a model before any run of its own asked MLflow's default, ./mlflow.db.
    tracking.setup()
    # Downloaded into a temporary folder removed afterwards, whether the download worked or not.
    with tempfile.TemporaryDirectory(prefix="tl-ckpt-") as folder:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=folder)
        except Exception as err:
            raise UserError(f"cannot fetch {uri} from MLflow ({err.__class__.__name__}: {str(err)[:200]})") from err
        path = Path(local)
        if path.is_dir():
            found = sorted(path.rglob("checkpoint.pt"))
            if not found:
                raise UserError(f"{uri} holds no checkpoint.pt; point at a run or model logged by tl")
            path = found[0]
        return path.read_bytes()


def read_checkpoint_bytes(uri: str) -> bytes:
    """A checkpoint's bytes (checked against its sha256 where one is beside it); of a packaged
    backbone, its weights file, which is what identifies it."""
    if uri.startswith(PACKAGED):
        return packaged_weights(uri)
    if uri.startswith(MLFLOW_SCHEMES):
        return _read_mlflow(uri)
    if not storage.is_s3(uri) and Path(uri).is_dir():
        uri = str(Path(uri, "checkpoint.pt"))
    if not storage.exists(uri):
        raise UserError(f"checkpoint {uri} does not exist: check the path, or run `tl pretrain` to make one")
    data = storage.read_bytes(uri)
    verify_checksum(uri, data)
    return data


PACKAGED = "packaged:"


def packaged_models() -> dict:
    """{name: Packaged}: the architectures whose pretrained weights come with a package
    (`minilm-l6`, `efficientnet-lite0` / `-lite1` / `-lite2`), as they registered themselves."""
    from tl_core.models import PACKAGED as registered

    return registered


@lru_cache(maxsize=4)
def packaged_sha256(uri: str) -> str:
    """The packaged weights' sha256, hashed once a process (90 MB for minilm-l6)."""
    return storage.sha256_bytes(packaged_weights(uri))


def packaged_weights(uri: str) -> bytes:
    name, known = uri[len(PACKAGED):], packaged_models()
    if name not in known:
        raise UserError(f"{uri}: no packaged backbone of that name; there is {', '.join(PACKAGED + n for n in known)}")
    return known[name].weights_file().read_bytes()


def packaged_backbone(uri: str) -> dict:
    """A bare backbone (format, model_spec, model) of a model whose pretrained weights come with an
    installed package; its sha256 is that of its weights file, so feature caches key on it."""
    from tl_core.models import create_model, model_spec

    digest = packaged_sha256(uri)
    name = uri[len(PACKAGED):]
    channels = packaged_models()[name].in_channels
    model = create_model(name, num_classes=1, in_channels=channels, weights="packaged")
    return {"format": FORMAT, "model_spec": model_spec(name, 1, channels, {}), "sha256": digest,
            "model": {k: v for k, v in model.state_dict().items()}}


def architecture_of(uri: str) -> str:
    """The architecture of the checkpoint at `uri` (its model_spec's name); a packaged backbone's
    is its name, read without building the network (2 s for minilm-l6). Read once a process: a
    transfer asks it for its recipe, its baseline's and each of auto's candidates', and a backbone
    on s3:// or in MLflow would be downloaded each time. Not a registry name without a version
    number (`models:/NAME@champion`, `models:/NAME/latest`): a promotion moves it to another
    version, maybe of another network."""
    if uri.startswith(PACKAGED):
        return uri[len(PACKAGED):]
    if uri.startswith("models:/"):
        name, _, version = uri[len("models:/"):].partition("/")
        if "@" in name or not version.split("/")[0].isdigit():
            return load_checkpoint(uri)["model_spec"]["name"]
    return _stored_architecture(uri)


@lru_cache(maxsize=32)
def _stored_architecture(uri: str) -> str:
    return load_checkpoint(uri)["model_spec"]["name"]


def load_checkpoint(uri: str) -> dict:
    if uri.startswith(PACKAGED):
        return packaged_backbone(uri)
    return checkpoint_from_bytes(read_checkpoint_bytes(uri), uri)


def checkpoint_from_bytes(data: bytes, uri: str) -> dict:
    """A checkpoint from its bytes, read from `uri`: refused (UserError) if it is not a whole tl
    checkpoint or its contents do not match the digest it carries."""
    try:
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"{uri} is not a readable checkpoint ({err.__class__.__name__}); was it written by tl?") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{uri} is not a tl checkpoint (format {FORMAT}); export it with tl or wrap its state_dict")
    verify_integrity(ckpt, uri)
    problem = checkpoint_problem(ckpt)
    if problem:
        raise UserError(f"checkpoint {uri} is damaged or was not written by tl ({problem}): train it again")
    ckpt["sha256"] = storage.sha256_bytes(data)
    return ckpt


def checkpoint_problem(ckpt: dict) -> str | None:
    """What is missing from a checkpoint or of the wrong kind, if anything: the steps index it without
    looking. A backbone wrapped by hand (format, model_spec, model: see the README) has no config
    or data; where they are, they must be whole."""
    for key in ("model_spec", "model"):
        if not isinstance(ckpt.get(key), dict):
            return f"{key!r} is missing or not a dict"
    for key in ("config", "data"):
        if key in ckpt and not isinstance(ckpt[key], dict):
            return f"{key!r} is not a dict"
    spec = ckpt["model_spec"]
    if not isinstance(spec.get("name"), str) or not isinstance(spec.get("kwargs", {}), dict):
        return f"model_spec {spec} has no architecture name or kwargs"
    for key in ("num_classes", "in_channels"):
        if not isinstance(spec.get(key), int) or spec[key] < 1:
            return f"model_spec's {key} is {spec.get(key)!r}, not a positive number"
    if "data" not in ckpt:
        return None
    data = ckpt["data"]
    shape = data.get("shape")
    if not isinstance(shape, list) or len(shape) != 3 or not all(isinstance(n, int) and n >= 1 for n in shape):
        return f"its data shape {shape!r} is not [channels, height, width]"
    if not isinstance(data.get("classes"), list):
        return "its data has no list of classes"
    if not all(isinstance(data.get(k), list) and len(data[k]) == shape[0] for k in ("mean", "std")):
        return f"its data mean and std do not have one value per channel of shape {shape}"
    return None


def require_trained(ckpt: dict, uri: str) -> None:
    """Evaluating and registering need what tl training stores; a wrapped backbone has only weights."""
    missing = [key for key in ("config", "data") if key not in ckpt]
    if missing:
        raise UserError(f"{uri} is a bare backbone (no {' or '.join(missing)} from a tl training): transfer it to a "
                        "dataset first (tl transfer --backbone), then evaluate or register that model")


def load_state(model: torch.nn.Module, state: dict, uri: str, part: str = "model") -> None:
    """Load a state_dict; a mismatch becomes one clear line, not a wall of missing keys."""
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise UserError(
            f"the {part} in {uri} does not fit this model ({first}); use the same --model and settings it was trained with"
        ) from None
