"""The ``TorchTrainer`` of a pretraining run: its scaling, storage, failure and dataset settings in one place."""

from __future__ import annotations


def ingest_config(label_selector: dict[str, str] | None, elastic: bool = False):
    """Ray Train's dataset config: its defaults, plus the data label selector as the dataset's execution
    option. Ray Train replaces a dataset's execution options with its own when it splits it for the workers,
    and its defaults carry no label selector: without this, what it adds (the split) and the dataset's
    requests to the autoscaler would not be bound to augmentation nodes.

    ``elastic``: the split hands blocks to whichever worker asks (``streaming_split(equal=False)``), not
    equal shares: a group smaller than the largest takes a fixed global batch as uneven micro-batch counts per
    worker (3 micro-batches over 2 workers: 2 and 1), and equal shares would end the faster-consuming
    worker's stream first."""
    import ray.train

    options = ray.train.DataConfig.default_ingest_options()
    options.label_selector = dict(label_selector) if label_selector else None
    if elastic:
        return _AsRequested(execution_options=options)
    return ray.train.DataConfig(execution_options=options)


def _as_requested_class():
    import ray.train

    class AsRequested(ray.train.DataConfig):
        """``DataConfig`` whose split gives blocks as the workers ask for them (``equal=False``)."""

        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            locality = worker_node_ids if self._enable_shard_locality else None
            out = [{} for _ in range(world_size)]
            for name, ds in datasets.items():
                if ds.name is None:
                    ds.set_name(name)
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                for i, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=locality)):
                    out[i][name] = split
            return out

    return AsRequested


def _AsRequested(**kwargs):  # noqa: N802  (a class built on first use: Ray is imported lazily here)
    return _as_requested_class()(**kwargs)


def training_deadline(started: float, budget_minutes: float | None) -> float | None:
    """When the workers must end training for the job to end within ``budget_minutes`` of ``started``:
    the budget less :data:`pipeline.train.budget.DRIVER_TAIL_S` for the export and registration after it."""
    from pipeline.train.budget import DRIVER_TAIL_S

    return None if budget_minutes is None else started + 60.0 * budget_minutes - DRIVER_TAIL_S


def storage_path(cfg) -> str:
    """``ray.storage_path`` as Ray Train needs it: an object-store URI as given, a local path made absolute."""
    from pathlib import Path

    storage = cfg.ray.storage_path
    return storage if "://" in storage else str(Path(storage).resolve())


def make_trainer(cfg, plan, dataset, placement, run_name: str):
    """The run's ``TorchTrainer``: ``ray.num_workers`` workers placed by ``placement``, checkpoints kept in
    ``ray.storage_path/<run_name>`` (a re-submitted name resumes them), ``ray.max_failures`` restarts, and
    ``dataset`` split across the workers on the data nodes."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.cluster.ray_output import train_logging_config
    from pipeline.train.worker import train_loop_per_worker

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "plan": plan.__dict__},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.ray.num_workers,  # (min, max): elastic
            elastic_resize_monitor_interval_s=cfg.ray.elastic_resize_interval_s,
            use_gpu=placement.cuda,
            resources_per_worker=placement.worker_resources(cfg.ray.cpus_per_worker),
            label_selector=placement.train_selector,
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path(cfg),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.ray.num_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures),
            logging_config=train_logging_config(cfg.logging.ray_verbose),
        ),
        datasets={"train": dataset},
        dataset_config=ingest_config(placement.data_selector, elastic=cfg.ray.elastic),
    )
