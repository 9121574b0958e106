"""Cases shared by the interpreter tests that run the Triton op two ways and compare
(test_triton_recompute.py, test_triton_fused_output.py), and the float64 chunk scores that
test_triton_scores.py and test_triton_gpu.py hold the stored ones to."""

import os

import pytest
import torch

from gdn.ops import chunk_gated_delta_rule, chunk_gated_linear_attention
from gdn.testing import random_inputs

interpreter_only = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs TRITON_INTERPRET=1 (set by tests/conftest.py when no GPU is visible)")

# name: (random_inputs kwargs, delta, segmented)
COMMON_CASES = {
    "gated": (dict(B=2, T=70, H=2, HV=2, K=20, V=12, initial_state=True), True, False),
    "deltanet": (dict(B=1, T=65, H=1, K=16, V=16, gate=False), True, False),
    "gla": (dict(B=2, T=70, H=2, HV=4, K=20, V=12, initial_state=True), False, False),
}


def op_for(delta: bool):
    """The gated delta rule, or without the delta term gated linear attention."""
    return chunk_gated_delta_rule if delta else chunk_gated_linear_attention


def case_inputs(case: tuple, dtype, seed: int, monkeypatch):
    """The inputs of a case (kwargs, delta, segmented) in dtype, requiring gradients, with
    the state passes cut into segments of two chunks where the case asks; and its delta."""
    from gdn.ops.triton import passes

    kwargs, delta, segmented = case
    if segmented:
        monkeypatch.setattr(passes, "SEGMENT_CHUNKS", 2)
    x = random_inputs(**kwargs, delta=delta, seed=seed).to(dtype, requires_grad=True)
    return x, delta


def record_keyword(monkeypatch, module, name: str, keyword: str, default=None) -> list:
    """Wraps ``module.name`` so that each call appends its ``keyword`` argument (``default``
    where the call leaves it out) to the list returned; the call itself is unchanged."""
    seen = []
    original = getattr(module, name)

    def recorded(*args, **kwargs):
        seen.append(kwargs.get(keyword, default))
        return original(*args, **kwargs)
    monkeypatch.setattr(module, name, recorded)
    return seen


def poisoned_forward(x, monkeypatch, **kwargs):
    """``launch.chunk_forward`` on float32 inputs x (exact, scale 0.3, scores saved) with every
    ``torch.empty`` it allocates filled with NaN, so that an element it does not write stays
    NaN; returns what chunk_forward returns."""
    from gdn.ops.triton import launch

    original = torch.empty
    monkeypatch.setattr(torch, "empty",
                        lambda *a, **kw: original(*a, **kw).fill_(float("nan")))
    try:
        return launch.chunk_forward(x.q, x.k, x.v, x.g, x.beta, scale=0.3, initial_state=None,
                                    cu_seqlens=x.cu_seqlens, exact=True, save_scores=True,
                                    **kwargs)
    finally:
        monkeypatch.setattr(torch, "empty", original)


def expected_chunk_scores(x, table, scale: float) -> torch.Tensor:
    """scale·(QKᵀ ⊙ D) per chunk of the launch's chunk table and v head, float64; zeros for
    the grid's spare chunks and past a sequence's end."""
    B, T, H, K = x.q.shape
    HV = x.v.shape[2]
    q, k = (t.reshape(B * T, H, K).double() for t in (x.q, x.k))
    g = None if x.g is None else x.g.reshape(B * T, HV).double()
    out = torch.zeros(table.num_chunks, HV, 64, 64, dtype=torch.float64)
    for c in range(table.num_chunks):
        n = int(table.seq[c])
        if n < 0:
            continue
        t0 = int(table.start[c])
        t1 = min(t0 + 64, int(table.cu[n + 1]))
        for hv in range(HV):
            h = hv // (HV // H)
            qk = q[t0:t1, h] @ k[t0:t1, h].T
            gamma = (torch.zeros(t1 - t0, dtype=torch.float64) if g is None
                     else g[t0:t1, hv].cumsum(0))
            decay = (gamma[:, None] - gamma[None, :]).exp().tril()
            out[c, hv, :t1 - t0, :t1 - t0] = scale * qk * decay
    return out
