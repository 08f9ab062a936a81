"""Batch inference (`tl predict`): a model's predictions on a whole dataset, with Ray Data.

    model : a tl checkpoint, `models:/NAME/3` or `models:/NAME@alias` (the alias resolved once to
            its version, so every row names the version that made it); verified on load as
            everywhere (`load_checkpoint`: the sha256 a checkpoint carries, the `.sha256` beside it)
    data  : a prepared dataset, or any source `tl prepare` reads, prepared first as `tl prepare`
            does (streamed, and reused by its hash as any prepared dataset); images of another size
            or channels are brought to the model's as they are read
    output: a folder (local or s3://) of Parquet parts, one per shard of the data
            (`part-test-00000.parquet`: id, split, index, label, predicted, probability, p_<class>,
            model_version), and `predictions.json`, written last: the model, the data, the parts.

Ray Data does the work: each shard file is read by a task (Ray's `read_binary_files`), and
`map_batches` with a callable class (`Predictor`) over an actor pool (`ActorPoolStrategy`) checks
it against its sha256 and decodes, normalises and scores its rows `batch_size` at a time, each
actor holding the model once. The driver gathers the (small) predictions of each shard as they
stream in and writes the shard's part when its last row has arrived, so no more than the shards in
flight (at most 32 MB each) are held anywhere: memory does not grow with the data.

Resuming: a part is written atomically (a local rename, an S3 PUT) and records in its Parquet
metadata the model's sha256 and the data's hash. A rerun into the same folder keeps every part
made by the same model from the same data and predicts only the missing ones; parts made by
another model or from other data are predicted again, and the summary says so (`redone`, `why`).
"""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import numpy as np

from tl_core import storage, tracking
from tl_core.config import PredictConfig, PrepareConfig
from tl_core.errors import UserError

FORMAT = "tl-predictions/1"
SUMMARY_FILE = "predictions.json"
META_KEY = b"tl.predictions"
READ_CPUS = 0.5  # what a shard's read task asks of Ray: it leaves the actors their CPUs


def actor_cpus(ray_cpus: float, actors: int) -> float:
    """The Ray CPUs each actor asks for: one, or where the Ray has fewer CPUs than the actors and a
    read need, a share of what a read leaves. Ray Data starts the whole pool before it reads, so
    actors that took every CPU left none to the reads and the run waited forever (`--actors 2` on
    a 2-CPU Ray did). A Ray that shows no more than a read's CPUs is left to its autoscaler."""
    if ray_cpus >= actors + READ_CPUS or ray_cpus <= READ_CPUS:
        return 1.0
    return (ray_cpus - READ_CPUS) / actors


# -- the model -------------------------------------------------------------------------------


def resolve_model(uri: str) -> tuple[dict, dict]:
    """The checkpoint behind `uri` (verified) and what names it: {"uri", "name", "version",
    "sha256", "model_version"}. An alias is resolved to its version first, so a promotion during
    the run does not mix two models."""
    from tl_core.checkpoints import load_checkpoint, require_trained
    from tl_core.config import TrainConfig, validate
    from tl_core.strategies import STRATEGIES

    name = version = None
    pinned = uri
    if uri.startswith("models:/"):
        name, version = _registry_version(uri)
        pinned = f"models:/{name}/{version}"
    ckpt = load_checkpoint(pinned)
    require_trained(ckpt, uri)
    cfg = validate(TrainConfig, ckpt["config"])
    if not STRATEGIES[cfg.strategy].classifies_dataset_classes:
        raise UserError(f"{uri} is a {cfg.strategy} model: it does not predict its dataset's classes; predict with a "
                        "model trained with a classification strategy")
    return ckpt, {"uri": uri, "pinned": pinned, "name": name, "version": version, "sha256": ckpt["sha256"],
                  "model_version": str(version) if version is not None else f"sha256:{ckpt['sha256'][:12]}"}


def _registry_version(uri: str) -> tuple[str, int]:
    """(name, version) of `models:/NAME/VERSION` or `models:/NAME@ALIAS`."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    rest = uri[len("models:/"):]
    name, at, alias = rest.partition("@")
    if not at:
        name, _, number = rest.partition("/")
        if not name or not number.isdigit():
            raise UserError(f"{uri!r} names no model version: write models:/NAME/VERSION or models:/NAME@ALIAS")
        return name, int(number)
    if not name or not alias or "/" in alias:
        raise UserError(f"{uri!r} names no alias: write models:/NAME@ALIAS, e.g. models:/{name or 'NAME'}@champion")
    tracking.setup()
    try:
        return name, int(MlflowClient().get_model_version_by_alias(name, alias).version)
    except MlflowException as err:
        if getattr(err, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise UserError(f"{uri}: {name} has no alias {alias!r} (or no such model); promote a version first "
                            f"(`tl promote --model {name}`) or name a version: models:/{name}/VERSION") from None
        raise UserError(f"cannot resolve {uri} ({err.__class__.__name__}: {str(err)[:200]}); check the MLflow "
                        f"server ({os.environ.get('MLFLOW_TRACKING_URI', 'local store')})") from err


# -- the data --------------------------------------------------------------------------------


def resolve_data(uri: str, ckpt: dict, text_column: str | None = None, label_column: str | None = None,
                 header: bool = True):
    """A prepared dataset for `uri` that the model can read: the folder itself, or the source
    prepared as `tl prepare URI` prepares it (reused by its hash when it was before)."""
    from tl_core.data import load_prepared, prepare
    from tl_core.data.text import is_text_uri

    scheme, colon, _ = uri.partition(":")
    if not colon or scheme == "s3" or "/" in scheme:  # a folder, local or s3://: a prepared dataset
        try:
            data = load_prepared(uri)
        except UserError as err:
            raise UserError(f"{err}; or give a data URI that tl prepare reads (idx:DIR, npz:FILE, imagefolder:DIR, "
                            "tsv:FILE...)") from None
    else:
        reads_text = ckpt["data"].get("stored") == "text"
        if reads_text != is_text_uri(uri):
            kinds = {True: "text", False: "images"}
            raise UserError(f"the model reads {kinds[reads_text]} but {uri} holds {kinds[not reads_text]}: give it "
                            f"{kinds[reads_text]}")
        # Prepared as `tl prepare URI` does (so a dataset prepared before, by tl run or the pipeline, is
        # reused); images of another size or channels are brought to the model's as they are read.
        data, _ = prepare(PrepareConfig(uri=uri, text_column=text_column, label_column=label_column, header=header))
    reads_text = ckpt["data"].get("stored") == "text"
    if reads_text != data.text:
        kinds = {True: "text", False: "images"}
        raise UserError(f"the model reads {kinds[reads_text]} but {data.path} holds {kinds[data.text]}: give it "
                        f"{kinds[reads_text]}")
    return data


def model_input(images: list[bytes], manifest: dict, trained: dict) -> "torch.Tensor":  # noqa: F821
    """A shard's image column -> the model's input tensor, as evaluation prepares it: decoded,
    brought to the model's channels and size where the data has others, normalised with the
    training data's statistics (`trained`: the checkpoint's `data`)."""
    from tl_core.data import normalise
    from tl_core.data.prepare import decode_images
    from tl_core.data.transforms import convert_channels, resize

    channels, height, width = trained["shape"]
    if manifest["stored"] in ("files", "text"):  # decoded straight to the model's crop, or its text width
        x = decode_images(images, {**manifest, "shape": [manifest["shape"][0] if manifest["stored"] == "text"
                                                         else channels, height, width]})
    else:
        x = decode_images(images, manifest)
        if list(x.shape[1:]) != [channels, height, width]:
            x = resize(convert_channels(x, channels), (height, width))
    return normalise(x, trained)


# -- the actors ------------------------------------------------------------------------------


class Predictor:
    """A Ray Data actor: the model built once, then `__call__` on shard files (their bytes, one a
    call): each checked against its sha256, decoded and scored `batch_size` images at a time ->
    (part, index, label, probabilities) of every row of the shard."""

    def __init__(self, checkpoint, manifest: dict, folder: str, shards: dict, batch_size: int, actors: int):
        import ray
        import torch

        from tl_core.checkpoints import load_state, verify_integrity
        from tl_core.models import build_from_spec

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, actors)))
        ckpt = ray.get(checkpoint) if isinstance(checkpoint, ray.ObjectRef) else checkpoint
        verify_integrity(ckpt, "the checkpoint sent to the actor")
        self.model = build_from_spec(ckpt["model_spec"])
        load_state(self.model, ckpt["model"], "the checkpoint")
        self.model.eval()
        self.trained, self.manifest, self.folder = ckpt["data"], manifest, folder
        self.shards, self.batch_size = shards, batch_size  # file name -> (split, manifest entry)

    def __call__(self, batch: dict) -> dict:
        import torch

        from tl_core.data.shards import verified_table
        from tl_core.models import predict_logits

        started = time.perf_counter()
        parts, index, label, probs = [], [], [], []
        for data_bytes, path in zip(batch["bytes"], batch["path"]):
            split, entry = self.shards[str(path).rsplit("/", 1)[-1]]
            table = verified_table(bytes(data_bytes), entry, self.folder)
            images = table.column("image").to_pylist()
            for start in range(0, len(images), self.batch_size):
                x = model_input(images[start:start + self.batch_size], self.manifest, self.trained)
                with torch.inference_mode():
                    probs.append(torch.softmax(predict_logits(self.model, x, torch.device("cpu")), dim=1).numpy())
            parts += [part_name(split, entry)] * len(images)
            index.append(table.column("index").to_numpy().astype(np.int64))
            label.append(table.column("label").to_numpy().astype(np.int64))
        # The seconds this call took, spread over its rows: summed, the actors' own time (not their start).
        seconds = np.full(len(parts), (time.perf_counter() - started) / max(len(parts), 1))
        return {"part": np.asarray(parts, dtype=object), "index": np.concatenate(index), "label": np.concatenate(label),
                "probs": np.concatenate(probs).astype(np.float32), "seconds": seconds,
                "threads": np.full(len(parts), torch.get_num_threads())}


def checkpoint_for_actors(ckpt: dict) -> dict:
    """The checkpoint as the actors need it: no optimizer state (it can be twice the weights), its
    digest made again over what is sent (`Predictor` checks it)."""
    from tl_core.checkpoints import INTEGRITY, content_digest

    sent = {k: v for k, v in ckpt.items() if k not in ("optimizer", INTEGRITY, "sha256")}
    return {**sent, INTEGRITY: {"sha256": content_digest(sent)}}


# -- the parts -------------------------------------------------------------------------------


def part_name(split: str, entry: dict) -> str:
    """`part-test-00003.parquet` for the shard `shards/test-00003.parquet`."""
    return "part-" + entry["name"].rsplit("/", 1)[-1]


def part_bytes(rows: dict, classes: list[str], data_classes: list[str], identity: dict, split: str) -> bytes:
    """One part: the predictions of one shard, in index order, with `identity` in its metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    order = np.argsort(rows["index"], kind="stable")
    index, label, probs = rows["index"][order], rows["label"][order], rows["probs"][order]
    best = probs.argmax(axis=1)
    columns = {
        "id": pa.array([f"{split}/{i}" for i in index], type=pa.string()),
        "split": pa.array([split] * len(index), type=pa.string()),
        "index": pa.array(index, type=pa.int64()),
        "label": pa.array([data_classes[i] for i in label], type=pa.string()),
        "predicted": pa.array([classes[i] for i in best], type=pa.string()),
        "probability": pa.array(probs.max(axis=1) if len(probs) else np.zeros(0), type=pa.float32()),
    }
    for i, name in enumerate(classes):
        columns[f"p_{name}"] = pa.array(probs[:, i], type=pa.float32())
    columns["model_version"] = pa.array([identity["model_version"]] * len(index), type=pa.string())
    table = pa.table(columns).replace_schema_metadata({META_KEY: json.dumps(identity).encode()})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def part_identity(uri: str) -> dict | None:
    """The identity a part records (None: unreadable, or not a part of ours)."""
    import pyarrow.parquet as pq

    try:
        meta = pq.read_schema(io.BytesIO(storage.read_bytes(uri))).metadata or {}
        return json.loads(meta[META_KEY])
    except Exception:  # a foreign or damaged file: predicted again
        return None


def plan_parts(output: str, todo: list[tuple[str, dict]], identity: dict) -> tuple[list, list, list]:
    """(kept, pending, redone) among the parts of `todo`: kept were made by this model from this
    data and are not predicted again; redone exist but were made otherwise."""
    kept, pending, redone = [], [], []
    for split, entry in todo:
        uri = storage.join(output, part_name(split, entry))
        found = part_identity(uri) if storage.exists(uri) else None
        if found is not None and all(found.get(k) == identity[k] for k in ("format", "model_sha256", "data_hash")) \
                and found.get("shard_sha256") == entry["sha256"]:
            kept.append((split, entry))
            continue
        if storage.exists(uri):
            redone.append((split, entry, found))
        pending.append((split, entry))
    return kept, pending, redone


def why_redone(redone: list, identity: dict) -> str:
    if not redone:
        return ""
    found = redone[0][2] or {}
    if found.get("model_sha256") != identity["model_sha256"]:
        reason = (f"they were made by another model ({found.get('model_version', 'unknown')}, sha256 "
                  f"{str(found.get('model_sha256'))[:12]}), not {identity['model_version']}")
    elif found.get("data_hash") != identity["data_hash"]:
        reason = "they were made from other data (another dataset hash)"
    else:
        reason = "they are unreadable or from another version of tl"
    return f"{len(redone)} part(s) already in the output were predicted again: {reason}"


def foreign_parts(output: str, todo: list[tuple[str, dict]], identity: dict) -> str:
    """What to say of the parts in `output` that this run neither writes nor keeps and that another
    model or other data made: reading the folder as one Parquet dataset would mix them in. They
    are left where they are ("" where there are none)."""
    ours = {part_name(split, entry) for split, entry in todo}
    names = [n for n in storage.list_files(output) if n.startswith("part-") and n.endswith(".parquet") and
             "/" not in n and n not in ours] if storage.is_s3(output) or Path(output).is_dir() else []
    foreign = []
    for name in names:
        found = part_identity(storage.join(output, name)) or {}
        if any(found.get(k) != identity[k] for k in ("model_sha256", "data_hash")):
            foreign.append(name)
    if not foreign:
        return ""
    return (f"{len(foreign)} other part(s) in {output} hold predictions of another model or other data "
            f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}): left as they are, and not in "
            f"{SUMMARY_FILE}; remove them, or predict into an empty folder")


# -- the run ---------------------------------------------------------------------------------


def predict(cfg: PredictConfig, say=lambda message: None) -> dict:
    """Predict every row of the chosen split(s); returns a JSON-able summary (see the module)."""
    started = time.perf_counter()
    ckpt, model = resolve_model(cfg.model)
    data = resolve_data(cfg.data, ckpt, cfg.text_column, cfg.label_column, cfg.header)
    if not storage.is_s3(cfg.output):  # once the inputs are good: a path that cannot be a folder fails before Ray
        Path(cfg.output).mkdir(parents=True, exist_ok=True)
    classes = list(ckpt["data"]["classes"])
    splits = ("train", "test") if cfg.split == "all" else (cfg.split,)
    todo = [(split, entry) for split in splits for entry in data.manifest["shards"][split]]
    identity = {"format": FORMAT, "model": model["uri"], "model_version": model["model_version"],
                "model_sha256": model["sha256"], "data": data.path, "data_hash": data.hash}
    kept, pending, redone = plan_parts(cfg.output, todo, identity)
    if kept:
        say(f"{len(kept)} of {len(todo)} parts are in {cfg.output} already (same model, same data): kept")
    why = why_redone(redone, identity)
    if why:
        say(why)
    foreign = foreign_parts(cfg.output, todo, identity)
    timing = {"seconds": 0.0, "first_batch_seconds": None, "actor_images_per_s": None, "actor_torch_threads": None}
    if pending:
        timing = _run_ray(cfg, ckpt, data, pending, classes, identity, say)
    predicted_seconds = timing["seconds"]
    # The summary file last: a folder with it is complete.
    parts, rows, correct = [], 0, 0
    for split, entry in todo:
        uri = storage.join(cfg.output, part_name(split, entry))
        table = _read_table(uri, ["label", "predicted"])
        rows += table.num_rows
        correct += int(np.sum(np.asarray(table.column("label").to_pylist(), dtype=object)
                              == np.asarray(table.column("predicted").to_pylist(), dtype=object)))
        parts.append({"name": part_name(split, entry), "split": split, "rows": table.num_rows,
                      "shard_sha256": entry["sha256"]})
    predicted_rows = sum(entry["rows"] for _, entry in pending)
    summary = {**identity, "output": cfg.output, "splits": list(splits), "classes": classes, "rows": rows,
               "parts": parts, "parts_kept": len(kept), "parts_predicted": len(pending), "parts_redone": len(redone),
               "why_redone": why, "foreign_parts": foreign,
               "accuracy": correct / rows if rows and data.classes == classes else None,
               "images_predicted": predicted_rows,
               "images_per_s": predicted_rows / predicted_seconds if predicted_seconds else None,
               "predict_seconds": predicted_seconds, "first_batch_seconds": timing["first_batch_seconds"],
               "actor_images_per_s": timing["actor_images_per_s"], "actor_torch_threads": timing["actor_torch_threads"]}
    storage.write_bytes(storage.join(cfg.output, SUMMARY_FILE), json.dumps(summary, indent=2).encode())
    with tracking.run(f"predict {model['model_version']}", params=cfg.model_dump(),
                      tags={"tl.step": "predict", "tl.model_uri": model["uri"],
                            "tl.model_version": model["model_version"], "tl.data_hash": data.hash}) as active:
        tracking.log_metrics({k: summary[k] for k in ("rows", "parts_kept", "parts_predicted", "parts_redone",
                                                      "accuracy", "images_per_s") if summary[k] is not None})
    return {**summary, "run_id": active.info.run_id, "seconds": time.perf_counter() - started}


def _read_table(uri: str, columns: list[str]):
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(storage.read_bytes(uri)), columns=columns)


def _run_ray(cfg: PredictConfig, ckpt: dict, data, pending: list, classes: list[str], identity: dict, say) -> dict:
    """Predict the shards of `pending` with Ray Data, writing each one's part as it completes.
    Returns its timing: seconds from the dataset's start to the last part; seconds to the first
    predictions (the actors' start, a process each importing torch, and the first shard); images/s
    of the actors themselves (rows over their summed seconds in __call__, times the actors)."""
    import ray
    import ray.data

    from tl_core.ray_cluster import init_ray, quiet_ray_data, storage_for

    init_ray()
    quiet_ray_data()
    by_file = {entry["name"].rsplit("/", 1)[-1]: (split, entry) for split, entry in pending}
    located = [storage_for(storage.join(data.path, entry["name"])) for _, entry in pending]

    started = time.perf_counter()
    # Ray's own reads (a shard file a block, no tl code: no torch to import in those workers), then the
    # actors: each takes a whole shard, checks it and scores it (see Predictor).
    ds = ray.data.read_binary_files([path for path, _ in located], filesystem=located[0][1], include_paths=True,
                                    override_num_blocks=len(located), num_cpus=READ_CPUS)
    ds = ds.map_batches(Predictor, fn_constructor_args=(ray.put(checkpoint_for_actors(ckpt)), data.manifest, data.path,
                                                        by_file, cfg.batch_size, cfg.actors),
                        batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=cfg.actors),
                        num_cpus=actor_cpus(ray.cluster_resources().get("CPU", 0.0), cfg.actors))
    expected = {part_name(split, entry): (split, entry) for split, entry in pending}
    held: dict[str, list[dict]] = {}
    counts: dict[str, int] = {}
    written, first, actor_seconds, threads = 0, None, 0.0, 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        parts = batch["part"]
        first = first or time.perf_counter()
        actor_seconds += float(batch["seconds"].sum())
        threads = max(threads, int(batch["threads"].max(initial=0)))
        for name in np.unique(parts):
            mine = parts == name
            held.setdefault(name, []).append({k: batch[k][mine] for k in ("index", "label", "probs")})
            counts[name] = counts.get(name, 0) + int(mine.sum())
            split, entry = expected[name]
            if counts[name] == entry["rows"]:  # the shard's last row: its part, and nothing held for it
                pieces = held.pop(name)
                rows = {k: np.concatenate([p[k] for p in pieces]) for k in ("index", "label", "probs")}
                part_id = {**identity, "shard": entry["name"], "shard_sha256": entry["sha256"]}
                storage.write_bytes(storage.join(cfg.output, name),
                                    part_bytes(rows, classes, data.classes, part_id, split))
                written += 1
                say(f"part {written}/{len(pending)}: {name} ({entry['rows']} rows)")
    if held or written != len(pending):
        missing = sorted(set(held) | {n for n in expected if n not in counts})
        raise UserError(f"Ray Data returned no or too few rows for {', '.join(missing[:3])}: run again (finished "
                        "parts are kept)")
    ended = time.perf_counter()
    rows = sum(counts.values())
    return {"seconds": ended - started, "first_batch_seconds": None if first is None else first - started,
            "actor_images_per_s": rows * cfg.actors / actor_seconds if actor_seconds else None,
            "actor_torch_threads": threads}
