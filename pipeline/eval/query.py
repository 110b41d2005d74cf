"""Query a saved k-NN index: image files or sample keys -> top-k neighbours (key, label, score) + a contact sheet.

Runs in one process, without Ray. An image file is embedded with the teacher that built the index
(found by :func:`find_teacher`; checked against the manifest's architecture, feature size and weights
hash) through the same evaluation view as the database. A key already in the index folder (the
database, or the evaluation split's features) is queried with its stored feature, so no teacher is
needed. Neighbours' images are read back from their shards by key with the whitelisting tar reader
(:mod:`pipeline.data.tar_reader`), one streamed pass per shard involved.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.eval.faiss_index import IndexFolder, search
from pipeline.eval.features import Embeddings, read_features

log = logging.getLogger(__name__)


@dataclass
class Neighbour:
    rank: int
    id: int  # faiss id = row of the features file
    key: str
    label: int  # -1 = unlabelled
    label_name: str | None
    score: float  # cosine similarity
    shard: str


@dataclass
class QueryResult:
    query: str  # the image path or the key
    kind: str  # "file" | "key"
    label: int | None  # known for a key query
    neighbours: list[Neighbour] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def find_teacher(folder: IndexFolder, teacher: str | Path | None = None, output_dir: str | Path = "outputs") -> Path:
    """The teacher folder to embed queries with.

    Order: ``teacher`` if given; the manifest's ``teacher_dir``; ``<index>/../teacher``; the manifest's
    run in MLflow (downloaded). Raises a one-line ValueError listing where it looked.
    """
    from pipeline.weights.teacher_source import require_teacher, teacher_from_run

    if teacher is not None:
        return require_teacher(teacher)
    m = folder.manifest
    looked = [p for p in (m.teacher_dir, str(folder.path.parent / "teacher")) if p]
    for p in looked:
        try:
            return require_teacher(p)
        except ValueError:
            continue
    if m.run_id and m.tracking_uri:
        try:
            return teacher_from_run(m.run_id, m.tracking_uri, output_dir)
        except Exception as e:  # unreachable server, run deleted: report with the places looked at
            looked.append(f"MLflow run {m.run_id} at {m.tracking_uri} ({e})")
    raise ValueError(f"no teacher for the index {folder.path}: looked in {'; '.join(looked)}; pass --teacher")


def load_query_model(folder: IndexFolder, teacher_dir: Path):
    """The teacher backbone, after checking it is the one that built the index (dim, arch, weights)."""
    from pipeline.weights.checkpoint import TEACHER_WEIGHTS, load_teacher
    from pipeline.weights.teacher_source import file_sha256

    model, meta = load_teacher(teacher_dir)
    m = folder.manifest
    if model.num_features != m.feature_dim:
        raise ValueError(
            f"teacher {teacher_dir} gives {model.num_features}-dimensional features but the index {folder.path} "
            f"holds {m.feature_dim}-dimensional ones ({m.arch}): wrong dimension"
        )
    if m.teacher_sha256 and file_sha256(teacher_dir / TEACHER_WEIGHTS) != m.teacher_sha256:
        raise ValueError(
            f"teacher {teacher_dir} is not the one that built the index {folder.path} (weights differ from run "
            f"{m.run_id}'s): its features would not be comparable; pass the matching --teacher"
        )
    return model, meta


def embed_files(paths: list[str | Path], model, image_size: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """``(M, D)`` L2-normalised features of image files and their ``(S, S, 3)`` evaluation views."""
    import torch

    from dino.augment import decode_image
    from dino.eval_view import center_view, embed_views

    views = []
    for p in paths:
        try:
            data = Path(p).read_bytes()
        except OSError as e:
            raise ValueError(f"cannot read query image {p}: {e.strerror or e}") from None
        try:
            views.append(center_view(decode_image(data), image_size))
        except Exception as e:
            raise ValueError(f"query image {p} is not a decodable image ({type(e).__name__})") from None
    feats = embed_views(model, torch.from_numpy(np.stack(views)), "cpu").numpy()
    return feats, views


def lookup_keys(folder: IndexFolder, keys: list[str]) -> Embeddings:
    """Stored rows (features included) of ``keys``, from the database or the evaluation split's file, in ``keys``
    order."""
    m = folder.manifest
    found: dict[str, Embeddings] = {}
    for name in filter(None, (m.features_file, m.eval_features_file)):
        wanted = [k for k in keys if k not in found]
        if not wanted or not (folder.path / name).is_file():
            continue
        rows = read_features(folder.path / name, keys=wanted)
        for i, k in enumerate(rows.keys):
            found.setdefault(str(k), rows.take(np.array([i])))
    missing = [k for k in keys if k not in found]
    if missing:
        where = m.features_file + (f" or {m.eval_features_file}" if m.eval_features_file else "")
        raise ValueError(
            f"key {missing[0]!r} is not in the index {folder.path} ({where}); query its image file instead"
        )
    parts = [found[k] for k in keys]
    return Embeddings(
        *(np.concatenate([getattr(p, f) for p in parts]) for f in ("features", "labels", "keys", "shards"))
    )


def neighbours(folder: IndexFolder, features: np.ndarray, k: int) -> list[list[Neighbour]]:
    """Top-``k`` neighbours of each row of ``features`` ``(M, D)``; raises on a dimension mismatch."""
    sims, ids = search(folder.index, features, k)
    classes = folder.manifest.classes
    rows = folder.rows
    out = []
    for srow, irow in zip(sims, ids):
        hits = []
        for s, i in zip(srow, irow):
            if i < 0:  # an approximate index found fewer than k
                continue
            label = int(rows.labels[i])
            name = classes[label] if classes is not None and 0 <= label < len(classes) else None
            hits.append(Neighbour(len(hits) + 1, int(i), str(rows.keys[i]), label, name, float(s), str(rows.shards[i])))
        out.append(hits)
    return out


def read_images(wanted: list[tuple[str, str]]) -> dict[tuple[str, str], bytes]:
    """Image bytes of ``(shard, key)`` pairs, one streamed pass per shard; absent ones are left out."""
    from pipeline.data.storage import filesystem_for
    from pipeline.data.tar_reader import read_shard

    by_shard: dict[str, set[str]] = {}
    for shard, key in wanted:
        by_shard.setdefault(shard, set()).add(key)
    out: dict[tuple[str, str], bytes] = {}
    for shard, keys in by_shard.items():
        rows = read_shard({"path": shard}, filesystem_for([shard]))
        try:
            for row in rows:
                if row["__error__"] is not None:
                    log.warning("cannot read thumbnails from %s (%s)", shard, row["__error__"])
                    break
                if row["__key__"] in keys:
                    data = row["image"] or None
                    if data is not None:
                        out[(shard, row["__key__"])] = data
                    keys.discard(row["__key__"])
                    if not keys:
                        break
        finally:
            rows.close()
        if keys:
            log.warning("%d image(s) not found in %s, e.g. %s", len(keys), shard, next(iter(keys)))
    return out


def thumbnail(data: bytes | None, thumb: int) -> np.ndarray | None:
    """The evaluation view of image bytes at ``thumb`` px (the region the model saw), or None."""
    from dino.augment import decode_image
    from dino.eval_view import center_view

    if data is None:
        return None
    try:
        return center_view(decode_image(data), thumb)
    except Exception:
        return None
