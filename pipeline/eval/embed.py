"""Ray Data batch inference: shards -> evaluation views -> L2-normalised CLS features.

One pass over the data, whatever is asked for. The database split and the evaluation split are read
together (a shard listed by both, e.g. ``train_split == val_split``, is read once); each image is
decoded and centre-cropped once (:func:`dino.eval_view.center_view`), and every model (the teacher and,
optionally, the same architecture at random initialisation) embeds that same uint8 view. Rows carry
their shard path, so the driver assigns them to splits. (The first version ran one Ray Data pass per
split and per model, decoding every image up to four times.)

Where the work runs::

    CPU-only cluster:  read tasks -> [decode + crop + embed]  knn.actors actors, 1 CPU each
    GPUs present:      read tasks -> [decode + crop]  CPU tasks -> [embed]  knn.actors actors, 1 GPU each

With GPUs the decode is a separate CPU stage: a GPU actor fed only by the one CPU it holds would idle.
The views travel as uint8 ``(B, S, S, 3)``; conversion and normalisation happen on the actor's device.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.data.shards import SplitInfo
from pipeline.errors import DataError
from pipeline.eval.features import Embeddings

log = logging.getLogger(__name__)

META_COLUMNS = ("key", "label", "shard")


@dataclass(frozen=True)
class BackboneSpec:
    """How to rebuild a backbone inside an embedding actor (weights travel separately)."""

    arch: str
    timm_kwargs: dict[str, Any]
    image_size: int
    seed: int = 0  # random init (weights None) is drawn from this seed
    pos_embed_interp: str = "timm"  # dino.backbone.POS_EMBED_INTERP; teacher.json's, "timm" when it has none


RAW_PIXELS = "raw_pixels"  # BackboneSpec.arch of the no-learning baseline (:class:`RawPixels`)
RAW_PIXELS_SIDE = 32  # its views are area-averaged to at most this side: 3 x 32 x 32 = 3,072 values per image


class RawPixels(torch.nn.Module):
    """The no-learning baseline as a backbone: the view as the network receives it, flattened.

    The input (ImageNet mean/std normalised, as :func:`dino.eval_view.embed_views` prepares it for every
    model) is area-averaged to at most ``side`` px, so the baseline's size stays ~3k values per image
    whatever the view size (on Imagenette 16-32 px pixels score higher than 64-224 px ones), and L2-normalised
    by ``embed_views`` like any feature: a cosine k-NN on centred pixels.
    """

    def __init__(self, image_size: int, side: int = RAW_PIXELS_SIDE):
        super().__init__()
        self.side = min(side, image_size)
        self.num_features = 3 * self.side * self.side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.side or x.shape[-2] != self.side:
            x = torch.nn.functional.adaptive_avg_pool2d(x, self.side)
        return x.flatten(1)


def raw_pixels_spec(image_size: int) -> BackboneSpec:
    """The :class:`BackboneSpec` of the raw-pixel baseline at a view size."""
    return BackboneSpec(RAW_PIXELS, {}, image_size)


def build_backbone(spec: BackboneSpec, weights: dict[str, torch.Tensor] | None) -> torch.nn.Module:
    """``timm.create_model(arch, num_classes=0, **timm_kwargs)`` with ``weights`` loaded (strict), eval mode;
    :class:`RawPixels` for ``arch == RAW_PIXELS``."""
    import timm

    from dino.backbone import set_pos_embed_interp

    if spec.arch == RAW_PIXELS:
        return RawPixels(spec.image_size).eval()
    torch.manual_seed(spec.seed)
    model = timm.create_model(spec.arch, pretrained=False, num_classes=0, **spec.timm_kwargs)
    set_pos_embed_interp(model, spec.pos_embed_interp)
    if weights is not None:
        model.load_state_dict(weights)
    return model.eval()


def decode_views(batch: dict[str, Any], image_size: int) -> dict[str, np.ndarray]:
    """``map_batches`` function: raw shard rows -> ``view`` uint8 ``(B, S, S, 3)`` + ``key``, ``label``, ``shard``.

    Shard-level marker rows, samples without an image and undecodable images are skipped (counted on
    the driver as the difference to the split's sample count); images are decoded by PIL only.
    """
    from dino.augment import decode_image
    from dino.eval_view import center_view
    from pipeline.data.stage import _label, image_bytes

    n = len(batch["__key__"])
    images = image_bytes(batch)
    labels = batch.get("cls", [None] * n)
    urls = batch.get("__url__", [""] * n)
    errors = batch.get("__error__", [None] * n)
    views = np.empty((n, image_size, image_size, 3), np.uint8)
    keys, out_labels, shards, bad = [], [], [], 0
    for data, key, label, url, error in zip(images, batch["__key__"], labels, urls, errors):
        if isinstance(error, str) or data is None or len(data) == 0:
            bad += not isinstance(error, str)
            continue
        try:
            views[len(keys)] = center_view(decode_image(bytes(data)), image_size)
        except Exception:  # corrupt / truncated / not an image
            bad += 1
            continue
        keys.append(str(key))
        out_labels.append(_label(label))
        shards.append(str(url))
    if bad:
        log.warning("skipped %d sample(s) without a decodable image", bad)
    m = len(keys)
    return {
        "view": views[:m],
        "key": np.array(keys, dtype=object),
        "label": np.array(out_labels, dtype=np.int64),
        "shard": np.array(shards, dtype=object),
    }


class Embedder:
    """``map_batches`` callable class: views (or raw rows, ``decode=True``) -> ``feature_<model>`` columns.

    ``models`` maps a name to ``(BackboneSpec, weights)``; weights are a state dict, a Ray object ref of
    one (shipped once through the object store), or None for random initialisation.
    """

    def __init__(self, models: dict[str, tuple[BackboneSpec, Any]], image_size: int, decode: bool):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.image_size, self.decode = image_size, decode
        self.models = {}
        for name, (spec, weights) in models.items():
            if weights is not None and not isinstance(weights, dict):  # a ray.ObjectRef
                import ray

                weights = ray.get(weights)
            self.models[name] = build_backbone(spec, weights).to(self.device)

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        from dino.eval_view import embed_views

        if self.decode:
            batch = decode_views(batch, self.image_size)
        views = torch.from_numpy(np.ascontiguousarray(batch["view"]))  # (B, S, S, 3) uint8
        out = {c: batch[c] for c in META_COLUMNS}
        for name, model in self.models.items():
            if len(views):
                out[f"feature_{name}"] = embed_views(model, views, self.device).numpy()  # (B, D)
            else:
                out[f"feature_{name}"] = np.zeros((0, model.num_features), np.float32)
        return out


def collect(
    batches: Iterable[dict[str, np.ndarray]], splits: dict[str, SplitInfo], models: list[str]
) -> dict[str, dict[str, Embeddings]]:
    """Embedder output batches -> ``{model: {split: Embeddings}}``, rows of each split sorted by key.

    A row belongs to every split that lists its shard. Raises :class:`DataError` naming the split when
    a split ends up with no decodable image. Shows its progress (:class:`pipeline.progress.Progress`).
    """
    from pipeline.progress import track

    shard_counts = {p: n for info in splits.values() for p, n in zip(info.paths, info.counts)}  # a shard once
    parts: dict[str, list[np.ndarray]] = {c: [] for c in (*META_COLUMNS, *(f"feature_{m}" for m in models))}
    for batch in track(batches, "embedding", sum(shard_counts.values()), size=lambda b: len(b["key"])):
        for c, chunks in parts.items():
            chunks.append(np.asarray(batch[c]))
    cols = {c: np.concatenate(v) if v else np.zeros(0) for c, v in parts.items()}
    keys, shards = cols["key"].astype(object), cols["shard"].astype(object)
    out: dict[str, dict[str, Embeddings]] = {m: {} for m in models}
    for split, info in splits.items():
        rows = np.flatnonzero(np.isin(shards.astype(str), np.asarray(info.paths, dtype=str)))
        if len(rows) == 0:
            raise DataError(
                f"{info.describe()} is empty: none of its {info.count} sample(s) in {len(info.paths)} shard(s) "
                f"(e.g. {info.paths[0]}) has a decodable image"
            )
        rows = rows[np.argsort(keys[rows].astype(str), kind="stable")]
        if len(rows) < info.count:
            log.warning(
                "%s: embedded %d of %d samples (%d skipped)",
                info.describe(),
                len(rows),
                info.count,
                info.count - len(rows),
            )
        dupes = len(rows) - len(np.unique(keys[rows].astype(str)))
        if dupes:
            log.warning("%s: %d duplicate key(s); a query by key returns the first", info.describe(), dupes)
        for m in models:
            feats = cols[f"feature_{m}"]
            out[m][split] = Embeddings(
                features=np.ascontiguousarray(feats[rows], dtype=np.float32),
                labels=cols["label"][rows].astype(np.int64),
                keys=keys[rows],
                shards=shards[rows],
            )
    return out


def embed_splits(
    splits: dict[str, SplitInfo],
    models: dict[str, tuple[BackboneSpec, dict[str, torch.Tensor] | None]],
    *,
    batch_size: int,
    actors: int,
    read_cpus: float = 1.0,
    ray_config=None,
) -> dict[str, dict[str, Embeddings]]:
    """Embed every split with every model in one Ray Data pass; ``{model: {split: Embeddings}}``.

    ``ray_config`` (a run's ``ray`` section): place the work as the run's :mod:`pipeline.cluster.placement` says
    (reads, decoding and CPU embedding on augmentation nodes, GPU embedding on training nodes)."""
    import ray

    from pipeline.cluster.placement import placement_for
    from pipeline.data.stage import read_shards

    place = placement_for(ray_config) if ray_config is not None else None
    cpu_side = {"label_selector": dict(place.data_selector)} if place and place.data_selector else {}
    gpu_side = {"label_selector": dict(place.train_selector)} if place and place.train_selector else {}

    sizes = {spec.image_size for spec, _ in models.values()}
    if len(sizes) != 1:
        raise ValueError(f"models to embed together must share one input size, got {sorted(sizes)}")
    image_size = sizes.pop()
    shipped = {name: (spec, ray.put(w) if w is not None else None) for name, (spec, w) in models.items()}
    paths = sorted({p for info in splits.values() for p in info.paths})  # a shard in two splits is read once
    gpus = int(ray.cluster_resources().get("GPU", 0))
    layout = next(iter(splits.values())).members  # one run's sources share data.image_keys / label_key
    ds = read_shards(
        paths, shuffle=False, num_cpus=read_cpus, label_selector=cpu_side.get("label_selector"), layout=layout
    )
    if cpu_side:  # the dataset's default (its resource requests to the autoscaler too); GPU actors override it
        ds.context.execution_options.label_selector = dict(cpu_side["label_selector"])
    embedder = {
        "fn_constructor_kwargs": {"models": shipped, "image_size": image_size, "decode": not gpus},
        "batch_size": batch_size,
        "num_cpus": 1,
        "zero_copy_batch": True,
    }
    if gpus:
        if actors > gpus:
            log.warning("knn.actors=%d but the cluster has %d GPU(s): using %d GPU actors", actors, gpus, gpus)
        ds = ds.map_batches(
            decode_views, fn_kwargs={"image_size": image_size}, batch_size=batch_size, num_cpus=1, **cpu_side
        )
        ds = ds.map_batches(
            Embedder, compute=ray.data.ActorPoolStrategy(size=min(actors, gpus)), num_gpus=1, **embedder, **gpu_side
        )
    else:
        ds = ds.map_batches(Embedder, compute=ray.data.ActorPoolStrategy(size=actors), **embedder, **cpu_side)
    log.info(
        "embedding %d shard(s) of %s with %s on %s",
        len(paths),
        "+".join(splits),
        "+".join(models),
        f"{min(actors, gpus)} GPU(s)" if gpus else f"{actors} CPU actor(s)",
    )
    return collect(ds.iter_batches(batch_size=None, batch_format="numpy"), splits, list(models))


def embed_in_process(
    splits: dict[str, SplitInfo],
    models: dict[str, tuple[BackboneSpec, dict[str, torch.Tensor] | None]],
    *,
    batch_size: int,
    **_: Any,
) -> dict[str, dict[str, Embeddings]]:
    """:func:`embed_splits` without Ray: the same reader, views, models and collection, in this process.

    For small collections and tests (the data source is swappable; the maths is the same code).
    """
    from pipeline.data.storage import filesystem_for
    from pipeline.data.tar_reader import read_shard_tables

    sizes = {spec.image_size for spec, _ in models.values()}
    if len(sizes) != 1:
        raise ValueError(f"models to embed together must share one input size, got {sorted(sizes)}")
    embedder = Embedder(models, sizes.pop(), decode=True)
    paths = sorted({p for info in splits.values() for p in info.paths})
    layout = next(iter(splits.values())).members
    tables = read_shard_tables({"path": paths}, filesystem_for(paths), rows_per_table=batch_size, layout=layout)
    batches = (embedder({c: np.array(t.column(c).to_pylist(), dtype=object) for c in t.column_names}) for t in tables)
    return collect(batches, splits, list(models))
