"""benchmarks/training/quality.py's raw-pixel baseline at scale: one blocked search votes every k exactly as a
search per k does, the views are streamed (only their area averages are kept), the features are the k-NN
job's baseline (normalised view averaged to 32 px), and the long phases print progress lines."""

from __future__ import annotations

import json
import weakref

import numpy as np
import pyarrow as pa
import pytest
import torch


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("training/quality")


def integer_features(n: int, dim: int, seed: int) -> torch.Tensor:
    """Integer-valued float32 rows: every dot product is exact (|x.y| <= 16 x 1000^2 < 2^24), so a blocked
    search and one full matrix product give bit-identical similarities."""
    return torch.from_numpy(np.random.default_rng(seed).integers(-1000, 1001, (n, dim))).float()


def test_one_blocked_search_votes_every_k_as_an_exact_search_per_k(bench, monkeypatch):
    from dino.knn import knn_predict, vote_for_each_k

    monkeypatch.setattr(bench, "SEARCH_ROWS", 7)  # blocks that split the database and the queries unevenly
    monkeypatch.setattr(bench, "QUERY_ROWS", 5)
    db, queries = integer_features(61, 16, 0), integer_features(23, 16, 1)
    labels = torch.from_numpy(np.random.default_rng(2).integers(0, 4, 61))
    ks, temperature = [1, 5, 10, 20], 1e6  # sims up to ~1e7: T keeps exp(sim / T) finite
    full = queries @ db.T  # (23, 61)
    ordered = full.sort(dim=1, descending=True).values
    assert (ordered[:, :21].diff(dim=1) < 0).all()  # no ties among the 21 best: the neighbours are unique

    sims, ids = bench.top_neighbours(queries, db, max(ks))
    ref_sims, ref_ids = full.topk(max(ks), dim=1)
    assert torch.equal(sims, ref_sims) and torch.equal(ids, ref_ids)
    votes = vote_for_each_k(sims, labels[ids], 4, ks, temperature)
    for k in ks:
        assert torch.equal(votes[k], knn_predict(db, labels, queries, 4, k=k, temperature=temperature))


def test_search_clamps_k_to_a_database_smaller_than_k(bench, monkeypatch):
    monkeypatch.setattr(bench, "SEARCH_ROWS", 3)
    db, queries = integer_features(5, 4, 3), integer_features(2, 4, 4)
    sims, ids = bench.top_neighbours(queries, db, 20)
    assert ids.shape == (2, 5)
    assert torch.equal(sims, (queries @ db.T).sort(dim=1, descending=True).values)


class Decoder:
    """``decode_views`` stand-in: table rows ``idx`` -> their views of ``views``, as fresh arrays; records
    a weak reference to every batch of views it handed out and how many were alive at each call."""

    def __init__(self, views: np.ndarray, labels: np.ndarray):
        self.views, self.labels = views, labels
        self.handed_out: list[weakref.ref] = []
        self.alive_at_call: list[int] = []

    def __call__(self, batch: dict, image_size: int) -> dict:
        assert image_size == self.views.shape[1]
        self.alive_at_call.append(sum(r() is not None for r in self.handed_out))
        idx = batch["idx"].astype(np.int64)
        out = self.views[idx].copy()  # (B, S, S, 3) uint8, as decoding makes them
        self.handed_out.append(weakref.ref(out))
        return {"view": out, "label": self.labels[idx], "key": batch["idx"].astype(str)}


def tables_of(n: int, rows: int):
    for start in range(0, n, rows):
        yield pa.table({"idx": list(range(start, min(start + rows, n)))})


def random_views(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), rng.integers(0, 3, n)


@pytest.mark.parametrize("total", [50, None], ids=["count known", "count unknown"])
def test_views_are_streamed_and_only_their_averages_kept(bench, total):
    views, labels = random_views(50, 64, 5)
    decode = Decoder(views, labels)
    pixels, got_labels = bench.pooled_pixels(tables_of(50, 8), 64, 32, total=total, decode=decode)
    assert len(decode.alive_at_call) == 7  # ceil(50 / 8) tables, decoded one at a time
    assert decode.alive_at_call == [0] * 7  # no earlier table's views alive when the next is decoded
    assert all(r() is None for r in decode.handed_out)  # nor any afterwards
    assert pixels.shape == (50, 3 * 32 * 32) and pixels.dtype == np.float32
    assert (
        pixels.base is None and pixels.nbytes == 50 * 3072 * 4
    )  # what it holds: N x 3,072 float32, nothing of the 64 px views
    np.testing.assert_array_equal(got_labels, labels)
    # each row: the view's 2x2 area averages, channel first
    ref = views.reshape(50, 32, 2, 32, 2, 3).astype(np.float64).mean(axis=(2, 4)).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(pixels, ref.reshape(50, -1), rtol=0, atol=1e-4)


def test_features_are_the_knn_jobs_baseline_and_the_old_one_at_full_size(bench):
    """Averaged then normalised = the normalised input averaged to 32 px (``pipeline.eval.embed.RawPixels``);
    without averaging, the features the script used before (the whole view) exactly up to rounding."""
    from dino.crops import crops_to_input

    views, labels = random_views(12, 64, 6)
    x = crops_to_input(torch.from_numpy(views)[:, None], "cpu", channels_last=False)  # (12, 3, 64, 64)
    job = torch.nn.functional.normalize(torch.nn.functional.adaptive_avg_pool2d(x, 32).flatten(1), dim=1)
    pixels, _ = bench.pooled_pixels(tables_of(12, 5), 64, 32, decode=Decoder(views, labels))
    torch.testing.assert_close(bench.pixel_features(pixels, normalise=True), job, rtol=0, atol=1e-6)

    full, _ = bench.pooled_pixels(tables_of(12, 5), 64, 0, decode=Decoder(views, labels))
    assert full.shape == (12, 3 * 64 * 64)
    old = torch.nn.functional.normalize(x.flatten(1), dim=1)
    torch.testing.assert_close(bench.pixel_features(full, normalise=True), old, rtol=0, atol=1e-6)
    old_u8 = torch.nn.functional.normalize(torch.from_numpy(views).float().reshape(12, -1), dim=1)  # (H, W, C) order
    sims = bench.pixel_features(full, normalise=False) @ bench.pixel_features(full, normalise=False).T
    # the same cosines, channel-first: float32 dot products of 12,288 terms summed in an order that depends on the
    # BLAS kernel and the CPU (measured up to 1.07e-6 apart), so 1e-5
    torch.testing.assert_close(sims, old_u8 @ old_u8.T, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from pipeline.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("shapes"), n_train=72, n_val=40, image_size=32, shard_size=30)


def test_pixels_only_prints_progress_and_equals_a_dense_search_per_k(bench, shapes, tmp_path, monkeypatch, capsys):
    from dino.knn import knn_accuracy, knn_predict
    from pipeline.data.storage import filesystem_for, resolve_split
    from pipeline.data.tar_reader import read_shard_tables
    from pipeline.eval.embed import decode_views

    monkeypatch.setattr(bench, "EVERY_S", 0.0)  # a line at every table / block, not after 10 s
    monkeypatch.setattr(bench, "SEARCH_ROWS", 16)
    assert bench.main(["--pixels-only", "--data", str(shapes), "--out", str(tmp_path), "knn.image_size=48",
                       "knn.ks=[1,5,20]"]) == 0  # fmt: skip
    stdout = capsys.readouterr().out
    for label in (
        "raw pixels: decoding 'train': ",
        "raw pixels: decoding 'val': ",
        "raw pixels: k-NN search (normalised): ",
        "raw pixels: k-NN search (uint8): ",
    ):
        assert label in stdout, stdout
    assert "raw pixels: decoding 'train': 72/72 images (100 %)" in stdout  # the closing line
    assert "raw pixels: k-NN search (normalised): 72/72 database images (100 %)" in stdout
    report = json.loads(next(tmp_path.glob("quality-pixels-*.json")).read_text())
    assert (report["n_db"], report["n_queries"], report["pixel_side"]) == (72, 40, 32)

    def dense(split):  # the old way: every view in memory, one search per k
        s = resolve_split(str(shapes), split)
        tables = read_shard_tables({"path": s.paths}, filesystem_for(s.paths), rows_per_table=256)
        out = [
            decode_views({c: np.array(t.column(c).to_pylist(), dtype=object) for c in t.column_names}, 48)
            for t in tables
        ]
        views = torch.from_numpy(np.concatenate([o["view"] for o in out])).permute(0, 3, 1, 2).float()
        feats = torch.nn.functional.adaptive_avg_pool2d(views, 32).flatten(1)
        return feats, torch.from_numpy(np.concatenate([o["label"] for o in out]))

    (xt, yt), (xv, yv) = dense("train"), dense("val")
    for name, normalise in (("raw_pixels", True), ("raw_pixels_uint8", False)):
        ft, fv = bench.pixel_features(xt, normalise), bench.pixel_features(xv, normalise)
        for k in (1, 5, 20):
            scores = knn_predict(ft, yt, fv, 8, k=k, temperature=0.07)
            assert report["by_k"][name][str(k)] == pytest.approx(knn_accuracy(scores, yv, topk=(1,))[1])
