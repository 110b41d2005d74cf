"""Joining or starting Ray, and placing a run on the cluster joined, with one-line errors before any request.

``ray.address`` is checked for a TCP answer before Ray is asked to join it; a local cluster starts with its
dashboard on 127.0.0.1 and Ray's noise filtered (:mod:`pipeline.cluster.ray_output`).
"""

from __future__ import annotations

import logging
import sys

from pipeline.config import Config
from pipeline.errors import ClusterError

log = logging.getLogger(__name__)


def check_ray_address(address: str | None) -> None:
    """A ``host:port`` (or ``ray://host:port``) Ray address must accept a TCP connection within 5 s."""
    import socket

    if not address or address == "auto" or address.startswith(("http://", "https://")):
        return  # local cluster, or "auto" (Ray finds the running one and says so itself)
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"ray.address '{address}' is not of the form host:port, ray://host:port or auto")
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            return
    except OSError as e:
        raise ClusterError(
            f"Ray cluster at ray.address '{address}' is not reachable ({e}); is the head running?"
        ) from None


def init_ray(address: str | None, verbose: bool = False) -> None:
    """Join ``address`` or start a local cluster (dashboard on 127.0.0.1, no progress bars off a tty).

    ``verbose`` (``logging.ray_verbose``) false: Ray's lines that repeat ours, and known-harmless warnings,
    are not shown (:mod:`pipeline.cluster.ray_output`); errors and tracebacks always are.
    """
    import ray

    from pipeline.cluster.ray_output import quiet_driver, quiet_forwarded

    quiet_driver(verbose)
    if not ray.is_initialized():
        ctx = ray.data.DataContext.get_current()
        if not sys.stdout.isatty():
            ctx.enable_progress_bars = False
        import os

        address = address or os.environ.get("RAY_ADDRESS")  # set for a `ray job submit` driver
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            ray.init(include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True)
    quiet_forwarded(verbose)


def resolve_placement_or_fail(cfg: Config):
    """The run's :class:`~pipeline.cluster.placement.Placement` on the cluster just joined; a one-line
    :class:`DataError` when the cluster cannot host it (before anything is requested from it)."""
    from pipeline.cluster.placement import placement_for

    try:
        placement = placement_for(cfg.ray)
    except ValueError as e:
        raise ClusterError(str(e)) from None
    storage = cfg.ray.storage_path
    if placement.labelled and "://" not in storage:
        log.warning(
            "ray.storage_path %s is a local path on a multi-node cluster: every node must see it (a shared "
            "file system), or pass ray.storage_path=s3://bucket/prefix",
            storage,
        )
    log.info("placement: %s", placement.describe())
    return placement
