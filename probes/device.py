"""Where the probe solver's passes over the data run (``--probe.device``), and the two products it makes there: each
head's Gram matrix and a batched matrix product with the small per-iteration vectors. The CPU keeps numpy, whose
BLAS calls are the faster ones there; any other device goes through torch.
"""

from __future__ import annotations

import numpy as np
import torch

from headlab.errors import HeadlabError

CPU = torch.device("cpu")


def host(t: torch.Tensor) -> np.ndarray:
    """A device tensor as a float64 numpy array (the small per-head statistics the solver keeps on the host)."""
    return t.detach().to(CPU, torch.float64).numpy()


def _numpy_path(t: torch.Tensor) -> bool:
    """Whether ``t``'s products go through numpy (CPU tensors) rather than torch (any other device)."""
    return t.device.type == "cpu"


def gram_matrices(x: torch.Tensor) -> np.ndarray:
    """Per-head ``X^T X`` of ``x [block, rows, d]`` as float64 ``[block, d, d]``: on the CPU numpy's ``a.T @ a``,
    which BLAS computes as a symmetric rank-k update (half the flops of torch's general ``bmm``); elsewhere ``bmm``."""
    if _numpy_path(x):
        a = x.numpy()
        return np.stack([a[b].T @ a[b] for b in range(a.shape[0])]).astype(np.float64)
    return host(torch.bmm(x.transpose(1, 2), x))


def bmm(data: torch.Tensor, small: np.ndarray) -> np.ndarray:
    """``data [B, n, m] @ small [B, m, c]`` as float32 numpy. On the CPU through numpy (BLAS reads a transposed
    ``data`` view in place; torch's bmm copies it first); elsewhere on ``data``'s device, ``small`` sent there."""
    small = small.astype(np.float32)
    if _numpy_path(data):
        return np.matmul(data.numpy(), small)
    return torch.bmm(data, torch.from_numpy(np.ascontiguousarray(small)).to(data.device)).cpu().numpy()


def solver_device(name: str) -> torch.device:
    """``auto``: the first CUDA device when present, else the CPU; otherwise the device named."""
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else CPU
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise HeadlabError(f"--probe.device {name!r} is not a device ({error}); use auto, cpu, cuda or cuda:N") \
            from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HeadlabError(f"--probe.device {name} asks for CUDA, which this machine does not have; use auto or cpu")
    return device
