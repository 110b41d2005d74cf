"""Config checks that need more than the values themselves: timm, the tracking store's scheme, this machine.

:func:`pipeline.config.load_config` checks each value on its own (types, ranges, names). What only
fails once something is built is checked here, by :func:`check_before_ray`, which ``prepare`` runs
before any Ray resources are requested:

* the model: the student is built as the worker builds it (timm backbone + DINO head), on the
  ``meta`` device (shapes only, no memory, ~0.5 s for a ViT-S/16), and run on every crop size it
  will see (``augment.global_size``, ``augment.local_size``, ``knn.image_size``). An unknown
  ``model.arch``, ``model.model_kwargs`` timm rejects (an unknown keyword, ``embed_dim`` not divisible by
  ``num_heads``), a patch size that does not divide a crop size, an architecture that cannot take
  several input sizes (e.g. Swin) or that gives no pooled feature vector per image: each is one line
  naming the key and value, where it used to restart the worker group ``ray.max_failures`` times;
* the tracking store: a URI scheme MLflow has no store for; a SQLite file in a folder that does not exist;
* a local Ray cluster (``ray.address`` null) too small for the training workers' CPUs, whose placement
  group would never be placed.

Every problem is a :class:`~pipeline.config.ConfigError` (one line); nothing is created or started.
"""

from __future__ import annotations

import difflib
import logging
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pipeline.config import Config
from pipeline.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# MLflow's own tracking stores (mlflow.tracking._tracking_service.utils); plugins add theirs as entry points.
TRACKING_SCHEMES = {
    "",
    "file",
    "http",
    "https",
    "sqlite",
    "postgresql",
    "mysql",
    "mssql",
    "databricks",
    "databricks-uc",
    "uc",
}


def check_before_ray(cfg: Config, tracking_uri: str) -> None:
    """Every check of this module; raises :class:`ConfigError` (one line) at the first problem."""
    check_model(cfg)
    check_tracking_store(tracking_uri)
    check_local_cpus(cfg)


def _crop_sizes(cfg: Config) -> list[tuple[str, int]]:
    """``(key, px)`` of every input size the backbone sees: training crops, then the evaluation view."""
    sizes = [("augment.global_size", cfg.augment.global_size)]
    if cfg.augment.n_local:
        sizes.append(("augment.local_size", cfg.augment.local_size))
    if cfg.knn.image_size:
        sizes.append(("knn.image_size", cfg.knn.image_size))
    return sizes


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split("\n")[0].split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def check_model(cfg: Config) -> None:
    """Build the student as a worker would and run every crop size through it, on the meta device.

    Raises:
        ConfigError: naming ``model.arch``, ``model.model_kwargs`` or the crop-size key at fault.
    """
    import timm
    import torch

    m = cfg.model
    if not timm.is_model(m.arch):
        close = difflib.get_close_matches(m.arch, timm.list_models(), n=3, cutoff=0.8)
        hint = f"; did you mean {', '.join(close)}?" if close else "; timm.list_models('vit_*') lists the ViTs"
        raise ConfigError(f"invalid config value 'model.arch' (got {m.arch!r}): not a timm architecture{hint}")
    try:
        _probe(cfg, torch.device("meta"))
    except NotImplementedError:  # an operator without a meta kernel: the same probe on real (small) tensors
        with torch.no_grad():
            _probe(cfg, torch.device("cpu"))


def _probe(cfg: Config, device) -> None:
    import torch

    from dino.backbone import create_backbone
    from dino.head import DINOHead

    m = cfg.model
    with_kwargs = (
        f"model.arch {m.arch!r} with model.model_kwargs {m.model_kwargs}"
        if m.model_kwargs
        else f"model.arch {m.arch!r}"
    )
    try:
        with device:
            backbone = create_backbone(
                m.arch, m.drop_path_rate, cfg.augment.global_size, m.model_kwargs, m.pos_embed_interp
            )
    except NotImplementedError:
        raise
    except Exception as e:  # noqa: BLE001  (timm raises TypeError, AssertionError, ValueError, RuntimeError ...)
        key, value = ("model.model_kwargs", m.model_kwargs) if m.model_kwargs else ("model.arch", m.arch)
        raise ConfigError(
            f"invalid config value '{key}' (got {value!r}): timm cannot build {m.arch!r} with it ({_first_line(e)})"
        ) from None
    dim = backbone.num_features
    with device:
        head = DINOHead(
            dim, m.out_dim, hidden_dim=m.hidden_dim, bottleneck_dim=m.bottleneck_dim, norm_last_layer=m.norm_last_layer
        )
    for key, size in _crop_sizes(cfg):
        x = torch.zeros(2, 3, size, size, device=device)  # (B, 3, H, W)
        try:
            features = backbone(x)  # (B, D)
        except NotImplementedError:
            raise
        except Exception as e:  # noqa: BLE001
            raise ConfigError(
                f"invalid config value '{key}' (got {size}): {with_kwargs} cannot take {size} px "
                f"crops ({_first_line(e)})"
            ) from None
        if tuple(features.shape) != (2, dim):
            raise ConfigError(
                f"invalid config value 'model.model_kwargs' (got {m.model_kwargs!r}): {m.arch!r} gives features of "
                f"shape {tuple(features.shape)} for a batch of 2, not (2, num_features={dim}): DINO needs one "
                f"pooled vector per image (timm's global_pool must not be '')"
            )
        head(features)  # (B, K)


def check_tracking_store(uri: str) -> None:
    """A tracking URI MLflow can open: a known scheme; for SQLite, a file whose folder exists."""
    from importlib.metadata import entry_points

    scheme = urlparse(uri).scheme.lower().split("+", 1)[0]  # postgresql+psycopg2 -> postgresql
    if len(scheme) == 1:  # a Windows drive letter: a path
        scheme = ""
    known = TRACKING_SCHEMES | {ep.name for ep in entry_points(group="mlflow.tracking_store")}
    if scheme not in known:
        raise ConfigError(
            f"invalid config value 'tracking.tracking_uri' (got {uri!r}): MLflow has no tracking store "
            f"for the scheme '{scheme}' (known: {', '.join(sorted(k for k in known if k))})"
        )
    if scheme == "sqlite":
        path = uri.split(":///", 1)[-1] if ":///" in uri else ""
        if path and path != ":memory:":
            folder = Path(path).parent
            if not folder.is_dir():
                raise ConfigError(
                    f"invalid config value 'tracking.tracking_uri' (got {uri!r}): the folder {folder} "
                    f"of the SQLite file does not exist (SQLite creates the file, not its folder)"
                )
            if not os.access(folder, os.W_OK | os.X_OK):
                raise ConfigError(
                    f"invalid config value 'tracking.tracking_uri' (got {uri!r}): no write permission on {folder}"
                )


def local_cpus() -> int:
    """CPUs this process may run on (what a local ``ray.init()`` sees, at most)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_local_cpus(cfg: Config, cpus: Any = None) -> None:
    """On a local cluster (``ray.address`` null, no ``RAY_ADDRESS``), the training workers' CPUs must fit."""
    r = cfg.ray
    ray = sys.modules.get("ray")
    if r.address or os.environ.get("RAY_ADDRESS") or (ray is not None and ray.is_initialized()):
        return  # a running cluster: its resources are checked once joined (pipeline.cluster.placement)
    cpus = local_cpus() if cpus is None else cpus
    need = r.min_workers * r.cpus_per_worker  # an elastic run starts with its min
    if need > cpus:
        key, value = (
            ("ray.cpus_per_worker", r.cpus_per_worker)
            if r.cpus_per_worker > cpus
            else ("ray.num_workers", r.min_workers)
        )
        raise ConfigError(
            f"invalid config value '{key}' (got {value:g}): {r.min_workers} training workers x "
            f"ray.cpus_per_worker {r.cpus_per_worker:g} = {need:g} CPUs, more than the {cpus} of this machine "
            f"(a local Ray cluster: ray.address is null); lower them, or join a cluster with ray.address"
        )


def check_writable(path: str, key: str) -> None:
    """A local output folder must be writable: it, or the nearest folder above it that exists (nothing is
    created here; object stores are checked by their first write)."""
    import os

    if "://" in path:
        return
    folder = Path(path).resolve()
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise DataError(f"{key} '{path}' is not writable ({folder} is a file)")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DataError(f"{key} '{path}' is not writable (no write permission on {folder})")


def check_tracking_uri(uri: str, cfg: Config) -> str:
    """An HTTP tracking server must answer ``/health`` before anything starts.

    Unreachable: a one-line error (``tracking.if_unreachable=fail``), or a warning and a local SQLite
    store under ``output_dir`` (``=local``) whose runs can be imported later.
    """
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return uri
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as r:
            if r.status == 200:
                return uri
            problem = f"HTTP {r.status}"
    except OSError as e:
        problem = str(getattr(e, "reason", e))
    if cfg.tracking.if_unreachable == "local":
        local = "sqlite:///" + str((Path(cfg.output_dir) / "mlflow-offline.db").resolve())
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        log.warning("MLflow server %s unreachable (%s): tracking to %s instead", uri, problem, local)
        return local
    raise DataError(
        f"MLflow tracking server {uri} is not reachable ({problem}); start it, fix tracking.tracking_uri / "
        f"MLFLOW_TRACKING_URI, or pass tracking.if_unreachable=local to track to a local store"
    )
