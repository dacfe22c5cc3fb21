"""Data: readers, augmentations and the LightningDataModule."""

from mcl.data.datamodule import ContrastiveDataModule

__all__ = ["ContrastiveDataModule"]
