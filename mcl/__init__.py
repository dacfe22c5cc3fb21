"""mcl: contrastive self-supervised learning that mines its own samples."""

from mcl import runtime

__version__ = "0.1.0"
runtime.register()  # the config's resolvers, before Hydra composes anything
