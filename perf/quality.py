"""Training quality: the same small model trained with each optimizer setting, same data.

    python perf/quality.py                       # 1500 steps, table on stdout
    python perf/quality.py --plot perf/scratch/quality.png   # also a PNG (needs matplotlib)

The task: a student MLP (32 -> 256 -> 256 -> 8, GELU) regresses a fixed random teacher MLP of
the same shape (weights 3x the default init, outputs scaled to unit variance) on fresh Gaussian
inputs each step (batch 256), so there is real learning and a held-out loss.
Every run starts from the same initial weights and sees the same batches, with a cosine lr
schedule to zero: late updates get small, which is where bf16 weights without an fp32 master
stop moving (an update below half a bf16 ulp rounds away).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch

import qhfast

WIDTH, INPUTS, OUTPUTS, BATCH = 256, 32, 8, 256


def mlp(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(INPUTS, WIDTH), torch.nn.GELU(),
        torch.nn.Linear(WIDTH, WIDTH), torch.nn.GELU(),
        torch.nn.Linear(WIDTH, OUTPUTS),
    ).to(dtype)


def configurations():
    """(row name, param dtype, optimizer factory)."""
    qh = dict(lr=2e-3, betas=(0.995, 0.999), nus=(0.7, 1.0), weight_decay=1e-4)
    return [
        ("qhfast QHAdamW fp32", torch.float32, lambda p: qhfast.QHAdamW(p, **qh)),
        ("qhfast QHAdamW bf16 + fp32 masters", torch.bfloat16, lambda p: qhfast.QHAdamW(p, **qh)),
        ("qhfast QHAdamW bf16 no masters", torch.bfloat16,
         lambda p: qhfast.QHAdamW(p, **qh, master_weights=False)),
        ("torch AdamW fp32", torch.float32,
         lambda p: torch.optim.AdamW(p, lr=2e-3, weight_decay=1e-4)),
        ("torch AdamW bf16", torch.bfloat16,
         lambda p: torch.optim.AdamW(p, lr=2e-3, weight_decay=1e-4)),
    ]


def train(make, dtype: torch.dtype, steps: int) -> tuple[list[float], float]:
    """Return the training losses and the held-out loss at the end."""
    torch.manual_seed(0)
    teacher = mlp()
    with torch.no_grad():  # a teacher with structure to learn: larger weights, unit-variance outputs
        for p in teacher.parameters():
            p.mul_(3.0)
        scale = teacher(torch.randn(4096, INPUTS, generator=torch.Generator().manual_seed(3))).std()
        teacher[-1].weight.div_(scale)
        teacher[-1].bias.div_(scale)
    student = mlp().to(dtype)  # same initial weights for every run (seeded)
    held_out = torch.randn(4096, INPUTS, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        held_out_targets = teacher(held_out)
    optimizer = make(student.parameters())
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    batches = torch.Generator().manual_seed(2)
    losses = []
    for _ in range(steps):
        inputs = torch.randn(BATCH, INPUTS, generator=batches)
        with torch.no_grad():
            targets = teacher(inputs)
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(student(inputs.to(dtype)).float(), targets)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = torch.nn.functional.mse_loss(student(held_out.to(dtype)).float(), held_out_targets)
    return losses, final.item()


def quality_table(steps: int, plot_path: str | None = None,
                  progress: Callable[[str], None] = lambda line: None) -> tuple[list[str], bool]:
    """Train every configuration; return the markdown table's lines and whether a plot of the
    loss curves was written to ``plot_path``."""
    lines = ["| optimizer | first-50 train loss | last-50 train loss | held-out loss | seconds |",
             "|---|---:|---:|---:|---:|"]
    curves = {}
    for name, dtype, make in configurations():
        start = time.perf_counter()
        losses, held_out = train(make, dtype, steps)
        seconds = time.perf_counter() - start
        curves[name] = losses
        window = min(50, len(losses))
        first = sum(losses[:window]) / window
        last = sum(losses[-window:]) / window
        lines.append(f"| {name} | {first:.5f} | {last:.5f} | {held_out:.5f} | {seconds:.1f} |")
        progress(f"quality  {name:40s} held-out {held_out:.5f} ({seconds:.1f} s)")
    plotted = bool(plot_path) and plot(curves, plot_path)
    return lines, plotted


def describe(steps: int) -> str:
    return (f"MLP {INPUTS}-{WIDTH}-{WIDTH}-{OUTPUTS} regressing a teacher MLP, batch {BATCH}, "
            f"{steps} steps, cosine lr to 0")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--plot", default=None, help="write a PNG of the loss curves here")
    args = parser.parse_args(argv)
    command = " ".join(argv if argv is not None else sys.argv[1:])
    print(f"# training quality: {describe(args.steps)}")
    print(f"# torch {torch.__version__}; command: python perf/quality.py {command}")
    print()
    lines, _ = quality_table(args.steps, args.plot, lambda line: print(line, file=sys.stderr, flush=True))
    print("\n".join(lines))
    return 0


def plot(curves: dict[str, list[float]], path: str) -> bool:
    """Write the loss curves as a PNG; False (and no file) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no plot)", file=sys.stderr)
        return False
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure, axes = plt.subplots(figsize=(8, 5))
    window = 25
    for name, losses in curves.items():
        smooth = [sum(losses[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1))
                  for i in range(len(losses))]
        axes.plot(smooth, label=name, linewidth=1)
    axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel(f"training loss (MSE), mean of the last {window} steps")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"plot written to {path}", file=sys.stderr)
    return True


if __name__ == "__main__":
    raise SystemExit(main())
