"""PackedBatches: a slow reference of the packing rule, rank splits, resume, targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gdn.data import Batch, PackedBatches, TokenDataset
from gdn.models.loss import IGNORE_INDEX, next_token_targets


def reference_rows(docs: list[np.ndarray], *, seq_len: int, seed: int, n_rows: int):
    """The packing rule written plainly: per epoch, permute, concatenate, cut, drop the tail."""
    rows, epoch = [], 0
    while len(rows) < n_rows:
        order = np.random.default_rng([seed, epoch]).permutation(len(docs))
        stream = np.concatenate([docs[i] for i in order])
        rows += [stream[r * seq_len:(r + 1) * seq_len] for r in range(len(stream) // seq_len)]
        epoch += 1
    return rows[:n_rows]


def take(batches: PackedBatches, n: int) -> list:
    return [next(batches) for _ in range(n)]


def test_rows_follow_the_reference_across_epochs(unique_dataset):
    path, docs = unique_dataset
    data = TokenDataset(path)
    seq_len, rows = 37, 3  # awkward sizes; ~120 rows per epoch, so 100 steps cross 2 epochs
    batches = PackedBatches(data, seq_len=seq_len, rows=rows, seed=5)
    got = take(batches, 100)
    want = reference_rows(docs, seq_len=seq_len, seed=5, n_rows=300)
    assert batches.epoch >= 2
    for step, batch in enumerate(got):
        assert batch.input_ids.shape == (1, rows * seq_len)
        assert batch.input_ids.dtype == torch.int64
        assert batch.labels is batch.input_ids
        expect = np.concatenate(want[step * rows:(step + 1) * rows])
        np.testing.assert_array_equal(batch.input_ids[0].numpy(), expect)


def test_every_token_of_an_epoch_appears_once(unique_dataset):
    path, docs = unique_dataset
    data = TokenDataset(path)
    batches = PackedBatches(data, seq_len=64, rows=1, seed=0)
    epoch = np.concatenate([next(batches).input_ids[0].numpy()
                            for _ in range(batches.rows_per_epoch)])
    assert batches.epoch == 1
    eos = data.eos_id
    words = epoch[epoch != eos]
    assert len(np.unique(words)) == len(words)  # no token twice
    all_words = np.concatenate(docs)
    all_words = all_words[all_words != eos]
    missing = np.setdiff1d(all_words, words)
    assert data.n_tokens - len(epoch) < 64  # only the partial last row is dropped
    assert len(missing) <= data.n_tokens - len(epoch)


def test_cu_seqlens_mark_document_and_row_boundaries(unique_dataset):
    path, _ = unique_dataset
    data = TokenDataset(path)
    seq_len, rows = 50, 4
    for batch in take(PackedBatches(data, seq_len=seq_len, rows=rows, seed=1), 30):
        ids = batch.input_ids[0].numpy()
        cu = batch.cu_seqlens.numpy()
        assert batch.cu_seqlens.dtype == torch.int32
        assert cu[0] == 0 and cu[-1] == rows * seq_len and np.all(np.diff(cu) > 0)
        # A boundary sits after every eos (document end) and at every row end, nowhere else.
        want = set(np.flatnonzero(ids == data.eos_id) + 1) | {seq_len * (r + 1)
                                                              for r in range(rows)}
        assert set(cu[1:].tolist()) == want
        # Inside a segment the ids are consecutive: one document, in order.
        for a, b in zip(cu[:-1], cu[1:], strict=True):
            words = ids[a:b][ids[a:b] != data.eos_id]
            assert np.all(np.diff(words) == 1)


def test_n_targets_equals_the_models_target_count(unique_dataset):
    path, _ = unique_dataset
    for batch in take(PackedBatches(TokenDataset(path), seq_len=40, rows=3, seed=2), 20):
        targets = next_token_targets(batch.labels, batch.cu_seqlens)
        assert batch.n_targets == int((targets != IGNORE_INDEX).sum())


def test_seed_decides_the_order(unique_dataset):
    path, _ = unique_dataset
    data = TokenDataset(path)

    def first(seed: int) -> torch.Tensor:
        return torch.cat([b.input_ids for b in take(PackedBatches(data, seq_len=32, rows=2,
                                                                  seed=seed), 5)])

    assert torch.equal(first(7), first(7))
    assert not torch.equal(first(7), first(8))


def test_ranks_split_the_single_rank_batch(unique_dataset):
    path, _ = unique_dataset
    data = TokenDataset(path)
    single = take(PackedBatches(data, seq_len=45, rows=4, seed=3), 40)  # crosses an epoch
    ranks = [take(PackedBatches(data, seq_len=45, rows=2, seed=3, rank=r, world_size=2), 40)
             for r in range(2)]
    for step, whole in enumerate(single):
        parts = [ranks[r][step] for r in range(2)]
        assert torch.equal(torch.cat([p.input_ids for p in parts], dim=1), whole.input_ids)
        joined = torch.cat([parts[0].cu_seqlens, parts[1].cu_seqlens[1:] + 2 * 45])
        assert torch.equal(joined, whole.cu_seqlens)
        assert sum(p.n_targets for p in parts) == whole.n_targets


def test_state_dict_resumes_exactly(unique_dataset):
    path, _ = unique_dataset
    data = TokenDataset(path)
    seq_len, rows = 33, 5
    for skip in (3, 26):  # inside epoch 0, and a step that straddles into epoch 1
        straight = PackedBatches(data, seq_len=seq_len, rows=rows, seed=4)
        take(straight, skip)
        state = straight.state_dict()
        assert {"epoch", "next_row"} <= set(state)
        expect = take(straight, 6)
        resumed = PackedBatches(data, seq_len=seq_len, rows=rows, seed=4)
        resumed.load_state_dict(dict(state))
        for a, b in zip(expect, take(resumed, 6), strict=True):
            assert torch.equal(a.input_ids, b.input_ids)
            assert torch.equal(a.cu_seqlens, b.cu_seqlens)


def test_state_from_another_setup_is_refused(unique_dataset):
    path, _ = unique_dataset
    data = TokenDataset(path)
    state = PackedBatches(data, seq_len=32, rows=2, seed=0).state_dict()
    with pytest.raises(ValueError, match="seq_len"):
        PackedBatches(data, seq_len=64, rows=2, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        PackedBatches(data, seq_len=32, rows=2, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="missing"):
        PackedBatches(data, seq_len=32, rows=2, seed=0).load_state_dict({"epoch": 0})


def test_dataset_shorter_than_a_row_is_an_error(tmp_path, make_unique_dataset):
    make_unique_dataset(tmp_path / "d", [3, 4])  # 9 tokens
    with pytest.raises(ValueError, match="fewer than one row"):
        PackedBatches(TokenDataset(tmp_path / "d"), seq_len=10, rows=1, seed=0)
    batch = next(PackedBatches(TokenDataset(tmp_path / "d"), seq_len=9, rows=2, seed=0))
    assert batch.input_ids.shape == (1, 18)  # one row per epoch: the batch spans two epochs


def test_batch_to_keeps_labels_shared(unique_dataset):
    path, _ = unique_dataset
    batch = next(PackedBatches(TokenDataset(path), seq_len=16, rows=2, seed=0))
    moved = batch.to("cpu")
    assert moved.labels is moved.input_ids and moved.n_targets == batch.n_targets
    assert torch.equal(moved.cu_seqlens, batch.cu_seqlens)
    plain = Batch(input_ids=torch.zeros(2, 5, dtype=torch.long), labels=torch.ones(2, 5,
                  dtype=torch.long), cu_seqlens=None, n_targets=8).to("cpu")
    assert plain.cu_seqlens is None and plain.labels.sum() == 10


def test_a_batch_feeds_the_model(tmp_path):
    from gdn.data import builtin_dataset
    from gdn.models import CausalLM, ModelConfig

    data = TokenDataset(builtin_dataset(tmp_path / "builtin"))
    batch = next(PackedBatches(data, seq_len=64, rows=2, seed=0))
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.from_preset("gdn-tiny"))
    loss = model(batch.input_ids, labels=batch.labels, cu_seqlens=batch.cu_seqlens).loss
    assert torch.isfinite(loss) and 4.0 < loss.item() < 7.0  # ≈ ln(260) = 5.56 at init
