"""Online monitors: weighted kNN on backbone features (InstDisc / MoCo protocol); under DDP each image counted once."""

from __future__ import annotations

import torch
from torch.nn import functional as F
from torch.utils.data import DistributedSampler


@torch.no_grad()
def knn_predict(
    query: torch.Tensor,
    memory: torch.Tensor,
    memory_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores (Q x C) of a weighted kNN vote: weight exp(cos / t) over the k nearest.

    query: Q x D, memory: N x D (any scale; both are L2-normalised here), memory_labels: N.
    """
    memory = F.normalize(memory.float(), dim=1)
    k = min(k, memory.shape[0])
    scores = []
    for q in F.normalize(query.float(), dim=1).split(chunk):
        sim, idx = (q @ memory.T).topk(k, dim=1)  # q x k
        votes = F.one_hot(memory_labels[idx], num_classes).float()  # q x k x C
        scores.append((votes * (sim / temperature).exp()[..., None]).sum(1))  # q x C
    return torch.cat(scores)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Share of rows whose label is among the k highest scores."""
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return (top == labels[:, None]).any(dim=1).float().mean().item()


def unpad_distributed(gathered: torch.Tensor, sampler: DistributedSampler) -> torch.Tensor:
    """Rows every rank evaluated (W x n x ..., from all_gather) -> each image once, in dataset order (N' x ...).

    An unshuffled DistributedSampler gives rank r the positions r, r + W, r + 2W, ... of the
    dataset, padded at the end with its first images until every rank has as many; so reading
    the gathered rows position-major restores dataset order, and every row past the dataset's
    length is a padding duplicate. With trainer.limit_val_batches < 1 the ranks evaluated a
    prefix of that order, and N' is that prefix's length.
    """
    if sampler.shuffle:
        raise ValueError("unpad_distributed needs the unshuffled DistributedSampler Lightning gives evaluation loaders")
    world = gathered.shape[0]
    if world != sampler.num_replicas:
        raise ValueError(f"gathered rows of {world} rank(s), the sampler shards over {sampler.num_replicas}")
    return gathered.transpose(0, 1).flatten(0, 1)[: len(sampler.dataset)]  # (n*W) x ... -> N' x ...
