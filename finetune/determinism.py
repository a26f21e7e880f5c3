"""Bit-exact reruns (`train.deterministic`), at some cost in speed.

Measured on CPU (docs/reliability.md): with oneDNN (mkldnn) convolutions, two runs of the same
recipe can differ by ~1e-6 after a few steps, and Adam amplifies that to ~1e-4 in fully
trained weights, only because tensors sit at different memory addresses (merely allocating
some unrelated tensors first changes the result). With oneDNN off, the native kernels give
identical results whatever the memory layout. On CUDA the usual switches apply: deterministic
algorithms, deterministic cuDNN, a fixed cuBLAS workspace.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch


@contextmanager
def deterministic_kernels(enabled: bool = True):
    """Within the block, use only kernels whose results do not depend on memory layout or
    scheduling; restore the previous settings afterwards."""
    if not enabled:
        yield
        return
    saved = (torch.backends.mkldnn.enabled, torch.are_deterministic_algorithms_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.mkldnn.enabled = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = saved[0]
        torch.use_deterministic_algorithms(saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]
        if saved[4] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
