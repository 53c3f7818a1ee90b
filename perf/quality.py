"""Training quality: the same small models trained with each optimizer setting, same data.

    python perf/quality.py                       # both tasks, their default steps; tables on stdout
    python perf/quality.py --task lm --steps 800 # one task, another step count
    python perf/quality.py --plot perf/scratch/quality.png   # also a PNG (needs matplotlib)

Rows: qhfast's QHAdamW on fp32 parameters, and on bf16 parameters in each ``low_precision``
mode (``master``, ``kahan``, ``stochastic``, ``nearest``; ``+bf16-state``: the moments are
stored in bf16, ``state_dtype=torch.bfloat16``), then torch's AdamW in fp32 and bf16 (no
master: torch rounds to nearest). A bf16 row computes the forward and backward in bf16 too;
its linear layers compute as a bf16 GEMM does (bf16 inputs, their products exact and summed in
fp32, the output rounded to bf16), emulated with fp32 matmuls because this CPU's own bf16
matmul is about 11x slower (the MLP's forward and backward: 38 against 3.4 ms, timed
once).
The last column is each row's held-out loss relative to the fp32 qhfast row of its task.

Two tasks (``--task``), each run from the same initial weights on the same batches for every
row, with the lr going to zero on a cosine: late updates get small, which is where bf16
weights without an fp32 master stop moving (an update below half a bf16 ulp rounds away).

``mlp``
    a student MLP (32 -> 256 -> 256 -> 8, GELU) regresses a fixed random teacher MLP of the
    same shape (weights 3x the default init, outputs scaled to unit variance) on fresh
    Gaussian inputs each step (batch 256); held-out loss on 4096 other inputs.
``lm``
    a tiny causal transformer language model (2 pre-norm blocks of width 64, 4 heads, learned
    positions, context 32) learns a synthetic source generated in-process: an order-2 Markov
    chain over 16 tokens, each pair of previous tokens with its own random next-token
    distribution (softmax of 3x Gaussian logits). Fresh
    sequences each step (batch 16); held-out loss (cross-entropy, nats per token) on 1024
    other sequences, counting the tokens that follow two others, so the source's own entropy
    is the best loss possible (printed with the table). Linear warm-up for 5% of the steps.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import qhfast

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_bench import PRECISION_VARIANTS, peer_8bit_classes  # noqa: E402

#: the precision variants with a quality row, by their step_bench tag
QUALITY_VARIANTS = ("fp32", "bf16 master", "bf16 kahan", "bf16 kahan+bf16-state",
                    "bf16 stochastic+bf16-state", "bf16 nearest", "fp32 8bit-state",
                    "bf16 stochastic+8bit-state")
#: the row the last column compares with
BASELINE = "qhfast QHAdamW fp32"

Make = Callable[[object], torch.optim.Optimizer]
#: a training run: (optimizer factory, parameter dtype, steps) -> (training losses, held-out loss)
Train = Callable[[Make, torch.dtype, int], tuple[list[float], float]]


@dataclass(frozen=True)
class Task:
    name: str
    steps: int  # the default number of steps
    lr: float
    weight_decay: float
    train: Train
    describe: Callable[[int], str]
    loss: str  # what the loss is, for the plot's axis


def configurations(task: Task) -> list[tuple[str, torch.dtype, Make]]:
    """(row name, param dtype, optimizer factory): the same hyperparameters for every row."""
    qh = dict(lr=task.lr, betas=(0.995, 0.999), nus=(0.7, 1.0), weight_decay=task.weight_decay)
    variants = {tag: (dtype, options) for tag, dtype, options in PRECISION_VARIANTS}
    rows = [(f"qhfast QHAdamW {tag}", variants[tag][0],
             lambda p, k={**qh, **variants[tag][1]}: qhfast.QHAdamW(p, **k))
            for tag in QUALITY_VARIANTS]
    for tag, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        rows.append((f"torch AdamW {tag}", dtype, lambda p: torch.optim.AdamW(
            p, lr=task.lr, weight_decay=task.weight_decay)))
    for name, cls in peer_8bit_classes().items():  # where installed (the step table names
        if cls is not None:                           # the missing ones)
            rows.append((f"{name} fp32", torch.float32, lambda p, c=cls: c(
                p, lr=task.lr, weight_decay=task.weight_decay)))
    return rows


class Linear(torch.nn.Linear):
    """``nn.Linear`` whose bf16 forward and backward compute as bf16 GEMMs with fp32
    accumulation do: the bf16 operands widened to fp32 (a product of two bf16 values is exact
    in fp32), summed in fp32, the result (and, through autograd's casts, each gradient)
    rounded to bf16."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype != torch.bfloat16:
            return super().forward(x)
        return F.linear(x.float(), self.weight.float(), self.bias.float()).to(torch.bfloat16)


# --------------------------------------------------------------------------------------------
# task 1: an MLP regresses a teacher MLP

WIDTH, INPUTS, OUTPUTS, BATCH = 256, 32, 8, 256


def mlp(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return torch.nn.Sequential(
        Linear(INPUTS, WIDTH), torch.nn.GELU(),
        Linear(WIDTH, WIDTH), torch.nn.GELU(),
        Linear(WIDTH, OUTPUTS),
    ).to(dtype)


def train_mlp(make: Make, dtype: torch.dtype, steps: int) -> tuple[list[float], float]:
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
        loss = F.mse_loss(student(inputs.to(dtype)).float(), targets)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = F.mse_loss(student(held_out.to(dtype)).float(), held_out_targets)
    return losses, final.item()


MLP = Task("mlp", steps=1500, lr=2e-3, weight_decay=1e-4, train=train_mlp,
           describe=lambda steps: (f"MLP {INPUTS}-{WIDTH}-{WIDTH}-{OUTPUTS} regressing a teacher "
                                   f"MLP, batch {BATCH}, {steps} steps, cosine lr to 0"),
           loss="training loss (MSE)")


# --------------------------------------------------------------------------------------------
# task 2: a tiny transformer language model on an order-2 Markov source

VOCAB, CONTEXT, LM_WIDTH, LM_BLOCKS, LM_HEADS, LM_BATCH = 16, 32, 64, 2, 4, 16
HELD_OUT_SEQUENCES = 1024
#: the source's logits are this times a standard Gaussian: larger is more predictable
SOURCE_SHARPNESS = 3.0


@functools.lru_cache(maxsize=1)
def markov_source() -> torch.Tensor:
    """The next-token distributions of the order-2 source: row ``a * VOCAB + b`` is the
    distribution of the token after ``a, b`` (fixed by its seed)."""
    logits = torch.randn(VOCAB * VOCAB, VOCAB, generator=torch.Generator().manual_seed(4))
    return (SOURCE_SHARPNESS * logits).softmax(-1)


def markov_sequences(count: int, seed: int) -> torch.Tensor:
    """``count`` sequences of ``CONTEXT + 1`` tokens from the source (int64)."""
    probs = markov_source()
    cdf = probs.cumsum(-1)
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.empty(count, CONTEXT + 1, dtype=torch.long)
    tokens[:, :2] = torch.randint(VOCAB, (count, 2), generator=generator)
    for t in range(2, CONTEXT + 1):
        rows = cdf[tokens[:, t - 2] * VOCAB + tokens[:, t - 1]]
        draw = torch.rand(count, 1, generator=generator)
        tokens[:, t] = torch.searchsorted(rows, draw).squeeze(1).clamp_(max=VOCAB - 1)
    return tokens


@functools.lru_cache(maxsize=2)
def lm_data(steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The training batches of a run of ``steps`` (one tensor, batch after batch) and the
    held-out sequences: made once per process, shared by every row."""
    return markov_sequences(steps * LM_BATCH, seed=5), markov_sequences(HELD_OUT_SEQUENCES, seed=6)


@functools.lru_cache(maxsize=1)
def source_entropy() -> float:
    """The held-out loss of the source itself (nats per counted token): the best possible."""
    held_out = lm_data(1)[1]
    probs = markov_source()
    context = held_out[:, :-2] * VOCAB + held_out[:, 1:-1]
    return -probs[context, held_out[:, 2:]].log().mean().item()


class Block(torch.nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.attention_norm = torch.nn.LayerNorm(width)
        self.qkv = Linear(width, 3 * width)
        self.out = Linear(width, width)
        self.mlp_norm = torch.nn.LayerNorm(width)
        self.up = Linear(width, 4 * width)
        self.down = Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = (self.qkv(self.attention_norm(x))
                   .view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.down(F.gelu(self.up(self.mlp_norm(x))))


class TinyLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, LM_WIDTH)
        self.position = torch.nn.Parameter(torch.randn(CONTEXT, LM_WIDTH) * 0.02)
        torch.nn.init.normal_(self.embed.weight, std=0.02)
        self.blocks = torch.nn.ModuleList(Block(LM_WIDTH, LM_HEADS) for _ in range(LM_BLOCKS))
        self.norm = torch.nn.LayerNorm(LM_WIDTH)
        self.head = Linear(LM_WIDTH, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def lm_loss(model: TinyLM, sequences: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (fp32) over the tokens that follow two others."""
    logits = model(sequences[:, :-1])[:, 1:]
    return F.cross_entropy(logits.float().reshape(-1, VOCAB), sequences[:, 2:].reshape(-1))


def train_lm(make: Make, dtype: torch.dtype, steps: int) -> tuple[list[float], float]:
    """Return the training losses and the held-out loss at the end."""
    batches, held_out = lm_data(steps)
    torch.manual_seed(0)
    model = TinyLM().to(dtype)  # same initial weights for every run (seeded)
    optimizer = make(model.parameters())
    warmup = max(1, steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(
        (step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))))
    losses = []
    for step in range(steps):
        optimizer.zero_grad()
        loss = lm_loss(model, batches[step * LM_BATCH:(step + 1) * LM_BATCH])
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    with torch.no_grad():
        total = sum(lm_loss(model, chunk).item() * len(chunk) for chunk in held_out.split(256))
    return losses, total / len(held_out)


LM = Task("lm", steps=400, lr=5e-3, weight_decay=0.01, train=train_lm,
          describe=lambda steps: (
              f"causal transformer LM ({LM_BLOCKS} blocks, width {LM_WIDTH}, {LM_HEADS} heads, "
              f"context {CONTEXT}) on an order-2 Markov source over {VOCAB} tokens, batch "
              f"{LM_BATCH} sequences, {steps} steps, {max(1, steps // 20)} warm-up, cosine lr "
              f"to 0; the source's entropy (the best held-out loss) is {source_entropy():.4f}"),
          loss="training loss (cross-entropy, nats/token)")

TASKS = {task.name: task for task in (MLP, LM)}


# --------------------------------------------------------------------------------------------
# the table


def relative(value: float, baseline: float) -> str:
    return f"{100 * (value / baseline - 1):+.2f}%"


def quality_table(steps: int | None = None, plot_path: str | None = None,
                  progress: Callable[[str], None] = lambda line: None,
                  tasks: list[str] | None = None) -> tuple[list[str], bool]:
    """Train every configuration on each task (``steps``: each task's own if None); return
    the markdown lines (a heading line and a table per task) and whether a plot of the loss
    curves was written to ``plot_path``."""
    lines: list[str] = []
    curves: dict[str, dict[str, list[float]]] = {}
    for task in [TASKS[name] for name in (tasks or list(TASKS))]:
        task_steps = steps or task.steps
        if lines:
            lines.append("")
        lines += [f"Task `{task.name}`: {task.describe(task_steps)}.", "",
                  "| optimizer | first-50 train loss | last-50 train loss | held-out loss "
                  "| held-out vs fp32 | seconds |",
                  "|---|---:|---:|---:|---:|---:|"]
        curves[task.name] = {}
        held_outs: dict[str, float] = {}
        rows = []
        for name, dtype, make in configurations(task):
            start = time.perf_counter()
            losses, held_out = task.train(make, dtype, task_steps)
            seconds = time.perf_counter() - start
            curves[task.name][name] = losses
            held_outs[name] = held_out
            window = min(50, len(losses))
            first = sum(losses[:window]) / window
            last = sum(losses[-window:]) / window
            rows.append((name, first, last, held_out, seconds))
            progress(f"quality {task.name} {name:40s} held-out {held_out:.5f} ({seconds:.1f} s)")
        for name, first, last, held_out, seconds in rows:
            lines.append(f"| {name} | {first:.5f} | {last:.5f} | {held_out:.5f} "
                         f"| {relative(held_out, held_outs[BASELINE])} | {seconds:.1f} |")
    plotted = bool(plot_path) and plot(curves, plot_path)
    return lines, plotted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=[*TASKS, "all"], default="all",
                        help="which task (default all: one table each)")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps (default: each task's own, "
                        + ", ".join(f"{t.name} {t.steps}" for t in TASKS.values()) + ")")
    parser.add_argument("--plot", default=None, help="write a PNG of the loss curves here")
    args = parser.parse_args(argv)
    tasks = list(TASKS) if args.task == "all" else [args.task]
    command = " ".join(argv if argv is not None else sys.argv[1:])
    print(f"# training quality: {', '.join(tasks)}; torch {torch.__version__}; "
          f"command: python perf/quality.py {command}")
    print()
    lines, _ = quality_table(args.steps, args.plot,
                             lambda line: print(line, file=sys.stderr, flush=True), tasks)
    print("\n".join(lines))
    return 0


def plot(curves: dict[str, dict[str, list[float]]], path: str) -> bool:
    """Write the loss curves as a PNG, one panel per task; False (and no file) without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no plot)", file=sys.stderr)
        return False

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure, panels = plt.subplots(1, len(curves), figsize=(8 * len(curves), 5), squeeze=False)
    window = 25
    for axes, (task, runs) in zip(panels[0], curves.items()):
        for name, losses in runs.items():
            smooth = [sum(losses[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1))
                      for i in range(len(losses))]
            axes.plot(smooth, label=name, linewidth=1)
        axes.set_yscale("log")
        axes.set_title(f"task {task}")
        axes.set_xlabel("step")
        axes.set_ylabel(f"{TASKS[task].loss}, mean of the last {window} steps")
        axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    print(f"plot written to {path}", file=sys.stderr)
    return True


if __name__ == "__main__":
    raise SystemExit(main())
