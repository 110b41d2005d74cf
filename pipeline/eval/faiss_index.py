"""A persisted faiss index over L2-normalised features: build, search, recall, and its folder on disk.

Inner product on unit vectors is cosine similarity. Three kinds (``knn.index``):

- ``flat``: ``IndexFlatIP``, exact, the default; memory ``4 * N * D`` bytes, search ``O(N * D)`` per query.
- ``ivf``: ``IndexIVFFlat``, k-means into ``knn.nlist`` cells (trained by faiss on the features), a query
  visits ``knn.nprobe`` of them; for collections beyond a few million.
- ``hnsw``: ``IndexHNSWFlat``, a graph with ``knn.hnsw_m`` links per node, ``knn.hnsw_ef_search`` candidates
  per query; no training, fast queries, more memory.

An approximate index is judged by recall@k against exact search: the fraction of a query's true ``k``
nearest neighbours that it returns, averaged over a sample of queries (:func:`recall_at_k`).

The index folder (written under a temporary name and renamed into place when every file is complete)::

    index.faiss            the faiss index; id i is row i of features.parquet
    features.parquet       database rows (key, label, feature, shard), sorted by key: the key order
    eval_features.parquet  the evaluation split's rows, when there was one
    manifest.json          IndexManifest: teacher, run, dim, count, index kind + params, recall, files
    knn_accuracy.csv/json, knn_per_class.csv   evaluation tables, when there was an evaluation
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.eval.features import Embeddings, read_features, write_features

log = logging.getLogger(__name__)

FORMAT = "dino-ray-knn/1"
INDEX_FILE = "index.faiss"
MANIFEST_FILE = "manifest.json"
FEATURES_FILE = "features.parquet"
EVAL_FEATURES_FILE = "eval_features.parquet"
INDEX_KINDS = ("flat", "ivf", "hnsw")


@dataclass(frozen=True)
class IndexSpec:
    """Which faiss index to build (``knn.index`` and its parameters)."""

    kind: str = "flat"
    nlist: int = 1024
    nprobe: int = 32
    hnsw_m: int = 32
    hnsw_ef_search: int = 128

    @classmethod
    def from_config(cls, knn) -> IndexSpec:
        return cls(knn.index, knn.nlist, knn.nprobe, knn.hnsw_m, knn.hnsw_ef_search)


def _check_dim(index, x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != index.d:
        shape = "x".join(map(str, x.shape))
        raise ValueError(
            f"{what} have shape {shape} but the index holds {index.d}-dimensional features: "
            "wrong dimension (another teacher?)"
        )
    return np.ascontiguousarray(x, dtype=np.float32)


def add_features(index, features: np.ndarray) -> None:
    """``index.add`` after checking ``features`` is ``(N, index.d)``."""
    index.add(_check_dim(index, features, "features to add"))


def search(index, queries: np.ndarray, k: int, what: str = "query features") -> tuple[np.ndarray, np.ndarray]:
    """``(similarities, ids)``, each ``(M, min(k, ntotal))``, best first; ids are -1 where an approximate index found
    fewer."""
    q = _check_dim(index, queries, what)
    return index.search(q, max(1, min(k, index.ntotal)))


def build_index(features: np.ndarray, spec: IndexSpec = IndexSpec()) -> tuple[Any, dict[str, int]]:
    """faiss index over ``features`` ``(N, D)`` (unit rows); returns it and the parameters it used.

    ``nlist`` is clamped to ``N`` (k-means needs a point per cell) and ``nprobe`` to ``nlist``, with a
    warning; the returned parameters are the effective ones.
    """
    import faiss

    if spec.kind not in INDEX_KINDS:
        raise ValueError(f"unknown index kind {spec.kind!r} (knn.index: one of {', '.join(INDEX_KINDS)})")
    x = np.ascontiguousarray(features, dtype=np.float32)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"cannot build an index over features of shape {x.shape}: need (N >= 1, D)")
    n, d = x.shape
    if spec.kind == "flat":
        index, params = faiss.IndexFlatIP(d), {}
    elif spec.kind == "ivf":
        nlist = min(spec.nlist, n)
        if nlist < spec.nlist:
            log.warning("knn.nlist=%d exceeds the %d features: using %d cells", spec.nlist, n, nlist)
        index = faiss.index_factory(d, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        index.train(x)  # k-means on the features themselves (faiss subsamples 256 points per cell)
        params = {"nlist": nlist, "nprobe": min(spec.nprobe, nlist)}
    else:
        index = faiss.index_factory(d, f"HNSW{spec.hnsw_m},Flat", faiss.METRIC_INNER_PRODUCT)
        params = {
            "hnsw_m": spec.hnsw_m,
            "ef_construction": int(index.hnsw.efConstruction),
            "ef_search": spec.hnsw_ef_search,
        }
    apply_params(index, params)
    index.add(x)
    return index, params


def apply_params(index, params: dict[str, int]) -> None:
    """Set the search-time parameters (``nprobe``, ``ef_search``) on a built or loaded index."""
    import faiss

    if "nprobe" in params:
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])
    if "ef_search" in params:
        faiss.downcast_index(index).hnsw.efSearch = int(params["ef_search"])


def exact_index(features: np.ndarray):
    """``IndexFlatIP`` over ``features``: the ground truth for recall and the paper's exact k-NN."""
    return build_index(features, IndexSpec("flat"))[0]


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
    """Mean over queries of ``|approx top-k ∩ exact top-k| / k`` for each ``k`` (clamped to the columns).

    Args:
        approx_ids: ``(M, K)`` ids from the approximate index, best first (-1 = nothing found).
        exact_ids: ``(M, K)`` ids from exact search, best first.
    """
    out = {}
    for k in ks:
        k_ = min(k, exact_ids.shape[1])
        a, e = approx_ids[:, :k_], exact_ids[:, :k_]  # (M, k), (M, k)
        found = ((a[:, :, None] == e[:, None, :]) & (a[:, :, None] >= 0)).any(axis=2).sum(axis=1)  # (M,)
        out[k] = float(np.mean(found / k_)) if len(a) else 0.0
    return out


def measure_recall(
    index, exact, queries: np.ndarray, ks: Sequence[int], sample: int, seed: int = 0
) -> tuple[dict[int, float], int]:
    """recall@k of ``index`` against ``exact`` on up to ``sample`` rows of ``queries`` drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(queries), size=min(sample, len(queries)), replace=False))
    q = queries[rows]
    kmax = max(ks)
    _, exact_ids = search(exact, q, kmax)
    _, approx_ids = search(index, q, kmax)
    return recall_at_k(approx_ids, exact_ids, ks), len(rows)


@dataclass
class IndexManifest:
    """``manifest.json``: everything needed to use the index without the run that built it."""

    arch: str
    timm_kwargs: dict[str, Any]
    image_size: int
    run_id: str | None  # the pretraining run whose teacher embedded the database
    feature_dim: int
    count: int  # vectors in the index = rows of features_file
    index_type: str  # flat | ivf | hnsw
    faiss_index: str  # the faiss class, e.g. IndexFlatIP
    index_params: dict[str, int] = field(default_factory=dict)  # effective nlist/nprobe, hnsw_m/ef_*
    recall_at_k: dict[int, float] | None = None  # approximate kinds: vs exact search
    recall_queries: int = 0  # queries the recall was measured on
    features_file: str = FEATURES_FILE  # row i is faiss id i: the key order
    eval_features_file: str | None = None
    data_root: str = ""
    split: str = ""
    eval_split: str | None = None
    classes: list[str] | None = None
    skipped: int = 0  # database samples without a decodable image
    teacher_dir: str | None = None
    teacher_sha256: str | None = None  # of the teacher's safetensors file
    tracking_uri: str | None = None
    created: str = ""
    format: str = FORMAT

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "manifest") -> IndexManifest:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(
                f"{where}: not a k-NN index manifest "
                f"(format {data.get('format') if isinstance(data, dict) else None!r}, expected {FORMAT!r})"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        required = {
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        if missing := sorted(required - set(data)):
            raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
        if unknown := sorted(set(data) - names):
            log.warning("%s: ignoring unknown field(s) %s", where, ", ".join(unknown))
        data = {k: v for k, v in data.items() if k in names}
        if data.get("recall_at_k") is not None:
            data["recall_at_k"] = {int(k): float(v) for k, v in data["recall_at_k"].items()}
        return cls(**data)


@dataclass
class IndexFolder:
    """A loaded index folder: the faiss index, its manifest, and the database rows without features."""

    path: Path
    index: Any
    manifest: IndexManifest
    rows: Embeddings  # keys, labels, shards of faiss ids 0..N-1 (features not loaded)


def load_index_dir(path: str | Path) -> IndexFolder:
    """Read and cross-check an index folder. Raises ValueError/FileNotFoundError naming the problem."""
    import faiss

    d = Path(path)
    if not (d / MANIFEST_FILE).is_file():
        raise FileNotFoundError(f"no k-NN index in {d} ({MANIFEST_FILE} missing)")
    manifest = IndexManifest.from_json((d / MANIFEST_FILE).read_text(), str(d / MANIFEST_FILE))
    for name in (INDEX_FILE, manifest.features_file):
        if not (d / name).is_file():
            raise FileNotFoundError(f"k-NN index {d} is incomplete: {name} missing")
    index = faiss.read_index(str(d / INDEX_FILE))
    apply_params(index, manifest.index_params)
    rows = read_features(d / manifest.features_file, with_features=False)
    problems = []
    if index.d != manifest.feature_dim:
        problems.append(f"index dimension {index.d} != manifest feature_dim {manifest.feature_dim}")
    if index.ntotal != manifest.count or len(rows) != manifest.count:
        problems.append(
            f"index holds {index.ntotal}, {manifest.features_file} {len(rows)}, manifest says {manifest.count}"
        )
    if problems:
        raise ValueError(f"k-NN index {d} is inconsistent: {'; '.join(problems)}")
    return IndexFolder(d, index, manifest, rows)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_index_dir(
    out_dir: str | Path,
    index,
    db: Embeddings,
    manifest: IndexManifest,
    eval_rows: Embeddings | None = None,
    extra: dict[str, str] | None = None,
) -> Path:
    """Write the whole folder under a temporary name, then rename it into place.

    A reader sees the previous complete folder, then (for the instant between two renames) none, then
    the new complete one; never a mix or a half-written file. ``out_dir`` may only replace a previous
    index folder (one holding ``manifest.json``) or an empty folder, so a wrong ``--out`` never deletes
    anything else. ``extra`` maps file names to text (tables).
    """
    import faiss

    out = Path(out_dir).absolute()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST_FILE).is_file())):
        raise ValueError(f"refusing to replace {out}: it exists and is not a k-NN index folder (no {MANIFEST_FILE})")
    if manifest.count != len(db) or manifest.feature_dim != db.dim or index.ntotal != len(db):
        raise ValueError(
            f"manifest (count {manifest.count}, dim {manifest.feature_dim}) does not describe the index "
            f"({index.ntotal} x {index.d}) / rows ({len(db)} x {db.dim})"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        writers: dict[str, Callable[[Path], None]] = {
            INDEX_FILE: lambda p: faiss.write_index(index, str(p)),
            manifest.features_file: lambda p: write_features(p, db),
        }
        if eval_rows is not None:
            manifest.eval_features_file = manifest.eval_features_file or EVAL_FEATURES_FILE
            writers[manifest.eval_features_file] = lambda p: write_features(p, eval_rows)
        for name, text in (extra or {}).items():
            writers[name] = lambda p, text=text: p.write_text(text)
        manifest.created = manifest.created or time.strftime("%Y-%m-%dT%H:%M:%S%z")
        writers[MANIFEST_FILE] = lambda p: p.write_text(manifest.to_json())  # last: refers to the rest
        for name, write in writers.items():
            write(tmp / name)
            _fsync(tmp / name)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
