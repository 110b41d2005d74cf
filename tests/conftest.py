"""Fixtures for tests that need real services: a local Ray cluster and an MLflow tracking server.

Both are started for real (no mocks) and shared by the whole session; tests that need them are marked
``ray`` and skip cleanly where Ray or MLflow cannot start.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    """Tests that use the session's in-process Ray (:func:`ray_cluster`) run after all the others, in their own
    order: that Ray stays up until the session ends, and tests that check a job starts no Ray (or that a local run
    checks this machine's CPUs) must not depend on whether a test before them started it."""
    items.sort(key=lambda item: "ray_cluster" in getattr(item, "fixturenames", ()))  # stable: order kept within


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def load_benchmark():
    """A function ``"<group>/<name>" -> module`` loading ``benchmarks/<group>/<name>.py`` once per session (e.g.
    ``load_benchmark("data/augment")``; the benchmarks are scripts, not a package), registered in ``sys.modules``
    as ``benchmark_<group>_<name>`` while the session lasts (dataclasses and pickling by value look their module
    up there)."""
    import importlib.util

    loaded: dict[str, object] = {}

    def module_name(name: str) -> str:
        return "benchmark_" + name.replace("/", "_")

    def load(name: str):
        if name not in loaded:
            path = REPO / "benchmarks" / f"{name}.py"
            if not path.is_file():
                raise FileNotFoundError(f"no benchmark {path} (name it as '<group>/<name>', e.g. 'data/augment')")
            spec = importlib.util.spec_from_file_location(module_name(name), path)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = mod
            spec.loader.exec_module(mod)
            loaded[name] = mod
        return loaded[name]

    yield load
    for name in loaded:
        sys.modules.pop(module_name(name), None)


@pytest.fixture(scope="session")
def port_factory():
    """A function returning a free TCP port on 127.0.0.1 (tests import fixtures, not conftest)."""
    return free_port


def _wait_http(url: str, timeout: float, proc: subprocess.Popen) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            time.sleep(0.5)
    return False


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` on 127.0.0.1 with a SQLite backend and a temp artifact root; yields its URI."""
    if shutil.which("mlflow") is None and not (Path(sys.executable).parent / "mlflow").exists():
        pytest.skip("mlflow CLI not installed")
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    exe = str(Path(sys.executable).parent / "mlflow")
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [
            exe,
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{root}/mlflow.db",
            "--artifacts-destination",
            str(root / "artifacts"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=root,
    )
    uri = f"http://127.0.0.1:{port}"
    if not _wait_http(f"{uri}/health", 90, proc):
        proc.kill()
        pytest.skip(f"mlflow server did not start; see {root / 'server.log'}")
    yield uri
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture
def moto_s3(monkeypatch, port_factory):
    """moto's S3 server (a real S3 API, its own process) on 127.0.0.1, the AWS environment pointing at it;
    yields a boto3 client for it."""
    pytest.importorskip("moto")
    boto3 = pytest.importorskip("boto3")
    port = port_factory()
    exe = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen(
        [str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.skip("moto_server did not start")
            time.sleep(0.3)
    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": url,
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(k, v)
    yield boto3.client("s3", endpoint_url=url)
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def ray_cluster():
    """A local 2-CPU Ray cluster (dashboard on 127.0.0.1, progress bars off) shared by the session."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ray.data.DataContext.get_current().enable_progress_bars = False
    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},
        )
    yield ray
    ray.shutdown()


class TinyTeacher:
    """Exports a tiny random ViT (2 blocks, width 48, patch 8, 32 px) as a teacher folder, as the pretraining
    job would: ``tiny_teacher(path, seed=1, **timm_kwargs) -> (folder, model in eval mode)``."""

    arch = "vit_tiny_patch16_224"
    kwargs = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3, "dynamic_img_size": True}

    def __call__(self, path, seed: int = 1, **kw):
        import timm
        import torch

        from pipeline.weights.checkpoint import export_teacher

        torch.manual_seed(seed)
        kwargs = {**self.kwargs, **kw}
        model = timm.create_model(self.arch, num_classes=0, **kwargs)
        meta = {"arch": self.arch, "timm_kwargs": kwargs, "image_size": 32, "run_id": None}
        folder = export_teacher(path, {f"backbone.{k}": v for k, v in model.state_dict().items()}, meta)
        return folder, model.eval()


@pytest.fixture(scope="session")
def tiny_teacher() -> TinyTeacher:
    return TinyTeacher()
