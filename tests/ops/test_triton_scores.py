"""The chunk scores scale·P the forward stores for the backward's reverse pass (scores.py,
math.md §4.2, §4.6), in Triton's interpreter:

- what the forward stores is scale·(QKᵀ ⊙ D) of every chunk, against a float64 formula, from
  the fused forward pass and from output_forward, with a gate and without, with GVA and
  varlen (ragged last chunks, an empty document, the grid's spare chunks zeroed);
- they are stored only when autograd will run the backward;
- the backward refuses to run without them.

On the GPU, test_triton_gpu.py holds the stored scores of bf16 inputs to the output bound.

The gradients that go through them are the reference tests' (test_triton.py and the others).
"""

import pytest
import torch
from triton_cases import expected_chunk_scores, interpreter_only, record_keyword

from gdn.ops import chunk_gated_delta_rule
from gdn.testing import random_inputs, rel_error

pytest.importorskip("triton")
pytestmark = interpreter_only


@pytest.mark.parametrize("fused", [True, False], ids=["fused_pass", "output_forward"])
@pytest.mark.parametrize("case", ["gated", "deltanet", "gva_varlen", "gla"])
def test_stored_scores_are_scale_qk_times_decay(case, fused, monkeypatch):
    from gdn.ops.triton import launch

    monkeypatch.setattr(launch, "fused_output", lambda K: fused)
    kwargs = {
        "gated": dict(B=2, T=130, H=2, K=20, V=12),
        "deltanet": dict(B=1, T=70, H=1, K=16, V=16, gate=False),
        "gva_varlen": dict(T=150, H=1, HV=2, K=20, V=100, doc_lengths=[1, 70, 0, 79]),
        "gla": dict(B=1, T=100, H=2, HV=4, K=16, V=20, delta=False),
    }[case]
    x = random_inputs(**kwargs, seed=71).to(torch.float32)
    scale = 0.3
    original = torch.empty
    monkeypatch.setattr(torch, "empty",
                        lambda *a, **kw: original(*a, **kw).fill_(float("nan")))
    *_, chunk_scores = launch.chunk_forward(
        x.q, x.k, x.v, x.g, x.beta, scale=scale, initial_state=None,
        cu_seqlens=x.cu_seqlens, exact=True, save_scores=True)
    monkeypatch.undo()
    table = launch._plan(x.q, x.v, x.g, x.cu_seqlens, exact=True).table
    want = expected_chunk_scores(x, table, scale)
    assert chunk_scores.shape == want.shape and chunk_scores.dtype == torch.float32
    assert torch.isfinite(chunk_scores).all()
    assert rel_error(chunk_scores, want) <= 1e-6


def test_scores_are_stored_only_when_a_backward_follows(monkeypatch):
    from gdn.ops.triton import launch

    asked = record_keyword(monkeypatch, launch, "chunk_forward", "save_scores", False)
    x = random_inputs(B=1, T=70, H=1, K=16, V=16, seed=72).to(torch.float32)
    chunk_gated_delta_rule(**x.kwargs(), backend="triton")
    with torch.no_grad():
        chunk_gated_delta_rule(**x.to(torch.float32, requires_grad=True).kwargs(),
                               backend="triton")
    o, _ = chunk_gated_delta_rule(**x.to(torch.float32, requires_grad=True).kwargs(),
                                  backend="triton")
    assert asked == [False, False, True]
    o.sum().backward()


def test_the_backward_refuses_to_run_without_the_scores():
    from gdn.ops.triton import launch

    x = random_inputs(B=1, T=70, H=1, K=16, V=16, seed=73).to(torch.float32)
    o, _, a, *_ = launch.chunk_forward(x.q, x.k, x.v, x.g, x.beta, scale=0.3,
                                       initial_state=None, cu_seqlens=None, exact=True)
    with pytest.raises(ValueError, match="save_scores=True"):
        launch.chunk_backward(torch.ones_like(o), None, x.q, x.k, x.v, x.g, x.beta, a, None,
                              scale=0.3, initial_state=None, cu_seqlens=None, exact=True)
