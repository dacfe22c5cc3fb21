"""No batch-norm shortcut: SplitBatchNorm in the backbone and MoCo's ShuffleBN for the key encoder.

A batch-norm layer normalises each image with statistics of the others in its batch. When a
query and its positive key are normalised with the statistics of the same images, the encoders
can match the two through those statistics instead of through the image content (MoCo,
He et al. 2020, section 3.3). The lab's protocol (docs/method.md) closes that door three ways:
    - the views go through their encoders as separate batches (`encode_views`);
    - every backbone BN normalises groups of batch/`num_splits` images (`SplitBatchNorm`,
      simulating `num_splits` devices on one);
    - the key batch is shuffled before the key encoder and restored after (`shuffled`), so the
      group that normalises a key holds other images than the group of its query.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d that, in training, normalises `num_splits` groups of the batch separately.

    Image n belongs to group g = n % num_splits (the batch is read as N/s rows of s groups). For
    group g and channel c, over its M = (N/s)*H*W values:
        mean_gc, var_gc = mean and biased variance      y = (x - mean_gc) / sqrt(var_gc + eps) * weight_c + bias_c
        running_c <- (1 - momentum) * running_c + momentum * mean_g(stat_gc)   (unbiased variance: var * M/(M-1))
    The statistics are reduced on a view of the input and the normalisation is one elementwise op, so
    the output keeps the input's memory format (channels_last stays channels_last). In eval mode (and
    with num_splits=1) this is nn.BatchNorm2d; parameters and buffers are BatchNorm2d's, with the
    same names and shapes, so a state_dict loads into torchvision's ResNet as it is.
    """

    def __init__(self, num_features: int, num_splits: int, **kwargs):
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.num_splits
        if not self.training or s == 1:
            return super().forward(x)
        n, c, h, w = x.shape
        groups = x.unflatten(0, (n // s, s))  # N/s x s x C x H x W, a view: [r, g] is image r*s + g
        m = (n // s) * h * w  # values per group and channel
        if m < 2:
            raise ValueError(f"SplitBatchNorm needs more than 1 value per group and channel, got input {tuple(x.shape)} in {s} groups")
        stats_input = groups if x.element_size() >= 4 else groups.float()  # statistics in float32, as BatchNorm computes them
        var, mean = torch.var_mean(stats_input, dim=(0, 3, 4), correction=0)  # s x C each
        scale = torch.rsqrt(var + self.eps)  # s x C
        if self.weight is not None:
            scale = scale * self.weight
        shift = -mean * scale if self.bias is None else self.bias - mean * scale  # s x C
        out = torch.addcmul(shift.to(x.dtype)[:, :, None, None], groups, scale.to(x.dtype)[:, :, None, None])  # x * scale + shift
        with torch.no_grad():
            self.running_mean.lerp_(mean.mean(0), self.momentum)
            self.running_var.lerp_(var.mean(0) * (m / (m - 1)), self.momentum)
            self.num_batches_tracked.add_(1)
        return out.flatten(0, 1)  # N x C x H x W, in x's memory format


def split_batchnorm(module: nn.Module, num_splits: int) -> nn.Module:
    """Turn every BatchNorm2d of `module` into a SplitBatchNorm with the same state (in place)."""
    if num_splits == 1:
        return module
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            split = SplitBatchNorm(child.num_features, num_splits, eps=child.eps, momentum=child.momentum)
            split.load_state_dict(child.state_dict())
            setattr(module, name, split)
        else:
            split_batchnorm(child, num_splits)
    return module


def encode_views(encoder: Callable[[torch.Tensor], torch.Tensor], views: list[torch.Tensor], separate: bool) -> list[torch.Tensor]:
    """encoder(view) of each B-image view, as separate batches; separate=False: one batch of all
    views together (both views of an image then share batch statistics: the old shortcut)."""
    if separate:
        return [encoder(v) for v in views]
    return list(encoder(torch.cat(views)).split(views[0].shape[0]))


@torch.no_grad()
def shuffled(
    encoder: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    gather: Callable[[torch.Tensor], torch.Tensor],
    broadcast: Callable[[torch.Tensor], torch.Tensor],
    rank: int,
) -> torch.Tensor:
    """encoder(x) row for row, where the encoder saw a random B-slice of the global batch (ShuffleBN).

    x: B x ... this device's images. gather: B x ... -> (devices*B) x ..., every device's rows in
    rank order (the identity on one device); broadcast: rank 0's tensor to every device. Each
    device encodes its slice of the shuffled global batch; the outputs are gathered, put back in
    the original order, and each device keeps its own rows: B x D. A channels_last x is gathered
    and indexed as B x H x W x C rows, so the encoder sees channels_last images too.
    """
    nhwc = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    rows = x.permute(0, 2, 3, 1) if nhwc else x  # B x ..., contiguous in its own dim order: gathers keep the layout
    images = gather(rows)  # N x ..., N = devices * B
    order = broadcast(torch.randperm(images.shape[0], device=x.device))  # N, one permutation for every device
    b = x.shape[0]
    mine = order[rank * b : (rank + 1) * b]  # B: the images this device encodes
    picked = images[mine]  # B x ...
    out = gather(encoder(picked.permute(0, 3, 1, 2) if nhwc else picked))  # N x D, in shuffled order
    restored = torch.empty_like(out)
    restored[order] = out  # N x D, back in the gathered order
    return restored[rank * b : (rank + 1) * b]
