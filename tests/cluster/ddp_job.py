"""A Ray job for tests/cluster: the production DINO runner, DDP across two training nodes, against one
process with the same global batch.

``python tests/cluster/ddp_job.py --out result.json [--steps 8]`` (submitted with ``ray job submit`` to the
local cluster): two Ray Train workers, one per ``dino-ray/role=train`` node (label selector, one
``local_gpu`` each, gloo), train the ``smoke`` model on the same fixed crops, rank ``r`` on its half of each
global batch; the driver trains the same model in-process on the whole batch. Written to ``--out``: the
per-step global loss of both (the DDP one is the mean of the ranks' half-batch losses, as the gradients
are), the centre divergence across ranks after every step, the node each rank ran on, and the max
difference between the final student weights of the two.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

GLOBAL_BATCH = 8
OVERRIDES = ["health.attention_every_epochs=0", "optim.base_lr=0.002", "ray.num_workers=2"]


def fixed_batches(steps: int, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        g = torch.randint(0, 256, (GLOBAL_BATCH, 2, 32, 32, 3), dtype=torch.uint8, generator=gen)
        loc = torch.randint(0, 256, (GLOBAL_BATCH, 2, 16, 16, 3), dtype=torch.uint8, generator=gen)
        out.append({"global_crops": g, "local_crops": loc})
    return out


def runner(wrap_ddp=None):
    import torch

    from pipeline.config import load_config
    from pipeline.train.runner import DinoRunner, LoopPlan

    cfg = load_config("smoke", OVERRIDES)
    plan = LoopPlan(steps_per_epoch=1000, global_batch_size=GLOBAL_BATCH, tracking_uri="", run_id="ddp")
    return DinoRunner(cfg, plan, torch.device("cpu"), wrap_ddp=wrap_ddp)


def train_loop(config: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    r = runner(wrap_ddp=lambda m: ray.train.torch.prepare_model(m, move_to_device=False))
    half = GLOBAL_BATCH // world
    losses, divergence = [], []
    for batch in fixed_batches(config["steps"]):
        mine = {k: v[rank * half : (rank + 1) * half] for k, v in batch.items()}
        loss = r.step(mine)["loss"].detach().clone()
        dist.all_reduce(loss)  # sum of the half-batch means
        losses.append(loss.item() / world)
        divergence.append(r.center_divergence())
    nodes = [None] * world
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    weights = torch.cat([p.detach().flatten() for p in r.student_module.parameters()])
    if rank == 0:
        torch.save(weights, config["weights"])
        Path(config["out"]).write_text(
            json.dumps({"ddp_loss": losses, "center_divergence": divergence, "nodes": nodes})
        )
    ray.train.report({"done": 1})


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()

    import ray
    import ray.train
    import torch
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.cluster.placement import placement_for
    from pipeline.config import load_config

    ray.init(address="auto")
    place = placement_for(load_config("smoke", OVERRIDES).ray)
    out = Path(args.out)
    weights = out.with_suffix(".ddp.pt")
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"steps": args.steps, "out": str(out), "weights": str(weights)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=2,
            use_gpu=place.cuda,
            resources_per_worker=place.worker_resources(0.5),
            label_selector=place.train_selector,
        ),
        torch_config=TorchConfig(backend="gloo"),
        run_config=ray.train.RunConfig(name=f"ddp-{out.stem}", storage_path=str(out.parent / "ray")),
    )
    trainer.fit()

    single = runner()  # one process, the whole global batch: the reference
    reference = [single.step(b)["loss"].item() for b in fixed_batches(args.steps)]
    result = json.loads(out.read_text())
    single_weights = torch.cat([p.detach().flatten() for p in single.student_module.parameters()])
    result.update(
        {
            "single_loss": reference,
            "placement": place.describe(),
            "max_weight_diff": (torch.load(weights) - single_weights).abs().max().item(),
        }
    )
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
