"""Each dataset format read from small files written in its real on-disk layout."""

from __future__ import annotations

import logging
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets

from mcl.data import sources
from mcl.data.datamodule import ContrastiveDataModule
from mcl.data.sources import DatasetError


def write_cifar(root: Path, variant: str, n: int = 12) -> None:
    """torchvision's layout: pickled dicts with b'data' (N x 3072) and b'labels'/b'fine_labels'."""
    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[variant]
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    label_key = "labels" if variant == "cifar10" else "fine_labels"
    rng = np.random.default_rng(0)
    for name, _ in cls.train_list + cls.test_list:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), label_key: list(rng.integers(0, 10, n))}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / cls.meta["filename"], "wb") as f:
        pickle.dump({cls.meta["key"]: [f"class{i}" for i in range(100)]}, f)


def write_stl10(root: Path, n: int = 4) -> None:
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, labelled in (("train", True), ("test", True), ("unlabeled", False)):
        rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8).tofile(folder / f"{split}_X.bin")
        if labelled:
            rng.integers(1, 11, n, dtype=np.uint8).tofile(folder / f"{split}_y.bin")
    (folder / "class_names.txt").write_text("\n".join(f"c{i}" for i in range(10)))


def write_image(path: Path, size: int = 16, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(path)


def write_tinyimagenet(root: Path) -> None:
    base = root / "tiny-imagenet-200"
    wnids = ["n01443537", "n01629819"]
    (base / "val" / "images").mkdir(parents=True)
    lines = []
    for c, wnid in enumerate(wnids):
        for i in range(3):
            write_image(base / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", 64, 40 * c + i)
        name = f"val_{c}.JPEG"
        write_image(base / "val" / "images" / name, 64, 40 * c)
        lines.append(f"{name}\t{wnid}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (base / "wnids.txt").write_text("\n".join(wnids))


def write_image_folder(root: Path) -> None:
    for split, n in (("train", 3), ("val", 1)):
        for c in ("cat", "dog"):
            for i in range(n):
                write_image(root / split / c / f"{i}.png", 24, 100 if c == "dog" else 0)


@pytest.fixture
def trusted(monkeypatch):
    """Skip torchvision's md5 checks: the test files are made here, not downloaded."""
    for cls in (datasets.CIFAR10, datasets.STL10):
        monkeypatch.setattr(cls, "_check_integrity", lambda self: True)
    monkeypatch.setattr(datasets.cifar, "check_integrity", lambda *args: True)


@pytest.mark.parametrize("variant", ["cifar10", "cifar100"])
def test_cifar(tmp_path, trusted, variant):
    write_cifar(tmp_path, variant)
    train, test = sources.cifar(str(tmp_path), variant, num_classes=10 if variant == "cifar10" else 100)
    n_train = 12 * (5 if variant == "cifar10" else 1)
    assert train.array.shape == (n_train, 32, 32, 3) and test.array.shape == (12, 32, 32, 3)
    assert train.image(0).shape == (3, 32, 32) and train.image(0).dtype == torch.uint8


def test_stl10_unlabelled_images_get_label_minus_one(tmp_path, trusted):
    write_stl10(tmp_path)
    train, test = sources.stl10(str(tmp_path))
    assert train.array.shape == (8, 96, 96, 3) and len(test) == 4
    assert (train.labels == -1).sum() == 4 and train.labels.max() < 10


def test_tinyimagenet_official_layout_and_cache(tmp_path, caplog):
    write_tinyimagenet(tmp_path / "data")
    cache_dir = tmp_path / "cache"
    base = tmp_path / "data" / "tiny-imagenet-200"
    with caplog.at_level(logging.INFO):
        train, val = sources.tinyimagenet(str(tmp_path / "data"), num_classes=2, cache_dir=str(cache_dir))
    assert train.array.shape == (6, 64, 64, 3) and val.labels.tolist() == [0, 1]
    [cache] = cache_dir.glob("tinyimagenet-*.npz")
    said = [r.getMessage() for r in caplog.records]  # what building the cache does, as it goes
    assert said[0] == f"tinyimagenet: decoding the 8 JPEGs under {base} into memory, then kept in {cache} for later runs"
    assert "tinyimagenet: train images decoded: 3 of 6" in said and said[-2].startswith(f"tinyimagenet: writing 0.00 GiB to {cache}")
    assert said[-1].startswith("tinyimagenet: ready in ")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        sources.tinyimagenet(str(tmp_path / "data"), num_classes=2, cache_dir=str(cache_dir))
    assert [r.getMessage() for r in caplog.records] == [f"tinyimagenet: decoded images read from the cache {cache}"]
    assert not list(base.rglob("*.npz"))  # the dataset folder may be a read-only shared copy: nothing written there
    again, _ = sources.tinyimagenet(str(tmp_path / "data"), num_classes=2, cache_dir=str(cache_dir))
    assert np.array_equal(again.array, train.array)

    built = cache.stat().st_mtime_ns
    write_image(base / "train" / "n01443537" / "images" / "n01443537_3.JPEG", 64, 200)  # the folder changed: rebuilt
    grown, _ = sources.tinyimagenet(str(tmp_path / "data"), num_classes=2, cache_dir=str(cache_dir))
    assert len(grown) == 7 and grown.array[3].mean() == pytest.approx(200, abs=2)
    assert cache.stat().st_mtime_ns != built and list(cache_dir.glob("tinyimagenet-*.npz")) == [cache]


def test_tinyimagenet_cached_labels_are_checked_too(tmp_path):
    write_tinyimagenet(tmp_path)
    sources.tinyimagenet(str(tmp_path), num_classes=2, cache_dir=str(tmp_path / "cache"))
    [cache] = (tmp_path / "cache").glob("*.npz")
    with np.load(cache) as f:
        arrays = dict(f)
    arrays["y_train"][0] = 7  # a cache written by another version, or edited: same key, bad label
    np.savez(cache, **arrays)
    with pytest.raises(DatasetError, match=r"labels must lie in \[0, 2\)"):
        sources.tinyimagenet(str(tmp_path), num_classes=2, cache_dir=str(tmp_path / "cache"))


def test_tinyimagenet_cache_dir_that_cannot_be_written_is_a_warning(tmp_path):
    write_tinyimagenet(tmp_path)
    (tmp_path / "not_a_dir").write_text("")
    with pytest.warns(UserWarning, match="could not write the decoded cache.*set paths.cache_dir"):
        train, _ = sources.tinyimagenet(str(tmp_path), num_classes=2, cache_dir=str(tmp_path / "not_a_dir"))
    assert len(train) == 6


def test_tinyimagenet_with_extra_class_folders_says_how_many_and_which_knob(tmp_path):
    write_tinyimagenet(tmp_path)
    train = tmp_path / "tiny-imagenet-200" / "train"
    write_image(train / "n99999999" / "images" / "x.JPEG", 64)  # a third class
    (train / ".ipynb_checkpoints").mkdir()  # hidden: not a class
    with pytest.raises(DatasetError, match=r"found 3 class folders under .*dataset.num_classes=2: set dataset.num_classes=3"):
        sources.tinyimagenet(str(tmp_path), num_classes=2)
    assert len(sources.tinyimagenet(str(tmp_path), num_classes=3)[0]) == 7


def test_image_folder(tmp_path):
    write_image_folder(tmp_path)
    train, val = sources.image_folder(str(tmp_path))
    assert len(train) == 6 and len(val) == 2 and sorted(set(train.labels.tolist())) == [0, 1]
    assert train.image(0).shape == (3, 24, 24)


def test_image_folder_skips_hidden_folders_and_files(tmp_path):
    write_image_folder(tmp_path)
    write_image(tmp_path / "train" / ".ipynb_checkpoints" / "0.png", 24)  # Jupyter's folder: not a class
    write_image(tmp_path / "train" / "cat" / ".thumbs" / "0.png", 24)  # hidden folder inside a class
    write_image(tmp_path / "train" / "dog" / "._0.png", 24)  # macOS resource fork
    train, val = sources.image_folder(str(tmp_path))
    assert len(train) == 6 and sorted(set(train.labels.tolist())) == [0, 1]
    assert not any("/." in p for p in train.paths)


@pytest.mark.parametrize("verify", [True, False])
def test_image_folder_warns_when_images_are_much_smaller_than_image_size(tmp_path, verify):
    write_image_folder(tmp_path)  # 24-px images
    with pytest.warns(
        sources.DatasetWarning, match=r"about 24 px .*dataset.image_size=224.*upscaled 9x.*dataset.image_size=24.*dataset.small_images=true"
    ):
        sources.image_folder(str(tmp_path), verify=verify, image_size=224)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # near the image size: no warning
        sources.image_folder(str(tmp_path), verify=verify, image_size=32)


def test_npz_and_grayscale(tmp_path):
    path = tmp_path / "g.npz"
    x = np.zeros((5, 8, 8), dtype=np.uint8)
    np.savez(path, x_train=x, y_train=np.arange(5), x_test=x[:2], y_test=np.arange(2))
    train, test = sources.npz(str(path))
    assert train.array.shape == (5, 8, 8, 3) and len(test) == 2


def test_digits_is_embedded():
    train, test = sources.digits(size=16)
    assert train.array.shape[1:] == (16, 16, 3) and len(train) + len(test) == 1797


@pytest.mark.parametrize(
    "reader,match",
    [
        (lambda root: sources.cifar(root, "cifar10"), r"cifar10 not found at .*cifar-10-batches-py.*dataset.download=true"),
        (lambda root: sources.stl10(root), r"stl10 not found at .*stl10_binary.*dataset.download=true"),
        (lambda root: sources.tinyimagenet(root), r"tinyimagenet not found at .*tiny-imagenet-200.*Expected layout"),
        (lambda root: sources.image_folder(root), r"imagefolder not found at .*train.*Expected layout"),
        (lambda root: sources.npz(root + "/missing.npz"), r"npz file not found: .*missing.npz"),
    ],
)
def test_missing_files_name_the_path_and_layout(tmp_path, reader, match):
    with pytest.raises(DatasetError, match=match):
        reader(str(tmp_path))


def test_npz_without_expected_arrays(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, images=np.zeros((2, 4, 4, 3), dtype=np.uint8))
    with pytest.raises(DatasetError, match=r"missing arrays \['x_train', 'y_train', 'x_test', 'y_test'\]"):
        sources.npz(str(path))


def test_datamodule_yields_two_views_index_and_label(npz_file):
    dataset = {"name": "npz", "image_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3, "num_classes": None}
    dataset["source"] = {"_target_": "mcl.data.sources.npz", "path": str(npz_file)}
    dm = ContrastiveDataModule(dataset, batch_size=16, num_workers=0, key_view="weak")
    dm.setup("fit")
    assert dm.num_classes == 4
    q, k, index, label = next(iter(dm.train_dataloader()))
    assert q.shape == k.shape == (16, 3, 32, 32) and q.dtype == torch.float32
    assert not torch.equal(q, k) and index.shape == label.shape == (16,)
    train_eval, val = dm.val_dataloader()
    x, y = next(iter(val))
    assert x.shape[1:] == (3, 32, 32) and len(train_eval.dataset) == 256
    with pytest.raises(DatasetError, match="larger than the 256 training images"):
        big = ContrastiveDataModule(dataset, batch_size=512, num_workers=0)
        big.setup("fit")
