"""The cluster over a run's lifetime: nodes by role and actors by kind, sampled from Ray's state API.

A user tuning autoscaling (``ray.augment_actors_min..max``, a node type's ``max_workers``,
``idle_timeout_minutes``) wants to see when the autoscaler added augmentation nodes, how long they took to
join, whether the actor pool grew to its maximum and when the nodes went away. On a multi-node cluster the
pretraining driver runs a :class:`ClusterTimeline` beside training and logs ``cluster/timeline.csv`` and
``cluster/timeline.png`` to the run::

    timeline = ClusterTimeline(interval_s=1.0).start()
    ...                                   # train
    rows = timeline.stop()
    timeline.write(folder)                # timeline.csv + timeline.png

Every figure comes from the state API (``list_nodes``, ``list_actors``), not from the pipeline's own
bookkeeping. Columns: ``t_s`` (seconds since start), ``time`` (UTC), ``nodes_<role>`` (alive nodes per
``dino-ray/role`` label: head, augment, train; ``unlabelled`` otherwise), ``actors_<kind>`` (alive
actors: ``augment`` = the multi-crop pool, ``train`` = Ray Train workers, ``embed`` = k-NN embedding) and
``pending_<kind>`` (actors waiting for a node: what the autoscaler is asked for).
"""

from __future__ import annotations

import csv
import logging
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from pipeline.cluster.placement import ROLE_LABEL

log = logging.getLogger(__name__)

ROLES = ("head", "augment", "train", "unlabelled")
KINDS = ("augment", "train", "embed")
_PENDING = {"PENDING_CREATION", "DEPENDENCIES_UNREADY", "RESTARTING"}


def actor_kind(class_name: str) -> str | None:
    """The kind of an actor by its class name (Ray Data names pool actors ``MapWorker(MapBatches(<fn>))``)."""
    if "MultiCropMapper" in class_name:
        return "augment"
    if class_name == "RayTrainWorker":
        return "train"
    if "Embedder" in class_name:
        return "embed"
    return None


def node_role(labels: dict[str, str] | None, is_head: bool = False) -> str:
    role = (labels or {}).get(ROLE_LABEL)
    if role in ROLES:
        return role
    return "head" if is_head else "unlabelled"


def sample(address: str | None = None) -> dict[str, int]:
    """One snapshot: ``{"nodes_<role>": n, "actors_<kind>": n, "pending_<kind>": n}``."""
    from ray.util.state import list_actors, list_nodes

    row = {f"nodes_{r}": 0 for r in ROLES} | {f"actors_{k}": 0 for k in KINDS} | {f"pending_{k}": 0 for k in KINDS}
    for node in list_nodes(
        address=address, filters=[("state", "=", "ALIVE")], limit=10_000, raise_on_missing_output=False
    ):
        row[f"nodes_{node_role(node.labels, node.is_head_node)}"] += 1
    actors = list_actors(
        address=address, filters=[("state", "!=", "DEAD")], limit=10_000, raise_on_missing_output=False
    )
    for actor in actors:
        kind = actor_kind(actor.class_name or "")
        if kind is not None:
            row[f"{'pending' if actor.state in _PENDING else 'actors'}_{kind}"] += 1
    return row


class ClusterTimeline:
    """Samples :func:`sample` every ``interval_s`` in a daemon thread until :meth:`stop`."""

    def __init__(self, interval_s: float = 1.0, address: str | None = None):
        self.interval_s, self.address = interval_s, address
        self.rows: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = time.time()
        self.errors = 0

    def start(self) -> ClusterTimeline:
        self._t0 = time.time()
        self._thread = threading.Thread(target=self._run, name="cluster-timeline", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.snapshot()
            self._stop.wait(self.interval_s)

    def snapshot(self) -> None:
        t = time.time()
        try:
            row = sample(self.address)
        except Exception as e:  # a diagnostic: the state API being slow or down never touches the run
            self.errors += 1
            if self.errors in (1, 10, 100):
                log.warning("cluster timeline: state API sample failed (%d so far): %s", self.errors, e)
            return
        self.rows.append({"t_s": round(t - self._t0, 2), "time": time.strftime("%H:%M:%S", time.gmtime(t)), **row})

    def stop(self) -> list[dict[str, Any]]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        return self.rows

    def write(self, folder: Path) -> list[Path]:
        """``timeline.csv`` and ``timeline.png`` in ``folder`` (nothing when no sample was taken)."""
        if not self.rows:
            return []
        folder.mkdir(parents=True, exist_ok=True)
        csv_path = folder / "timeline.csv"
        with csv_path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(self.rows[0]))
            writer.writeheader()
            writer.writerows(self.rows)
        png = folder / "timeline.png"
        plot(self.rows, png)
        return [csv_path, png]


def events(rows: list[dict[str, Any]], column: str) -> list[tuple[float, int]]:
    """``(t_s, value)`` at the start and at every change of ``column``: when nodes came and went."""
    out: list[tuple[float, int]] = []
    for row in rows:
        if not out or row[column] != out[-1][1]:
            out.append((row["t_s"], row[column]))
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Two stacked step plots over time: nodes by role, actors by kind (alive solid, pending dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t_s"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True, constrained_layout=True)
    colours = {
        "head": "grey",
        "augment": "tab:blue",
        "train": "tab:orange",
        "unlabelled": "tab:purple",
        "embed": "tab:green",
    }
    for role in ROLES:
        values = [r[f"nodes_{role}"] for r in rows]
        if any(values):
            top.step(t, values, where="post", label=f"{role} nodes", color=colours[role])
    top.set_ylabel("alive nodes")
    top.legend(loc="upper right")
    top.set_title("Cluster over the run (Ray state API)")
    for kind in KINDS:
        alive, pending = [r[f"actors_{kind}"] for r in rows], [r[f"pending_{kind}"] for r in rows]
        if any(alive) or any(pending):
            bottom.step(t, alive, where="post", label=f"{kind} actors", color=colours[kind])
            if any(pending):
                bottom.step(t, pending, where="post", linestyle="--", label=f"{kind} pending", color=colours[kind])
    bottom.set_ylabel("actors")
    bottom.set_xlabel("seconds since the driver started")
    bottom.legend(loc="upper right")
    for ax in (top, bottom):
        ax.yaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def log_timeline(tracking_uri: str, run_id: str, timeline) -> list[str]:
    """Stop ``timeline`` and log its CSV and PNG under ``cluster/`` of the run; returns the artifact paths.
    A diagnostic: failures warn and never change the run's outcome."""
    if timeline is None:
        return []
    rows = timeline.stop()
    try:
        with tempfile.TemporaryDirectory() as d:
            files = timeline.write(Path(d))
            from pipeline.tracking import mlflow_client

            client = mlflow_client(tracking_uri)
            for f in files:
                client.log_artifact(run_id, str(f), artifact_path="cluster")
    except Exception as e:  # noqa: BLE001
        log.warning("could not log the cluster timeline (%d samples): %s", len(rows), e)
        return []
    log.info(
        "cluster timeline: %d samples over %.0f s logged to the run as cluster/timeline.csv and .png",
        len(rows),
        rows[-1]["t_s"] if rows else 0.0,
    )
    return [f"cluster/{f.name}" for f in files]
