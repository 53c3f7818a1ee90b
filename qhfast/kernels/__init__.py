"""qhfast's kernels: one pass over memory per bucket of tensors, one module per backend.

``cpu``: the C kernel (``cpu_kernel.c``), its build, disk cache and loading. The modules here
import nothing from the optimizers: the orchestration (``qhfast._fused``) calls them.
"""
