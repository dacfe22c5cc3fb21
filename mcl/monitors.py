"""Online monitors: weighted kNN on backbone features (InstDisc / MoCo protocol); under DDP each image counted once."""

from __future__ import annotations

import torch
from torch.nn import functional as F
from torch.utils.data import DistributedSampler

from mcl.mining.diagnostics import MiningMeter


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


class Monitors:
    """What `MCLModule` logs besides its loss (mixed into it): the `mining/*` diagnostics, and the kNN and
    linear-probe monitors (validation loader 0 is the un-augmented train split, the kNN memory; loader 1
    the test split). Reads `self.linear_probe`, `self.num_classes` and `self.cfg_monitor` (knn_k, knn_t)."""

    def init_monitors(self) -> None:
        self.mining_meter = MiningMeter()  # mining/* diagnostics, summed on the device between logging steps
        self._eval_feats: list[list[torch.Tensor]] = [[], []]
        self._eval_labels: list[list[torch.Tensor]] = [[], []]
        self._linear_pred: list[torch.Tensor] = []  # the linear probe's class per test image

    def _log_mining(self, sums: list[torch.Tensor], batch_size: int) -> None:
        """`mining/*` diagnostics (mcl.mining.diagnostics; each direction's sums), averaged over the directions.

        They accumulate on the device (no host read in a step that does not log) and are read at
        Lightning's logging steps (trainer.log_every_n_steps): `mining/<name>_step` is the mean over
        the steps since the last logging step, `mining/<name>_epoch` (on_train_epoch_end) the mean
        over the epoch; a diagnostic undefined in a step (e.g. purity before mining starts) does
        not count there. Each rank logs its own batches, without a collective.
        """
        self.mining_meter.update(*sums)
        if self._trainer is None or self.trainer._logger_connector.should_update_logs:
            for name, value in self.mining_meter.read("interval").items():
                self.log(f"mining/{name}_step", value, on_step=True, on_epoch=False, batch_size=batch_size)

    def on_train_epoch_end(self) -> None:
        for name, value in self.mining_meter.read("epoch").items():
            self.log(f"mining/{name}_epoch", value, on_step=False, on_epoch=True)

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = batch
        feats = self(x)
        self._eval_feats[dataloader_idx].append(feats.float())
        self._eval_labels[dataloader_idx].append(y)
        if dataloader_idx == 1:
            self._linear_pred.append(self.linear_probe(feats).argmax(1))  # B

    def _whole_split(self, tensors: list[torch.Tensor], dataloader_idx: int) -> list[torch.Tensor]:
        """This rank's per-batch tensors -> the split's rows as every rank evaluated them, each image once.

        Under DDP the DistributedSampler pads each split to a multiple of the world size with
        repeated images; they are dropped here (`unpad_distributed`), so no image votes or is
        scored twice.
        """
        tensors = [torch.cat(t) for t in tensors]
        sampler = getattr(self.trainer.val_dataloaders[dataloader_idx], "sampler", None)
        if self.trainer.world_size == 1 or not isinstance(sampler, DistributedSampler):
            return tensors  # every rank evaluated the whole split itself
        return [unpad_distributed(t, sampler) for t in self.all_gather(tensors)]  # W x n x ... -> N' x ...

    def on_validation_epoch_end(self) -> None:
        """Logs val/knn_top1, val/knn_top5 and val/linear_top1 on the test split, with
        val/knn_memory_size (training images that voted) and val/knn_queries (test images scored):
        fewer than the splits hold when trainer.limit_val_batches < 1."""
        feats, labels, linear = self._eval_feats, self._eval_labels, self._linear_pred  # [train split, test split] each
        self._eval_feats, self._eval_labels, self._linear_pred = [[], []], [[], []], []
        if not (feats[0] and feats[1]):  # a split without batches (e.g. limit_val_batches=0)
            return
        memory, memory_labels = self._whole_split([feats[0], labels[0]], 0)  # N x D, N
        query, query_labels, linear = self._whole_split([feats[1], labels[1], linear], 1)  # Q x D, Q, Q
        voters = memory_labels >= 0  # unlabelled images (STL-10) cannot vote
        k, t = self.cfg_monitor["knn_k"], self.cfg_monitor["knn_t"]
        scores = knn_predict(query, memory[voters], memory_labels[voters], self.num_classes, k, t)  # Q x C
        scored = query_labels >= 0
        self.log("val/knn_top1", topk_accuracy(scores[scored], query_labels[scored]), sync_dist=False)
        self.log("val/knn_top5", topk_accuracy(scores[scored], query_labels[scored], 5), sync_dist=False)
        self.log("val/linear_top1", (linear[scored] == query_labels[scored]).float().mean(), sync_dist=False)
        self.log("val/knn_memory_size", float(voters.sum()), sync_dist=False)
        self.log("val/knn_queries", float(scored.sum()), sync_dist=False)
