"""Momentum memory bank: a FIFO queue of L2-normalised keys in registered buffers.

Buffers are checkpointed, moved with the module and identical on every DDP rank as long as
every rank enqueues the same (all-gathered) keys, which `MCLModule` guarantees.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class MemoryBank(nn.Module):
    """K keys of dimension D, with the dataset index and label of the image each came from.

    Slots not yet written hold random unit vectors with index -1 and label -1.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 1:
            raise ValueError(f"model.queue_size must be a positive integer, got {size}")
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))  # K x D
        self.register_buffer("indices", torch.full((size,), -1, dtype=torch.long))  # K
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long))  # K
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("num_written", torch.zeros((), dtype=torch.long))
        self._written = 0  # num_written counted on the host (each enqueue's size is known): is_full reads no device value

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    @property
    def is_full(self) -> bool:
        """True once every slot holds a real key (mining warm-up waits for this)."""
        return self._written >= self.size

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._written = int(self.num_written)  # one read when a checkpoint is loaded, none per step

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, indices: torch.Tensor, labels: torch.Tensor) -> None:
        """Write N keys (N x D) at the pointer, oldest first out; K must be a multiple of N."""
        n = keys.shape[0]
        assert self.size % n == 0, f"queue size {self.size} must be a multiple of the keys per step {n}"
        slots = self.ptr + torch.arange(n, device=self.ptr.device)  # N, read on the device: no host sync
        self.keys.index_copy_(0, slots, keys.to(self.keys.dtype))
        self.indices.index_copy_(0, slots, indices)
        self.labels.index_copy_(0, slots, labels)
        self.ptr.add_(n).remainder_(self.size)
        self.num_written.add_(n)
        self._written += n
