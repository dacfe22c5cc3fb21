"""The views of a training step and the (query view, key view, weight) pairs the loss sums over.

    2 views, symmetric      (0 -> 1, 1/2), (1 -> 0, 1/2)                      MoCo v2, SimCLR, BYOL, MSF, SCE, ...
    2 views, one direction  (0 -> 1, 1)                                       ReSSL (the lab's script)
    3 views (CMSF)          as 2 views; view 2 is encoded by the key encoder only: the auxiliary view whose
                            neighbours in an auxiliary bank pick a second set of targets (mcl.contrast)
    mixed (UnMix)           [x1, x2, m, flip(m)], m = mix(x2, flip(x2)) (flip: the batch reversed):
                            pairs (x1, x2) with weight 1, (x1, m) with lam, (x1, flip(m)) with 1 - lam,
                            each symmetric; lam ~ Beta(1, 1); mixup m = lam x2 + (1 - lam) flip(x2), or
                            cutmix (probability 1/2): a box of flip(x2) pasted into x2, lam = the pixels kept

An arrow a -> b: the query is view a's prediction, the key is view b's (EMA) projection. The mixing
is drawn on the host from (seed, step, batch) alone, so a resumed run draws what the first would have.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def view_pairs(symmetric: bool, mix_lam: float | None = None) -> list[tuple[int, int, float]]:
    """(query view, key view, weight) of every direction of the step's loss."""
    pairs = [(0, 1, 0.5), (1, 0, 0.5)] if symmetric else [(0, 1, 1.0)]
    if mix_lam is None:
        return pairs
    scale = 0.5 if symmetric else 1.0
    for view, weight in ((2, mix_lam), (3, 1.0 - mix_lam)):
        pairs += [(0, view, scale * weight), (view, 0, scale * weight)] if symmetric else [(0, view, weight)]
    return pairs


def draw_mix(seed: int, step: int, batch: int, rows: int, cols: int) -> tuple[float, tuple[int, int, int, int] | None]:
    """UnMix's draw for one step: (lam, None) for mixup, or (lam, box r1, r2, c1, c2) for cutmix, lam then
    the share of x2's pixels kept (the lab's main_pretrain.py: a box of side sqrt(1 - lam) around a
    uniform centre, clipped to the image)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, step, batch]))  # mixed streams, not seed + step
    cutmix, lam = rng.random() >= 0.5, float(rng.beta(1.0, 1.0))
    if not cutmix:
        return lam, None
    side = math.sqrt(1.0 - lam)
    half_r, half_c = int(rows * side) // 2, int(cols * side) // 2
    r, c = int(rng.integers(rows)), int(rng.integers(cols))
    r1, r2, c1, c2 = max(r - half_r, 0), min(r + half_r, rows), max(c - half_c, 0), min(c + half_c, cols)
    return 1.0 - (r2 - r1) * (c2 - c1) / (rows * cols), (r1, r2, c1, c2)


def mix(x: torch.Tensor, lam: float, box: tuple[int, int, int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x: B x C x H x W view -> (m, flip(m)): x mixed with the reversed batch, and m reversed."""
    reverse = x.flip(0)
    if box is None:
        mixed = lam * x + (1.0 - lam) * reverse  # Python floats: no tensor to copy to the device
    else:
        r1, r2, c1, c2 = box
        mixed = x.clone()
        mixed[:, :, r1:r2, c1:c2] = reverse[:, :, r1:r2, c1:c2]
    return mixed, mixed.flip(0)
