"""The Ray Dataset that a Ray Train run streams its labelled images from.

Built in the driver from the prepared dataset's shards (local or s3://) and handed to the
`TorchTrainer` as `datasets={"train": ...}`; each worker takes its share with
`ray.train.get_dataset_shard("train")` (Ray splits the rows equally among the workers, so DDP
gets equal step counts). Reading, the sha256 check, the k-shot row selection and decoding (with
the random crops of photos) are Ray Data tasks on the cluster's CPUs, re-run every epoch; the
workers only train.
"""

from __future__ import annotations

import numpy as np

from tl_core import storage
from tl_core.data.prepare import PreparedDataset, Rows, decode_images, hide_labels
from tl_core.data.shards import select_rows, verified_table

DECODE_BATCH = 256  # images per decode task: a few MB of pixels
DATA_CPUS = 1  # logical CPUs a streaming Ray Train run leaves to these tasks (see fit_on_ray)
# What each task asks for: a fraction, so that tasks fit in what the workers leave on any node
# (2 nodes of 2 CPUs, a worker of 1.5 on each: 0.5 free per node, where whole-CPU tasks waited forever).
TASK_CPUS = 0.25


def labelled_dataset(data: PreparedDataset, rows: Rows, augment: bool):
    """A Ray Dataset of `rows`' images: columns x (uint8 N x C x H x W), y (label), index (row)."""
    import ray.data

    from tl_core.ray_cluster import quiet_ray_data, storage_for

    quiet_ray_data()
    entries = rows.shards()
    located = [storage_for(storage.join(data.path, e["name"])) for e in entries]
    by_name = {e["name"]: e for e in entries}
    manifest, wanted, unlabeled, folder = data.manifest, rows.indices, rows.unlabeled, data.path

    def checked_rows(batch):  # one shard file per batch: its sha256 checked, the wanted rows kept
        import pyarrow as pa

        tables = [select_rows(verified_table(data_bytes, by_name["shards/" + path.rsplit("/", 1)[-1]], folder), wanted)
                  for data_bytes, path in zip(batch.column("bytes").to_pylist(), batch.column("path").to_pylist())]
        return pa.concat_tables(tables)

    def decoded(batch):
        return {"x": decode_images(list(batch["image"]), manifest, train=augment),
                "y": hide_labels(batch["label"].astype(np.int64), batch["index"], unlabeled),
                "index": batch["index"].astype(np.int64)}

    ds = ray.data.read_binary_files([path for path, _ in located], filesystem=located[0][1], include_paths=True,
                                    override_num_blocks=len(located), num_cpus=TASK_CPUS)
    ds = ds.randomize_block_order()  # shards in a new order each epoch
    ds = ds.map_batches(checked_rows, batch_size=1, batch_format="pyarrow", num_cpus=TASK_CPUS)
    return ds.map_batches(decoded, batch_size=DECODE_BATCH, batch_format="numpy", num_cpus=TASK_CPUS)
