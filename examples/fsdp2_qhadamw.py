"""Train a small MLP with FSDP2 and QHAdamW on CPU processes (gloo), then checkpoint with DCP.

    torchrun --standalone --nproc_per_node=2 examples/fsdp2_qhadamw.py

Parameters are bf16 and sharded by ``fully_shard``; qhfast keeps fp32 master copies and fp32
moments sharded like them, and steps on each rank's local shards. The checkpoint (model and
optimizer, masters included) is written with ``torch.distributed.checkpoint`` and can be loaded
on any number of processes.
"""

from __future__ import annotations

import argparse
import gc
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
from torch.distributed.fsdp import fully_shard

from qhfast import QHAdamW


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--checkpoint", default=None, help="directory (default: a temporary one)")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same model and data on every rank
    inputs = torch.randn(512, 32)
    targets = torch.sin(inputs @ torch.randn(32, 4))  # a smooth target an MLP can learn
    model = torch.nn.Sequential(
        torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, 128), torch.nn.GELU(),
        torch.nn.Linear(128, 4),
    ).to(torch.bfloat16)
    for layer in model[::2]:
        fully_shard(layer)
    fully_shard(model)
    optimizer = QHAdamW(model.parameters(), lr=torch.tensor(3e-3), nus=(0.7, 1.0), weight_decay=1e-2)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)

    shard = slice(rank * len(inputs) // world, (rank + 1) * len(inputs) // world)
    for step in range(args.steps):
        optimizer.zero_grad()
        prediction = model(inputs[shard].bfloat16()).float()
        loss = torch.nn.functional.mse_loss(prediction, targets[shard])
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 50 == 0 or step == args.steps - 1:
            total = loss.detach().clone()
            dist.all_reduce(total)
            if rank == 0:
                print(f"step {step:4d}  loss {total.item() / world:.5f}", flush=True)

    directory = args.checkpoint or tempfile.mkdtemp(prefix="qhfast_fsdp2_")
    dcp.save({"model": get_model_state_dict(model),
              "optim": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=directory)
    if rank == 0:
        print(f"checkpoint written to {directory}", flush=True)
    # Drop everything that references the process group (the DTensors' device mesh) and
    # destroy it while the interpreter is alive: gloo threads left for interpreter shutdown
    # can abort the process after the work is done.
    del model, optimizer, scheduler
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
