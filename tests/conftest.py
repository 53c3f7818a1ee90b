import os

import pytest
import torch
import torch._dynamo
import torch._inductor.config
from torch._dynamo.utils import counters

# Inductor compiles in this process: its pool of compile workers (each a process importing
# torch) costs more than it saves on the suite's small graphs, and CI runs suites side by side.
# The environment variable reaches the processes the tests start (distributed ranks).
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
torch._inductor.config.compile_threads = int(os.environ["TORCHINDUCTOR_COMPILE_THREADS"])


@pytest.fixture
def fresh_dynamo():
    """Compiled-code caches and dynamo's counters cleared before and after the test."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def mixed_per_tensor_chunks(monkeypatch):
    """The per-tensor path updates tensors alone or, when small, a few neighbours together
    (qhfast._base.CACHE_SIZED_CHUNK elements). The test problems' tensors are tiny, so with
    the real size every per-tensor test would run one chunk; at 16 elements the problem's
    tensors (15, 7, 8 and 4 elements) split into [15], [7, 8], [4]: both kinds at once."""
    import qhfast._base

    monkeypatch.setattr(qhfast._base, "CACHE_SIZED_CHUNK", 16)
