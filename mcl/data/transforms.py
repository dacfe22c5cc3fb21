"""Augmentation recipes (torchvision.transforms.v2) on 3 x H x W uint8 tensors.

`strong`: the MoCo v2 / SimCLR recipe (random resized crop, flip, colour jitter, grayscale,
optional blur). `weak`: crop and flip only, an option for the key branch. `plain`: resize and
normalise, for the monitors' un-augmented views.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2


def _finish(mean: list[float], std: list[float]) -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


def strong_view(
    size: int,
    mean: list[float],
    std: list[float],
    crop_scale: tuple[float, float] = (0.2, 1.0),
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1),
    jitter_prob: float = 0.8,
    gray_prob: float = 0.2,
    blur_prob: float = 0.0,
    flip_prob: float = 0.5,
) -> v2.Compose:
    ops: list[v2.Transform] = [
        v2.RandomResizedCrop(size, scale=tuple(crop_scale), antialias=True),
        v2.RandomApply([v2.ColorJitter(*jitter)], p=jitter_prob),
        v2.RandomGrayscale(p=gray_prob),
    ]
    if blur_prob > 0:
        ops.append(v2.RandomApply([v2.GaussianBlur(kernel_size=2 * (size // 20) + 1, sigma=(0.1, 2.0))], p=blur_prob))
    ops.append(v2.RandomHorizontalFlip(p=flip_prob))
    return v2.Compose(ops + _finish(mean, std))


def weak_view(
    size: int, mean: list[float], std: list[float], crop_scale: tuple[float, float] = (0.2, 1.0), flip_prob: float = 0.5, **_
) -> v2.Compose:
    ops = [v2.RandomResizedCrop(size, scale=tuple(crop_scale), antialias=True), v2.RandomHorizontalFlip(p=flip_prob)]
    return v2.Compose(ops + _finish(mean, std))


def plain_view(size: int, mean: list[float], std: list[float]) -> v2.Compose:
    return v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size), *_finish(mean, std)])
