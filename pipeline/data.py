"""The Ray Data side: webdataset shards -> decode + multi-crop on an autoscaling CPU actor pool.

Emitted batch columns (names are stable, see DESIGN.md)::

    global_crops  uint8 (B, 2, G, G, 3)
    local_crops   uint8 (B, N, L, L, 3)
    key           str   (B,)
    label         int64 (B,)   -1 where a sample carries no ``cls``

A sample whose image cannot be decoded is skipped and counted (``SampleCounter``), never a crash.
Shard contents are untrusted: images are decoded by PIL only (``decoder=None`` keeps raw bytes; no
pickle or other code-executing decoder is ever applied).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import ray

from dino.augment import MultiCropAugment, MultiCropSpec, decode_image
from pipeline.config import AugmentConfig, Config

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
COUNTER_NAME = "dino_sample_counter"


@ray.remote(num_cpus=0)
class SampleCounter:
    """Counts samples skipped by the data stage (corrupt images), across all actors and epochs."""

    def __init__(self) -> None:
        self.skipped = 0
        self.examples: list[str] = []

    def add(self, n: int, keys: list[str]) -> None:
        self.skipped += n
        self.examples = (self.examples + keys)[:20]

    def get(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "examples": list(self.examples)}


def spec_from_config(cfg: AugmentConfig) -> MultiCropSpec:
    return MultiCropSpec(**cfg.model_dump())


def _label(value: Any) -> int:
    if value is None:
        return -1
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("ascii", "replace").strip()
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1


def _image_column(batch: dict[str, np.ndarray]) -> str:
    for k in IMAGE_KEYS:
        if k in batch:
            return k
    raise KeyError(f"batch has no image column (looked for {IMAGE_KEYS}; got {sorted(batch)})")


class MultiCropMapper:
    """Callable class for ``map_batches``: raw webdataset rows -> multi-crop uint8 columns."""

    def __init__(self, spec: MultiCropSpec, seed: int, counter_name: str = COUNTER_NAME):
        # Each actor draws its own stream: mixing the actor id into the seed keeps actors independent.
        actor_id = ray.get_runtime_context().get_actor_id() if ray.is_initialized() else None
        salt = int(actor_id[-8:], 16) if actor_id else 0
        self.spec = spec
        self.augment = MultiCropAugment(spec, seed=(seed * 1_000_003 + salt) % 2**31)
        self.counter_name = counter_name
        self._counter = None

    def _count_skipped(self, keys: list[str]) -> None:
        log.warning("skipped %d undecodable sample(s): %s", len(keys), keys[:5])
        if not ray.is_initialized():  # in-process use (tests, benchmarks): log only; never start Ray
            return
        try:
            if self._counter is None:
                self._counter = ray.get_actor(self.counter_name)
            self._counter.add.remote(len(keys), keys)
        except ValueError:  # no counter (e.g. running outside a pipeline run)
            pass

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        s = self.spec
        images = batch[_image_column(batch)]
        keys = batch.get("__key__", np.array([""] * len(images)))
        labels = batch.get("cls", np.array([None] * len(images), dtype=object))
        globals_, locals_, out_keys, out_labels, bad = [], [], [], [], []
        for data, key, label in zip(images, keys, labels):
            try:
                g, loc = self.augment(decode_image(bytes(data)))
            except Exception:  # corrupt / truncated / unsupported image: skip and count
                bad.append(str(key))
                continue
            globals_.append(g)
            locals_.append(loc)
            out_keys.append(str(key))
            out_labels.append(_label(label))
        if bad:
            self._count_skipped(bad)
        n = len(globals_)
        return {
            "global_crops": np.stack(globals_) if n else np.zeros((0, 2, s.global_size, s.global_size, 3), np.uint8),
            "local_crops": np.stack(locals_)
            if n
            else np.zeros((0, s.n_local, s.local_size, s.local_size, 3), np.uint8),
            "key": np.array(out_keys, dtype=object),
            "label": np.array(out_labels, dtype=np.int64),
        }


def read_shards(paths: list[str], *, shuffle: bool = True, num_cpus: float = 1.0) -> ray.data.Dataset:
    """Raw webdataset rows (``__key__``, ``jpg``, ``cls`` as bytes); file order shuffled per epoch.

    Read tasks only move bytes; ``num_cpus`` below 1 lets them fit beside train workers and
    augmentation actors on small machines (a read task that cannot be scheduled stalls the pipeline).
    """
    from pipeline.storage import filesystem_for

    return ray.data.read_webdataset(
        paths,
        filesystem=filesystem_for(paths),  # built on the driver from its AWS environment, shipped to tasks
        decoder=None,
        shuffle="files" if shuffle else None,
        include_paths=False,
        num_cpus=num_cpus,
    )


def multicrop_dataset(paths: list[str], cfg: Config, counter_name: str = COUNTER_NAME) -> ray.data.Dataset:
    """Shards -> multi-crop batches on an autoscaling actor pool (``ray.augment_actors_min..max``)."""
    r = cfg.ray
    return read_shards(paths, num_cpus=r.read_cpus_per_task).map_batches(
        MultiCropMapper,
        fn_constructor_kwargs={"spec": spec_from_config(cfg.augment), "seed": cfg.seed, "counter_name": counter_name},
        batch_size=r.augment_batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=r.augment_actors_min, max_size=r.augment_actors_max),
        num_cpus=r.augment_cpus_per_actor,
        zero_copy_batch=True,
    )
