"""The README's Python examples run as written (the seed's examples with qhfast in place of
qhoptim.pyt, and the conversion examples), on a small model."""

import re
import warnings
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    before = [p.detach().clone() for p in model.parameters()]
    namespace = {
        "model": model,
        "loss_fn": torch.nn.functional.mse_loss,
        "input": torch.randn(16, 4),
        "target": torch.randn(16, 1),
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), namespace)
    # none a user would see: torch's own DeprecationWarnings (from inside torch, e.g. inductor
    # using torch.jit) are hidden by Python's default filters, and are not ours to fix
    torch_dir = str(Path(torch.__file__).parent)
    shown = [w for w in caught if not (issubclass(w.category, DeprecationWarning)
                                       and w.filename.startswith(torch_dir))]
    assert not shown, [f"{w.category.__name__}: {w.message}" for w in shown]
    if "optimizer.step()" in BLOCKS[index]:
        assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
