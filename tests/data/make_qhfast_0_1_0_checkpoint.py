"""Write ``qhfast-0.1.0-checkpoint.pth.gz``: optimizer checkpoints made by the released qhfast 0.1.0
and the parameters 0.1.0 reaches when it resumes from them (tests/test_upgrade.py's reference).

Made from git revision 31bd9c5 (qhfast 0.1.0, the release: ``master_weights``, no
``low_precision``) with torch 2.13.0 (CPU), from the repository root::

    rm -rf /tmp/qhfast010 && mkdir /tmp/qhfast010
    git archive 31bd9c5 qhfast | tar -x -C /tmp/qhfast010
    PYTHONPATH=/tmp/qhfast010 python tests/data/make_qhfast_0_1_0_checkpoint.py

The script refuses to run unless the imported ``qhfast`` is 0.1.0's: its constructors take
``master_weights`` (default True) and no ``low_precision`` (so it cannot be run by mistake against
today's code, which would make the test compare the new code with itself).

For each optimizer (QHM, QHAdam, QHAdamW), parameter setting (fp32; bf16 with fp32 masters,
``master_weights=True``; bf16 without, ``master_weights=False``) and update path (per-tensor,
foreach, capturable) it runs ``STEPS_BEFORE`` steps on seeded gradients, stores the parameters
and ``optimizer.state_dict()``, then stores the gradients of ``STEPS_AFTER`` more steps and the
parameters and state 0.1.0 ends with after taking them. One parameter gets its first gradient late and
then skips every third step, so its state lags the others' (and is absent from the checkpoint
for the first ``FIRST_GRAD`` steps). Gradients are drawn independently of the parameters, so the
test needs nothing but this file to replay them. The file is what ``torch.save`` wrote, gzipped
(``torch.load(io.BytesIO(gzip.decompress(data)), weights_only=True)`` reads it).
"""

from __future__ import annotations

import copy
import gzip
import inspect
import io
import os
import sys

import torch

import qhfast

REVISION = "31bd9c5"
OUTPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "qhfast-0.1.0-checkpoint.pth.gz")

SHAPES = [(5, 3), (7,), (2, 2, 2), (4, 1)]
#: the parameter whose gradient is missing on some steps: before FIRST_GRAD and every third
INTERMITTENT, FIRST_GRAD = 1, 2
STEPS_BEFORE, STEPS_AFTER = 6, 6

OPTIMIZERS = {
    "QHM": (qhfast.QHM, dict(lr=0.5, momentum=0.9, nu=0.7, weight_decay=0.01)),
    "QHAdam": (qhfast.QHAdam,
               dict(lr=0.01, betas=(0.9, 0.99), nus=(0.7, 0.9), weight_decay=0.01)),
    "QHAdamW": (qhfast.QHAdamW, dict(lr=0.01, nus=(0.7, 1.0), weight_decay=0.1)),
}
SETTINGS = {
    "fp32": (torch.float32, {}),
    "bf16_master": (torch.bfloat16, dict(master_weights=True)),
    "bf16_nomaster": (torch.bfloat16, dict(master_weights=False)),
}
PATHS = {
    "per_tensor": dict(foreach=False),
    "foreach": dict(foreach=True),
    "capturable": dict(foreach=False, capturable=True),
}


def check_released_code() -> None:
    options = inspect.signature(qhfast.QHAdam).parameters
    if "low_precision" in options or options["master_weights"].default is not True:
        sys.exit(f"qhfast imported from {qhfast.__file__} is not 0.1.0 ({REVISION}); "
                 "see this script's docstring")
    print(f"qhfast {qhfast.__version__} from {qhfast.__file__}, torch {torch.__version__}")


def initial_params(dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in SHAPES]


def gradients(step: int, dtype: torch.dtype) -> list[torch.Tensor | None]:
    gen = torch.Generator().manual_seed(100 + step)
    grads: list[torch.Tensor | None] = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
    if step < FIRST_GRAD or step % 3 == 0:
        grads[INTERMITTENT] = None
    return grads


def take_steps(optimizer, params, steps) -> list[list[torch.Tensor | None]]:
    taken = []
    for step in steps:
        grads = gradients(step, params[0].dtype)
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        optimizer.step()
        taken.append(grads)
    return taken


def _same(a: list, b: list) -> bool:
    return all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
               for x, y in zip(a, b))


def snapshot(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def main() -> None:
    check_released_code()
    cases = {}
    resume_grads = {
        setting: [gradients(step, dtype) for step in range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER)]
        for setting, (dtype, _) in SETTINGS.items()
    }
    for opt_name, (cls, hyper) in OPTIMIZERS.items():
        for setting, (dtype, precision) in SETTINGS.items():
            for path, flags in PATHS.items():
                if path == "capturable" and cls is qhfast.QHM:
                    continue  # QHM counts no steps: capturable changes nothing in it
                kwargs = {**hyper, **precision, **flags}
                params = initial_params(dtype)
                optimizer = cls(params, **kwargs)
                take_steps(optimizer, params, range(STEPS_BEFORE))
                at_checkpoint = snapshot(params)
                # a copy, as torch.save would write it now: state_dict() holds the live state
                state_dict = copy.deepcopy(optimizer.state_dict())
                grads = take_steps(optimizer, params, range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER))
                assert all(_same(a, b) for a, b in zip(grads, resume_grads[setting]))
                cases[f"{opt_name}/{setting}/{path}"] = {
                    "optimizer": opt_name,
                    "kwargs": kwargs,
                    "params": at_checkpoint,
                    "state_dict": state_dict,
                    "setting": setting,
                    "expected": snapshot(params),
                    "expected_state": copy.deepcopy(optimizer.state_dict()["state"]),
                }
    buffer = io.BytesIO()
    torch.save(
        {
            "qhfast_version": qhfast.__version__,
            "revision": REVISION,
            "torch_version": str(torch.__version__),
            "steps_before": STEPS_BEFORE,
            "steps_after": STEPS_AFTER,
            "grads": resume_grads,
            "cases": cases,
        },
        buffer,
    )
    # gzipped: torch.save's zip stores each tensor uncompressed with its own headers
    with open(OUTPUT, "wb") as file, gzip.GzipFile(fileobj=file, mode="wb", mtime=0) as gz:
        gz.write(buffer.getvalue())
    print(f"wrote {len(cases)} cases to {OUTPUT} ({os.path.getsize(OUTPUT)} bytes, "
          f"{len(buffer.getvalue())} uncompressed)")


if __name__ == "__main__":
    main()
