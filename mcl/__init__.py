"""mcl: contrastive self-supervised learning that mines its own samples."""

__version__ = "0.1.0"
