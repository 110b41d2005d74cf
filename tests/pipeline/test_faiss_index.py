"""The faiss index: exact search against numpy, self-retrieval, recall of IVF/HNSW against an independent
count, the index folder (manifest round trip, never half-written) and the wrong-dimension errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.eval import faiss_index as fi
from pipeline.eval.features import Embeddings, read_features


def _unit(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _rows(features, seed=0):
    n = len(features)
    rng = np.random.default_rng(seed)
    return Embeddings(
        features=features,
        labels=rng.integers(0, 5, size=n).astype(np.int64),
        keys=np.array([f"k{i:05d}" for i in range(n)], dtype=object),
        shards=np.array([f"/data/train-{i // 100:06d}.tar" for i in range(n)], dtype=object),
    )


def _manifest(rows, index_type="flat", params=None, recall=None):
    return fi.IndexManifest(
        arch="vit_tiny_patch16_224",
        timm_kwargs={"img_size": 32, "patch_size": 8},
        image_size=32,
        run_id="r1",
        feature_dim=rows.dim,
        count=len(rows),
        index_type=index_type,
        faiss_index="IndexFlatIP",
        index_params=params or {},
        recall_at_k=recall,
        recall_queries=7 if recall else 0,
        data_root="/data",
        split="train",
        classes=["a", "b", "c", "d", "e"],
        teacher_sha256="ab" * 32,
        tracking_uri="sqlite:///x.db",
    )


def test_exact_search_equals_brute_force_numpy_topk():
    rng = np.random.default_rng(0)
    db, q = _unit(rng, 500, 32), _unit(rng, 40, 32)
    index, params = fi.build_index(db)
    assert params == {} and type(index).__name__ == "IndexFlatIP"
    sims, ids = fi.search(index, q, 10)
    full = q.astype(np.float64) @ db.T.astype(np.float64)  # (40, 500)
    ref_ids = np.argsort(-full, axis=1, kind="stable")[:, :10]
    # faiss scores in float32: 32-term dot products of unit vectors, |error| <= 32 * 2**-24 = 1.9e-6 (BLAS
    # blocking and threads decide the rounding). Two neighbours closer than twice that may come in either
    # order (this seed has one pair 1.6e-6 apart), so ranks are compared where the float64 order is unambiguous,
    # and every rank's true similarity must be the float64 top-k's up to that rounding.
    top = np.take_along_axis(full, ref_ids, axis=1)  # (40, 10) best first
    nxt = np.take_along_axis(full, np.argsort(-full, axis=1, kind="stable")[:, 1:11], axis=1)
    gap_below = top - nxt  # to the next rank (the 11th for rank 10)
    gap_above = np.concatenate([np.full((len(top), 1), np.inf), gap_below[:, :-1]], axis=1)
    clear = np.minimum(gap_below, gap_above) > 4e-6
    assert clear.mean() > 0.95  # nearly every rank is pinned down
    np.testing.assert_array_equal(ids[clear], ref_ids[clear])
    np.testing.assert_allclose(np.take_along_axis(full, ids, axis=1), top, rtol=0, atol=4e-6)
    assert all(len(set(row)) == 10 for row in ids.tolist())
    # float32 scores vs float64 (1.9e-6 at most, above): atol 1e-5
    np.testing.assert_allclose(sims, top, rtol=0, atol=1e-5)


def test_k_is_clamped_to_the_database_size():
    index, _ = fi.build_index(_unit(np.random.default_rng(0), 5, 8))
    _, ids = fi.search(index, _unit(np.random.default_rng(1), 2, 8), 200)
    assert ids.shape == (2, 5) and sorted(ids[0]) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_every_database_item_queried_returns_itself_first(kind):
    db = _unit(np.random.default_rng(3), 300, 16)
    index, _ = fi.build_index(db, fi.IndexSpec(kind, nlist=8, nprobe=8, hnsw_m=16, hnsw_ef_search=64))
    sims, ids = fi.search(index, db, 3)
    np.testing.assert_array_equal(ids[:, 0], np.arange(300))  # the nearest other item is at cosine <= 0.86
    # float32 self-similarity of a unit vector normalised in float32 (16 terms): <= ~20 * 2**-24 = 1.2e-6 from 1
    np.testing.assert_allclose(sims[:, 0], 1.0, atol=1e-5)


def test_recall_at_k_on_a_hand_made_table():
    exact = np.array([[0, 1, 2, 3], [4, 5, 6, 7]])
    approx = np.array([[0, 2, 9, 1], [5, -1, -1, -1]])  # -1: nothing found
    # k=1: {0}&{0} -> 1, {5}&{4} -> 0 => 0.5;  k=2: {0,2}&{0,1} -> 1/2, {5}&{4,5} -> 1/2 => 0.5
    # k=4: {0,2,9,1}&{0,1,2,3} -> 3/4, {5}&{4..7} -> 1/4 => 0.5;  k=10 clamps to 4
    assert fi.recall_at_k(approx, exact, [1, 2, 4, 10]) == {1: 0.5, 2: 0.5, 4: 0.5, 10: 0.5}


def _independent_recall(index, db, queries, k):
    """Set intersection per query, exact neighbours by numpy."""
    exact = np.argsort(-(queries @ db.T), axis=1, kind="stable")[:, :k]
    _, approx = index.search(queries, k)
    return float(np.mean([len(set(a) & set(e)) / k for a, e in zip(approx.tolist(), exact.tolist())]))


@pytest.mark.parametrize(
    "spec", [fi.IndexSpec("ivf", nlist=32, nprobe=2), fi.IndexSpec("hnsw", hnsw_m=4, hnsw_ef_search=10)]
)
def test_approximate_index_reports_recall_equal_to_an_independent_count(spec):
    rng = np.random.default_rng(4)
    db, q = _unit(rng, 2000, 24), _unit(rng, 300, 24)
    index, params = fi.build_index(db, spec)
    exact = fi.exact_index(db)
    recall, n = fi.measure_recall(index, exact, q, [10, 20], sample=300)
    assert n == 300
    full = q.astype(np.float64) @ db.T.astype(np.float64)
    ranked = -np.sort(-full, axis=1)
    for k in (10, 20):
        # Both exact neighbour sets come from float32 scores (faiss vs numpy; 24-term dot products of unit
        # vectors, <= 24 * 2**-24 = 1.4e-6 each): they are the same sets when the k-th and (k+1)-th float64
        # similarities are further apart than the two errors together (this seed: >= 8.1e-6).
        assert (ranked[:, k - 1] - ranked[:, k]).min() > 3e-6
        # float64 means of the same per-query fractions computed two ways: ~1e-16
        assert recall[k] == pytest.approx(_independent_recall(index, db, q, k), abs=1e-12)
        assert 0.05 < recall[k] < 1.0  # approximate: really misses some; not garbage either
    if spec.kind == "ivf":
        assert params == {"nlist": 32, "nprobe": 2}
    else:
        assert params["hnsw_m"] == 4 and params["ef_search"] == 10


def test_recall_sample_is_a_reproducible_subset():
    rng = np.random.default_rng(5)
    db, q = _unit(rng, 500, 16), _unit(rng, 100, 16)
    index, _ = fi.build_index(db, fi.IndexSpec("ivf", nlist=16, nprobe=1))
    a = fi.measure_recall(index, fi.exact_index(db), q, [10], sample=30, seed=1)
    b = fi.measure_recall(index, fi.exact_index(db), q, [10], sample=30, seed=1)
    assert a == b and a[1] == 30


def test_ivf_cells_are_clamped_to_the_database_size():
    index, params = fi.build_index(_unit(np.random.default_rng(0), 10, 8), fi.IndexSpec("ivf", nlist=1024, nprobe=32))
    assert params == {"nlist": 10, "nprobe": 10} and index.ntotal == 10


def test_wrong_dimension_is_named():
    index, _ = fi.build_index(_unit(np.random.default_rng(0), 10, 8))
    with pytest.raises(ValueError, match=r"shape 3x6 but the index holds 8-dimensional features: wrong dimension"):
        fi.search(index, np.zeros((3, 6), np.float32), 2)
    with pytest.raises(ValueError, match=r"features to add have shape 4x12 but the index holds 8-dimensional"):
        fi.add_features(index, np.zeros((4, 12), np.float32))
    assert index.ntotal == 10


def test_index_folder_round_trips(tmp_path):
    rows = _rows(_unit(np.random.default_rng(6), 250, 16))
    index, params = fi.build_index(rows.features, fi.IndexSpec("hnsw", hnsw_m=8, hnsw_ef_search=77))
    manifest = _manifest(rows, "hnsw", params, recall={10: 0.97, 20: 0.95})
    evals = _rows(_unit(np.random.default_rng(7), 20, 16), seed=1)
    out = fi.save_index_dir(
        tmp_path / "knn", index, rows, manifest, eval_rows=evals, extra={"knn_accuracy.csv": "model,k\n"}
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["knn"]  # no temporary folder left
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["index.faiss", "features.parquet", "eval_features.parquet", "manifest.json", "knn_accuracy.csv"]
    )

    loaded = fi.load_index_dir(out)
    assert loaded.manifest == manifest  # every field, recall keys back to int
    assert json.loads((out / "manifest.json").read_text())["recall_at_k"] == {"10": 0.97, "20": 0.95}
    assert loaded.index.ntotal == 250 and loaded.index.hnsw.efSearch == 77
    np.testing.assert_array_equal(loaded.rows.keys, rows.keys)  # the key order: row i is faiss id i
    np.testing.assert_array_equal(loaded.rows.labels, rows.labels)
    np.testing.assert_array_equal(loaded.rows.shards, rows.shards)
    back = read_features(out / "features.parquet")
    np.testing.assert_array_equal(back.features, rows.features)
    assert back.features.dtype == np.float32
    some = read_features(out / "eval_features.parquet", keys=["k00003", "k00011"])
    np.testing.assert_array_equal(some.features, evals.features[[3, 11]])
    _, ids = fi.search(loaded.index, rows.features[:5], 1)
    assert ids[:, 0].tolist() == [0, 1, 2, 3, 4]


def test_a_failed_write_leaves_the_previous_index_whole(tmp_path, monkeypatch):
    rows = _rows(_unit(np.random.default_rng(8), 50, 8))
    index, _ = fi.build_index(rows.features)
    out = fi.save_index_dir(tmp_path / "knn", index, rows, _manifest(rows))
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    rows2 = _rows(_unit(np.random.default_rng(9), 60, 8))
    index2, _ = fi.build_index(rows2.features)

    def disk_full(path, emb):
        path.write_bytes(b"PAR1 half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fi, "write_features", disk_full)
    with pytest.raises(OSError, match="No space left"):
        fi.save_index_dir(out, index2, rows2, _manifest(rows2))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["knn"]
    assert fi.load_index_dir(out).manifest.count == 50


def test_replaces_only_an_index_folder(tmp_path):
    rows = _rows(_unit(np.random.default_rng(0), 5, 4))
    index, _ = fi.build_index(rows.features)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("x")
    with pytest.raises(ValueError, match=r"refusing to replace .*mine: it exists and is not a k-NN index folder"):
        fi.save_index_dir(tmp_path / "mine", index, rows, _manifest(rows))
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "x"


def test_inconsistent_or_foreign_folders_are_named(tmp_path):
    rows = _rows(_unit(np.random.default_rng(0), 12, 4))
    index, _ = fi.build_index(rows.features)
    out = fi.save_index_dir(tmp_path / "knn", index, rows, _manifest(rows))
    m = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**m, "count": 13}))
    with pytest.raises(ValueError, match=r"is inconsistent: index holds 12, features.parquet 12, manifest says 13"):
        fi.load_index_dir(out)
    (out / "manifest.json").write_text(json.dumps({**m, "format": "something/2"}))
    with pytest.raises(ValueError, match="not a k-NN index manifest"):
        fi.load_index_dir(out)
    (out / "manifest.json").write_text(json.dumps({k: v for k, v in m.items() if k != "feature_dim"}))
    with pytest.raises(ValueError, match="missing field.*feature_dim"):
        fi.load_index_dir(out)
    with pytest.raises(FileNotFoundError, match="no k-NN index in"):
        fi.load_index_dir(tmp_path)
