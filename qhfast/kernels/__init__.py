"""qhfast's kernels: one pass over memory per bucket of tensors, one module per backend.

``cpu``: the C kernel (``cpu_kernel.c``), its build, disk cache and loading, and its plans.
``triton``: the Triton kernel (``triton_kernel.py``), its tables and launches (CUDA, or CPU
tensors under Triton's interpreter). Both take a bucket's tensors by role and are run each
step through a plan. The modules here import nothing from the optimizers: the orchestration
(``qhfast._fused``) checks the tensors, makes the plans and runs them.
"""
