"""benchmarks/training/train_step.py on CPU at tiny sizes: both variants time real steps from the same
weights, the FLOP count equals an analytic count, the reference attends by hand, compiled steps do not
recompile."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn import functional as F

# The tiny ViT of tests/dino/conftest.py: embed 48, 2 blocks, 3 heads, patch 8.
D, DEPTH, PATCH = 48, 2, 8
B, G, L, N_LOCAL, K = 4, 32, 16, 2, 64
HIDDEN, BOTTLENECK = 2048, 256  # DINOHead defaults used by the benchmark
STEPS, WARMUP = 2, 1
TINY = [
    "--device", "cpu", "--threads", "1", "--arch", "vit_tiny_patch16_224",
    "--model-kwargs", json.dumps({"depth": DEPTH, "patch_size": PATCH, "embed_dim": D, "num_heads": 3}),
    "--global-size", str(G), "--local-size", str(L), "--n-local", str(N_LOCAL), "--batch", str(B),
    "--out-dim", str(K), "--steps", str(STEPS), "--warmup", str(WARMUP),
]  # fmt: skip


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("training/train_step")


def analytic_step_flops() -> int:
    """Matmul FLOPs (2 per multiply-add) of one step, counted by hand.

    Per crop of n patches (N = n + 1 tokens): patch embedding 2 n D (3 p^2); per block the qkv, proj
    and two MLP linears 2 N D^2 (3 + 1 + 4 + 4) and the two attention matmuls 2 x 2 N^2 D. Head per
    crop: D -> 2048 -> 2048 -> 256 -> K. Loss: einsum "tbk,sbk->ts", 2 T S B K. Backward costs twice
    the forward, except the patch embedding (no gradient for the input pixels: once) and the loss
    einsum (no gradient for the teacher's probabilities: once). The teacher runs forward only.
    """

    def backbone(n: int) -> tuple[int, int]:
        tokens = n + 1
        patch = 2 * n * D * 3 * PATCH**2
        blocks = DEPTH * (24 * tokens * D**2 + 4 * tokens**2 * D)
        return patch, blocks

    head = 2 * (D * HIDDEN + HIDDEN * HIDDEN + HIDDEN * BOTTLENECK + BOTTLENECK * K)
    patch_g, blocks_g = backbone((G // PATCH) ** 2)
    patch_l, blocks_l = backbone((L // PATCH) ** 2)
    n_g, n_l = 2 * B, N_LOCAL * B  # crops in the batch
    student_fwd = n_g * (patch_g + blocks_g) + n_l * (patch_l + blocks_l) + (n_g + n_l) * head
    student_patch = n_g * patch_g + n_l * patch_l
    teacher_fwd = n_g * (patch_g + blocks_g + head)
    loss = 2 * 2 * (2 + N_LOCAL) * B * K
    return 3 * student_fwd - student_patch + teacher_fwd + 2 * loss


def test_both_variants(bench, tmp_path, capsys):
    out = tmp_path / "result.json"
    r = bench.main(TINY + ["--which", "both", "--peak-tflops", "1", "--json", str(out)])

    assert json.loads(out.read_text()) == json.loads(json.dumps(r))
    assert r["flops_per_step"] == analytic_step_flops()
    assert r["peak_tflops"] == 1.0 and r["peak_source"] == "--peak-tflops"
    for v in r["variants"].values():
        assert v["images_per_s"] > 0
        assert len(v["step_ms"]) == STEPS and min(v["step_ms"]) > 0
        assert 0 < v["step_ms_median"] <= v["step_ms_p90"] <= max(v["step_ms"])
        assert v["images_per_s"] == pytest.approx(B * STEPS / v["timed_s"])
        assert v["achieved_tflops"] == pytest.approx(r["flops_per_step"] * STEPS / v["timed_s"] / 1e12)
        assert v["mfu"] == pytest.approx(v["achieved_tflops"] / 1.0)
        assert v["aug_cores"] == pytest.approx(v["images_per_s"] / 220.0)
        assert v["peak_memory_bytes"] > 0
        assert v["settings"]["attention_modules"] == 2 * DEPTH  # student + teacher
        assert v["settings"]["precision"] == "fp32"  # both fp32 on CPU by default
    ref, ours = r["variants"]["reference"], r["variants"]["ours"]
    assert ref["fused_attn"] == [False] and ours["fused_attn"] == [True]
    assert ref["settings"]["optimizer"].startswith("AdamW for-loop")
    assert ref["settings"]["host_syncs_per_step"] > 0 and ours["settings"]["host_syncs_per_step"] == 0
    # Same weights and drop-path masks, different attention, loss and input paths: the same first loss.
    assert ours["first_loss"] == pytest.approx(ref["first_loss"], rel=1e-5)
    assert r["speedup"] == pytest.approx(ours["images_per_s"] / ref["images_per_s"])
    assert "ours / reference images/s" in capsys.readouterr().out


def test_reference_attends_by_hand(bench, monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls.append(args[0].shape)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting_sdpa)  # timm calls F.<name>
    bench.main(TINY + ["--which", "reference"])
    assert calls == []  # FLOP count and reference steps: attention by hand
    bench.main(TINY + ["--which", "ours"])
    # Per step: student backbone on the globals and on the locals, teacher on the globals; 2 blocks each.
    assert len(calls) == (WARMUP + STEPS) * 3 * DEPTH
    assert {s[2] for s in calls} == {(G // PATCH) ** 2 + 1, (L // PATCH) ** 2 + 1}  # (b, heads, tokens, hd)


def test_compiled_step_does_not_recompile(bench):
    torch._dynamo.reset()
    r = bench.main(TINY + ["--which", "ours", "--compile", "--compile-backend", "eager", "--warmup", "2"])
    ours = r["variants"]["ours"]
    # Student backbone at two crop sizes + teacher backbone (no_grad): three graphs, all in warm-up.
    assert ours["graphs_compiled_in_warmup"] == 3
    assert ours["graphs_compiled_while_timed"] == 0
