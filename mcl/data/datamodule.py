"""LightningDataModule: two augmented views per image, plus its dataset index and label."""

from __future__ import annotations

from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from mcl.data import batched, transforms
from mcl.data.sources import DatasetError, Images
from mcl.reliability import DataOrder, SeededItems, per_rank

AUTO_ON_DEVICE_BYTES = 4 * 2**30  # data.images_on_device=auto keeps training sets up to 4 GiB on the GPU (STL-10's 2.9 GB)


class TwoViews(Dataset):
    """Item i -> (query view, key view, [extra view,] i, label). Labels never reach the training loss.

    extra_view: a third view (CMSF's), drawn after the other two; None: two views.
    """

    def __init__(self, images: Images, query_view, key_view, extra_view=None):
        self.images, self.query_view, self.key_view, self.extra_view = images, query_view, key_view, extra_view

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        image = self.images.image(i)  # 3 x H x W uint8
        extra = () if self.extra_view is None else (self.extra_view(image),)
        return self.query_view(image), self.key_view(image), *extra, i, int(self.images.labels[i])


class OneView(Dataset):
    """Item i -> (un-augmented image, label), for the kNN and linear monitors.

    whole_batches (for a deterministic view only: a random one would draw once for the batch): a
    loader with collate_fn=batched.whole_batch takes whole batches (`__getitems__`); from an
    in-memory dataset the view runs once on the uint8 batch (torchvision's ops on B x 3 x H x W,
    the same values as image by image), not once per image in Python.
    """

    def __init__(self, images: Images, view, whole_batches: bool = False):
        self.images, self.view, self.whole_batches = images, view, whole_batches

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.view(self.images.image(i)), int(self.images.labels[i])

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor] | list[tuple[torch.Tensor, int]]:
        if not self.whole_batches:
            return [self[i] for i in indices]  # items, for the loader's collate_fn
        labels = torch.from_numpy(self.images.labels[indices])
        if self.images.array is None:
            return torch.stack([self.view(self.images.image(i)) for i in indices]), labels
        return self.view(torch.from_numpy(self.images.array[indices]).permute(0, 3, 1, 2)), labels


class ContrastiveDataModule(L.LightningDataModule):
    """dataset: the `dataset/` config group (its `source` is a reader from mcl.data.sources).

    batch_size is per device; key_view: "strong" (symmetric MoCo v2) or "weak" (crop + flip);
    extra_view: None, "strong" or "weak": a third view of each image (CMSF), after the other two.
    batched_augment: in-memory datasets only; the loader yields uint8 batches and
    `on_after_batch_transfer` makes both views on the training device (mcl.data.batched).
    images_on_device: with batched_augment, keep the whole uint8 training set on that device.
    Both may be "auto": `setup` decides (`resolve_speed`): on when training on CUDA GPUs and the
    dataset is in memory, images_on_device when the set also takes at most AUTO_ON_DEVICE_BYTES.
    Validation yields two loaders: the un-augmented train split (kNN memory) and the test split.
    seed: the training order and augmentations are a function of it and the epoch (None: drawn
    once, then checkpointed); `state_dict` holds it and the position, for exact mid-epoch resume.
    """

    def __init__(
        self,
        dataset: dict[str, Any],
        batch_size: int = 256,
        eval_batch_size: int = 512,
        num_workers: int = 4,
        key_view: str = "strong",
        extra_view: str | None = None,
        augment: dict[str, Any] | None = None,
        pin_memory: bool = True,
        batched_augment: bool | str = "auto",
        images_on_device: bool | str = "auto",
        seed: int | None = None,
    ):
        super().__init__()
        if key_view not in ("strong", "weak"):
            raise ValueError(f"data.key_view must be 'strong' or 'weak', got {key_view!r}")
        if extra_view not in (None, "strong", "weak"):
            raise ValueError(f"data.extra_view must be null, 'strong' or 'weak', got {extra_view!r}")
        self.extra_view_name = extra_view
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be a positive integer, got {batch_size}")
        for name, value in (("batched_augment", batched_augment), ("images_on_device", images_on_device)):
            if value not in (True, False, "auto"):
                raise ValueError(f"data.{name} must be true, false or auto, got {value!r}")
        if images_on_device is True and batched_augment is False:
            raise ValueError("data.images_on_device=true only applies to the batched path: also set data.batched_augment=true")
        self.batched_augment, self.images_on_device = batched_augment, images_on_device
        self.device_images: torch.Tensor | None = None  # N x H x W x 3 uint8 on the training device
        self.dataset_cfg = dataset
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.key_view_name, self.augment = key_view, dict(augment or {})
        self.train_images: Images | None = None
        self.test_images: Images | None = None
        self.order = DataOrder(seed)
        self.generator: torch.Generator | None = None  # batched views' random stream
        self._generator_states: list[torch.Tensor] | None = None  # one per rank, from a checkpoint; set when the loader is built

    @property
    def num_classes(self) -> int:
        configured = self.dataset_cfg.get("num_classes")
        return int(configured) if configured else int(self.train_images.labels.max()) + 1

    def setup(self, stage: str | None = None) -> None:
        if self.train_images is None:
            self.train_images, self.test_images = hydra.utils.instantiate(self.dataset_cfg["source"])
        world = self.trainer.world_size if self.trainer is not None else 1
        if len(self.train_images) < self.batch_size * world:
            raise DatasetError(
                f"data.batch_size={self.batch_size} x {world} device(s) is larger than the "
                f"{len(self.train_images)} training images of dataset {self.dataset_cfg['name']}"
            )
        if self.batched_augment is True and self.train_images.array is None:
            raise DatasetError(
                f"data.batched_augment=true needs an in-memory dataset (one uint8 array); dataset "
                f"{self.dataset_cfg['name']} reads its images from files one by one: set data.batched_augment=false (or auto)"
            )
        self.resolve_speed()

    def resolve_speed(self) -> None:
        """data.batched_augment / images_on_device "auto" -> true or false for this trainer and dataset."""
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        on_cuda, array = device.type == "cuda", self.train_images.array
        if self.batched_augment == "auto":
            self.batched_augment = on_cuda and array is not None
        if self.images_on_device == "auto":
            self.images_on_device = self.batched_augment and on_cuda and array.nbytes <= AUTO_ON_DEVICE_BYTES
        if self.images_on_device and not self.batched_augment:
            raise ValueError(
                "data.images_on_device=true only applies to the batched path, and data.batched_augment=auto chose the "
                f"per-image path ({'the dataset is read from files' if on_cuda else 'not training on a CUDA GPU'}): "
                "set data.batched_augment=true, or data.images_on_device=auto"
            )

    def _views(self, recipes=transforms):
        """(query view, key view, monitors' view, extra view or None); recipes: mcl.data.transforms or mcl.data.batched."""
        size, mean, std = self.dataset_cfg["image_size"], self.dataset_cfg["mean"], self.dataset_cfg["std"]
        blur = {k: self.dataset_cfg[k] for k in ("blur_prob", "blur_sigma") if k in self.dataset_cfg}
        aug = {**blur, **self.augment}
        weak_flip = aug.pop("weak_flip_prob", aug.get("flip_prob", 0.5))  # configs from before the knob: the strong flip
        strong = recipes.strong_view(size, mean, std, **aug)
        weak = lambda: recipes.weak_view(size, mean, std, aug.get("crop_scale", (0.2, 1.0)), weak_flip)  # noqa: E731
        recipe = {"strong": lambda: strong, "weak": weak, None: lambda: None}
        return strong, recipe[self.key_view_name](), transforms.plain_view(size, mean, std), recipe[self.extra_view_name]()

    def state_dict(self) -> dict[str, Any]:
        state = self.order.state_dict(self.trainer, self.batch_size)
        if self.generator is None:
            return state
        return {**state, "generators": per_rank(self.generator.get_state(), self.trainer)}  # one stream per rank

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.order.load_state_dict(state_dict)
        old = state_dict.get("generator")  # checkpoints that kept rank 0's stream only
        self._generator_states = state_dict.get("generators", None if old is None else [old])

    def _loader(self, dataset: Dataset, batch_size: int, train: bool, collate_fn=None, workers: int | None = None) -> DataLoader:
        workers = self.num_workers if workers is None else workers
        sampler = self.order.sampler(dataset, batch_size, self.trainer, with_seeds=not self.batched_augment) if train else None
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,  # training: a resumable order fixed by (seed, epoch), one shard per rank
            generator=torch.Generator().manual_seed(self.order.seed) if train else None,  # leaves the global random state alone
            drop_last=train,  # the bank takes a fixed number of keys per step
            num_workers=workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=workers > 0,
            collate_fn=collate_fn,
        )

    def train_dataloader(self) -> DataLoader:
        if not self.batched_augment:
            strong, key, _, extra = self._views()
            return self._loader(SeededItems(TwoViews(self.train_images, strong, key, extra)), self.batch_size, train=True)
        self.batched_query, self.batched_key, _, self.batched_extra = self._views(batched)
        images = None if self.images_on_device else torch.from_numpy(self.train_images.array)
        dataset = batched.ImageBatches(images, torch.from_numpy(self.train_images.labels))
        # fixes order.seed; images on the device: the loader yields indices only, in this process (no worker round trip)
        loader = self._loader(dataset, self.batch_size, train=True, collate_fn=batched.whole_batch, workers=0 if images is None else None)
        rank = self.trainer.global_rank if self.trainer is not None else 0
        self.generator = torch.Generator().manual_seed(self.order.view_seed(rank))  # the views follow data.seed, one stream per rank
        states, self._generator_states = self._generator_states, None
        world = self.trainer.world_size if self.trainer is not None else 1
        if states is not None and len(states) == world:  # resumed: each rank continues its stream where the checkpoint left it
            self.generator.set_state(states[rank])
        elif states is not None:
            rank_zero_warn(f"the checkpoint holds the augmentation streams of {len(states)} rank(s), this run has {world}: restarted")
        return loader

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Batched path: (uint8 images or nothing, index, label) on the device -> (view_q, view_k, [view_e,] index, label)."""
        if not (self.batched_augment and self.trainer.training):
            return batch
        *images, index, labels = batch
        if self.images_on_device:
            if self.device_images is None or self.device_images.device != index.device:
                self.device_images = torch.from_numpy(self.train_images.array).to(index.device)  # N x H x W x 3, once
            images = [self.device_images[index]]
        x = images[0].permute(0, 3, 1, 2)  # B x 3 x H x W uint8
        extra = () if self.batched_extra is None else (self.batched_extra(x, self.generator),)  # drawn after the other two
        return self.batched_query(x, self.generator), self.batched_key(x, self.generator), *extra, index, labels

    def val_dataloader(self) -> list[DataLoader]:
        plain = self._views()[2]
        splits = (self.train_images, self.test_images)
        views = [OneView(s, plain, whole_batches=True) for s in splits]
        return [self._loader(v, self.eval_batch_size, train=False, collate_fn=batched.whole_batch) for v in views]
