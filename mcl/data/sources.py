"""Dataset readers. Each returns a (train, test) pair of `Images`, checked before training.

In-memory formats (CIFAR, STL-10, TinyImageNet, npz, digits) hold one uint8 array N x H x W x 3;
ImageFolder holds file paths and decodes per image. Labels feed monitors and diagnostics only.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image


class DatasetError(ValueError):
    """Bad or missing dataset files; raised before training starts."""


@dataclass
class Images:
    """labels: N int64 (-1 = unlabelled). Exactly one of `array` (N x H x W x 3 uint8) or `paths`."""

    labels: np.ndarray
    array: np.ndarray | None = None
    paths: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> torch.Tensor:
        """Image i as a 3 x H x W uint8 tensor."""
        if self.array is not None:
            return torch.from_numpy(self.array[i]).permute(2, 0, 1)
        with Image.open(self.paths[i]) as im:
            return torch.from_numpy(np.asarray(im.convert("RGB"))).permute(2, 0, 1)


def _missing(name: str, path: Path, layout: str, download: bool | None = None) -> DatasetError:
    hint = " or pass dataset.download=true to fetch it" if download is False else ""
    return DatasetError(f"{name} not found at {path}. Expected layout: {layout}. Put the files there{hint}.")


def _checked(name: str, x: np.ndarray, y: np.ndarray, num_classes: int | None) -> Images:
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim == 3:  # grayscale N x H x W
        x = np.repeat(x[..., None], 3, axis=-1)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise DatasetError(f"{name}: images must be N x H x W x 3 (or N x H x W), got shape {x.shape}")
    if x.dtype != np.uint8:
        raise DatasetError(f"{name}: images must be uint8 in [0, 255], got dtype {x.dtype}")
    if y.ndim != 1 or len(y) != len(x):
        raise DatasetError(f"{name}: labels must be a vector of length {len(x)}, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DatasetError(f"{name}: labels must be integers, got dtype {y.dtype}")
    if len(y) == 0:
        raise DatasetError(f"{name}: holds no images")
    if y.min() < -1:
        raise DatasetError(f"{name}: labels must be >= 0 (-1 = unlabelled), got {y.min()}")
    if num_classes is not None and len(y) and (y.min() < -1 or y.max() >= num_classes):
        raise DatasetError(f"{name}: labels must lie in [0, {num_classes}) (-1 = unlabelled), got [{y.min()}, {y.max()}]")
    return Images(labels=y.astype(np.int64), array=np.ascontiguousarray(x))


def cifar(root: str, variant: str = "cifar10", download: bool = False, num_classes: int = 10) -> tuple[Images, Images]:
    """torchvision's CIFAR-10/100 (python pickles under root/cifar-10-batches-py or cifar-100-python)."""
    from torchvision import datasets

    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[variant]
    try:
        splits = [cls(root, train=train, download=download) for train in (True, False)]
    except RuntimeError as err:
        raise _missing(variant, Path(root) / cls.base_folder, f"{root}/{cls.base_folder}/ with the python batches", download) from err
    return tuple(_checked(variant, s.data, np.array(s.targets), num_classes) for s in splits)


def stl10(root: str, train_split: str = "train+unlabeled", download: bool = False, num_classes: int = 10) -> tuple[Images, Images]:
    """torchvision's STL-10 binaries (root/stl10_binary); the unlabelled images get label -1."""
    from torchvision import datasets

    try:
        splits = [datasets.STL10(root, split=s, download=download) for s in (train_split, "test")]
    except RuntimeError as err:
        raise _missing(
            "stl10", Path(root) / "stl10_binary", f"{root}/stl10_binary/ with train_X.bin, unlabeled_X.bin, ...", download
        ) from err
    return tuple(_checked("stl10", s.data.transpose(0, 2, 3, 1), s.labels, num_classes) for s in splits)


TINY_LAYOUT = "tiny-imagenet-200/{wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG, val/val_annotations.txt}"


def _read_rgb(paths: list[Path]) -> np.ndarray:
    def load(p: Path) -> np.ndarray:
        with Image.open(p) as im:
            return np.asarray(im.convert("RGB"))

    try:
        return np.stack([load(p) for p in paths])
    except ValueError as err:
        raise DatasetError(f"images under {paths[0].parent} do not all have the same size: {err}") from err


def tinyimagenet(root: str, num_classes: int = 200) -> tuple[Images, Images]:
    """The official tiny-imagenet-200 layout; decoded once into memory (cached as .npz beside it)."""
    base = Path(root) / "tiny-imagenet-200"
    annotations = base / "val" / "val_annotations.txt"
    if not (base / "train").is_dir() or not annotations.is_file():
        raise _missing("tinyimagenet", base, TINY_LAYOUT)
    cache = base / "mcl_cache.npz"
    if cache.is_file():
        with np.load(cache) as f:
            return Images(f["y_train"], f["x_train"]), Images(f["y_test"], f["x_test"])
    wnids = sorted(p.name for p in (base / "train").iterdir() if p.is_dir())
    cls = {w: i for i, w in enumerate(wnids)}
    train = sorted((p, cls[p.parent.parent.name]) for p in (base / "train").glob("*/images/*"))
    val = []
    for line in annotations.read_text().splitlines():
        name, wnid = line.split("\t")[:2]
        if wnid not in cls:
            raise DatasetError(f"{annotations}: class {wnid} has no folder under {base / 'train'}")
        val.append((base / "val" / "images" / name, cls[wnid]))
    if not train or not val:
        raise _missing("tinyimagenet", base, TINY_LAYOUT)
    out = [_checked("tinyimagenet", _read_rgb([p for p, _ in s]), np.array([c for _, c in s]), num_classes) for s in (train, val)]
    np.savez(cache, x_train=out[0].array, y_train=out[0].labels, x_test=out[1].array, y_test=out[1].labels)
    return out[0], out[1]


def _readable_image(path: str) -> None:
    """Opens the file's header (cheap, no decoding): catches empty, truncated-header and non-image files."""
    try:
        with Image.open(path) as im:
            if min(im.size) < 1:
                raise ValueError(f"size {im.size}")
    except Exception as err:
        raise DatasetError(f"imagefolder: {path} is not a readable image ({type(err).__name__}: {err})") from err


def image_folder(root: str, train_dir: str = "train", val_dir: str = "val", verify: bool = True) -> tuple[Images, Images]:
    """root/{train,val}/<class>/<image>, read per image (torchvision's ImageFolder rules).

    Images may differ in size: the views crop and resize them. verify: open every file's header
    before training, so a corrupt file stops the run now rather than hours in.
    """
    from torchvision.datasets import ImageFolder

    splits = []
    for sub in (train_dir, val_dir):
        path = Path(root) / sub
        if not path.is_dir():
            raise _missing("imagefolder", path, f"{root}/{{{train_dir},{val_dir}}}/<class>/<image files>")
        try:
            folder = ImageFolder(str(path))
        except FileNotFoundError as err:  # torchvision: a class folder without images
            raise DatasetError(f"imagefolder: {err}") from err
        splits.append(folder)
    if splits[0].classes != splits[1].classes:
        raise DatasetError(f"imagefolder: {train_dir} and {val_dir} have different class folders")
    if verify:
        for folder in splits:
            for path, _ in folder.samples:
                _readable_image(path)
    return tuple(Images(labels=np.array(f.targets, dtype=np.int64), paths=[p for p, _ in f.samples]) for f in splits)


NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def npz(path: str, num_classes: int | None = None) -> tuple[Images, Images]:
    """A .npz with x_train/x_test (N x H x W x 3 or N x H x W, uint8) and y_train/y_test (int)."""
    file = Path(path)
    if not file.is_file():
        raise DatasetError(f"npz file not found: {file}. Pass dataset.path=FILE with arrays {', '.join(NPZ_KEYS)}.")
    try:
        with np.load(file, allow_pickle=False) as f:
            missing = [k for k in NPZ_KEYS if k not in f.files]
            if missing:
                raise DatasetError(f"{file}: missing arrays {missing}; expected {list(NPZ_KEYS)}, found {f.files}")
            arrays = {k: f[k] for k in NPZ_KEYS}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:  # a torn or foreign file
        if isinstance(err, DatasetError):
            raise
        raise DatasetError(f"{file}: not a readable .npz file ({err})") from err
    return (
        _checked(f"{file}:train", arrays["x_train"], arrays["y_train"], num_classes),
        _checked(f"{file}:test", arrays["x_test"], arrays["y_test"], num_classes),
    )


def digits(size: int = 32, test_fraction: float = 0.25, seed: int = 0) -> tuple[Images, Images]:
    """scikit-learn's embedded 8x8 handwritten digits (1,797 images, 10 classes), upscaled.

    Ships inside the installed package, so it needs no download (used by `make demo`).
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.from_numpy(data.images).float()[:, None] / 16.0  # N x 1 x 8 x 8
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)[:, 0].numpy()  # N x size x size
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    y = data.target.astype(np.int64)
    return _checked("digits", x[train], y[train], 10), _checked("digits", x[test], y[test], 10)
