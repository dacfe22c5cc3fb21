"""Batched augmentation: both views of a whole batch with tensor ops, on the batch's device.

The per-image path (mcl.data.transforms) runs torchvision's transforms once per image on the CPU;
for CIFAR-sized images that Python work, not the network, bounds the step. Here the recipe is the
same, and so is the distribution of every random parameter (each image draws its own crop box,
flip, jitter strengths and order, grayscale and blur), but each op runs once for the whole batch:

    uint8 B x 3 x H x W -> float [0, 1] -> crop+resize (roi_align) -> flip -> colour jitter in the
    image's own order -> grayscale -> PIL's Gaussian blur -> normalise   float B x 3 x size x size

Random parameters are drawn on the CPU from an explicit torch.Generator (deterministic under a
seed, identical on CPU and GPU) and only the small parameter tensors travel to the device.
Differences from the per-image path, none of which changes the distribution of parameters:
the per-image path rounds to uint8 after every op, this one stays in float; the crop samples
its bilinear taps from the whole image (the per-image path clamps at the crop's border); a crop
larger than `size` is box-averaged by roi_align instead of torchvision's antialias filter; the
blur is PIL's filter (as the per-image path's) in float, not rounded after each of its passes.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F
from torch.utils.data import Dataset
from torchvision.ops import roi_align

GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def _gray(x: torch.Tensor) -> torch.Tensor:
    """n x 3 x H x W -> n x 1 x H x W luma (Python-float weights: no constant tensor to copy to the device)."""
    return (x[:, 0] * GRAY[0] + x[:, 1] * GRAY[1] + x[:, 2] * GRAY[2])[:, None]


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor * x + (1 - factor) * other, clamped to [0, 1]; factor: n."""
    f = factor[:, None, None, None]
    return (f * x + (1 - f) * other).clamp_(0, 1)


def _brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * factor[:, None, None, None]).clamp_(0, 1)


def _contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, _gray(x).mean((1, 2, 3), keepdim=True), factor)  # towards each image's mean grey


def _saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, _gray(x), factor)  # towards each pixel's grey


def _shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of each image by shift (n, in turns): torchvision's adjust_hue, batched."""
    r, g, b = x.unbind(1)  # n x H x W each
    maxc, minc = x.amax(1), x.amin(1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(maxc == r, (g - b) / safe, torch.where(maxc == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    h = (h / 6 + shift[:, None, None]).remainder(1.0)
    s = delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    # HSV -> RGB: channel n = v - v*s*clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6, n = 5, 3, 1
    k = torch.stack([5 + 6 * h, 3 + 6 * h, 1 + 6 * h], 1).remainder(6)  # n x 3 x H x W
    return maxc[:, None] - (maxc * s)[:, None] * torch.minimum(k, 4 - k).clamp(0, 1)


JITTER_OPS = (_brightness, _contrast, _saturation, _shift_hue)  # ColorJitter's op ids 0-3, each (n x 3 x H x W, n) -> n x 3 x H x W


def pil_box_radius(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PIL's box radius l + a for GaussianBlur(radius=sigma) with 3 passes (its BoxBlur.c `_gaussian_blur_radius`,
    from Gwosdek et al. 2011): a box of 2l + 1 full taps and two end taps of weight a, variance sigma^2 / 3 each.

    sigma: n -> (l: n whole taps each side, a: n in [0, 1) the end taps' weight); sigma = 0 gives l = a = 0 (no blur).
    """
    var = sigma.float() ** 2 / 3  # each of the 3 passes carries a third of the variance (float32, as PIL's C floats)
    whole = torch.floor((torch.sqrt(12 * var + 1) - 1) / 2)
    a = (2 * whole + 1) * (whole * (whole + 1) - 3 * var) / (6 * (var - (whole + 1) ** 2))
    return whole, a


def pil_blur_matrices(sigma: torch.Tensor, size: int, reach: int) -> torch.Tensor:
    """n x size x size: M_i such that M_i @ line blurs a line of `size` pixels as PIL's GaussianBlur(sigma_i) does
    along one axis: three extended box passes, each replicating the edge pixels (PIL's `ImagingLineBoxBlur`),
    in float (PIL rounds to uint8 after each pass). reach: taps each side of one box, at least l + 1 for every
    sigma (a constant, so every step builds the same shapes). sigma_i = 0 gives the identity.
    """
    whole, a = pil_box_radius(sigma)  # n each
    offset = torch.arange(-reach, reach + 1, device=sigma.device)  # T
    far = offset.abs()[None].float()  # 1 x T
    box = torch.where(far <= whole[:, None], 1.0, torch.where(far == whole[:, None] + 1, a[:, None], 0.0))  # n x T
    box = box / (2 * (whole + a) + 1)[:, None]  # each pass keeps the mean
    columns = (torch.arange(size, device=sigma.device)[:, None] + offset[None]).clamp_(0, size - 1)  # size x T, edges replicated
    taps = F.one_hot(columns, size).transpose(0, 1).flatten(1).to(box.dtype)  # T x size*size: tap t of pixel i reads pixel j
    one_pass = (box @ taps).view(-1, size, size)  # n x size x size (a matrix product: no atomics, deterministic)
    return one_pass @ one_pass @ one_pass  # n x size x size


def _blur(x: torch.Tensor, sigma: torch.Tensor, reach: int) -> torch.Tensor:
    """PIL's GaussianBlur(radius=sigma_i) of each image (x: n x 3 x S x S float, sigma: n; 0 leaves an image as it is).

    Two batched matrix products (columns, then rows) with one matrix an image: no convolution whose shape
    follows the number of blurred images, so nothing is re-tuned when it changes.
    """
    m = pil_blur_matrices(sigma, x.shape[-1], reach)[:, None]  # n x 1 x S x S (square views: one matrix per axis)
    return m @ x @ m.transpose(-1, -2)  # n x 3 x S x S


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device`; to a GPU from pinned memory, so the copy does not wait for queued work."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


class BatchedView:
    """One augmented view of a batch, with the parameters of `mcl.data.transforms.strong_view`.

    `weak_view` is the same class with jitter, grayscale and blur switched off.
    Call with a uint8 batch B x 3 x H x W (any device) and a CPU torch.Generator.
    """

    def __init__(
        self,
        size: int,
        mean: list[float],
        std: list[float],
        crop_scale: tuple[float, float] = (0.2, 1.0),
        jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1),
        jitter_prob: float = 0.8,
        gray_prob: float = 0.2,
        blur_prob: float = 0.0,
        flip_prob: float = 0.5,
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),  # RandomResizedCrop's default
        blur_sigma: tuple[float, float] = (0.1, 2.0),  # as in transforms.strong_view (the lab's)
    ):
        self.size, self.mean, self.std = size, list(mean), list(std)
        self.crop_scale, self.crop_ratio = tuple(crop_scale), tuple(crop_ratio)
        b, c, s, h = jitter
        # ColorJitter's ranges; a zero strength switches the op off
        self.jitter_ranges = [(max(0.0, 1 - b), 1 + b) if b else None, (max(0.0, 1 - c), 1 + c) if c else None]
        self.jitter_ranges += [(max(0.0, 1 - s), 1 + s) if s else None, (-h, h) if h else None]
        self.jitter_prob, self.gray_prob, self.flip_prob = jitter_prob, gray_prob, flip_prob
        self.blur_prob, self.blur_sigma = blur_prob, tuple(blur_sigma)
        self.blur_reach = int(pil_box_radius(torch.tensor([max(self.blur_sigma)]))[0]) + 1  # one box's taps each side at the largest sigma

    def sample(self, n: int, height: int, width: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Each image's random parameters (CPU tensors), drawn as torchvision draws them."""

        def uniform(*shape: int, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
            return torch.empty(shape).uniform_(low, high, generator=generator)

        # RandomResizedCrop: 10 tries of (area, log-ratio); the first box that fits, else the central fallback
        area = height * width * uniform(n, 10, low=self.crop_scale[0], high=self.crop_scale[1])  # n x 10
        ratio = torch.exp(uniform(n, 10, low=math.log(self.crop_ratio[0]), high=math.log(self.crop_ratio[1])))
        w, h = torch.sqrt(area * ratio).round(), torch.sqrt(area / ratio).round()  # n x 10
        fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = fits.int().argmax(1, keepdim=True)  # n x 1
        w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], fits.any(1)  # n
        fw, fh = width, height
        if width / height < self.crop_ratio[0]:
            fh = round(width / self.crop_ratio[0])
        elif width / height > self.crop_ratio[1]:
            fw = round(height * self.crop_ratio[1])
        w, h = torch.where(found, w, float(fw)), torch.where(found, h, float(fh))
        top = torch.where(found, (uniform(n) * (height - h + 1)).floor(), ((height - h) // 2))
        left = torch.where(found, (uniform(n) * (width - w + 1)).floor(), ((width - w) // 2))
        # ColorJitter inside RandomApply: strengths uniform in their ranges, op order a uniform permutation
        factors = torch.stack([uniform(n, low=r[0], high=r[1]) if r else torch.full((n,), math.nan) for r in self.jitter_ranges], 1)
        return {
            "box": torch.stack([left, top, left + w, top + h], 1),  # n x 4, x1 y1 x2 y2
            "flip": uniform(n) < self.flip_prob,
            "jitter": uniform(n) < self.jitter_prob,
            "jitter_factor": factors,  # n x 4 (nan: op off)
            "jitter_order": uniform(n, 4).argsort(1),  # n x 4, op id at each position
            "gray": uniform(n) < self.gray_prob,
            "blur": uniform(n) < self.blur_prob,
            "blur_sigma": uniform(n, low=self.blur_sigma[0], high=self.blur_sigma[1]),
        }

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """uint8 B x 3 x H x W -> normalised float B x 3 x size x size.

        Which rows each op touches, and with what strength, is decided on the CPU; all of it
        reaches the device in two copies, and no op reads a device value back: on a GPU the
        whole view is queued without waiting.
        """
        n, _, height, width = images.shape
        p = self.sample(n, height, width, generator)
        order, factor = p["jitter_order"], p["jitter_factor"]  # n x 4 each
        steps = [(lambda v, _: v.flip(-1), p["flip"], None)]  # (op, CPU bool mask n, per-row value n or None)
        for position in range(4):  # each image applies its own permutation of the four jitter ops
            for op_id, op in enumerate(JITTER_OPS):
                steps.append((op, p["jitter"] & (order[:, position] == op_id) & ~factor[:, op_id].isnan(), factor[:, op_id]))
        steps.append((lambda v, _: _gray(v).expand(-1, 3, -1, -1), p["gray"], None))
        rows = [mask.nonzero().flatten() for _, mask, _ in steps]
        values = [value[mask] if value is not None else torch.empty(0) for _, mask, value in steps]
        # the blur runs on every image, sigma 0 where it does not apply: its shapes follow the batch, not the draw
        values.append(torch.where(p["blur"], p["blur_sigma"], 0.0) if self.blur_prob > 0 else torch.empty(0))
        boxes = torch.cat([torch.arange(n, dtype=torch.float32)[:, None], p["box"]], 1)  # n x 5: image, x1 y1 x2 y2
        dev_rows = _to_device(torch.cat(rows), images.device).split([len(r) for r in rows])
        dev_boxes, *dev_values, dev_sigma = _to_device(torch.cat([boxes.flatten(), *values]), images.device).split(
            [5 * n, *map(len, values)]
        )
        x = images.float().div_(255).contiguous()  # B x 3 x H x W
        x = roi_align(x, dev_boxes.view(n, 5), self.size, sampling_ratio=-1, aligned=True)  # B x 3 x size x size
        for (op, _, _), cpu_rows, r, v in zip(steps, rows, dev_rows, dev_values):
            if len(cpu_rows):
                x[r] = op(x[r], v)  # r, v: the selected rows and their strengths, on the device
        if self.blur_prob > 0:
            x = _blur(x, dev_sigma, self.blur_reach)
        for c in range(3):
            x[:, c].sub_(self.mean[c]).div_(self.std[c])
        return x


def strong_view(size: int, mean: list[float], std: list[float], **recipe) -> BatchedView:
    """The batched counterpart of `mcl.data.transforms.strong_view` (same keyword arguments)."""
    return BatchedView(size, mean, std, **recipe)


def weak_view(
    size: int, mean: list[float], std: list[float], crop_scale: tuple[float, float] = (0.2, 1.0), flip_prob: float = 0.5, **_
) -> BatchedView:
    """The batched counterpart of `mcl.data.transforms.weak_view`: crop and flip only."""
    return BatchedView(size, mean, std, crop_scale=crop_scale, jitter_prob=0.0, gray_prob=0.0, blur_prob=0.0, flip_prob=flip_prob)


class ImageBatches(Dataset):
    """Whole training batches from one uint8 N x H x W x 3 tensor, for the batched views.

    The loader gathers a batch in one indexing op (`__getitems__`, then `whole_batch` as the
    collate_fn) and yields (uint8 B x H x W x 3, index B, label B); with images=None (the images
    live on the training device) it yields (index, label) only.
    """

    def __init__(self, images: torch.Tensor | None, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        index = torch.as_tensor(indices)
        if self.images is None:
            return index, self.labels[index]
        return self.images[index], index, self.labels[index]


def whole_batch(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """collate_fn for ImageBatches and the monitors' OneView: `__getitems__` already built the batch."""
    return batch
