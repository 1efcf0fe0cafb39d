"""Cross-device negatives on 2 CPU processes (gloo): the loss and the gradients every rank ends
with after DDP's averaging equal one process's over the global batch, with hard negatives, the
false-negative mask, teacher scores and GradCache; without the flag each rank's loss is its own
share's InfoNCE. The ranks run the real path: `Replica` (accelerate's DDP) and the task's loss."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from qtune.records import QueryGroup

from support import free_port

WORDS = ["cat", "dog", "horse", "cow", "sheep", "goat", "mouse", "tiger", "car", "bus", "train", "truck", "bike",
         "plane", "boat", "tram"]
GLOBAL = 7  # groups in the global batch: rank 0 takes 4, rank 1 takes 3

CASES = {
    "plain": dict(),
    "mask": dict(false_negative_offset=0.0),
    "symmetric": dict(symmetric=True),
    "improved": dict(improved_contrastive=True),
    "distill": dict(distill_weight=0.5, distill_temperature=0.5),
    "cached": dict(mini_batch_size=3),
    "cached+mask": dict(mini_batch_size=2, false_negative_offset=0.0),
}


def groups() -> list[QueryGroup]:
    out = []
    for i in range(GLOBAL):
        a, b = WORDS[i], WORDS[(i + 5) % len(WORDS)]
        negatives = tuple(f"{WORDS[(i + k) % len(WORDS)]} is here" for k in range(2, 2 + i % 3))  # 0-2 each
        out.append(QueryGroup(f"the {a} {b}", (f"a {a} and a {b} now",), negatives,
                              pos_scores=(0.9,), neg_scores=tuple(0.5 - 0.1 * k for k in range(len(negatives)))))
    return out


def _setup(model_dir: str):
    from qtune.tasks import load_model
    from qtune.tasks.embedding.encode import collate, group_features
    from qtune.tasks.embedding.loss import collate_for_loss, with_teacher_scores
    from qtune.tasks.embedding.model import Embedder

    loaded = load_model(model_dir, task="embedding", device="cpu", trainable=True, lora=None)
    gs = groups()
    features = group_features(gs, Embedder(loaded).features, hard_negatives=2)
    features = with_teacher_scores(features, [(g.pos_scores, g.neg_scores) for g in gs])
    return loaded, features, lambda rows: collate_for_loss(lambda f: collate(loaded.tokenizer, f), rows)


def _step(replica, loaded, batch, name: str, cross_device: bool):
    """One case's loss and the gradients after DDP's averaging (what the optimizer steps on)."""
    from qtune.tasks.embedding import loss as contrastive

    settings = contrastive.ContrastiveSettings(pooling=loaded.meta.settings.pooling, cross_device=cross_device,
                                               **CASES[name])
    if "mini_batch_size" in CASES[name]:
        value = contrastive.cached_backward(replica, batch, settings, 1.0, True)
    else:
        value = replica.run(lambda model, b: contrastive.loss(model, b, settings), batch)
        replica.backward(value)
    grads = {n: p.grad.clone() for n, p in loaded.model.named_parameters() if p.grad is not None}
    for p in loaded.model.parameters():
        p.grad = None
    return float(value.detach()), grads


def _rank(rank: int, port: int, model_dir: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from qtune.distributed import shard_bounds
    from qtune.training.replica import Replica

    loaded, features, collate = _setup(model_dir)
    replica = Replica(loaded.model, torch.optim.SGD(loaded.model.parameters(), lr=0.0))
    start, end = shard_bounds(GLOBAL, 2, rank)
    batch = collate(features[start:end])
    results = {}
    for name in CASES:
        results[name] = _step(replica, loaded, batch, name, cross_device=True)
    results["local"] = _step(replica, loaded, batch, "plain", cross_device=False)[0]
    torch.save(results, Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(still_bert_dir, tmp_path_factory):
    """Both ranks' (loss, averaged gradients) per case, from one 2-process launch."""
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("ranks")
    mp.start_processes(_rank, args=(free_port(), still_bert_dir, str(out)), nprocs=2, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.fixture(scope="module")
def one_process(still_bert_dir):
    """The same cases in one process over the whole global batch."""
    from qtune.training.replica import Replica

    torch.set_num_threads(1)
    loaded, features, collate = _setup(still_bert_dir)
    replica = Replica(loaded.model, torch.optim.SGD(loaded.model.parameters(), lr=0.0))
    batch = collate(features)
    results = {name: _step(replica, loaded, batch, name, cross_device=False) for name in CASES}
    results["shares"] = [_step(replica, loaded, collate(part), "plain", False)[0]
                         for part in (features[:4], features[4:])]
    return results


@pytest.mark.parametrize("name", list(CASES))
def test_cross_device_loss_and_gradients_equal_one_process_over_the_global_batch(ranks, one_process, name):
    loss, grads = one_process[name]
    assert max(g.abs().max().item() for g in grads.values()) > 1e-4  # the comparison can fail
    for rank in ranks:
        rank_loss, rank_grads = rank[name]
        assert rank_loss == pytest.approx(loss, abs=1e-5)
        assert rank_grads.keys() == grads.keys()
        for key, grad in grads.items():
            torch.testing.assert_close(rank_grads[key], grad, atol=1e-5, rtol=1e-4, msg=f"{name}: {key}")


def test_without_cross_device_negatives_each_rank_has_its_own_shares_infonce(ranks, one_process):
    local = [rank["local"] for rank in ranks]
    assert local == pytest.approx(one_process["shares"], abs=1e-5)
    assert abs(local[0] - one_process["plain"][0]) > 1e-3  # a share's loss is not the global batch's
