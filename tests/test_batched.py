"""The batched augmentation path: per-op statistics equal to the per-image torchvision path's,
seeded, wired into the data module, and training as well as the per-image path."""

from __future__ import annotations

import colorsys
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from omegaconf import OmegaConf
from PIL import Image, ImageFilter
from torch.nn import functional as F
from torchvision.transforms.v2 import functional as TF

from mcl.data import batched, transforms
from mcl.data import datamodule as datamodule_module
from mcl.data.datamodule import ContrastiveDataModule
from mcl.data.sources import DatasetError
from mcl.train import ConfigError, build, build_module, train
from tests.conftest import make_cfg

N = 1000  # views per path and op; the KS test's 0.1% critical distance is then about 0.09
SIZE = 32
UNIT = {"size": SIZE, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}  # views read back as pixel values in [0, 1]
NOTHING = {"crop_scale": (1.0, 1.0), "jitter_prob": 0.0, "gray_prob": 0.0, "blur_prob": 0.0, "flip_prob": 0.0}


def both_paths(image: torch.Tensor, **recipe) -> tuple[torch.Tensor, torch.Tensor]:
    """N views of one uint8 3 x H x W image by each path: (batched, per-image torchvision), N x 3 x SIZE x SIZE."""
    recipe = {**UNIT, **NOTHING, **recipe}
    fast = batched.strong_view(**recipe)(image.expand(N, -1, -1, -1), torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    slow = transforms.strong_view(**recipe)
    return fast, torch.stack([slow(image) for _ in range(N)])


def same_distribution(a: torch.Tensor, b: torch.Tensor) -> None:
    """Two-sample Kolmogorov-Smirnov test at the 0.1% level (asymptotic; conservative with ties)."""
    a, b = a.float().sort().values, b.float().sort().values
    at = torch.cat([a, b])
    distance = (torch.searchsorted(a, at, right=True) / len(a) - torch.searchsorted(b, at, right=True) / len(b)).abs().max()
    critical = 1.949 * math.sqrt((len(a) + len(b)) / (len(a) * len(b)))
    assert distance < critical, f"distributions differ: KS distance {distance:.3f} >= {critical:.3f}"


def ramp_image() -> torch.Tensor:
    """R = 8 * column, G = 8 * row: a view's pixel values say where in the image it was sampled."""
    grid = torch.arange(SIZE) * 8
    return torch.stack([grid[None, :].expand(SIZE, SIZE), grid[:, None].expand(SIZE, SIZE), torch.full((SIZE, SIZE), 128)]).to(torch.uint8)


def crop_geometry(views: torch.Tensor) -> dict[str, torch.Tensor]:
    """Crop width/height (whole pixels), centre (half pixels) and flip of each view of `ramp_image`.

    Sample c of a crop [x0, x0 + w) sits at x0 + (c + 0.5) * w / SIZE - 0.5; columns 1 and SIZE-2
    are inside every crop the recipe allows, so their difference gives w (up to uint8 rounding).
    """
    x, y = views[:, 0] * 255 / 8, views[:, 1] * 255 / 8  # N x SIZE x SIZE, source coordinates
    dx = (x[:, :, SIZE - 2] - x[:, :, 1]).mean(1)  # N, negative when flipped
    w, h = dx.abs() * SIZE / (SIZE - 3), (y[:, SIZE - 2] - y[:, 1]).mean(1) * SIZE / (SIZE - 3)
    centre = lambda v: (v.mean((1, 2)) * 2).round() / 2  # noqa: E731
    return {"w": w.round(), "h": h.round(), "cx": centre(x), "cy": centre(y), "flipped": dx < 0}


def test_crop_area_aspect_position_and_flip_match_torchvision():
    fast, slow = both_paths(ramp_image(), crop_scale=(0.2, 1.0), flip_prob=0.5)
    for geo in map(crop_geometry, (fast, slow)):
        area, ratio = geo["w"] * geo["h"] / SIZE**2, geo["w"] / geo["h"]
        # w and h are rounded to whole pixels (as torchvision does): a 12 x 17 crop is in range
        assert area.min() >= 0.18 and area.max() <= 1.0 + 1e-3
        assert ratio.min() >= 0.70 and ratio.max() <= 1 / 0.70
        assert area.max() - area.min() > 0.7 and ratio.max() - ratio.min() > 0.5  # the whole ranges are used
        assert abs(geo["flipped"].float().mean() - 0.5) < 4 * math.sqrt(0.25 / N)
    g_fast, g_slow = crop_geometry(fast), crop_geometry(slow)
    for key in ("w", "h", "cx", "cy"):
        same_distribution(g_fast[key], g_slow[key])


def test_grayscale_rate_and_value_match_torchvision():
    colour = torch.tensor([200, 60, 100], dtype=torch.uint8)[:, None, None].expand(3, SIZE, SIZE)
    luma = (0.2989 * 200 + 0.587 * 60 + 0.114 * 100) / 255
    for views in both_paths(colour, gray_prob=0.2):
        gray = views.amax(1) - views.amin(1) < 1 / 255  # N x H x W
        assert gray.all((1, 2)).eq(gray.any((1, 2))).all()  # a whole view or nothing
        rate = gray.all((1, 2)).float().mean()
        assert abs(rate - 0.2) < 4 * math.sqrt(0.16 / N)
        assert torch.allclose(views[gray.all((1, 2))], torch.tensor(luma), atol=1.5 / 255)


def two_colours() -> torch.Tensor:
    """Left half (180, 90, 60), right half (60, 120, 160): no jitter strength in range clips them."""
    image = torch.empty(3, SIZE, SIZE, dtype=torch.uint8)
    image[:, :, : SIZE // 2] = torch.tensor([180, 90, 60], dtype=torch.uint8)[:, None, None]
    image[:, :, SIZE // 2 :] = torch.tensor([60, 120, 160], dtype=torch.uint8)[:, None, None]
    return image


def jitter_strength(op: str, views: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """The factor (or hue shift) each view of `two_colours` was jittered with, read off its pixels."""
    src, out = image.float()[None] / 255, views  # 1 x 3 x H x W, N x 3 x H x W
    left, right = (
        (slice(None), slice(None), slice(None), slice(0, SIZE // 2)),
        (slice(None), slice(None), slice(None), slice(SIZE // 2, None)),
    )
    if op == "brightness":
        return out[left].mean((1, 2, 3)) / src[left].mean()
    if op == "contrast":  # distances to the mean grey scale by the factor
        return (out[left] - out[right]).mean((2, 3))[:, 0] / (src[left] - src[right]).mean((2, 3))[0, 0]
    gray = torch.tensor([0.2989, 0.587, 0.114])
    if op == "saturation":  # distances to the pixel's own grey scale by the factor
        return (out[left].mean((2, 3))[:, 0] - out[left].mean((2, 3)) @ gray) / (
            src[left].mean((2, 3))[0, 0] - src[left].mean((2, 3))[0] @ gray
        )
    hue = lambda rgb: colorsys.rgb_to_hsv(*rgb.tolist())[0]  # noqa: E731
    before = hue(src[left].mean((0, 2, 3)))
    return torch.tensor([(hue(v) - before + 0.5) % 1.0 - 0.5 for v in out[left].mean((2, 3))])


@pytest.mark.parametrize(
    "op, strengths, low, high",
    [
        ("brightness", (0.4, 0, 0, 0), 0.6, 1.4),
        ("contrast", (0, 0.4, 0, 0), 0.6, 1.4),
        ("saturation", (0, 0, 0.4, 0), 0.6, 1.4),
        ("hue", (0, 0, 0, 0.1), -0.1, 0.1),
    ],
)
def test_each_jitter_strength_has_torchvision_range_and_distribution(op, strengths, low, high):
    image = two_colours()
    fast, slow = both_paths(image, jitter=strengths, jitter_prob=1.0)
    s_fast, s_slow = jitter_strength(op, fast, image), jitter_strength(op, slow, image)
    for s in (s_fast, s_slow):
        assert s.min() >= low - 0.02 and s.max() <= high + 0.02
        assert s.min() < low + 0.05 and s.max() > high - 0.05  # the whole range is used
    same_distribution(s_fast, s_slow)


def test_jitter_rate_and_order():
    image = two_colours()
    for views in both_paths(image, jitter=(0.4, 0, 0, 0), jitter_prob=0.8):
        jittered = (jitter_strength("brightness", views, image) - 1).abs() > 2 / 255
        assert abs(jittered.float().mean() - 0.8) < 4 * math.sqrt(0.16 / N)
    params = batched.strong_view(**UNIT).sample(24 * 400, SIZE, SIZE, torch.Generator().manual_seed(0))
    order = params["jitter_order"]  # each image's own permutation of the four ops, uniform over all 24
    assert torch.equal(order.sort(1).values, torch.arange(4).expand_as(order))
    counts = torch.unique(order, dim=0, return_counts=True)[1]
    assert len(counts) == 24 and counts.min() > 400 - 4 * 20 and counts.max() < 400 + 4 * 20


def pil_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """uint8 3 x H x W -> PIL's ImageFilter.GaussianBlur(radius=sigma) of it (the lab's blur), uint8 3 x H x W."""
    return TF.pil_to_tensor(TF.to_pil_image(image).filter(ImageFilter.GaussianBlur(radius=sigma)))


@pytest.mark.parametrize("sigma", [0.1, 1.0, 2.0])
def test_blur_of_both_paths_is_pils_gaussian_blur(sigma):
    """The strong view with only the blur on (blur_prob 1, sigma fixed), on a noise image, against PIL's
    GaussianBlur(radius=sigma): mean absolute difference below 2/255 in both paths. torchvision's blur with
    the 3-tap kernel mcl used before fails it at sigma 1 and 2 (too little blur: 3 taps cannot spread that far)."""
    image = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE), dtype=np.uint8))
    expected = pil_blur(image, sigma).float() / 255  # 3 x SIZE x SIZE
    recipe = {**UNIT, **NOTHING, "blur_prob": 1.0, "blur_sigma": (sigma, sigma)}
    fast = batched.strong_view(**recipe)(image[None].expand(4, -1, -1, -1), torch.Generator().manual_seed(0))  # 4 x 3 x S x S
    slow = transforms.strong_view(**recipe)(image)  # 3 x S x S
    for view in (*fast, slow):
        assert (view - expected).abs().mean() < 2 / 255
    old = TF.gaussian_blur(image, [3, 3], [sigma, sigma]).float() / 255  # kernel 2 * (32 // 20) + 1
    assert ((old - expected).abs().mean() >= 2 / 255) == (sigma > 0.5)


def test_blur_rate_and_sigma_distribution_match_the_per_image_path():
    dot = torch.zeros(3, SIZE, SIZE, dtype=torch.uint8)
    dot[:, SIZE // 2, SIZE // 2] = 255  # the view's centre value is the filter's centre weight
    fast, slow = both_paths(dot, blur_prob=0.5)
    centre = [v[:, 0, SIZE // 2, SIZE // 2] for v in (fast, slow)]
    widest = float(pil_blur(dot, 2.0)[0, SIZE // 2, SIZE // 2]) / 255  # sigma = 2, the largest
    for c in centre:
        # half the views blurred; even sigma = 0.1 lowers the centre (PIL's first box pass already does)
        assert 0.5 - 4 * math.sqrt(0.25 / N) < (c < 1).float().mean() < 0.5 + 4 * math.sqrt(0.25 / N)
        assert widest - 0.01 < c.min() < widest + 0.01  # sigma reaches 2 (~500 draws in [0.1, 2])
    same_distribution(centre[0], centre[1])


def test_whole_recipe_view_statistics_match_torchvision():
    """All ops together (crop, flip, jitter in random order, grayscale, blur): per-view mean and contrast."""
    image = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE), dtype=np.uint8))
    recipe = {"crop_scale": (0.2, 1.0), "jitter_prob": 0.8, "gray_prob": 0.2, "blur_prob": 0.5, "flip_prob": 0.5}
    fast, slow = both_paths(image, **recipe)
    for stat in (lambda v: v.mean((1, 2, 3)), lambda v: v.std((1, 2, 3)), lambda v: (v.amax(1) - v.amin(1)).mean((1, 2))):
        same_distribution(stat(fast), stat(slow))


def torchvision_with(params: dict[str, torch.Tensor], images: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision's functional ops (and PIL's blur) image by image, uint8 between ops, with the batched view's drawn parameters."""
    jitter = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    views = []
    for i, image in enumerate(images):
        x1, y1, x2, y2 = (int(v) for v in params["box"][i])
        view = TF.resized_crop(image, y1, x1, y2 - y1, x2 - x1, [size, size], antialias=True)
        for op in params["jitter_order"][i].tolist() if params["jitter"][i] else []:
            strength = float(params["jitter_factor"][i, op])
            view = view if math.isnan(strength) else jitter[op](view, strength)
        view = TF.rgb_to_grayscale(view, num_output_channels=3) if params["gray"][i] else view
        sigma = float(params["blur_sigma"][i])
        view = pil_blur(view, sigma) if params["blur"][i] else view
        views.append(TF.horizontal_flip(view) if params["flip"][i] else view)
    return torch.stack(views).float() / 255


def test_the_drawn_parameters_give_torchvisions_pixels():
    """Image by image, the batched view equals torchvision's own ops run with the same crop box, flip, jitter
    strengths and order, grayscale and blur sigma, up to uint8 rounding (the per-op tests check the draws)."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.randint(0, 256, (200, 3, 5, 5), generator=g).float()  # smooth colour images, 40 x 40
    images = F.interpolate(coarse, size=40, mode="bilinear", align_corners=False).round().clamp(0, 255).to(torch.uint8)
    view = batched.BatchedView(SIZE, [0.0] * 3, [1.0] * 3, blur_prob=0.5)
    params = view.sample(len(images), 40, 40, torch.Generator().manual_seed(1))
    assert params["jitter"].any() and params["gray"].any() and params["blur"].any() and params["flip"].any()
    difference = (view(images, torch.Generator().manual_seed(1)) - torchvision_with(params, images, SIZE)).abs()
    assert difference.mean() < 2.5 / 255 and difference.flatten().quantile(0.99) < 6 / 255
    assert difference.flatten(1).mean(1).max() < 4 / 255  # every image, not only on average


def test_views_are_seeded_normalised_and_device_independent_of_the_global_rng():
    images = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (8, 3, 24, 24), dtype=np.uint8))
    view = batched.strong_view(SIZE, [0.5, 0.4, 0.3], [0.2, 0.2, 0.2], blur_prob=0.5)
    first = view(images, torch.Generator().manual_seed(3))
    torch.manual_seed(123)  # the global stream plays no part
    assert torch.equal(first, view(images, torch.Generator().manual_seed(3)))
    assert not torch.equal(first, view(images, torch.Generator().manual_seed(4)))
    assert first.shape == (8, 3, SIZE, SIZE) and first.dtype == torch.float32
    raw = batched.BatchedView(SIZE, [0.5, 0.4, 0.3], [0.2, 0.2, 0.2], **NOTHING)(images, torch.Generator())
    resized = torch.nn.functional.interpolate(images.float() / 255, size=SIZE, mode="bilinear", align_corners=False)
    expected = (resized - torch.tensor([0.5, 0.4, 0.3])[:, None, None]) / 0.2
    assert torch.allclose(raw, expected, atol=1e-4)  # with every op off: a plain resize, then normalisation
    weak = batched.weak_view(SIZE, [0.5] * 3, [0.2] * 3, jitter_prob=1.0, gray_prob=1.0)
    assert weak.jitter_prob == weak.gray_prob == weak.blur_prob == 0.0  # crop and flip only, as transforms.weak_view


SMALL = [
    "debug=tiny",
    "logger=none",
    "callbacks=none",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=0",
]


def test_batched_batches_reach_the_module_as_views(cfg_factory, npz_file):
    """Loader: uint8 batches; on_after_batch_transfer: both views; with images_on_device, indices only."""
    for on_device in (False, True):
        cfg = cfg_factory(
            [*SMALL, "dataset=npz", f"dataset.path={npz_file}", "data.batched_augment=true", f"data.images_on_device={on_device}"]
        )
        datamodule, model, trainer = build(cfg)
        seen = []
        model.training_step = lambda batch, i, step=model.training_step, seen=seen: seen.append(batch) or step(batch, i)
        trainer.fit(model, datamodule)
        raw = next(iter(datamodule.train_dataloader()))
        assert len(raw) == (2 if on_device else 3) and raw[-2].shape == (32,)
        if not on_device:
            assert raw[0].dtype == torch.uint8 and raw[0].shape == (32, 32, 32, 3)
        x1, x2, index, labels = seen[0]
        assert x1.shape == x2.shape == (32, 3, 32, 32) and x1.dtype == torch.float32 and not torch.equal(x1, x2)
        assert torch.equal(labels, torch.from_numpy(datamodule.train_images.labels)[index])
        assert torch.isfinite(torch.tensor(float(trainer.callback_metrics["train/loss"])))


def image_folder(root: Path) -> list[str]:
    """Overrides for a 2-class, 2-images-a-split ImageFolder dataset (read from files) at root."""
    for split in ("train", "val"):
        for c in ("a", "b"):
            for i in range(2):
                (root / split / c).mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return ["dataset=imagefolder", f"dataset.root={root}", "data.batch_size=2", "model.queue_size=8", "model.bn_splits=2"]


def test_batched_path_refuses_file_datasets_and_misplaced_options(cfg_factory, tmp_path: Path):
    folder = image_folder(tmp_path / "imgs")
    with pytest.raises(DatasetError, match="batched_augment=true needs an in-memory dataset"):
        build(cfg_factory([*SMALL, *folder, "data.batched_augment=true"]))
    with pytest.raises(ValueError, match="images_on_device=true only applies to the batched path"):
        build(cfg_factory([*SMALL, "dataset=digits", "data.batched_augment=false", "data.images_on_device=true"]))
    with pytest.raises(ValueError, match="batched_augment=auto chose the per-image path \\(not training on a CUDA GPU\\)"):
        build(cfg_factory([*SMALL, "dataset=digits", "data.images_on_device=true"]))
    with pytest.raises(ValueError, match="data.batched_augment must be true, false or auto, got 'yes'"):
        build(cfg_factory([*SMALL, "dataset=digits", "data.batched_augment=yes"]))
    with pytest.raises(ConfigError, match="model.channels_last must be true, false or auto, got 'fast'"):
        build(cfg_factory([*SMALL, "dataset=digits", "model.channels_last=fast"]))


def test_monitor_loaders_make_whole_batches_with_the_per_image_values(cfg_factory, tmp_path):
    """The kNN/linear monitors' loaders view a whole uint8 batch at once (in-memory datasets; files: image by
    image, stacked): the same tensors as the view of each image, for a resized and a native-size dataset."""
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (48, 40, 40, 3), dtype=np.uint8), rng.integers(0, 4, 48)
    np.savez(tmp_path / "big.npz", x_train=x[:32], y_train=y[:32], x_test=x[32:], y_test=y[32:])
    data = {
        "resized": ["dataset=npz", f"dataset.path={tmp_path / 'big.npz'}", "dataset.image_size=32"],
        "native": ["dataset=digits"],
        "files": image_folder(tmp_path / "imgs"),
    }
    for name, overrides in data.items():
        datamodule, _, _ = build(cfg_factory([*SMALL, *overrides, "data.eval_batch_size=16"]))
        for loader in datamodule.val_dataloader():
            images, labels = next(iter(loader))
            one_by_one = [loader.dataset[i] for i in range(len(labels))]
            assert torch.equal(images, torch.stack([view for view, _ in one_by_one])), name
            assert labels.tolist() == [label for _, label in one_by_one] and labels.dtype == torch.int64, name


def test_auto_speed_settings_follow_the_training_device(cfg_factory, tmp_path, monkeypatch):
    """The defaults (auto) are the fast path on CUDA GPUs: the batched views for in-memory datasets, the
    training set on the GPU up to 4 GiB, channels_last; on a CPU, or for files, the per-image path. The
    run records what auto chose (config_resolved.yaml and checkpoints compare those values on resume)."""
    cfg = cfg_factory([*SMALL, "dataset=digits"])
    datamodule, model, _ = build(cfg)
    assert (cfg.data.batched_augment, cfg.data.images_on_device, cfg.model.channels_last) == (False, False, False)
    assert (datamodule.batched_augment, datamodule.images_on_device, model.cfg_model["channels_last"]) == (False, False, False)

    def chosen(overrides: list[str], device: str) -> tuple[bool, bool]:
        c = cfg_factory([*SMALL, *overrides])
        dm = ContrastiveDataModule(dataset=OmegaConf.to_container(c.dataset, resolve=True), batch_size=2, num_workers=0)
        dm.trainer = SimpleNamespace(world_size=1, strategy=SimpleNamespace(root_device=torch.device(device)))
        dm.setup("fit")
        return dm.batched_augment, dm.images_on_device

    assert chosen(["dataset=digits"], "cuda:0") == (True, True)
    assert chosen(["dataset=digits"], "cpu") == (False, False)
    assert chosen(image_folder(tmp_path / "imgs"), "cuda:0") == (False, False)
    monkeypatch.setattr(datamodule_module, "AUTO_ON_DEVICE_BYTES", 1000)  # digits: 1348 x 32 x 32 x 3 bytes
    assert chosen(["dataset=digits"], "cuda:0") == (True, False)
    monkeypatch.setattr(CUDAAccelerator, "is_available", staticmethod(lambda: True))
    for accelerator, channels_last in (("auto", True), ("gpu", True), ("cpu", False)):
        module = build_module(cfg_factory([*SMALL, "dataset=digits", f"trainer.accelerator={accelerator}"]), num_classes=10)
        assert module.cfg_model["channels_last"] is channels_last
        assert module.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last) is channels_last


def coloured_stripes(path: Path, n: int = 320, num_classes: int = 4) -> Path:
    """An npz where the class is a colour and a stripe orientation, plus noise: learnable in a few steps."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, num_classes, n)
    palette, grid = rng.integers(40, 215, (num_classes, 3)), np.arange(SIZE)
    x = np.empty((n, SIZE, SIZE, 3), dtype=np.uint8)
    for i, c in enumerate(y):
        stripes = ((grid[:, None] if c % 2 else grid[None, :]) // 4 % 2) * np.ones((SIZE, SIZE))
        x[i] = np.clip(palette[c] * (0.6 + 0.4 * stripes[..., None]) + rng.normal(0, 12, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
    np.savez(path, x_train=x[:256], y_train=y[:256], x_test=x[256:], y_test=y[256:])
    return path


@pytest.mark.slow
def test_both_paths_train_the_same_model_to_comparable_knn(cfg_factory, tmp_path):
    data = coloured_stripes(tmp_path / "stripes.npz")
    common = [*SMALL, "dataset=npz", f"dataset.path={data}", "seed=0", "monitor.at_start=true"]
    common += ["trainer.limit_train_batches=8", "trainer.limit_val_batches=null"]
    per_image = train(make_cfg([*common, "data.batched_augment=false"], tmp_path / "per_image"))
    fast = train(make_cfg([*common, "data.batched_augment=true"], tmp_path / "batched"))
    print({"initial": per_image["initial"]["val/knn_top1"], "per-image": per_image["val/knn_top1"], "batched": fast["val/knn_top1"]})
    assert per_image["initial"]["val/knn_top1"] == pytest.approx(fast["initial"]["val/knn_top1"])  # same model at the start
    for summary in (per_image, fast):
        assert summary["val/knn_top1"] >= summary["initial"]["val/knn_top1"] + 0.1  # both learn
    assert abs(per_image["val/knn_top1"] - fast["val/knn_top1"]) <= 0.15
