"""Run by tests/test_train_monitor.py under torchrun (2 gloo ranks) and in one process: the same training of a
small MLP on the same global batches, monitored; rank 0 writes the monitor's rows to OUT/rows.parquet."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from gradsight.train import Monitor


def main(out: str, mode: str = "ddp") -> None:
    ddp = "RANK" in __import__("os").environ
    if ddp:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    if ddp and mode == "fsdp":  # FSDP2: parameters and gradients are DTensor shards
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for m in (model[0], model[2], model):
            fully_shard(m, mesh=mesh)
        net = model
    else:
        net = nn.parallel.DistributedDataParallel(model) if ddp else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    mon = Monitor(model, opt, every={"per_example": None, "hist": None}, flush_every=4)
    gen = torch.Generator().manual_seed(1)
    for _ in range(10):
        X = torch.randn(8, 6, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (8,), generator=gen)
        x, t = X.chunk(world)[rank], y.chunk(world)[rank]  # each rank its half of the same global batch
        loss = nn.functional.cross_entropy(net(x), t)
        mon.log_loss(loss)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        opt.zero_grad()
    mon.close()
    if rank == 0:
        import pandas as pd

        rows = mon.table()
        Path(out).mkdir(parents=True, exist_ok=True)
        rows.to_parquet(Path(out) / "rows.parquet")
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], *sys.argv[2:])
