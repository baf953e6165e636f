"""Copies between host and device that never wait for the device.

A copy from pageable host memory may block the host until the device has run everything queued before it;
with steps queued ahead of the device (overlapped scheduling) that stall would undo the overlap. On CUDA
the data goes through pinned memory (torch's caching host allocator), so the copy is queued and returns;
results come back the same way, read once an event recorded after the copy has passed.
"""

import numpy as np
import torch


def pinned(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor in pinned memory when the device is CUDA (for kernels' host-side plans), else as is."""
    return t.pin_memory() if device.type == "cuda" else t


def to_device(a: np.ndarray | list, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    t = torch.from_numpy(a) if isinstance(a, np.ndarray) else torch.tensor(a, dtype=dtype)
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A CUDA tensor's copy into pinned host memory, queued behind the work that computes it, not waited for."""
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
