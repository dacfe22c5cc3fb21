"""Dataset readers. Each returns a (train, test) pair of `Images`, checked before training.

In-memory formats (CIFAR, STL-10, TinyImageNet, npz, digits) hold one uint8 array N x H x W x 3;
ImageFolder holds file paths and decodes per image. Labels feed monitors and diagnostics only.
"""

from __future__ import annotations

import hashlib
import os
import time
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension


class DatasetError(ValueError):
    """Bad or missing dataset files; raised before training starts."""


class DatasetWarning(UserWarning):
    """Data that trains, but probably not as meant (e.g. tiny images upscaled to a large image_size)."""


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
            return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)  # a copy: PIL's buffer is read-only


def _missing(name: str, path: Path, layout: str, download: bool | None = None) -> DatasetError:
    hint = " or pass dataset.download=true to fetch it" if download is False else ""
    return DatasetError(f"{name} not found at {path}. Expected layout: {layout}. Put the files there{hint}.")


@contextmanager
def _downloading(name: str, root: str, download: bool):
    """dataset.download=true: a download that fails (no network: compute nodes often have none) is a DatasetError
    saying how to stage the files, and the folders it created are removed again when they are left empty."""
    if not download:
        yield
        return
    created = [p for p in (Path(root), *Path(root).parents) if not p.exists()]  # deepest first
    try:
        yield
    except (OSError, HTTPException) as err:
        for folder in created:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise DatasetError(
            f"{name}: dataset.download=true could not download into {root} ({type(err).__name__}: {err}); is there a network "
            f'here? Download it on a machine that has one (the same command, or python -c "from torchvision import datasets; '
            f"datasets.{ {'cifar10': 'CIFAR10', 'cifar100': 'CIFAR100', 'stl10': 'STL10'}[name] }('{root}', download=True)\"), "
            "copy the folder to paths.data_dir (or $MCL_DATA_DIR) and run without dataset.download=true (docs/datasets.md)"
        ) from err


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
        with _downloading(variant, root, download):
            splits = [cls(root, train=train, download=download) for train in (True, False)]
    except RuntimeError as err:
        raise _missing(variant, Path(root) / cls.base_folder, f"{root}/{cls.base_folder}/ with the python batches", download) from err
    return tuple(_checked(variant, s.data, np.array(s.targets), num_classes) for s in splits)


def stl10(root: str, train_split: str = "train+unlabeled", download: bool = False, num_classes: int = 10) -> tuple[Images, Images]:
    """torchvision's STL-10 binaries (root/stl10_binary); the unlabelled images get label -1."""
    from torchvision import datasets

    try:
        with _downloading("stl10", root, download):
            splits = [datasets.STL10(root, split=s, download=download) for s in (train_split, "test")]
    except RuntimeError as err:
        raise _missing(
            "stl10", Path(root) / "stl10_binary", f"{root}/stl10_binary/ with train_X.bin, unlabeled_X.bin, ...", download
        ) from err
    return tuple(_checked("stl10", s.data.transpose(0, 2, 3, 1), s.labels, num_classes) for s in splits)


TINY_LAYOUT = "tiny-imagenet-200/{wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG, val/val_annotations.txt}"
TINY_ARRAYS = ("x_train", "y_train", "x_test", "y_test")


def _read_rgb(paths: list[Path], progress: str | None = None) -> np.ndarray:
    """The images at `paths`, N x H x W x 3 uint8; `progress`: say `<progress>: i of N` at every tenth of them."""

    def load(i: int, p: Path) -> np.ndarray:
        if progress and i and i % max(1, len(paths) // 10) == 0:
            rank_zero_info(f"{progress}: {i} of {len(paths)}")
        with Image.open(p) as im:
            return np.asarray(im.convert("RGB"))

    try:
        return np.stack([load(i, p) for i, p in enumerate(paths)])
    except ValueError as err:
        raise DatasetError(f"images under {paths[0].parent} do not all have the same size: {err}") from err


def _files_key(files: list[Path]) -> str:
    """Changes when a file is added, removed, renamed, resized or touched: the cache's validity."""
    digest = hashlib.sha256()
    for p in files:
        st = p.stat()
        digest.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _read_cache(path: Path, key: str) -> dict[str, np.ndarray] | None:
    """The cached arrays when the file exists, is readable and was built from these files."""
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in TINY_ARRAYS} if str(f["key"]) == key else None
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        return None


def _write_cache(path: Path, key: str, arrays: dict[str, np.ndarray]) -> None:
    """Written beside, then renamed into place: a killed run never leaves a torn cache."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        with partial.open("wb") as f:
            np.savez(f, key=np.array(key), **arrays)
        os.replace(partial, path)
    except OSError as err:
        warnings.warn(
            f"tinyimagenet: could not write the decoded cache {path} ({err}); set paths.cache_dir to a writable folder", stacklevel=2
        )


def tinyimagenet(root: str, num_classes: int | None = 200, cache_dir: str | None = None) -> tuple[Images, Images]:
    """The official tiny-imagenet-200 layout, decoded once into memory.

    cache_dir: the decoded arrays (1.3 GB) are kept in `<cache_dir>/tinyimagenet-<hash of the
    folder's path>.npz` (the dataset folder may be a read-only shared copy), rebuilt whenever a
    file under the folder is added, removed or changed; None: decode on every run.
    """
    base = Path(root) / "tiny-imagenet-200"
    annotations = base / "val" / "val_annotations.txt"
    if not (base / "train").is_dir() or not annotations.is_file():
        raise _missing("tinyimagenet", base, TINY_LAYOUT)
    wnids = sorted(p.name for p in (base / "train").iterdir() if p.is_dir() and not p.name.startswith("."))
    if num_classes is not None and len(wnids) != num_classes:
        raise DatasetError(
            f"tinyimagenet: found {len(wnids)} class folders under {base / 'train'}, but dataset.num_classes={num_classes}: "
            f"set dataset.num_classes={len(wnids)} to train on all of them, or remove the extra folders"
        )
    cls = {w: i for i, w in enumerate(wnids)}
    train = sorted((p, cls[p.parent.parent.name]) for p in (base / "train").glob("*/images/*") if p.parent.parent.name in cls)
    val = []
    for line in annotations.read_text().splitlines():
        name, wnid = line.split("\t")[:2]
        if wnid not in cls:
            raise DatasetError(f"{annotations}: class {wnid} has no folder under {base / 'train'}")
        val.append((base / "val" / "images" / name, cls[wnid]))
    if not train or not val:
        raise _missing("tinyimagenet", base, TINY_LAYOUT)
    cache, key, arrays = None, None, None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"tinyimagenet-{hashlib.sha256(str(base.resolve()).encode()).hexdigest()[:12]}.npz"
        key = _files_key([annotations, *(p for p, _ in train), *(p for p, _ in val)])
        arrays = _read_cache(cache, key)
    if arrays is None:
        began = time.monotonic()
        kept = f"then kept in {cache} for later runs" if cache is not None else "on every run (paths.cache_dir=null)"
        rank_zero_info(f"tinyimagenet: decoding the {len(train) + len(val)} JPEGs under {base} into memory, {kept}")
        splits = [
            (_read_rgb([p for p, _ in s], f"tinyimagenet: {name} images decoded"), np.array([c for _, c in s]))
            for name, s in (("train", train), ("val", val))
        ]
        arrays = dict(zip(TINY_ARRAYS, (*splits[0], *splits[1])))
        if cache is not None:
            rank_zero_info(f"tinyimagenet: writing {sum(a.nbytes for a in arrays.values()) / 2**30:.2f} GiB to {cache}")
            _write_cache(cache, key, arrays)
        rank_zero_info(f"tinyimagenet: ready in {time.monotonic() - began:.0f} s")
    else:
        rank_zero_info(f"tinyimagenet: decoded images read from the cache {cache}")
    return (  # the cached copy passes the same checks as a fresh decode
        _checked("tinyimagenet", arrays["x_train"], arrays["y_train"], num_classes),
        _checked("tinyimagenet", arrays["x_test"], arrays["y_test"], num_classes),
    )


def _image_size(path: str) -> tuple[int, int]:
    """(width, height) from the file's header (cheap, no decoding): catches empty, truncated-header and non-image files."""
    try:
        with Image.open(path) as im:
            if min(im.size) < 1:
                raise ValueError(f"size {im.size}")
            return im.size
    except Exception as err:
        raise DatasetError(f"imagefolder: {path} is not a readable image ({type(err).__name__}: {err})") from err


def _warn_if_upscaled(sides: list[int], image_size: int) -> None:
    """The views resize every image to image_size: a 32-px image at 224 px costs 49x the compute and adds nothing."""
    side = int(np.median(sides))
    if 2 * side <= image_size:
        warnings.warn(
            f"imagefolder: the images are about {side} px on their short side (median of {len(sides)}), much smaller than "
            f"dataset.image_size={image_size}: every view is upscaled {image_size / side:.0f}x, which costs compute and adds "
            f"no detail. Set dataset.image_size={side}, and for images of 64 px or less also dataset.small_images=true "
            f"(the CIFAR stem: 3x3 stride-1 conv, no max-pool).",
            DatasetWarning,
            stacklevel=3,
        )


class VisibleImageFolder(ImageFolder):
    """torchvision's ImageFolder without hidden entries (`.ipynb_checkpoints/`, `.DS_Store`, `._x.jpg`)."""

    def __init__(self, root: str):
        super().__init__(root, is_valid_file=lambda file: self.visible(file) and has_file_allowed_extension(file, IMG_EXTENSIONS))

    def visible(self, file: str) -> bool:
        return not any(part.startswith(".") for part in Path(file).relative_to(self.root).parts)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = [c for c in super().find_classes(directory)[0] if not c.startswith(".")]
        if not classes:
            raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
        return classes, {c: i for i, c in enumerate(classes)}


def image_folder(
    root: str, train_dir: str = "train", val_dir: str = "val", verify: bool = True, image_size: int | None = None
) -> tuple[Images, Images]:
    """root/{train,val}/<class>/<image>, read per image (torchvision's ImageFolder rules).

    Hidden folders and files (names starting with '.') are skipped. Images may differ in size:
    the views crop and resize them. verify: open every file's header before training, so a
    corrupt file stops the run now rather than hours in. image_size: the views' size; images
    much smaller (short side at most half of it, median over the headers read) get a warning.
    """
    splits = []
    for sub in (train_dir, val_dir):
        path = Path(root) / sub
        if not path.is_dir():
            raise _missing("imagefolder", path, f"{root}/{{{train_dir},{val_dir}}}/<class>/<image files>")
        try:
            folder = VisibleImageFolder(str(path))
        except FileNotFoundError as err:  # torchvision: a class folder without images
            raise DatasetError(f"imagefolder: {err}") from err
        splits.append(folder)
    if splits[0].classes != splits[1].classes:
        raise DatasetError(f"imagefolder: {train_dir} and {val_dir} have different class folders")
    files = [path for folder in splits for path, _ in folder.samples]
    checked = files if verify else files[:: max(1, len(files) // 64)]  # without verify: a sample of the headers
    sizes = [_image_size(path) for path in checked]
    if image_size is not None:
        _warn_if_upscaled([min(size) for size in sizes], image_size)
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
