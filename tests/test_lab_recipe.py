"""The data recipe of each dataset preset against the lab's (pc-cp/Benchmark-Methods-For-MNN, dataset/data_public.py):
the strong view (`get_contrastive_augment`) and the weak view (`get_weak_augment`), in both augmentation paths."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf
from torchvision.transforms import v2

from mcl.data import batched
from mcl.data.datamodule import ContrastiveDataModule
from mcl.data.transforms import PILGaussianBlur
from tests.conftest import make_cfg

# written from the lab's file: per dataset (size, mean, std); `else` (CIFAR-100) is its last branch
LAB_NORMALISE = {
    "cifar10": (32, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": (32, (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "stl10": (64, (0.4408, 0.4279, 0.3867), (0.2682, 0.2610, 0.2686)),
    "tinyimagenet": (64, (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
}
# get_contrastive_augment, op by op (torchvision's defaults filled in: ratio, flip p); ToTensor is the [0, 1] scaling
LAB_STRONG = [
    ("RandomResizedCrop", {"scale": (0.2, 1.0), "ratio": (3 / 4, 4 / 3)}),
    ("RandomHorizontalFlip", {"p": 0.5}),
    ("ColorJitter", {"p": 0.8, "brightness": (0.6, 1.4), "contrast": (0.6, 1.4), "saturation": (0.6, 1.4), "hue": (-0.1, 0.1)}),
    ("RandomGrayscale", {"p": 0.2}),
    ("GaussianBlur", {"p": 0.5, "sigma": (0.1, 2.0)}),  # the lab's class: PIL's ImageFilter.GaussianBlur(radius=U[0.1, 2])
    ("ToTensor", {}),
    ("Normalize", {}),
]
LAB_WEAK = [
    ("RandomResizedCrop", {"scale": (0.2, 1.0), "ratio": (3 / 4, 4 / 3)}),
    ("RandomHorizontalFlip", {"p": 0.9}),
    ("ToTensor", {}),
    ("Normalize", {}),
]
KNOWN_DIFFERENCES = {"stl10": "size"}  # mcl crops STL-10 to 96 px, the lab to 64 (docs/method.md lists it)


def described(op: v2.Transform, p: float = 1.0) -> tuple[str, dict]:
    """A per-image op as (the lab's name for it, its parameters)."""
    if isinstance(op, v2.RandomApply):
        (inner,) = op.transforms
        return described(inner, op.p)
    if isinstance(op, v2.RandomResizedCrop):
        return "RandomResizedCrop", {"scale": tuple(op.scale), "ratio": tuple(op.ratio)}
    if isinstance(op, v2.RandomHorizontalFlip):
        return "RandomHorizontalFlip", {"p": op.p}
    if isinstance(op, v2.ColorJitter):
        return "ColorJitter", {"p": p, **{k: tuple(getattr(op, k)) for k in ("brightness", "contrast", "saturation", "hue")}}
    if isinstance(op, v2.RandomGrayscale):
        return "RandomGrayscale", {"p": op.p}
    if isinstance(op, PILGaussianBlur):
        return "GaussianBlur", {"p": p, "sigma": op.sigma}
    if isinstance(op, v2.ToDtype):
        assert op.scale
        return "ToTensor", {}
    if isinstance(op, v2.Normalize):
        return "Normalize", {}
    raise AssertionError(f"an op the lab's recipe does not have: {op}")


def in_lab_order(ops: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """mcl flips last, the lab second: the flip commutes with the crop and the pixel-wise and symmetric ops."""
    flips = [op for op in ops if op[0] == "RandomHorizontalFlip"]
    rest = [op for op in ops if op[0] != "RandomHorizontalFlip"]
    return rest[:1] + flips + rest[1:]


def batched_described(view: batched.BatchedView) -> list[tuple[str, dict]]:
    """The batched view's parameters in the same form (its ops run in the lab's order)."""
    ranges = dict(zip(("brightness", "contrast", "saturation", "hue"), view.jitter_ranges))
    ops = [("RandomResizedCrop", {"scale": view.crop_scale, "ratio": view.crop_ratio}), ("RandomHorizontalFlip", {"p": view.flip_prob})]
    if view.jitter_prob > 0:
        ops.append(("ColorJitter", {"p": view.jitter_prob, **ranges}))
    if view.gray_prob > 0:
        ops.append(("RandomGrayscale", {"p": view.gray_prob}))
    if view.blur_prob > 0:
        ops.append(("GaussianBlur", {"p": view.blur_prob, "sigma": view.blur_sigma}))
    return [*ops, ("ToTensor", {}), ("Normalize", {})]


def close(a: tuple[str, dict], b: tuple[str, dict]) -> bool:
    return (
        a[0] == b[0]
        and a[1].keys() == b[1].keys()
        and all(
            pytest.approx(list(b[1][k])) == list(a[1][k]) if isinstance(b[1][k], tuple) else pytest.approx(b[1][k]) == a[1][k] for k in a[1]
        )
    )


@pytest.mark.parametrize("dataset", sorted(LAB_NORMALISE))
@pytest.mark.parametrize("key_view", ["strong", "weak"])
def test_each_dataset_presets_views_are_the_labs(tmp_path, dataset, key_view):
    cfg = make_cfg([f"dataset={dataset}", f"data.key_view={key_view}"], tmp_path)
    data = ContrastiveDataModule(
        dataset=OmegaConf.to_container(cfg.dataset, resolve=True), **OmegaConf.to_container(cfg.data, resolve=True)
    )
    size, mean, std = LAB_NORMALISE[dataset]
    expected_key = LAB_STRONG if key_view == "strong" else LAB_WEAK
    per_image_query, per_image_key, *_ = data._views()
    fast_query, fast_key, *_ = data._views(batched)
    for view, lab in ((per_image_query, LAB_STRONG), (per_image_key, expected_key)):
        ops = in_lab_order([described(op) for op in view.transforms])
        assert len(ops) == len(lab) and all(close(a, b) for a, b in zip(ops, lab)), (ops, lab)
        crop, normalise = view.transforms[0], view.transforms[-1]
        assert tuple(normalise.mean) == mean and tuple(normalise.std) == std
        assert (tuple(crop.size) == (size, size)) is (KNOWN_DIFFERENCES.get(dataset) != "size")
    for view, lab in ((fast_query, LAB_STRONG), (fast_key, expected_key)):
        ops = batched_described(view)
        assert len(ops) == len(lab) and all(close(a, b) for a, b in zip(ops, lab)), (ops, lab)
        assert tuple(view.mean) == mean and tuple(view.std) == std
        assert (view.size == size) is (KNOWN_DIFFERENCES.get(dataset) != "size")


def test_blur_can_still_be_switched_off(tmp_path):
    cfg = make_cfg(["dataset=cifar10", "dataset.blur_prob=0"], tmp_path)
    data = ContrastiveDataModule(
        dataset=OmegaConf.to_container(cfg.dataset, resolve=True), **OmegaConf.to_container(cfg.data, resolve=True)
    )
    assert not any(isinstance(op, v2.RandomApply) and isinstance(op.transforms[0], PILGaussianBlur) for op in data._views()[0].transforms)
    assert data._views(batched)[0].blur_prob == 0
