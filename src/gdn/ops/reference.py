"""The recurrences token by token: the truth every other path is tested against.

Letters: B batch, T time, H q/k heads, HV v heads, K key dim, V value dim, N sequences.
The state of one head is a [K, V] matrix S; one step of the gated delta rule (math.md §1.2) is

    S ← α S                      decay,           α = exp(g_t)
    S ← S + β k (v − Sᵀk)ᵀ       delta-rule write (replaces what S recalled for k)
    o = scale · Sᵀq              read

and gated linear attention (Mamba2's SSD recurrence, math.md §1.4) writes S ← S + k vᵀ.
Inputs arrive validated, already L2-normalised if asked; arithmetic runs in float64 for
float64 inputs and float32 otherwise.
"""

from __future__ import annotations

from itertools import pairwise

import torch

from gdn.ops.prepare import compute_dtype, expand_heads


def recurrence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    beta: torch.Tensor | None,
    *,
    scale: float,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the recurrence step by step; ``beta=None`` means no delta term.

    q, k [B, T, H, K]; v [B, T, HV, V]; g, beta [B, T, HV] or None;
    initial_state [N, HV, K, V] or None. Returns o [B, T, HV, V] in v's dtype and the final
    state [N, HV, K, V] in float32 (float64 for float64 inputs).
    """
    HV, out_dtype = v.shape[2], v.dtype
    dtype = compute_dtype(v.dtype)
    q, k = (expand_heads(x, HV).to(dtype) for x in (q, k))
    v = v.to(dtype)
    g = None if g is None else g.to(dtype)
    beta = None if beta is None else beta.to(dtype)
    state = None if initial_state is None else initial_state.to(dtype)

    if cu_seqlens is None:
        o, final = _run_batch(q, k, v, g, beta, scale, state)
    else:
        outputs, finals = [], []
        bounds = cu_seqlens.tolist()
        for n, (start, end) in enumerate(pairwise(bounds)):
            doc = slice(start, end)
            o_n, final_n = _run_batch(
                q[:, doc], k[:, doc], v[:, doc],
                None if g is None else g[:, doc],
                None if beta is None else beta[:, doc],
                scale,
                None if state is None else state[n : n + 1],
            )
            outputs.append(o_n)
            finals.append(final_n)
        o, final = torch.cat(outputs, dim=1), torch.cat(finals, dim=0)
    return o.to(out_dtype), final


def _run_batch(q, k, v, g, beta, scale, state):
    """Step through T for a batch of independent sequences; state [B, HV, K, V]."""
    B, T, HV, K = k.shape
    V = v.shape[-1]
    if state is None:
        state = q.new_zeros(B, HV, K, V)
    # unbind once: indexing x[:, t] in the loop would make autograd write a full-size
    # gradient per step (O(T²) work in the backward).
    q_t, k_t, v_t = q.unbind(1), k.unbind(1), v.unbind(1)
    alpha_t = None if g is None else g.exp().unbind(1)
    beta_t = None if beta is None else beta.unbind(1)
    outputs = []
    for t in range(T):
        if alpha_t is not None:
            state = state * alpha_t[t][..., None, None]
        if beta_t is None:
            write = v_t[t]
        else:
            recalled = (k_t[t][..., None, :] @ state)[..., 0, :]
            write = beta_t[t][..., None] * (v_t[t] - recalled)
        state = state + k_t[t][..., :, None] * write[..., None, :]
        outputs.append(scale * (q_t[t][..., None, :] @ state)[..., 0, :])
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(B, 0, HV, V)
    return o, state
