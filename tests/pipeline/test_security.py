"""Security pass: shards and checkpoints are untrusted, keys never become paths, nothing listens publicly.

- A shard holding pickles (``.pickle``, ``.pyd``, ``.pth``, ``.npy``) whose loading would create a file goes
  through every reader of shard contents (tar reader -> multi-crop mapper, evaluation views, attention
  images, neighbour thumbnails) and the file is never created.
- A checkpoint whose unpickling would run code is refused (``weights_only=True``) and runs nothing; no
  code in the project loads with pickle, ``weights_only=False``, ``yaml.load`` or ``allow_pickle``.
- Member names with ``../`` or absolute paths are only ever strings: nothing is extracted to disk.
- Every default that starts a server binds 127.0.0.1 (or the head's private address on a cluster).

Secrets in the environment reaching MLflow: ``tests/pipeline/test_no_secrets.py``.
"""

from __future__ import annotations

import ast
import io
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from tar_members import write_tar as _tar

REPO = Path(__file__).resolve().parents[2]
CODE_DIRS = ("pipeline", "jobs", "dino")


class _Payload:
    """Unpickling this runs ``exec``: it writes ``path`` (a harmless stand-in for arbitrary code)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('pwned')",))


def _payloads(sentinel: Path) -> dict[str, bytes]:
    pth = io.BytesIO()
    torch.save({"weights": _Payload(sentinel)}, pth)
    return {
        "pickle": pickle.dumps(_Payload(sentinel)),
        "pyd": pickle.dumps(_Payload(sentinel)),
        "pth": pth.getvalue(),
        "npy": pickle.dumps(_Payload(sentinel)),  # np.load(allow_pickle=True) would run it
    }


def _jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (30, 120, 200)).save(buf, format="JPEG")
    return buf.getvalue()


def test_the_payload_is_live(tmp_path):
    """The stand-in really runs when unpickled (else the tests below would prove nothing)."""
    sentinel = tmp_path / "ran"
    for ext, data in _payloads(sentinel).items():
        if ext == "pth":
            torch.load(io.BytesIO(data), weights_only=False)
        else:
            pickle.loads(data)
        assert sentinel.read_text() == "pwned", ext
        sentinel.unlink()


def test_pickles_in_a_shard_are_never_unpickled(tmp_path):
    from dino.augment import MultiCropSpec
    from pipeline.data.stage import MultiCropMapper
    from pipeline.data.tar_reader import COLUMNS, read_shard, read_shard_tables

    sentinel = tmp_path / "ran"
    members = [("a.jpg", _jpeg()), ("a.cls", b"1")]
    members += [(f"a.{ext}", data) for ext, data in _payloads(sentinel).items()]
    members += [(f"b.{ext}", data) for ext, data in _payloads(sentinel).items()]  # a sample of pickles only
    shard = _tar(tmp_path / "train-000000.tar", members)

    rows = list(read_shard({"path": str(shard)}))
    assert [r["__key__"] for r in rows] == ["a", "b"]
    assert all(set(r) == set(COLUMNS) for r in rows)  # no pickle member kept, even as bytes
    tables = list(read_shard_tables({"path": [str(shard)]}))
    assert tables[0].column_names == list(COLUMNS)
    batch = {c: np.array([r[c] for r in rows], dtype=object) for c in COLUMNS}
    spec = MultiCropSpec(global_size=32, local_size=16, n_local=1)
    mapper = MultiCropMapper(spec, seed=0)
    out = mapper(batch)
    assert out["key"].tolist() == ["a"] and dict(mapper.last_tally.reasons) == {"no_image": 1}
    assert not sentinel.exists()


def test_pickles_under_an_image_key_are_only_ever_given_to_pil(tmp_path):
    """A pickle renamed ``.jpg`` reaches the image decoder and is counted undecodable; nothing runs."""
    from dino.augment import MultiCropSpec
    from pipeline.data.stage import MultiCropMapper
    from pipeline.data.tar_reader import COLUMNS, read_shard
    from pipeline.eval.embed import decode_views
    from pipeline.eval.query import read_images
    from pipeline.train.attention import fixed_val_images

    sentinel = tmp_path / "ran"
    p = _payloads(sentinel)
    shard = _tar(
        tmp_path / "val-000000.tar",
        [("x.jpg", p["pickle"]), ("x.cls", b"0"), ("y.png", p["pth"]), ("z.jpg", _jpeg()), ("z.cls", b"1")],
    )
    rows = list(read_shard({"path": str(shard)}))
    batch = {c: np.array([r[c] for r in rows], dtype=object) for c in COLUMNS}
    mapper = MultiCropMapper(MultiCropSpec(global_size=32, local_size=16, n_local=1), seed=0)
    assert mapper(batch)["key"].tolist() == ["z"] and mapper.last_tally.reasons["undecodable"] == 2
    views = decode_views(batch, 32)
    assert list(views["key"]) == ["z"]
    assert len(fixed_val_images([str(shard)], 3, 32)) == 1
    got = read_images([(str(shard), "x"), (str(shard), "z")])
    assert got.get((str(shard), "x")) == p["pickle"]  # handed back as bytes (then to PIL), never loaded
    assert not sentinel.exists()


def test_a_pickle_checkpoint_that_runs_code_is_refused(tmp_path):
    from pipeline.errors import CheckpointError
    from pipeline.weights.checkpoint import STATE_FILE, load_state

    sentinel = tmp_path / "ran"
    torch.save({"student": {}, "epoch": _Payload(sentinel)}, tmp_path / STATE_FILE)
    with pytest.raises(CheckpointError) as err:
        load_state(tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and "refused" in msg and "weights_only=True" in msg and "exec" in msg, msg
    assert not sentinel.exists()


def test_exported_teachers_are_safetensors_and_a_pickle_in_their_place_is_refused(tmp_path):
    import timm

    from pipeline.errors import CheckpointError
    from pipeline.weights.checkpoint import TEACHER_WEIGHTS, export_teacher, load_teacher

    tk = {"depth": 1, "patch_size": 8, "embed_dim": 24, "num_heads": 2, "img_size": 16}
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, **tk)
    d = export_teacher(
        tmp_path / "t",
        {"backbone." + k: v for k, v in model.state_dict().items()},
        {"arch": "vit_tiny_patch16_224", "timm_kwargs": tk, "image_size": 16},
    )
    header_len = int.from_bytes((d / TEACHER_WEIGHTS).read_bytes()[:8], "little")  # safetensors layout
    assert (d / TEACHER_WEIGHTS).read_bytes()[8:9] == b"{" and header_len > 0
    sentinel = tmp_path / "ran"
    pth = io.BytesIO()
    torch.save({k: _Payload(sentinel) for k in ("x",)}, pth)
    (d / TEACHER_WEIGHTS).write_bytes(pth.getvalue())
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_teacher(d)
    assert not sentinel.exists()


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            yield owner, name, node


def _sources():
    for d in CODE_DIRS:
        for path in sorted((REPO / d).rglob("*.py")):
            yield path, ast.parse(path.read_text(), filename=str(path))


def test_no_code_executing_loader_is_used_anywhere():
    """Every torch.load passes weights_only=True; no pickle/marshal/dill/yaml.load/allow_pickle/eval/extract."""
    torch_loads, problems = 0, []
    for path, tree in _sources():
        rel = path.relative_to(REPO)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                bad = [
                    n
                    for n in names
                    if n and n.split(".")[0] in ("pickle", "marshal", "dill", "cloudpickle", "shelve", "joblib")
                ]
                if isinstance(node, ast.ImportFrom) and [a.name for a in node.names] == ["UnpicklingError"]:
                    bad = []  # the exception class only (to name a refused checkpoint)
                if bad:
                    problems.append(f"{rel}:{node.lineno} imports {bad}")
        for owner, name, node in _calls(tree):
            kw = {k.arg: k.value for k in node.keywords}
            where = f"{rel}:{node.lineno}"
            if owner == "torch" and name == "load":
                torch_loads += 1
                wo = kw.get("weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    problems.append(f"{where} torch.load without weights_only=True")
            if owner == "yaml" and name in ("load", "unsafe_load", "full_load", "load_all"):
                problems.append(f"{where} yaml.{name}")
            if (
                name == "load"
                and owner in ("np", "numpy")
                and not (isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value is False)
                and "allow_pickle" in kw
            ):
                problems.append(f"{where} np.load(allow_pickle=...)")
            if name in ("read_pickle", "extractall") or (name == "extract" and owner in ("tf", "tar", "tarfile")):
                problems.append(f"{where} {name}")
            if isinstance(node.func, ast.Name) and name in ("eval", "exec"):
                problems.append(f"{where} {name}()")
            if name == "read_webdataset" and not (
                isinstance(kw.get("decoder"), ast.Constant) and kw["decoder"].value is None
            ):
                problems.append(f"{where} read_webdataset with a decoder")
    assert problems == []
    assert torch_loads >= 1  # at least pipeline/checkpoint.load_state (the scan saw it)


def test_member_names_that_escape_are_strings_and_nothing_is_written(tmp_path):
    from pipeline.data.shards import Sample, is_safe_key, write_shards
    from pipeline.data.tar_reader import read_shard

    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    shard = _tar(
        work / "s.tar",
        [("../../escaped.jpg", _jpeg()), (str(tmp_path / "abs.jpg"), _jpeg()), ("..\\..\\win.jpg", _jpeg())],
    )
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    rows = list(read_shard({"path": str(shard)}))
    # "..\\..\\win.jpg" has no key under webdataset's rule (the first "." starts the extension): skipped.
    assert [r["__key__"] for r in rows] == ["../../escaped", str(tmp_path / "abs")]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # read in memory only
    assert not any(is_safe_key(r["__key__"]) for r in rows)
    for r in rows:  # such a key can never be written back into a shard of ours
        with pytest.raises(ValueError, match="key"):
            write_shards([Sample(r["__key__"], _jpeg(), 0)], tmp_path / "out", "train")


def test_query_outputs_have_fixed_names_keys_only_inside():
    """jobs/query_knn.py writes neighbours.json and contact_sheet.png into --out-dir: names are constants."""
    src = (REPO / "jobs" / "query_knn.py").read_text()
    writes = re.findall(r"\(out / (\w+)\)", src)
    assert sorted(writes) == ["JSON_FILE", "SHEET_FILE"]
    consts = dict(re.findall(r'^(JSON_FILE|SHEET_FILE) = "([^"]+)"', src, re.MULTILINE))
    assert consts == {"JSON_FILE": "neighbours.json", "SHEET_FILE": "contact_sheet.png"}


def test_every_default_server_binds_loopback():
    """No `0.0.0.0`/`::` bind anywhere; every dashboard and MLflow server start names 127.0.0.1 (or, on the
    cluster head, its private address: tests/jobs/test_deploy_configs.py checks cluster.yaml and deploy/)."""
    files = [REPO / "Makefile", REPO / "cluster.yaml", REPO / "README.md", *sorted((REPO / "deploy").rglob("*"))]
    files += [
        p
        for d in (*CODE_DIRS, "benchmarks", "tools")
        for p in sorted((REPO / d).rglob("*"))
        if p.suffix in (".py", ".sh", ".yaml")
    ]
    files += sorted((REPO / "configs").glob("*.yaml"))
    for f in (p for p in files if p.is_file()):
        text = f.read_text(errors="replace")
        assert not re.search(r"0\.0\.0\.0|--host[= ]::|dashboard_host\s*=\s*[\"']::", text), f
        for m in re.finditer(r"dashboard[-_]host\s*[= ]\s*[\"']?([^\s\"',)`]+)", text):
            assert m.group(1) == "127.0.0.1", (f, m.group(0))
        for m in re.finditer(r"mlflow (?:server|ui)\b[^\n]*", text):
            host = re.search(r"--host[= ](\S+)", m.group(0))
            # No --host: MLflow's own default, 127.0.0.1 (checked against the installed CLI below).
            assert host is None or host.group(1) in ("127.0.0.1", "$(hostname"), (f, m.group(0))
    import subprocess
    import sys

    helptext = subprocess.run(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--help"],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert re.search(r"--host HOST\s+The network interface to bind the server to\s+\(default: 127\.0\.0\.1\)", helptext)
    # Every ray.init in the code that starts a local cluster with a dashboard binds it to loopback.
    for path, tree in _sources():
        for owner, name, node in _calls(tree):
            if owner == "ray" and name == "init":
                kw = {k.arg: k.value for k in node.keywords}
                if "address" in kw:
                    continue  # joins an existing cluster: its head decides
                dash = kw.get("include_dashboard")
                if isinstance(dash, ast.Constant) and dash.value is False:
                    continue
                host = kw.get("dashboard_host")
                assert isinstance(host, ast.Constant) and host.value == "127.0.0.1", f"{path}:{node.lineno}"
