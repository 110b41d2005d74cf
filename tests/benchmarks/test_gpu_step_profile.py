"""benchmarks/gpu/step_profile.py: kernel names fall in the right kind, and a CPU run at tiny sizes times every
batch size with one FLOP count per image (no kernels to profile on a CPU)."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def prof(load_benchmark):
    return load_benchmark("gpu/step_profile")


@pytest.mark.parametrize("name, kind", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
    ("nvjet_hsh_128x256_64x4_1x2_h_bz_coopA_NNT", "matmul"),
    ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4>>", "attention"),
    ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float>", "softmax/loss"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float>", "norm"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer+EMA"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", "elementwise+reduce"),
    ("Memcpy DtoD (Device -> Device)", "copy"),
    ("some_unknown_kernel_name", "other"),
])  # fmt: skip
def test_kernel_kinds(prof, name, kind):
    assert prof.kind_of(name) == kind


@pytest.mark.slow
def test_cpu_run_times_each_batch(prof, tmp_path):
    out = tmp_path / "p.json"
    r = prof.main([
        "--device", "cpu", "--arch", "vit_tiny_patch16_224",
        "--model-kwargs", json.dumps({"depth": 2, "patch_size": 8, "embed_dim": 48, "num_heads": 3}),
        "--global-size", "32", "--local-size", "16", "--n-local", "2", "--batches", "2,4", "--out-dim", "64",
        "--steps", "1", "--profile-steps", "1", "--json", str(out),
    ])  # fmt: skip
    assert [b["batch"] for b in r["batches"]] == [2, 4]
    assert all(b["images_per_s"] > 0 and b["mfu"] is None for b in r["batches"])
    assert r["flops_per_image"] > 0 and r["profile"]["kernel_ms_per_step"] == 0  # no CUDA kernels on a CPU
    assert r["batches"][1]["tflops"] == pytest.approx(r["flops_per_image"] * r["batches"][1]["images_per_s"] / 1e12)
    assert json.loads(out.read_text())["batches"][0]["batch"] == 2
