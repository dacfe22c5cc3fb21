"""Independent random streams: the data order, the item seeds and the batched views' streams of every
(seed, epoch, rank) differ, and checkpoints written before the mix resume with the streams they trained with."""

from __future__ import annotations

import itertools

import torch

from mcl.reliability import STREAM_SCHEME, DataOrder, ResumableSampler, stream_seed

SEEDS, EPOCHS, RANKS = (1339, 1340, 1341), (0, 1, 2), (0, 1)
DATA = list(range(64))


def epoch_items(seed: int, epoch: int, rank: int, legacy: bool = False) -> list[tuple[int, int]]:
    """(index, item seed) pairs rank `rank` of 2 trains on in `epoch` of run seed `seed`."""
    sampler = ResumableSampler(DATA, 2, rank, seed=seed, legacy_seeds=legacy)
    sampler.set_epoch(epoch)
    return list(sampler)


def test_no_two_seed_epoch_rank_triples_share_an_order_or_item_seeds():
    triples = list(itertools.product(SEEDS, EPOCHS, RANKS))
    items = {t: epoch_items(*t) for t in triples}
    orders = {t: tuple(i for i, _ in v) for t, v in items.items()}
    item_seeds = {t: {s for _, s in v} for t, v in items.items()}
    assert len(set(orders.values())) == len(triples)  # 18 different orders
    for a, b in itertools.combinations(triples, 2):
        assert not item_seeds[a] & item_seeds[b], (a, b)  # not one augmentation seed in common
    # the scheme before the mix: seed 1339's epoch 1 was seed 1340's epoch 0, order and item seeds alike
    assert epoch_items(1339, 1, 0, legacy=True) == epoch_items(1340, 0, 0, legacy=True)


def test_batched_view_streams_differ_for_every_seed_and_rank_and_from_the_order_streams():
    view_seeds = {(s, r): stream_seed(s, "views", r) for s in SEEDS for r in RANKS}
    order_seeds = {(s, e): stream_seed(s, "order", e) for s in SEEDS for e in EPOCHS}
    assert len(set(view_seeds.values()) | set(order_seeds.values())) == len(view_seeds) + len(order_seeds)
    draws = {k: tuple(torch.rand(8, generator=torch.Generator().manual_seed(v)).tolist()) for k, v in view_seeds.items()}
    assert len(set(draws.values())) == len(draws)
    order = DataOrder(1340)
    assert order.view_seed(0) == view_seeds[(1340, 0)] != stream_seed(1339, "views", 1)  # seed + rank made these equal
    assert stream_seed(1340, "views", 0, legacy=True) == stream_seed(1339, "views", 1, legacy=True) == 1340


def test_a_checkpoint_of_the_old_scheme_resumes_with_its_own_streams():
    state = {"seed": 1339, "epoch": 1, "batches_done": 2, "world_size": 1, "batch_size": 4}  # no "streams": an older mcl
    old = DataOrder()
    old.load_state_dict(state)
    assert old.legacy_seeds and old.view_seed(1) == 1340
    rest = old.sampler(DATA, 4, None)  # epoch 1 after 2 batches of 4
    old_order = torch.randperm(len(DATA), generator=torch.Generator().manual_seed(1339 + 1)).tolist()  # the old rule: seed + epoch
    assert [i for i, _ in rest] == old_order[8:]
    new = DataOrder()
    new.load_state_dict({**state, "streams": STREAM_SCHEME})
    assert not new.legacy_seeds and new.view_seed(1) == stream_seed(1339, "views", 1)
    assert new.state_dict(None, 4)["streams"] == STREAM_SCHEME and old.state_dict(None, 4)["streams"] == "legacy"
