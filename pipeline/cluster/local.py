"""A real autoscaling, multi-node Ray cluster on one machine, with the node types of ``cluster.yaml``.

Every node is a real raylet (its own object store, workers, agents); Ray's own autoscaler (v2) launches and
terminates them from the node types, through the fake multi-node provider that ships in the Ray wheel. It is
the cluster of ``cluster.yaml`` without the cloud: the same head, the same ``cpu_worker`` type scaling from
zero for augmentation and the same ``gpu_worker`` type for training, with their labels, min/max counts and
the idle timeout, read from the file itself (one source of truth). What one machine cannot have is
replaced, and nothing else:

- sizes: each worker node claims :data:`LOCAL_SIZES` logical CPUs (``--size TYPE.CPU=N`` to change, as
  ``--size TYPE.max_workers=N`` caps a type's count): fake nodes may claim more than the machine has;
- GPUs: ``cluster.yaml``'s ``GPU`` becomes the custom resource :data:`~pipeline.cluster.placement.LOCAL_GPU`
  (there is none to hand out); a pretraining job sees it and its workers each reserve one and train on
  the CPU (``ray.gpu_resource: auto``);
- the head type is renamed ``ray.head.default`` (the provider's name for it); its labels are kept.

Usage::

    python -m pipeline.cluster.local start --dir /tmp/dino-cluster    # prints the job API address
    RAY_ADDRESS=http://127.0.0.1:<port> ray job submit --working-dir . -- python jobs/pretrain.py --config smoke
    python -m pipeline.cluster.local status --dir /tmp/dino-cluster   # nodes by type and role
    python -m pipeline.cluster.local stop --dir /tmp/dino-cluster     # stops this cluster's processes only

Everything binds to 127.0.0.1 where Ray lets it (dashboard/job API); auth is off for this local cluster.
``stop`` kills only this cluster's processes (those naming its temp folder or GCS port, and their
descendants), never ``ray stop``, which would kill every Ray on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.cluster.placement import LOCAL_GPU, ROLE_LABEL

REPO = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO / "cluster.yaml"
HEAD_TYPE = "ray.head.default"  # the fake provider tags its head with this type name
FAKE_HEAD_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"  # the provider's fixed head node id
PROVIDER = "pipeline.cluster.local.LocalNodeProvider"
NODE_ID_ENV = "RAY_OVERRIDE_NODE_ID_FOR_TESTING"  # how the provider gives each node its id
LOCAL_SIZES = {"CPU": 1, "max_workers": 2}  # per worker node type unless --size says otherwise
OBJECT_STORE_BYTES = 1 << 30  # per node: the default (30 % of RAM each) would promise several times the RAM
# Faster than Ray's defaults (3 s x 5): a killed node is declared dead in ~3 s instead of ~15 s.
SYSTEM_CONFIG = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_sizes(items: list[str]) -> dict[str, dict[str, float]]:
    """``["cpu_worker.CPU=2", "gpu_worker.max_workers=1"]`` -> ``{"cpu_worker": {"CPU": 2}, ...}``."""
    out: dict[str, dict[str, float]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        node_type, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise ValueError(f"--size '{item}' is not of the form NODE_TYPE.KEY=NUMBER (e.g. cpu_worker.CPU=2)")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"--size '{item}': {value!r} is not a number") from None
        out.setdefault(node_type, {})[name] = int(number) if number == int(number) else number
    return out


def local_config(
    gcs_address: str,
    sizes: dict[str, dict[str, float]] | None = None,
    idle_timeout_minutes: float | None = None,
    cluster_yaml: Path = CLUSTER_YAML,
) -> dict[str, Any]:
    """The autoscaling config of the local cluster: ``cluster_yaml``'s node types (labels, min/max counts,
    resources with ``GPU`` -> :data:`LOCAL_GPU`), sized by :data:`LOCAL_SIZES` and ``sizes``, for the fake
    provider joining the GCS at ``gcs_address``.

    Raises:
        ValueError: one line, when ``sizes`` names a node type the file does not have.
    """
    source = yaml.safe_load(cluster_yaml.read_text())
    types = source["available_node_types"]
    head_name = source["head_node_type"]
    unknown = sorted(set(sizes or {}) - set(types))
    if unknown:
        raise ValueError(
            f"--size names node type(s) {unknown} that {cluster_yaml.name} does not define (it has {sorted(types)})"
        )
    node_types: dict[str, Any] = {}
    for name, spec in types.items():
        want = {**({} if name == head_name else LOCAL_SIZES), **(sizes or {}).get(name, {})}
        market = ((spec.get("node_config") or {}).get("InstanceMarketOptions") or {}).get("MarketType")
        if market == "spot" and "max_workers" not in (sizes or {}).get(name, {}):
            want["max_workers"] = 0  # a purchase option, not another shape: local nodes of it only when sized
        resources = {}
        for res, amount in (spec.get("resources") or {}).items():
            res = LOCAL_GPU if res == "GPU" else res
            resources[res] = min(amount, 1) if res == LOCAL_GPU else amount  # one stand-in GPU per node
        if "CPU" in want:
            resources["CPU"] = want["CPU"]
        for res, amount in want.items():
            if res not in ("CPU", "max_workers", "min_workers"):
                resources[res] = amount
        resources.setdefault("object_store_memory", OBJECT_STORE_BYTES)
        out = {"resources": resources, "node_config": {}, "labels": dict(spec.get("labels") or {})}
        if name == head_name:
            out["max_workers"] = 0
        else:
            out["min_workers"] = int(want.get("min_workers", spec.get("min_workers", 0)))
            out["max_workers"] = int(min(want.get("max_workers", spec["max_workers"]), spec["max_workers"]))
            if "priority" in spec:
                out["priority"] = int(spec["priority"])
        node_types[HEAD_TYPE if name == head_name else name] = out
    return {
        "cluster_name": f"{source.get('cluster_name', 'dino-ray')}-local",
        "max_workers": sum(t["max_workers"] for n, t in node_types.items() if n != HEAD_TYPE),
        "upscaling_speed": source.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": source.get("idle_timeout_minutes", 5)
        if idle_timeout_minutes is None
        else idle_timeout_minutes,
        "provider": {
            "type": "external",
            "module": PROVIDER,
            "gcs_address": gcs_address,
            "head_node_id": FAKE_HEAD_ID,
            "launch_multiple": True,
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": node_types,
        "head_node_type": HEAD_TYPE,
        "auth": {"ssh_user": "ubuntu"},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def _provider_base():
    from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider

    return FakeMultiNodeProvider


class LocalNodeProvider(_provider_base()):
    """Ray's fake multi-node provider, with one change: every node gets a temp folder of its own
    (``<head temp>/nodes/<id>``, and ``tmp/`` in it as the node's ``TMPDIR``), as separate machines have. With the
    provider's default all nodes share the head's session folder, and a node's runtime-env agent, when its node is
    removed, deletes the job's working directory that the workers of every other node run in (seen: k-NN actors
    starting on a CPU node while an idle training node went away died with ``FileNotFoundError`` from
    ``os.getcwd``); every node's log monitor also re-sent the others' logs, so each driver line came 2-4 times."""

    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        import ray
        import ray._private.ray_constants as ray_constants
        from ray.autoscaler.tags import (
            NODE_KIND_WORKER,
            STATUS_UP_TO_DATE,
            TAG_RAY_NODE_KIND,
            TAG_RAY_NODE_NAME,
            TAG_RAY_NODE_STATUS,
            TAG_RAY_USER_NODE_TYPE,
        )

        resources = dict(resources)
        self._wait_for_capacity(tags[TAG_RAY_USER_NODE_TYPE], TAG_RAY_USER_NODE_TYPE)
        with self.lock:
            node_type = tags[TAG_RAY_USER_NODE_TYPE]
            node_id = self._next_hex_node_id()
            temp_dir = os.path.join(os.environ["DINO_LOCAL_CLUSTER_TEMP"], "nodes", node_id[-5:])
            tmp = os.path.join(temp_dir, "tmp")  # the node's own TMPDIR: nothing in /tmp is shared between nodes
            os.makedirs(tmp, exist_ok=True)
            params = ray._private.parameter.RayParams(
                min_worker_port=0,
                max_worker_port=0,
                dashboard_port=None,
                dashboard_agent_listen_port=0,
                num_cpus=resources.pop("CPU", 0),
                num_gpus=resources.pop("GPU", 0),
                object_store_memory=resources.pop("object_store_memory", None),
                resources=resources,
                labels=labels,
                gcs_address=self._gcs_address,
                redis_address=self._gcs_address,
                temp_dir=temp_dir,
                env_vars={
                    NODE_ID_ENV: node_id,
                    "RAY_CLOUD_INSTANCE_ID": node_id,
                    "RAY_NODE_TYPE_NAME": node_type,
                    "TMPDIR": tmp,
                    ray_constants.RESOURCES_ENVIRONMENT_VARIABLE: json.dumps(resources),
                    ray_constants.LABELS_ENVIRONMENT_VARIABLE: json.dumps(labels),
                },
            )
            node = ray._private.node.Node(params, head=False, shutdown_at_exit=False, spawn_reaper=False)
            self._nodes[node_id] = {
                "tags": {
                    TAG_RAY_NODE_KIND: NODE_KIND_WORKER,
                    TAG_RAY_USER_NODE_TYPE: node_type,
                    TAG_RAY_NODE_NAME: node_id,
                    TAG_RAY_NODE_STATUS: STATUS_UP_TO_DATE,
                    **tags,
                },
                "node": node,
            }

    def _wait_for_capacity(self, node_type: str, type_tag: str) -> None:
        """A cloud out of capacity, for tests (:meth:`LocalCluster.set_capacity`): while the file
        ``<cluster temp>/capacity/<node type>`` holds a number N, a node of that type is created only while fewer
        than N of it are alive; the launch waits (on the autoscaler's launch pool, as a request the cloud has
        not filled), and goes through once the file is gone or allows it."""
        path = Path(os.environ["DINO_LOCAL_CLUSTER_TEMP"]) / "capacity" / node_type
        while path.exists():
            try:
                limit = int(path.read_text())
            except (OSError, ValueError):
                return
            with self.lock:
                alive = sum(
                    1
                    for n in self._nodes.values()
                    if n["tags"].get(type_tag) == node_type and n["node"].remaining_processes_alive()
                )
            if alive < limit:
                return
            time.sleep(0.5)


def _ray_cli() -> str:
    beside = Path(sys.executable).parent / "ray"
    return str(beside) if beside.exists() else "ray"


def _proc_table() -> tuple[dict[int, int], dict[int, bytes]]:
    """``{pid: ppid}`` and ``{pid: cmdline}`` of every process readable here."""
    parent, cmdline = {}, {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline[int(pid)] = Path(f"/proc/{pid}/cmdline").read_bytes()
            parent[int(pid)] = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return parent, cmdline


def _with_descendants(roots: set[int], parent: dict[int, int]) -> set[int]:
    found = set(roots)
    while True:
        more = {pid for pid, ppid in parent.items() if ppid in found} - found
        if not more:
            return found
        found |= more


def _kill(pids: set[int], grace_s: float = 10.0, sig: int = signal.SIGTERM) -> None:
    """Send ``sig``, then SIGKILL to whatever is left after ``grace_s``."""
    for s in (sig, signal.SIGKILL) if sig != signal.SIGKILL else (signal.SIGKILL,):
        for pid in pids:
            try:
                os.kill(pid, s)
            except OSError:
                pass
        deadline = time.monotonic() + grace_s
        while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)


@dataclass
class LocalCluster:
    """One local autoscaling cluster living in ``folder`` (config, state file; Ray's temp folder beside)."""

    folder: Path
    sizes: dict[str, dict[str, float]] = field(default_factory=dict)
    idle_timeout_minutes: float | None = None
    cluster_yaml: Path = CLUSTER_YAML
    gcs_port: int = 0
    dashboard_port: int = 0
    temp_dir: str = ""
    config: dict[str, Any] = field(default_factory=dict)

    STATE = "cluster.json"

    node_ip: str = ""

    @property
    def gcs_address(self) -> str:
        return f"{self.node_ip}:{self.gcs_port}"

    @property
    def address(self) -> str:
        """The dashboard / job API (``RAY_ADDRESS`` for ``ray job submit`` and the state API)."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def job_env(self) -> dict[str, str]:
        """The environment for ``ray job submit`` against this cluster."""
        env = {**os.environ, "RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "disabled"}
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        return env

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, timeout_s: float = 180.0) -> LocalCluster:
        import ray._private.services

        self.folder = Path(self.folder).resolve()
        self.folder.mkdir(parents=True, exist_ok=True)
        # The address the provider's raylets register with: the head must have the same one, or clients
        # resolving the cluster from this machine's processes see two clusters ("multiple active Ray instances").
        self.node_ip = ray._private.services.get_node_ip_address()
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.temp_dir = f"/tmp/dlc{os.getpid()}-{self.gcs_port}"  # short: Ray's unix sockets live under it
        self.config = local_config(self.gcs_address, self.sizes, self.idle_timeout_minutes, self.cluster_yaml)
        config_path = self.folder / "autoscaling.yaml"
        config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        head = self.config["available_node_types"][HEAD_TYPE]
        resources = dict(head["resources"])
        cpus = int(resources.pop("CPU", 0))
        store = int(resources.pop("object_store_memory", OBJECT_STORE_BYTES))
        labels = ",".join(f"{k}={v}" for k, v in head["labels"].items())
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(
            {
                "RAY_FAKE_CLUSTER": "1",
                "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                "RAY_enable_autoscaler_v2": "1",
                "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_ID,
                NODE_ID_ENV: FAKE_HEAD_ID,
                "RAY_AUTH_MODE": "disabled",
                "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
                "DINO_LOCAL_CLUSTER_TEMP": self.temp_dir,  # LocalNodeProvider puts each node's folder under it
                "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
            }
        )
        ports = {
            "--ray-client-server-port": free_port(),
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--runtime-env-agent-port": free_port(),
            "--metrics-export-port": free_port(),
            "--node-manager-port": free_port(),
            "--object-manager-port": free_port(),
        }
        cmd = [
            _ray_cli(),
            "start",
            "--head",
            f"--node-ip-address={self.node_ip}",
            f"--port={self.gcs_port}",
            f"--dashboard-port={self.dashboard_port}",
            "--dashboard-host=127.0.0.1",
            "--include-dashboard=true",
            f"--num-cpus={cpus}",
            f"--object-store-memory={store}",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
            f"--autoscaling-config={config_path}",
            f"--system-config={json.dumps(SYSTEM_CONFIG, separators=(',', ':'))}",
            *(["--labels", labels] if labels else []),
            *(f"{k}={v}" for k, v in ports.items()),
        ]
        if resources:
            cmd.append(f"--resources={json.dumps(resources)}")
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        if out.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start --head failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
        self._write_state()
        self._publish_node_types()
        self._wait_for_api(timeout_s)
        return self

    def _publish_node_types(self) -> None:
        """Tell the GCS what the node types can reach, as a managed autoscaler does (KubeRay's operator):
        Ray Train checks a worker group against it, and ``ray.use_gpu: auto`` sees the training type's
        accelerator before the first training node exists. Ray's own VM autoscaler does not publish it."""
        import ray._raylet
        from ray.core.generated import autoscaler_pb2

        groups = []
        for name, spec in self.config["available_node_types"].items():
            resources = {k: int(v) for k, v in spec["resources"].items() if k != "object_store_memory" and v}
            groups.append(
                autoscaler_pb2.NodeGroupConfig(
                    name=name,
                    resources=resources,
                    min_count=int(spec.get("min_workers", 0)),
                    max_count=int(spec["max_workers"]) if name != HEAD_TYPE else 1,
                )
            )
        config = autoscaler_pb2.ClusterConfig(node_group_configs=groups)
        client = ray._raylet.GcsClient(address=self.gcs_address)
        client.internal_kv_put(
            ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY.encode(),
            config.SerializeToString(),
            True,
            ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE.encode(),
        )

    def set_capacity(self, node_type: str, nodes: int | None) -> None:
        """What the "cloud" can give of ``node_type`` from now on: at most ``nodes`` alive at once (launches beyond
        wait, as on a cloud out of spot capacity; nodes already up stay), or None for no limit. The autoscaler
        still plans for the type's maximum, and Ray Train still sees it (a capacity missing for now, not a
        smaller cluster)."""
        path = Path(self.temp_dir) / "capacity" / node_type
        if nodes is None:
            path.unlink(missing_ok=True)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(str(int(nodes)))
        tmp.replace(path)

    def _wait_for_api(self, timeout_s: float) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.address}/api/version", timeout=2) as r:
                    if r.status == 200 and self.nodes():
                        return
            except Exception:  # noqa: BLE001 - not up yet
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the local cluster's job API at {self.address} did not answer within {timeout_s:.0f} s")

    def _write_state(self) -> None:
        state = {
            "gcs_port": self.gcs_port,
            "dashboard_port": self.dashboard_port,
            "temp_dir": self.temp_dir,
            "node_ip": self.node_ip,
            "address": self.address,
            "gcs_address": self.gcs_address,
            "config": self.config,
        }
        (self.folder / self.STATE).write_text(json.dumps(state, indent=2))

    @classmethod
    def attach(cls, folder: Path) -> LocalCluster:
        """The cluster started in ``folder`` (by another process)."""
        path = Path(folder) / cls.STATE
        if not path.is_file():
            raise FileNotFoundError(f"no local cluster in {folder} ({cls.STATE} not found): start one first")
        state = json.loads(path.read_text())
        return cls(
            Path(folder),
            gcs_port=state["gcs_port"],
            dashboard_port=state["dashboard_port"],
            temp_dir=state["temp_dir"],
            config=state["config"],
            node_ip=state["node_ip"],
        )

    def processes(self) -> set[int]:
        """Every process of this cluster: those naming its temp folder or its GCS port, and their descendants."""
        if not self.temp_dir:
            return set()
        parent, cmdline = _proc_table()
        port = f":{self.gcs_port}".encode()
        me = os.getpid()
        named = {
            pid
            for pid, cmd in cmdline.items()
            if pid != me
            and (
                self.temp_dir.encode() in cmd
                or (b"--address=" in cmd and port + b"\x00" in cmd + b"\x00" and b"ray" in cmd)
            )
        }
        return _with_descendants(named, parent) - {me}

    def stop(self, keep_logs: bool = False) -> None:
        """Stop this cluster only (never ``ray stop``: it kills every Ray cluster on the machine) and remove
        its temp folder (its nodes' logs and sessions), unless ``keep_logs``."""
        import shutil

        _kill(self.processes())
        state = Path(self.folder) / self.STATE
        if state.exists():
            state.unlink()
        if self.temp_dir and not keep_logs:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    # -- nodes -----------------------------------------------------------------------------------
    def nodes(self, alive_only: bool = True) -> list[dict[str, Any]]:
        """Nodes from Ray's state API: ``node_id``, ``role`` (its ``dino-ray/role`` label), ``state``, resources."""
        from ray.util.state import list_nodes

        nodes = list_nodes(address=self.address, limit=10_000, raise_on_missing_output=False)
        rows = [
            {
                "node_id": n.node_id,
                "role": (n.labels or {}).get(ROLE_LABEL, "?"),
                "state": n.state,
                "is_head": n.is_head_node,
                "resources": dict(n.resources_total or {}),
            }
            for n in nodes
        ]
        return [r for r in rows if r["state"] == "ALIVE"] if alive_only else rows

    def node_processes(self, node_id: str) -> set[int]:
        """The processes of one worker node: its raylet and everything it started (workers, agents), found by
        the node id the provider put in their environment."""
        if node_id == FAKE_HEAD_ID:
            raise ValueError("that is the head node: stop() stops the whole cluster")
        parent, _ = _proc_table()
        marker = f"{NODE_ID_ENV}={node_id}\x00".encode()
        tagged = set()
        for pid in parent:
            try:
                if marker in Path(f"/proc/{pid}/environ").read_bytes() + b"\x00":
                    tagged.add(pid)
            except OSError:
                continue
        return _with_descendants(tagged, parent)

    def kill_node(self, node_id: str) -> set[int]:
        """SIGKILL a worker node's raylet and every process under it, as a machine that vanished; returns the pids."""
        pids = self.node_processes(node_id)
        if not pids:
            raise ValueError(f"no process of node {node_id} found")
        _kill(pids, grace_s=5.0, sig=signal.SIGKILL)
        return pids


def _status_lines(cluster: LocalCluster) -> list[str]:
    lines = [f"job API {cluster.address} (RAY_ADDRESS), GCS {cluster.gcs_address}"]
    for n in sorted(cluster.nodes(), key=lambda n: (not n["is_head"], n["role"], n["node_id"])):
        res = ", ".join(
            f"{k}={v:g}"
            for k, v in sorted(n["resources"].items())
            if not k.startswith(("node:", "memory", "object_store"))
        )
        lines.append(f"  {n['node_id'][-8:]}  {ROLE_LABEL}={n['role']:<8} {res}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.cluster.local", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["start", "status", "stop"])
    parser.add_argument("--dir", default="/tmp/dino-ray-local-cluster", help="folder for its config and state")
    parser.add_argument(
        "--size",
        action="append",
        default=[],
        metavar="TYPE.KEY=N",
        help=f"override a node type's size, e.g. cpu_worker.CPU=2, cpu_worker.max_workers=3 "
        f"(default {LOCAL_SIZES} per worker type)",
    )
    parser.add_argument(
        "--idle-timeout-minutes",
        type=float,
        default=None,
        help="idle time before the autoscaler removes a node (default: cluster.yaml's)",
    )
    parser.add_argument("--cluster-yaml", default=str(CLUSTER_YAML))
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            cluster = LocalCluster(
                Path(args.dir), parse_sizes(args.size), args.idle_timeout_minutes, Path(args.cluster_yaml)
            ).start()
            print("\n".join(_status_lines(cluster)))
            types = {
                n: (t.get("min_workers", 0), t["max_workers"], t["resources"], t["labels"])
                for n, t in cluster.config["available_node_types"].items()
            }
            for name, (lo, hi, res, labels) in types.items():
                print(f"  node type {name}: {lo}..{hi} nodes, {res}, labels {labels}")
            print(f"submit:  RAY_ADDRESS={cluster.address} ray job submit --working-dir . -- python jobs/pretrain.py")
            print(f"stop:    python -m pipeline.cluster.local stop --dir {args.dir}")
        elif args.command == "status":
            print("\n".join(_status_lines(LocalCluster.attach(Path(args.dir)))))
        else:
            cluster = LocalCluster.attach(Path(args.dir))
            n = len(cluster.processes())
            cluster.stop()
            print(f"stopped the local cluster in {args.dir} ({n} processes)")
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
