"""DDP that does not broadcast the memory bank at every forward.

DDP (`broadcast_buffers`) copies every buffer of rank 0 to the other ranks before each forward:
with a bank of K x D float keys that is 2 MB a step at K = 4096, D = 128 (8 MB at 16384), for
values every rank already holds: each rank enqueues the same gathered keys in the same order
(`MCLModule.on_after_backward`), so the banks stay identical by construction. The bank's buffers
are left out of DDP's broadcasts and sent from rank 0 once, when the model is wrapped (an unseeded
run draws other random unwritten slots on each rank); every other buffer (batch-norm statistics)
is broadcast as before.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mcl.bank import MemoryBank


def gather_rows(gather: Callable[[torch.Tensor], torch.Tensor], world_size: int, *parts: torch.Tensor | None) -> list[torch.Tensor | None]:
    """`gather` (B x c -> (world_size*B) x c, rank order) of several B-row tensors in one collective: float32
    B x D keys, int64 B indices and labels (None stays None), their bits side by side as float32 columns,
    so every value arrives exactly (the enqueue's keys, indices and labels: one all_gather, not three)."""
    if world_size == 1:
        return list(parts)
    given = [p for p in parts if p is not None]
    columns = [p.reshape(p.shape[0], -1).view(torch.float32) for p in given]  # B x c_i each, the same bits
    packed = gather(torch.cat(columns, dim=1)).split([c.shape[1] for c in columns], dim=1)  # N x c_i
    out = iter(c.contiguous().view(p.dtype).reshape(-1, *p.shape[1:]) for c, p in zip(packed, given))
    return [None if p is None else next(out) for p in parts]


def bank_buffers(model: nn.Module) -> list[str]:
    """The names of every MemoryBank buffer in `model` (e.g. bank.keys), as model.named_buffers() spells them."""
    return [
        f"{prefix}.{name}" if prefix else name
        for prefix, module in model.named_modules()
        if isinstance(module, MemoryBank)
        for name, _ in module.named_buffers()
    ]


class BankDDPStrategy(DDPStrategy):
    """Lightning's DDPStrategy (same arguments), with the memory banks kept out of DDP's buffer broadcasts."""

    def _setup_model(self, model: nn.Module) -> DistributedDataParallel:
        names = bank_buffers(model)
        model._ddp_params_and_buffers_to_ignore = names  # read by DistributedDataParallel when it wraps the model
        wrapped = super()._setup_model(model)
        for name in names:  # once: rank 0's bank on every rank
            torch.distributed.broadcast(model.get_buffer(name), src=0)
        return wrapped
