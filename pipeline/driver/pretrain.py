"""Driver side of a pretraining run: validate, plan, start Ray, train, export, track.

Everything that can be wrong with the input (config, data path, shard contents, batch larger than the
dataset) is checked by :func:`prepare` before any Ray resources are requested.
"""

from __future__ import annotations

import json
import logging
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.data.shards import SplitInfo
from pipeline.errors import ClusterError, DataError
from pipeline.tracking import create_run, log_dataset_inputs, metric_name, redact, resolve_tracking_uri

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """A validated plan for one run (no Ray resources requested yet)."""

    cfg: Config
    data_root: str | list[str]
    train: SplitInfo  # its counts may hold None until count_shards() (object storage without an index)
    steps_per_epoch: int | None  # None until the training source is counted
    global_batch_size: int
    tracking_uri: str
    experiment: str
    run_name: str
    val: SplitInfo | None = None  # for attention maps and the k-NN evaluation; None when there is no validation source
    start: Any = None  # model.init_from read and mapped onto the model (pipeline.train.start_weights.StartWeights), or None
    val_note: str | None = None  # why there is no validation source, for the user
    entry_point: str = ""  # the script the run was started from (the MLflow run's source)


@dataclass
class PretrainResult:
    run_id: str
    tracking_uri: str
    teacher_dir: Path
    checkpoint_path: str
    data_root: str
    # Rank 0's last report (+ skipped_samples, data); with val object masks also "attention_jaccard": {"teacher",
    # "random_init" (or "start" after model.init_from), "centre_prior": scores, "n_images", "epoch", "mass"}
    metrics: dict[str, Any] = field(default_factory=dict)
    model_version: str | None = None  # "name/version" in the MLflow model registry
    start_knn: dict[str, Any] | None = None  # k-NN of the starting weights (model.init_from), measured before step 1
    timeline: Any = None  # a running ClusterTimeline on a multi-node cluster: close_timeline() logs it

    def close_timeline(self) -> list[str]:
        """Stop the cluster timeline (if any) and log it to the run as ``cluster/timeline.{csv,png}``."""
        timeline, self.timeline = self.timeline, None
        return log_timeline(self.tracking_uri, self.run_id, timeline)


def log_timeline(tracking_uri: str, run_id: str, timeline) -> list[str]:
    """Stop ``timeline`` and log its CSV and PNG under ``cluster/`` of the run; returns the artifact paths.
    A diagnostic: failures warn and never change the run's outcome."""
    if timeline is None:
        return []
    rows = timeline.stop()
    try:
        with tempfile.TemporaryDirectory() as d:
            files = timeline.write(Path(d))
            client = _client(tracking_uri)
            for f in files:
                client.log_artifact(run_id, str(f), artifact_path="cluster")
    except Exception as e:  # noqa: BLE001
        log.warning("could not log the cluster timeline (%d samples): %s", len(rows), e)
        return []
    log.info("cluster timeline: %d samples over %.0f s logged to the run as cluster/timeline.csv and .png",
             len(rows), rows[-1]["t_s"] if rows else 0.0)
    return [f"cluster/{f.name}" for f in files]


def ensure_data(cfg: Config) -> str:
    """The dataset root: ``data.root``, or the synthetic demo dataset (generated once) when it is null."""
    if cfg.data.root is not None:
        return cfg.data.root
    from pipeline.data.synthetic import VERSION, make_synthetic_dataset

    d = cfg.data
    out = Path(d.synthetic_dir) / f"shapes-v{VERSION}-{d.synthetic_image_size}px-{d.synthetic_train}-{d.synthetic_val}-s{cfg.seed}"
    if not (out / "index.json").is_file():
        log.info("no data.root given: generating the synthetic shapes dataset in %s", out)
        make_synthetic_dataset(
            out, n_train=d.synthetic_train, n_val=d.synthetic_val, image_size=d.synthetic_image_size, seed=cfg.seed
        )
    return str(out.resolve())


def dataset_name(root) -> str:
    """A short name for experiment/run names: the folder, the folder holding a pattern or a shard list, or the
    first of a list of sources."""
    from pipeline.data.storage import is_pattern

    if isinstance(root, (list, tuple)):
        root = root[0]
    path = Path(str(root).rstrip("/"))
    inside = is_pattern(str(root)) or path.suffix in (".tar", ".json")
    name = path.parent.name if inside else path.name
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "dataset"


def steps_per_epoch(cfg: Config, train: SplitInfo) -> int:
    """Full global batches in one pass over the (counted) training source; a one-line error when there is none."""
    global_batch = cfg.optim.batch_size_per_worker * cfg.ray.num_workers
    steps = train.count // global_batch
    if steps == 0:
        raise DataError(
            f"{train.describe()} has {train.count} samples, fewer than one global batch "
            f"({cfg.optim.batch_size_per_worker} x {cfg.ray.num_workers} workers = {global_batch})"
        )
    return steps


def prepare(cfg: Config, entry_point: str | None = None) -> Prepared:
    """Validate data and sizes and compute the step plan. Raises one-line errors; starts nothing.

    The training and validation sources are listed and, where an index or the local tar headers can tell,
    counted here (:mod:`pipeline.data.sources`); shards on object storage that no index counts are counted by Ray
    tasks once Ray has started (:func:`count_shards`). ``entry_point``: the script that started the run."""
    from pipeline.driver.preflight import check_before_ray
    from pipeline.data.sources import validation_source

    check_before_ray(cfg, resolve_tracking_uri(cfg.tracking.tracking_uri))  # the model, the store, local CPUs
    root = ensure_data(cfg)
    from pipeline.data.sources import resolve_source

    train = resolve_source(root, cfg.data.train_split, cfg.data)
    global_batch = cfg.optim.batch_size_per_worker * cfg.ray.num_workers
    steps = steps_per_epoch(cfg, train) if train.counted else None
    val, val_note = validation_source(cfg.data, root, train)
    name = dataset_name(root)
    experiment = cfg.tracking.experiment or f"dino-{name}-{cfg.preset}"
    run_name = cfg.tracking.run_name or f"{cfg.model.arch}-{name}-{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    check_ray_address(cfg.ray.address)
    check_writable(cfg.ray.storage_path, "ray.storage_path")
    check_writable(cfg.output_dir, "output_dir")
    tracking_uri = check_tracking_uri(resolve_tracking_uri(cfg.tracking.tracking_uri), cfg)
    from pipeline.train.start_weights import load_start

    start = load_start(cfg, tracking_uri)  # read and checked key by key here, before Ray (None without init_from)
    return Prepared(
        cfg=cfg,
        data_root=root,
        train=train,
        steps_per_epoch=steps,
        global_batch_size=global_batch,
        tracking_uri=tracking_uri,
        experiment=experiment,
        run_name=run_name,
        val=val,
        start=start,
        val_note=val_note,
        entry_point=entry_point or _entry_point(),
    )


def _entry_point() -> str:
    """The script this process runs, relative to the repository when inside it (``jobs/pretrain.py``)."""
    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    if script is None or not script.name:
        return "python"
    repo = Path(__file__).resolve().parents[2]
    try:
        return str(script.relative_to(repo))
    except ValueError:
        return script.name


def count_shards(p: Prepared, label_selector: dict[str, str] | None = None) -> Prepared:
    """Counts, in place, the training and validation shards that no index counted, by Ray tasks on the data
    nodes (their tar headers; each shard streamed once), then makes the step plan; returns ``p``.

    Raises:
        DataError: a shard that is not a readable tar; a training source smaller than one global batch.
    """
    from pipeline.data.sources import count_on_ray

    cpus = p.cfg.ray.read_cpus_per_task
    p.train = count_on_ray(p.train, num_cpus=cpus, label_selector=label_selector)
    if p.val is not None:
        p.val = count_on_ray(p.val, num_cpus=cpus, label_selector=label_selector)
    p.steps_per_epoch = steps_per_epoch(p.cfg, p.train)
    return p


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
        raise ClusterError(f"Ray cluster at ray.address '{address}' is not reachable ({e}); is the head running?") from None


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


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_tags(p: Prepared, placement) -> dict[str, str]:
    import ray
    import torch
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE

    commit = _git_commit()
    return {
        MLFLOW_SOURCE_NAME: p.entry_point,  # the run page's "Source"
        MLFLOW_SOURCE_TYPE: "JOB",
        **({MLFLOW_GIT_COMMIT: commit} if commit != "unknown" else {}),
        "git_commit": commit,
        "preset": p.cfg.preset,
        "dataset": p.train.source,
        "arch": p.cfg.model.arch,
        "num_workers": str(p.cfg.ray.num_workers),
        "worker_kind": "gpu" if placement.cuda else "cpu",
        "placement": placement.describe(),
        "ray_version": ray.__version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        **({"dino.init_from": p.start.source, "dino.init_kind": p.start.kind,
            "dino.init_summary": p.start.summary()[:5000]} if p.start is not None else {}),
    }


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
        log.warning("ray.storage_path %s is a local path on a multi-node cluster: every node must see it (a shared "
                    "file system), or pass ray.storage_path=s3://bucket/prefix", storage)
    log.info("placement: %s", placement.describe())
    return placement


def pretrain(p: Prepared) -> PretrainResult:
    """Start Ray (if needed), train with a ``TorchTrainer``, export the final teacher, log it to MLflow."""
    import ray
    import ray.train
    import ray.util.scheduling_strategies
    from ray.train.torch import TorchTrainer

    from pipeline.data.stage import multicrop_dataset
    from pipeline.progress import EpochPrinter, summary_line
    from pipeline.cluster.ray_output import train_logging_config
    from pipeline.data.sample_stats import SampleCounter, skipped_total
    from pipeline.train.loop import LoopPlan, train_loop_per_worker

    cfg = p.cfg
    started = time.time()  # optim.time_budget_minutes counts from here: Ray's start is part of the job
    init_ray(cfg.ray.address, cfg.logging.ray_verbose)
    placement = resolve_placement_or_fail(cfg)
    if not p.train.counted or (p.val is not None and not p.val.counted):
        count_shards(p, placement.data_selector)
    run_id = find_run(p.tracking_uri, p.experiment, p.run_name)
    if run_id is not None:  # a re-submitted run name: continue that run (Ray Train resumes its checkpoints)
        _client(p.tracking_uri).update_run(run_id, status="RUNNING")
        _client(p.tracking_uri).set_tag(run_id, "resubmitted_at", time.strftime("%Y-%m-%d %H:%M:%S"))
        log.info("run name %s exists: resuming MLflow run %s and its Ray Train checkpoints", p.run_name, run_id)
    else:
        run_id = create_run(p.tracking_uri, p.experiment, p.run_name, cfg.flat(), run_tags(p, placement))
        log.info("MLflow run %s (%s) in experiment %s at %s", run_id, p.run_name, p.experiment, p.tracking_uri)
        _log_config_artifact(p, run_id)
        log_dataset_inputs(p.tracking_uri, run_id, dataset_name(p.data_root),
                           [(p.train, "training")] + ([(p.val, "validation")] if p.val is not None else []))
    start_knn = measure_start(p, run_id) if p.start is not None else None

    plan = LoopPlan(
        steps_per_epoch=p.steps_per_epoch,
        global_batch_size=p.global_batch_size,
        tracking_uri=p.tracking_uri,
        run_id=run_id,
        counter_name=f"dino_sample_counter_{run_id}",
        attention_paths=tuple(p.val.paths) if p.val is not None else (),
        deadline=training_deadline(started, cfg.optim.time_budget_minutes),
        started=started,
        init_weights=ray.put(p.start) if p.start is not None else None,  # every node reads it from the object store
    )
    counter_name = plan.counter_name
    # On the driver's node (the head on a cluster): it must outlive any worker node the autoscaler removes.
    here = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    counter = SampleCounter.options(name=counter_name, get_if_exists=True, scheduling_strategy=here).remote()
    # All epochs as one stream (one Ray Data execution for the run), plus one spare pass: bad samples
    # make a pass shorter than the index says, and a resumed run needs fewer steps than a fresh one.
    passes = cfg.optim.epochs + 1
    ds = multicrop_dataset(p.train, cfg, counter_name=counter_name, passes=passes, with_meta=False,
                           label_selector=placement.data_selector)
    storage = cfg.ray.storage_path
    if "://" not in storage:
        storage = str(Path(storage).resolve())
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "plan": plan.__dict__},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.ray.num_workers,
            use_gpu=placement.cuda,
            resources_per_worker=placement.worker_resources(cfg.ray.cpus_per_worker),
            label_selector=placement.train_selector,
        ),
        run_config=ray.train.RunConfig(
            name=p.run_name,
            storage_path=storage,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.ray.num_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures),
            logging_config=train_logging_config(cfg.logging.ray_verbose),
        ),
        datasets={"train": ds},
        dataset_config=ingest_config(placement.data_selector),
    )
    client = _client(p.tracking_uri)
    timeline = None
    if placement.multi_node:  # nodes by role and actors by kind over the run, for whoever tunes autoscaling
        from pipeline.cluster.timeline import ClusterTimeline

        timeline = ClusterTimeline(interval_s=1.0).start()
    epochs = EpochPrinter(lambda since: ray.get(counter.epoch_records.remote(since), timeout=30)).start()
    t_fit = time.time()
    try:
        result = trainer.fit()
    except Exception as e:
        log_timeline(p.tracking_uri, run_id, timeline)
        timeline = None
        client.set_terminated(run_id, "FAILED")
        storage_error = checkpoint_storage_error(e)
        if storage_error is not None:  # retried ray.max_failures times like any worker failure; it persisted
            raise DataError(f"run {p.run_name} stopped: {storage_error}; {last_checkpoint_note(storage, p.run_name)}") from None
        raise
    finally:
        records = epochs.stop()  # the last epoch's line, if the thread had not shown it yet
        prune_unregistered_checkpoints(storage, p.run_name)
    fit_s = time.time() - t_fit
    skipped = ray.get(counter.get.remote())
    stopped = ray.get(counter.stopped.remote())  # rank 0's reason: Result.metrics are the last checkpoint's
    ray.kill(counter)
    if stopped or result.checkpoint is None:
        log_timeline(p.tracking_uri, run_id, timeline)
    if stopped:
        client.set_tag(run_id, "stopped", stopped[:5000])
        client.set_terminated(run_id, "FAILED")
        raise DataError(f"run {p.run_name} stopped: {stopped}")
    if result.checkpoint is None:
        client.set_terminated(run_id, "FAILED")
        raise RuntimeError(f"training of run {p.run_name} finished without a checkpoint")
    log.info(summary_line(records, fit_s))
    teacher_dir = export_from_checkpoint(result.checkpoint, Path(cfg.output_dir) / p.run_name / "teacher", run_id)
    client.log_artifacts(run_id, str(teacher_dir), artifact_path="teacher")
    client.log_metric(run_id, metric_name("data_skipped_samples"), skipped_total(skipped))
    model_version = register_teacher(client, run_id, p, teacher_dir)
    client.set_terminated(run_id, "FINISHED")
    return PretrainResult(
        run_id=run_id,
        tracking_uri=p.tracking_uri,
        teacher_dir=teacher_dir,
        checkpoint_path=result.checkpoint.path,
        data_root=p.data_root,
        metrics={**dict(result.metrics or {}), "skipped_samples": skipped_total(skipped), "data": skipped},
        model_version=model_version,
        timeline=timeline,
        start_knn=start_knn,
    )


START_METRICS = ("knn/start_top1", "knn/start_top5")  # the starting weights' k-NN, logged at step 0 of the run


def measure_start(p: Prepared, run_id: str) -> dict[str, Any] | None:
    """k-NN of the starting teacher backbone (``model.init_from``) on the val split, before the first step.

    Logged to the run as ``knn/start_top1`` / ``knn/start_top5`` (step 0) with the same protocol as the final
    evaluation. A resumed run keeps the figures it logged when it started (read back, not measured again).
    Returns ``{"top1", "top5", "by_k"}`` in percent, or None without a val split.
    """
    cfg = p.cfg
    if p.val is None:
        log.info("model.init_from: no validation source, the starting point's k-NN is not measured")
        return None
    logged = _client(p.tracking_uri).get_run(run_id).data.metrics
    if all(k in logged for k in START_METRICS):
        return {"top1": logged[START_METRICS[0]], "top5": logged[START_METRICS[1]], "by_k": {}}
    from dino.backbone import backbone_kwargs
    from pipeline.eval.embed import BackboneSpec
    from pipeline.train.start_weights import backbone_weights
    from pipeline.eval.knn import knn_accuracies

    spec = BackboneSpec(cfg.model.arch, backbone_kwargs(cfg.model.arch, cfg.augment.global_size, cfg.model.model_kwargs),
                        cfg.knn.image_size or cfg.augment.global_size, seed=cfg.seed)
    t0 = time.perf_counter()
    try:
        from pipeline.data.sources import knn_protocol

        protocol, note = knn_protocol(p.train, p.val)
        if protocol is None:
            log.info("the starting point's k-NN is not measured: %s", note)
            return None
        acc = knn_accuracies(cfg, p.train, p.val, {"start": (spec, backbone_weights(p.start))}, protocol=protocol)["start"]
    except DataError as e:  # e.g. a val split without labels: the run goes on, unmeasured
        log.warning("the starting point's k-NN is not measured: %s", e)
        return None
    log.info("starting weights (%s): k-NN top-1 %.2f%%, top-5 %.2f%% on %s (k=%d, %.0f s)", p.start.kind, acc["top1"],
             acc["top5"], p.val.describe(), cfg.knn.k, time.perf_counter() - t0)
    _client(p.tracking_uri).log_batch(run_id, metrics=_metrics({START_METRICS[0]: acc["top1"], START_METRICS[1]: acc["top5"]}))
    return acc


def compare_with_start(tracking_uri: str, run_id: str, end_top1: float, start_top1: float) -> str:
    """The final teacher's k-NN against the starting weights': tag ``dino.below_start`` (true/false) and the
    margin on the run; a run that ends below its starting point also warns. Returns the line to show."""
    below = end_top1 < start_top1
    margin = end_top1 - start_top1
    client = _client(tracking_uri)
    client.set_tag(run_id, "dino.below_start", str(below).lower())
    client.set_tag(run_id, "dino.knn_vs_start", f"{margin:+.2f} points top-1")
    if below:
        line = (f"WARNING: the run ended BELOW its starting point: k-NN top-1 {end_top1:.2f}% against {start_top1:.2f}% "
                f"at the start ({margin:+.2f} points); see README 'Start from pretrained weights' for safer settings")
        log.warning(line)
        return line
    return f"the run ended {margin:+.2f} points top-1 above its starting point"


def _metrics(values: dict[str, float], step: int = 0):
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in values.items()]


def ingest_config(label_selector: dict[str, str] | None):
    """Ray Train's dataset config: its defaults, plus the data label selector as the dataset's execution
    option. Ray Train replaces a dataset's execution options with its own when it splits it for the workers,
    and its defaults carry no label selector: without this, what it adds (the split) and the dataset's
    requests to the autoscaler would not be bound to augmentation nodes."""
    import ray.train

    options = ray.train.DataConfig.default_ingest_options()
    options.label_selector = dict(label_selector) if label_selector else None
    return ray.train.DataConfig(execution_options=options)


def training_deadline(started: float, budget_minutes: float | None) -> float | None:
    """When the workers must end training for the job to end within ``budget_minutes`` of ``started``:
    the budget less :data:`pipeline.train.budget.DRIVER_TAIL_S` for the export and registration after it."""
    from pipeline.train.budget import DRIVER_TAIL_S

    return None if budget_minutes is None else started + 60.0 * budget_minutes - DRIVER_TAIL_S


def checkpoint_storage_error(error: BaseException) -> str | None:
    """The one-line message of a worker's :class:`~pipeline.errors.CheckpointStorageError` inside a
    failed ``trainer.fit()`` (Ray Train wraps worker exceptions), or None if it was not that."""
    import re

    from pipeline.errors import CheckpointStorageError

    for failure in (getattr(error, "worker_failures", None) or {}).values():
        base = getattr(failure, "_base_exc", failure)  # Ray Train's UserExceptionWithTraceback
        if isinstance(base, CheckpointStorageError):
            return str(base)
        found = re.search(r"CheckpointStorageError: (.+)$", str(failure), re.MULTILINE)
        if found:
            return found.group(1).strip()
    return None


def last_checkpoint_note(storage: str, run_name: str) -> str:
    """Where the run's last registered checkpoint is, for an error message."""
    try:
        import pyarrow.fs as pafs

        from pipeline.data.storage import filesystem_for

        uri = f"{storage.rstrip('/')}/{run_name}"
        fs = filesystem_for([uri]) or pafs.LocalFileSystem()
        snapshot = json.loads(fs.open_input_stream(f"{uri.split('://', 1)[-1]}/checkpoint_manager_snapshot.json").read())
        last = (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    except (OSError, ValueError):
        last = None
    if not last:
        return "no checkpoint of this run was registered"
    return (f"last good checkpoint {storage.rstrip('/')}/{run_name}/{last} is intact; re-submit the run name "
            f"once the storage is writable to resume from it")


def prune_unregistered_checkpoints(storage: str, run_name: str) -> list[str]:
    """Delete ``checkpoint_*`` folders of a finished run that Ray Train never registered.

    A worker killed between writing a checkpoint and the controller registering it leaves the folder
    behind; Ray Train never resumes from it (only from its snapshot's list) and never deletes it, so each
    failure would leave a full optimizer state on the storage. Returns the names removed.
    """
    import pyarrow.fs as pafs

    from pipeline.data.storage import filesystem_for

    uri = f"{storage.rstrip('/')}/{run_name}"
    fs = filesystem_for([uri]) or pafs.LocalFileSystem()
    root = uri.split("://", 1)[-1]
    try:
        snapshot = json.loads(fs.open_input_stream(f"{root}/checkpoint_manager_snapshot.json").read())
    except (OSError, ValueError):
        return []  # no snapshot: nothing is known to be registered; leave everything alone
    keep = {r["checkpoint_dir_name"] for r in snapshot.get("checkpoint_results", [])}
    latest = snapshot.get("latest_checkpoint_result") or {}
    keep.add(latest.get("checkpoint_dir_name", ""))
    removed = []
    try:
        for info in fs.get_file_info(pafs.FileSelector(root)):
            name = info.base_name
            if info.type == pafs.FileType.Directory and name.startswith("checkpoint_") and name not in keep:
                fs.delete_dir(info.path)
                removed.append(name)
    except OSError as e:  # the storage refuses (read-only, gone): never mask the run's own outcome
        log.warning("could not remove unregistered checkpoint folders of %s: %s", run_name, e)
    if removed:
        log.info("removed %d unregistered checkpoint folder(s) of %s: %s", len(removed), run_name, removed)
    return removed


def find_run(tracking_uri: str, experiment: str, run_name: str) -> str | None:
    """The id of the run named ``run_name`` in ``experiment`` (the oldest, if several), or None."""
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    safe = run_name.replace("'", "\\'")
    runs = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`mlflow.runName` = '{safe}'", order_by=["attributes.start_time ASC"]
    )
    return runs[0].info.run_id if runs else None


def register_teacher(client, run_id: str, p: Prepared, teacher_dir: Path) -> str | None:
    """Log the exported teacher as an MLflow model of the run and register that model.

    The model (:mod:`pipeline.eval.teacher_model`: images in, L2-normalised CLS embeddings out) is what
    ``mlflow.pyfunc.load_model("models:/<name>/<version>")`` loads; the safetensors + ``teacher.json``
    export stays the run's ``teacher/`` artifact beside it (for timm, and for the k-NN jobs). Name:
    ``tracking.register_model`` (``auto`` = ``dino-<dataset>-<preset>``; null logs the model without
    registering it); tags carry the timm arch and image size so a user can rebuild the backbone.
    Model-logging and registry errors warn; they never fail the run. Returns ``"name/version"`` or None.
    """
    from pipeline.weights.checkpoint import TEACHER_WEIGHTS
    from pipeline.eval.teacher_model import log_teacher_model, tracking_uri_set

    try:
        info = log_teacher_model(p.tracking_uri, run_id, teacher_dir)
    except Exception as e:  # noqa: BLE001
        log.warning("could not log the teacher as an MLflow model (the teacher/ artifact is there): %s: %s",
                    type(e).__name__, " ".join(str(e).split())[:500])
        return None
    name = p.cfg.tracking.register_model
    if not name:
        return None
    if name == "auto":
        name = f"dino-{dataset_name(p.data_root)}-{p.cfg.preset}"
    meta = json.loads((teacher_dir / "teacher.json").read_text())
    try:
        try:
            client.create_registered_model(name, description="DINO teacher backbones: images in, L2-normalised CLS "
                                                             "embeddings out (mlflow.pyfunc); weights for timm in "
                                                             "the run's teacher/ artifact")
        except Exception as e:
            if "RESOURCE_ALREADY_EXISTS" not in str(e) and "already exists" not in str(e):
                raise
        with tracking_uri_set(p.tracking_uri):  # the registry resolves the models:/ source through the global URI
            version = client.create_model_version(
                name,
                source=info.model_uri,
                run_id=run_id,
                model_id=info.model_id,
                tags={"timm_arch": meta["arch"], "image_size": str(meta["image_size"]),
                      "global_step": str(meta.get("global_step")), "format": "pyfunc",
                      "timm_weights": f"runs:/{run_id}/teacher/{TEACHER_WEIGHTS}"},
                description=f"{meta['arch']} teacher of run {p.run_name} at step {meta.get('global_step')}",
            )
    except Exception as e:
        log.warning("could not register the teacher in the MLflow model registry as %s: %s", name, e)
        return None
    client.set_tag(run_id, "registered_model", f"{name}/{version.version}")
    log.info("teacher registered as model %s version %s", name, version.version)
    return f"{name}/{version.version}"


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _log_config_artifact(p: Prepared, run_id: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "config.json"
        path.write_text(json.dumps(redact(p.cfg.to_dict()), indent=2))  # no credentials in artifacts
        _client(p.tracking_uri).log_artifact(run_id, str(path))


def export_from_checkpoint(checkpoint, out_dir: Path, run_id: str) -> Path:
    """Final Ray Train checkpoint -> exported teacher backbone (safetensors + teacher.json)."""
    from pipeline.weights.checkpoint import export_teacher, load_state
    from pipeline.train.snapshots import teacher_meta

    with checkpoint.as_directory() as d:
        state = load_state(d)
    meta = teacher_meta(state["config"], run_id, state["global_step"], state["epoch"])
    return export_teacher(out_dir, state["teacher"], meta)
