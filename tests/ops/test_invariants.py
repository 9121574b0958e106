"""Invariants every backend must keep (RELIABILITY.md item 4), checked in float64."""

import pytest
import torch

from gdn.ops import (
    chunk_gated_delta_rule,
    chunk_gated_linear_attention,
    fused_recurrent_gated_delta_rule,
    recurrent_gated_delta_rule,
    recurrent_gated_linear_attention,
)
from gdn.testing import random_inputs, rel_error

CHUNKED = {"delta": chunk_gated_delta_rule, "linear": chunk_gated_linear_attention}
RECURRENT = {"delta": recurrent_gated_delta_rule, "linear": recurrent_gated_linear_attention}
BACKENDS = ["torch", "reference"]
TOL = 1e-10


def _inputs(kind, **shape):
    return random_inputs(delta=kind == "delta", **shape)


def _call(op, x, kind, **kwargs):
    return op(**x.kwargs(delta=kind == "delta"), output_final_state=True, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("split", [1, 17, 32, 69])
@pytest.mark.parametrize("kind", ["delta", "linear"])
def test_split_and_carry_equals_one_call(kind, split, backend):
    x = _inputs(kind, B=2, T=70, H=2, K=12, V=9, initial_state=True, seed=split)
    o, state = _call(CHUNKED[kind], x, kind, backend=backend, chunk_size=16)
    first, second = x.slice(slice(0, split)), x.slice(slice(split, None))
    o1, s1 = _call(CHUNKED[kind], first, kind, backend=backend, chunk_size=16)
    second.initial_state = s1
    o2, s2 = _call(CHUNKED[kind], second, kind, backend=backend, chunk_size=16)
    assert rel_error(torch.cat([o1, o2], dim=1), o) <= TOL
    assert rel_error(s2, state) <= TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["delta", "linear"])
def test_varlen_equals_loop_over_documents(kind, backend):
    docs = [1, 20, 0, 16, 1, 33]
    x = _inputs(kind, T=sum(docs), H=1, HV=2, K=10, V=7, initial_state=True,
                doc_lengths=docs, seed=5)
    o, state = _call(CHUNKED[kind], x, kind, backend=backend, chunk_size=16)
    bounds = x.cu_seqlens.tolist()
    for n in range(len(docs)):
        start, end = bounds[n], bounds[n + 1]
        if start == end:  # an empty document passes its initial state through
            assert torch.equal(state[n], x.initial_state[n])
            continue
        doc = x.slice(slice(start, end), sequences=slice(n, n + 1))
        o_n, s_n = _call(CHUNKED[kind], doc, kind, backend=backend, chunk_size=16)
        assert rel_error(o[:, start:end], o_n) <= TOL
        assert rel_error(state[n : n + 1], s_n) <= TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["delta", "linear"])
def test_gva_equals_repeated_heads(kind, backend):
    x = _inputs(kind, B=2, T=29, H=2, HV=6, K=8, V=5, initial_state=True, seed=7)
    o, state = _call(CHUNKED[kind], x, kind, backend=backend, chunk_size=8)
    x.q = x.q.repeat_interleave(3, dim=2)
    x.k = x.k.repeat_interleave(3, dim=2)
    o_rep, state_rep = _call(CHUNKED[kind], x, kind, backend=backend, chunk_size=8)
    assert rel_error(o, o_rep) <= TOL and rel_error(state, state_rep) <= TOL


@pytest.mark.parametrize("kind", ["delta", "linear"])
def test_recurrent_equals_chunked(kind):
    x = _inputs(kind, B=2, T=45, H=2, HV=4, K=9, V=11, initial_state=True, seed=9)
    o_c, s_c = _call(CHUNKED[kind], x, kind)
    o_r, s_r = _call(RECURRENT[kind], x, kind)
    assert rel_error(o_r, o_c) <= TOL and rel_error(s_r, s_c) <= TOL
    assert fused_recurrent_gated_delta_rule is recurrent_gated_delta_rule


@pytest.mark.parametrize("kind", ["delta", "linear"])
def test_chunk_size_does_not_change_the_result(kind):
    x = _inputs(kind, T=50, H=1, K=6, V=6, initial_state=True, seed=11)
    o, s = _call(CHUNKED[kind], x, kind, chunk_size=64)
    for chunk_size in (1, 3, 16, 50, 128):
        o_c, s_c = _call(CHUNKED[kind], x, kind, chunk_size=chunk_size)
        assert rel_error(o_c, o) <= TOL and rel_error(s_c, s) <= TOL


@pytest.mark.parametrize("T", [16, 23])  # a whole number of chunks, and a ragged one
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_equals_contiguous(backend, T):
    x = random_inputs(B=2, T=T, H=2, K=8, V=8, initial_state=True, seed=13)
    o, s = _call(chunk_gated_delta_rule, x, "delta", backend=backend, chunk_size=8)
    # [B, H, T, K] storage viewed as [B, T, H, K]: same values, non-unit strides.
    for name in ("q", "k", "v"):
        t = getattr(x, name)
        setattr(x, name, t.transpose(1, 2).contiguous().transpose(1, 2))
    x.g, x.beta = (t.mT.contiguous().mT for t in (x.g, x.beta))
    assert not x.q.is_contiguous() and not x.g.is_contiguous()
    o_nc, s_nc = _call(chunk_gated_delta_rule, x, "delta", backend=backend, chunk_size=8)
    assert rel_error(o_nc, o) <= TOL and rel_error(s_nc, s) <= TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_op_l2norm_equals_normalising_outside(backend):
    x = random_inputs(T=19, H=2, K=7, V=5, seed=17).to(torch.float64, requires_grad=True)
    x.q = (x.q * 3.0).detach().requires_grad_()
    x.k = (x.k * 0.2 + 0.1).detach().requires_grad_()
    o, _ = chunk_gated_delta_rule(**x.kwargs(), use_qk_l2norm_in_kernel=True, backend=backend)
    gq, gk = torch.autograd.grad(o.square().sum(), (x.q, x.k))

    def unit(t):
        return t * torch.rsqrt(t.square().sum(-1, keepdim=True) + 1e-6)

    kwargs = x.kwargs() | {"q": unit(x.q), "k": unit(x.k)}
    o_out, _ = chunk_gated_delta_rule(**kwargs, backend=backend)
    gq_out, gk_out = torch.autograd.grad(o_out.square().sum(), (x.q, x.k))
    assert rel_error(o, o_out) <= TOL
    assert rel_error(gq, gq_out) <= TOL and rel_error(gk, gk_out) <= TOL


def test_final_state_only_when_asked():
    x = random_inputs(T=5, H=1, K=4, V=4)
    o, state = chunk_gated_delta_rule(**x.kwargs())
    assert state is None and o.shape == (1, 5, 1, 4)


@pytest.mark.parametrize("kind", ["delta", "linear"])
def test_gradcheck_float64(kind):
    for docs in (None, [2, 0, 5]):
        x = _inputs(kind, T=7, H=1, HV=2, K=3, V=2, initial_state=True, doc_lengths=docs,
                    seed=19).to(torch.float64, requires_grad=True)
        names = list(x.tensors())

        def f(*tensors, x=x, names=names):
            args = x.kwargs(delta=kind == "delta") | dict(zip(names, tensors, strict=True))
            o, s = CHUNKED[kind](**args, output_final_state=True, chunk_size=4,
                                 use_qk_l2norm_in_kernel=True)
            return o, s

        assert torch.autograd.gradcheck(f, tuple(x.tensors().values()))
