"""Launchers: the chunked forward and backward as sequences of stage kernels.

Letters: B batch, T time, TT = B·T packed tokens, H q/k heads, HV v heads (G = HV / H),
K/V head dims, N sequences, NC chunks (a grid bound, see ``indexing``), BT = 64 the chunk.

Inputs arrive validated by ``gdn.ops.validate`` and already L2-normalised if asked; here they
are flattened to one packed row. Intermediates that the kernels hand to one another (A, w, u,
Δ, the chunk-start states and their gradients) are float32: they feed the sequential state
pass, whose error would otherwise compound over chunks (math.md §5.2). The backward keeps
only A from the forward and recomputes w, u, Δ and the states (math.md §4.6).
"""

from __future__ import annotations

import torch
import triton

from gdn.ops.triton import output, state, wy
from gdn.ops.triton.indexing import chunk_table

BT = 64  # chunk length: four 16-row blocks in the inverse (wy.BC)


def tile_sizes(K: int, V: int) -> tuple[int, int, int]:
    """BK (all of K in one tile), BV for the parallel kernels, BV for the state passes.

    The state passes keep a [BK, BV] float32 state in registers; at K = 256 the value
    dimension is split finer to stay within the register file (and to give the sequential
    pass more programs).
    """
    BK = max(16, triton.next_power_of_2(K))
    BV = min(64, max(16, triton.next_power_of_2(V)))
    BV_state = min(BV, 32 if BK <= 128 else 16)
    return BK, BV, BV_state


def _flat(x: torch.Tensor | None) -> torch.Tensor | None:
    if x is None:
        return None
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]).contiguous()


def _dims(q, v):
    B, T, H, K = q.shape
    return B, T, H, v.shape[2], K, v.shape[3]


def chunk_forward(q, k, v, g, beta, *, scale: float, initial_state, cu_seqlens, exact: bool):
    """Returns o [B, T, HV, V] (v's dtype), final state [N, HV, K, V] float32, A or None."""
    B, T, H, HV, K, V = _dims(q, v)
    BK, BV, BV_state = tile_sizes(K, V)
    prec = "ieee" if exact else "tf32"
    table = chunk_table(B, T, cu_seqlens, BT, q.device)
    q_, k_, v_, g_, b_ = (_flat(x) for x in (q, k, v, g, beta))
    TT, NC = B * T, table.num_chunks
    f32 = dict(device=q.device, dtype=torch.float32)
    flags = dict(H=H, HV=HV, K=K, BK=BK, HAS_GATE=g is not None, PREC=prec, BT=BT)
    chunks = (table.seq, table.start, table.cu)
    delta = beta is not None
    a = w = None
    u = v_
    if delta:
        a = torch.empty(TT, HV, BT, **f32)
        w, u = torch.empty(TT, HV, K, **f32), torch.empty(TT, HV, V, **f32)
        wy.wy_inverse_kernel[(NC, HV)](k_, g_, b_, a, *chunks, BC=wy.BC, **flags)
        wy.wy_apply_kernel[(NC, HV)](k_, v_, g_, b_, a, w, u, *chunks, V=V, BV=BV, **flags)
    states, v_new, final = _state_forward(k_, w, u, g_, initial_state, table, HV, K, V,
                                          BV_state, flags, f32)
    o = torch.empty(TT, HV, V, device=q.device, dtype=v.dtype)
    output.output_forward_kernel[(NC, HV)](q_, k_, v_new, g_, states, o, *chunks, scale,
                                           V=V, BV=BV, **flags)
    return o.view(B, T, HV, V), final, a


def _state_forward(k_, w, u, g_, initial_state, table, HV, K, V, BV_state, flags, f32):
    delta = w is not None
    TT = k_.shape[0]
    states = torch.empty(table.num_chunks, HV, K, V, **f32)
    v_new = torch.empty(TT, HV, V, **f32) if delta else u
    final = torch.empty(table.num_seqs, HV, K, V, **f32)
    h0 = None if initial_state is None else initial_state.to(torch.float32).contiguous()
    grid = (table.num_seqs * HV, triton.cdiv(V, BV_state))
    state.state_forward_kernel[grid](
        k_, w, u, g_, h0, states, v_new, final, table.cu, table.offsets, V=V, BV=BV_state,
        DELTA=delta, HAS_H0=h0 is not None, STORE_HT=True, **flags)
    return states, v_new, final


def chunk_backward(do, dht, q, k, v, g, beta, a, *, scale: float, initial_state, cu_seqlens,
                   exact: bool):
    """Gradients (dq, dk, dv, dg, dbeta, dh0) in the dtypes of their inputs; None where the
    input was None. ``dht`` (gradient of the final state) may be None."""
    B, T, H, HV, K, V = _dims(q, v)
    G = HV // H
    BK, BV, BV_state = tile_sizes(K, V)
    prec = "ieee" if exact else "tf32"
    table = chunk_table(B, T, cu_seqlens, BT, q.device)
    q_, k_, v_, g_, b_, do_ = (_flat(x) for x in (q, k, v, g, beta, do))
    TT, N, NC = B * T, table.num_seqs, table.num_chunks
    f32 = dict(device=q.device, dtype=torch.float32)
    flags = dict(H=H, HV=HV, K=K, BK=BK, HAS_GATE=g is not None, PREC=prec, BT=BT)
    chunks = (table.seq, table.start, table.cu)
    delta = beta is not None
    w = None
    u = v_
    if delta:
        w, u = torch.empty(TT, HV, K, **f32), torch.empty(TT, HV, V, **f32)
        wy.wy_apply_kernel[(NC, HV)](k_, v_, g_, b_, a, w, u, *chunks, V=V, BV=BV, **flags)
    states, v_new, _ = _state_forward(k_, w, u, g_, initial_state, table, HV, K, V, BV_state,
                                      flags, f32)

    dv_local = torch.empty(TT, HV, V, **f32)
    output.dv_local_kernel[(NC, HV)](q_, k_, g_, do_, dv_local, *chunks, scale, V=V, BV=BV,
                                     **flags)
    d_states = torch.empty(NC, HV, K, V, **f32)
    d_delta = torch.empty(TT, HV, V, **f32)
    dh0 = torch.empty(N, HV, K, V, **f32) if initial_state is not None else None
    dht_ = None if dht is None else dht.to(torch.float32).contiguous()
    state.state_backward_kernel[(N * HV, triton.cdiv(V, BV_state))](
        q_, k_, w, g_, do_, dv_local, dht_, d_states, d_delta, dh0, table.cu, table.offsets,
        scale, V=V, BV=BV_state, DELTA=delta, HAS_DHT=dht_ is not None,
        STORE_DH0=dh0 is not None, **flags)

    dq, dk = torch.empty(TT, HV, K, **f32), torch.empty(TT, HV, K, **f32)
    dw = torch.empty(TT, HV, K, **f32) if delta else None
    dg = torch.empty(TT, HV, **f32) if g is not None else None
    output.output_backward_kernel[(NC, HV)](
        q_, k_, g_, v_new, do_, d_delta, states, d_states, dq, dk, dw, dg, *chunks, scale,
        V=V, BV=BV, DELTA=delta, **flags)
    if delta:
        dv = torch.empty(TT, HV, V, **f32)
        dbeta = torch.empty(TT, HV, **f32)
        wy.wy_backward_kernel[(NC, HV)](k_, v_, g_, b_, a, w, u, dw, d_delta, dk, dg, dv, dbeta,
                                        *chunks, V=V, BV=BV, **flags)
    else:
        dv, dbeta = d_delta, None

    def per_qk_head(x):  # GVA: a q/k head's gradient sums over the v heads reading it
        return x.view(TT, H, G, K).sum(2).view(B, T, H, K)

    return (
        per_qk_head(dq).to(q.dtype),
        per_qk_head(dk).to(k.dtype),
        dv.view(B, T, HV, V).to(v.dtype),
        None if g is None else dg.view(B, T, HV).to(g.dtype),
        None if beta is None else dbeta.view(B, T, HV).to(beta.dtype),
        dh0 if initial_state is None else dh0.to(initial_state.dtype),
    )
