"""Embedded samples as arrays, and their Parquet form next to a k-NN index.

One row per image: ``key`` (webdataset sample key), ``label`` (-1 = no ``cls``), ``feature`` (the
L2-normalised CLS feature, a fixed-size list of float32) and ``shard`` (the shard it came from, so a
neighbour's image can be read back by key without scanning every shard). In the database file, row
``i`` is faiss id ``i``: the file *is* the index's key order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Embeddings:
    """Features of one split, rows sorted by key."""

    features: np.ndarray  # (N, D) float32, L2-normalised
    labels: np.ndarray  # (N,) int64, -1 = unlabelled
    keys: np.ndarray  # (N,) str (object)
    shards: np.ndarray  # (N,) str (object): the shard path/URI holding each sample

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def take(self, rows: np.ndarray) -> Embeddings:
        return Embeddings(self.features[rows], self.labels[rows], self.keys[rows], self.shards[rows])


def write_features(path: str | Path, emb: Embeddings) -> None:
    """``emb`` as Parquet with columns ``key`` (string), ``label`` (int64), ``feature`` (float32[D]), ``shard``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = emb.features.shape[1]
    flat = pa.array(np.ascontiguousarray(emb.features, dtype=np.float32).reshape(-1), type=pa.float32())
    table = pa.table(
        {
            "key": pa.array([str(k) for k in emb.keys], type=pa.string()),
            "label": pa.array(np.asarray(emb.labels, dtype=np.int64), type=pa.int64()),
            "feature": pa.FixedSizeListArray.from_arrays(flat, d),
            "shard": pa.array([str(s) for s in emb.shards], type=pa.string()),
        }
    )
    pq.write_table(table, str(path))


def read_features(path: str | Path, keys: list[str] | None = None, with_features: bool = True) -> Embeddings:
    """Read a features file (all rows, or only those whose key is in ``keys``; file order kept).

    ``with_features=False`` skips the feature column (keys, labels and shards of a big index are a
    small fraction of it); ``features`` is then ``(N, 0)``.
    """
    import pyarrow.parquet as pq

    columns = ["key", "label", "shard"] + (["feature"] if with_features else [])
    filters = [("key", "in", list(keys))] if keys is not None else None
    table = pq.read_table(str(path), columns=columns, filters=filters)
    n = table.num_rows
    if with_features:
        col = table.column("feature").combine_chunks()
        d = col.type.list_size
        features = np.array(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(n, d)  # writable
    else:
        features = np.zeros((n, 0), np.float32)
    return Embeddings(
        features=features,
        labels=table.column("label").to_numpy().astype(np.int64),
        keys=np.array(table.column("key").to_pylist(), dtype=object),
        shards=np.array(table.column("shard").to_pylist(), dtype=object),
    )
