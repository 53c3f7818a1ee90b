"""End to end: a small MLP learns a synthetic task under bf16 autocast on the CPU, with a
GradScaler, an LR schedule on a tensor lr and the optimizer step compiled (fullgraph); the
compiled run matches the eager one."""

import statistics

import pytest
import torch

import qhfast

STEPS = 300


def _train(compiled: bool, param_dtype: torch.dtype) -> list[float]:
    torch.manual_seed(0)
    torch._dynamo.reset()
    inputs = torch.randn(256, 16)
    targets = torch.sin(inputs @ torch.randn(16, 4))  # smooth, learnable by an MLP
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 64), torch.nn.GELU(),
        torch.nn.Linear(64, 64), torch.nn.GELU(),
        torch.nn.Linear(64, 4),
    ).to(param_dtype)
    optimizer = qhfast.QHAdamW(model.parameters(), lr=torch.tensor(3e-3), nus=(0.7, 1.0),
                               weight_decay=1e-2)
    step = torch.compile(optimizer.step, fullgraph=True) if compiled else optimizer.step
    scheduler = torch.optim.lr_scheduler.LambdaLR(  # warm-up, then linear decay
        optimizer, lambda t: min(1.0, (t + 1) / 20) * (1 - t / (STEPS + 1))
    )
    optimizer.step = step  # GradScaler calls optimizer.step (the scheduler had wrapped it)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    losses = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.mse_loss(model(inputs).float(), targets)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        losses.append(loss.item())
    torch._dynamo.reset()
    return losses


# the compiled step replaces the scheduler's call-tracking wrapper of optimizer.step
@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16_masters"])
def test_autocast_gradscaler_compiled_step_scheduler(param_dtype):
    """The forward runs in bf16 (precision 2^-8). The compiled step differs from eager by fp32
    rounding (~1e-7); once such a difference flips a bf16 rounding in the forward, the two runs
    continue as two trainings with slightly different noise. So: the first 20 steps agree to
    1e-3, and the converged loss level (mean of the last 50 steps) to 10% (measured: 0.2% with
    fp32 params, 4% with bf16 params)."""
    eager = _train(False, param_dtype)
    compiled = _train(True, param_dtype)
    assert eager[-1] < eager[0] / 20 and compiled[-1] < compiled[0] / 20  # it learns
    for e, c in zip(eager[:20], compiled[:20]):
        assert abs(e - c) <= 1e-3 * e
    eager_level, compiled_level = statistics.mean(eager[-50:]), statistics.mean(compiled[-50:])
    assert abs(eager_level - compiled_level) <= 0.1 * eager_level
