"""The chunked cross-entropy equals plain cross-entropy and never holds all the logits."""

import pytest
import torch
import torch.nn.functional as F

from gdn.models import CausalLM, ModelConfig
from gdn.models.loss import IGNORE_INDEX, chunked_cross_entropy, next_token_targets
from gdn.testing import rel_error


def inputs(dtype, *, N=37, D=20, V=53, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    weight = torch.randn(V, D, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[::5] = IGNORE_INDEX
    return hidden, weight, targets


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("chunk_tokens", [1, 7, 37, 100])
def test_chunked_loss_equals_full_cross_entropy(dtype, tol, chunk_tokens):
    hidden, weight, targets = inputs(dtype)
    got = chunked_cross_entropy(hidden, weight, targets, chunk_tokens=chunk_tokens)
    got_grads = torch.autograd.grad(got, (hidden, weight))
    want = F.cross_entropy(hidden @ weight.T, targets, ignore_index=IGNORE_INDEX)
    want_grads = torch.autograd.grad(want, (hidden, weight))
    assert rel_error(got, want) <= tol
    for g, w in zip(got_grads, want_grads, strict=True):
        assert rel_error(g, w) <= tol


def test_forward_saves_no_logits():
    """Autograd keeps the chunks' inputs (hidden rows, the head, targets), no logits."""
    N, D, V = 64, 20, 101
    hidden, weight, targets = inputs(torch.float32, N=N, D=D, V=V)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = chunked_cross_entropy(hidden, weight, targets, chunk_tokens=8)
    assert saved and all(shape == (V, D) or V not in shape for shape in saved), saved
    loss.backward()
    assert torch.isfinite(hidden.grad).all()
    # Without chunking (or recomputation) autograd would have kept [N, V] logits.
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(hidden @ weight.T, targets)
    assert (N, V) in saved


def test_no_targets_gives_zero_not_nan():
    hidden, weight, targets = inputs(torch.float32)
    loss = chunked_cross_entropy(hidden, weight, torch.full_like(targets, IGNORE_INDEX))
    assert loss.item() == 0.0
    loss.backward()
    assert (hidden.grad == 0).all()


def test_targets_shift_and_stop_at_document_ends():
    labels = torch.arange(10, 20)[None]
    cu_seqlens = torch.tensor([0, 3, 4, 10])
    targets = next_token_targets(labels, cu_seqlens)
    ignore = IGNORE_INDEX
    expected = [11, 12, ignore, ignore, 15, 16, 17, 18, 19, ignore]
    assert targets[0].tolist() == expected
    assert next_token_targets(labels, None)[0].tolist() == [*range(11, 20), ignore]


def test_int32_labels_give_the_int64_loss():
    """input_ids may be int32, and labels are usually input_ids: the targets must still be
    int64 for cross_entropy."""
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.from_preset("gdn-tiny", n_layers=1))
    ids = torch.randint(0, 256, (1, 9))
    cu_seqlens = torch.tensor([0, 4, 9], dtype=torch.int32)
    expected = model(ids, labels=ids, cu_seqlens=cu_seqlens).loss
    got = model(ids.int(), labels=ids.int(), cu_seqlens=cu_seqlens).loss
    assert torch.equal(got, expected)
