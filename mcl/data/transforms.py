"""Augmentation recipes (torchvision.transforms.v2) on 3 x H x W uint8 tensors.

`strong`: the MoCo v2 / SimCLR recipe as the lab writes it (its dataset/data_public.py,
`get_contrastive_augment`): random resized crop, flip, colour jitter, grayscale, then PIL's
Gaussian blur with probability blur_prob. `weak`: crop and flip only, an option for the key
branch (the lab's `--weak`). `plain`: resize and normalise, for the monitors' un-augmented views.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import ImageFilter
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF


class PILGaussianBlur(v2.Transform):
    """PIL's `ImageFilter.GaussianBlur(radius=sigma)`, sigma ~ U[sigma[0], sigma[1]]: the lab's blur.

    PIL does not sample a Gaussian: it runs three "extended" box blurs along each axis (box radius
    l + a from sigma, Gwosdek et al. 2011), each replicating the edge pixels, rounding to uint8
    after every pass. Applying PIL itself keeps the per-image path equal to the lab's pixel for
    pixel; `mcl.data.batched.pil_blur_matrices` is the same filter for whole batches.
    sigma is drawn from torch's generator (as v2.GaussianBlur draws it), so `SeededItems` fixes it.
    """

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)):
        super().__init__()
        self.sigma = (float(sigma[0]), float(sigma[1]))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"radius": float(torch.empty(1).uniform_(*self.sigma))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, torch.Tensor) or inpt.dtype != torch.uint8:
            raise TypeError(f"PILGaussianBlur takes 3 x H x W uint8 image tensors, got {type(inpt).__name__} {getattr(inpt, 'dtype', '')}")
        blurred = TF.pil_to_tensor(TF.to_pil_image(inpt).filter(ImageFilter.GaussianBlur(radius=params["radius"])))  # 3 x H x W
        return tv_tensors.wrap(blurred, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else blurred


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
    blur_sigma: tuple[float, float] = (0.1, 2.0),
) -> v2.Compose:
    """The lab's strong view; the flip comes last here (it commutes with every other op)."""
    ops: list[v2.Transform] = [
        v2.RandomResizedCrop(size, scale=tuple(crop_scale), antialias=True),
        v2.RandomApply([v2.ColorJitter(*jitter)], p=jitter_prob),
        v2.RandomGrayscale(p=gray_prob),
    ]
    if blur_prob > 0:
        ops.append(v2.RandomApply([PILGaussianBlur(blur_sigma)], p=blur_prob))
    ops.append(v2.RandomHorizontalFlip(p=flip_prob))
    return v2.Compose(ops + _finish(mean, std))


def weak_view(
    size: int, mean: list[float], std: list[float], crop_scale: tuple[float, float] = (0.2, 1.0), flip_prob: float = 0.5, **_
) -> v2.Compose:
    ops = [v2.RandomResizedCrop(size, scale=tuple(crop_scale), antialias=True), v2.RandomHorizontalFlip(p=flip_prob)]
    return v2.Compose(ops + _finish(mean, std))


def plain_view(size: int, mean: list[float], std: list[float]) -> v2.Compose:
    return v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size), *_finish(mean, std)])
