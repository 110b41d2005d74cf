"""The real multi-crop stage on class-sorted shards, as `make_shards --order sorted` writes an ImageNet-style
folder: every shard holds one class (a shard no larger than a class), so shuffling the shard order alone
cannot mix a batch. The read tasks' sample shuffle must."""

from __future__ import annotations

import collections
import io
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
CLASSES, PER_CLASS, SHARD = 10, 64, 32


def _entropy(labels: np.ndarray) -> float:
    p = np.bincount(labels) / len(labels)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


@pytest.fixture(scope="module")
def class_sorted(tmp_path_factory) -> Path:
    sys.path.insert(0, str(REPO / "jobs"))
    import make_shards

    tmp = tmp_path_factory.mktemp("sorted")
    for c in range(CLASSES):
        (tmp / "folder" / f"class{c}").mkdir(parents=True)
        for i in range(PER_CLASS):
            buf = io.BytesIO()
            Image.new("RGB", (24, 24), (25 * c, i, 100)).save(buf, format="JPEG")
            (tmp / "folder" / f"class{c}" / f"{i:03d}.jpg").write_bytes(buf.getvalue())
    out = tmp / "shards"
    assert (
        make_shards.main(
            [str(tmp / "folder"), str(out), "--shard-size", str(SHARD), "--order", "sorted", "--workers", "1"]
        )
        == 0
    )
    return out


def _batches(root: Path, *overrides: str) -> list[np.ndarray]:
    from pipeline.config import load_config
    from pipeline.data.sources import resolve_source
    from pipeline.data.stage import multicrop_dataset

    cfg = load_config("smoke", ["ray.augment_actors_max=1", "ray.augment_batch_size=32", *overrides])
    train = resolve_source(str(root), "train", cfg.data)
    assert len(train.paths) == CLASSES * PER_CLASS // SHARD and train.count == CLASSES * PER_CLASS
    out = []
    for batch in multicrop_dataset(train, cfg, passes=2).iter_batches(batch_size=32, batch_format="numpy"):
        out.append(batch["label"])
    return out


def test_batches_from_class_sorted_shards_hold_every_class(class_sorted):
    per_shard = []
    from pipeline.data.tar_reader import read_shard

    for p in sorted(class_sorted.glob("train-*.tar")):
        per_shard.append({int(r["cls"]) for r in read_shard({"path": str(p)})})
    assert all(len(s) == 1 for s in per_shard)  # one class per shard: what the fixture is for

    # Two passes of the run's stream, read as training reads them (the stage's read task mixes 20 shards).
    batches = _batches(class_sorted)
    labels = np.concatenate(batches)
    assert collections.Counter(labels.tolist()) == {c: 2 * PER_CLASS for c in range(CLASSES)}  # each sample once a pass
    full = [b for b in batches if len(b) == 32]
    mean_h = float(np.mean([_entropy(b) for b in full]))
    classes = float(np.mean([len(set(b.tolist())) for b in full]))
    print(
        f"\nclass-sorted shards, shuffled stage: {len(full)} batches of 32, mean label entropy {mean_h:.3f} nats "
        f"(log 10 = {math.log(10):.3f}), {classes:.2f} classes per batch"
    )
    # A uniform mix gives ~2.16 nats for 32 samples (log 10 less the small-sample bias (K-1)/2n).
    assert mean_h >= 0.9 * math.log(CLASSES)

    # The same stage reading shard after shard (no sample shuffle: what training did before) gives one class
    # per batch whatever the shard order: the fixture is one that shard-order shuffling alone cannot pass.
    no_shuffle = ("data.shuffle_shards=1", "data.shuffle_buffer=0", "data.shuffle_random_access=false")
    plain = [b for b in _batches(class_sorted, *no_shuffle) if len(b) == 32]
    plain_h = float(np.mean([_entropy(b) for b in plain]))
    print(f"without the sample shuffle: mean label entropy {plain_h:.3f} nats")
    assert plain_h < 0.25
