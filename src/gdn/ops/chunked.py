"""The chunked WY algorithm in plain PyTorch: the CPU path and the readable algorithm.

Letters: N sequences, HV heads, NC chunks, C chunk size, K key dim, V value dim.
Stages (math.md §3), the same names as the Triton kernels:

1. gate cumsum  Γ_r = Σ_{j≤r} g_j within each chunk
2. wy           A = (I + strictly-lower(diag(β)(KKᵀ ⊙ D)))⁻¹ by a triangular solve,
                u = A diag(β) V, w = A diag(β e^Γ) K   (the UT transform, §2)
3. state        sequential pass over chunks: Δ = u − w S, S ← e^{Γ_C} S + (K ⊙ e^{Γ_C−Γ})ᵀ Δ
4. output       o = scale · (diag(e^Γ) Q S + (QKᵀ ⊙ D) Δ)

where D_rj = e^{Γ_r − Γ_j} for j ≤ r and 0 above the diagonal. Without the delta term
(gated linear attention) stage 2 is skipped and Δ = V. Only stage 3 loops, once per chunk;
autograd differentiates the whole thing. Variable-length documents and a ragged last chunk
are handled by padding with identity steps (k = 0, g = 0), which leave the state unchanged
(§3.4), so every document becomes a row of one [N, ...] batch.
"""

from __future__ import annotations

import torch

from gdn.ops.prepare import compute_dtype, expand_heads


def chunked_recurrence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    beta: torch.Tensor | None,
    *,
    scale: float,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``reference.recurrence``, computed chunk by chunk.

    q, k [B, T, H, K]; v [B, T, HV, V]; g, beta [B, T, HV] or None (``beta=None``: no delta
    term); initial_state [N, HV, K, V] or None. Returns o [B, T, HV, V] in v's dtype and the
    final state [N, HV, K, V] in float32 (float64 for float64 inputs).
    """
    B, T, HV, V = v.shape
    K = k.shape[-1]
    dtype = compute_dtype(v.dtype)
    layout = ChunkLayout(B, T, cu_seqlens, chunk_size, q.device)
    q_c, k_c = (layout.to_chunks(expand_heads(x, HV).to(dtype)) for x in (q, k))
    v_c = layout.to_chunks(v.to(dtype))
    g_c = None if g is None else layout.to_chunks(g.to(dtype)[..., None])[..., 0]
    beta_c = None if beta is None else layout.to_chunks(beta.to(dtype)[..., None])[..., 0]

    gamma = gate_cumsum(g_c) if g_c is not None else None
    decay = intra_chunk_decay(g_c, layout.C, dtype, q.device)
    if beta_c is None:
        u, w = v_c, None
    else:
        u, w = wy_representation(k_c, v_c, beta_c, gamma, decay)

    no_state = initial_state is None
    state = q_c.new_zeros(layout.N, HV, K, V) if no_state else initial_state.to(dtype)
    chunk_states, deltas, final_state = state_pass(k_c, u, w, gamma, decay, state)
    o_c = chunk_output(q_c, k_c, deltas, chunk_states, gamma, decay, scale)
    return layout.from_chunks(o_c).to(v.dtype), final_state


def gate_cumsum(g_c: torch.Tensor) -> torch.Tensor:
    """Stage 1: in-chunk cumulative log gate Γ [N, HV, NC, C] (math.md §3.1)."""
    return g_c.cumsum(dim=-1)


def intra_chunk_decay(g_c, C: int, dtype, device) -> torch.Tensor:
    """D_rj = e^{Γ_r − Γ_j} for j ≤ r, else 0: [N, HV, NC, C, C], or [C, C] with no gate.

    Each exponent Γ_r − Γ_j = Σ_{j<i≤r} g_i is summed directly (a cumsum down the columns of
    a masked [C, C] copy of g) rather than subtracted from prefix sums: after a gate of −10⁴
    the prefix sums sit near −10⁴, where float32 cannot resolve the −10⁻³ differences that
    follow (math.md §5.3). The upper triangle is masked to −∞ *before* exp, so no inf·0 can
    poison the products that follow (math.md §5.1).
    """
    causal = torch.ones(C, C, dtype=torch.bool, device=device).tril()
    if g_c is None:
        return causal.to(dtype)
    after_column = ~causal.T  # [i, j]: i > j, the steps that decay a write made at j
    steps = g_c[..., :, None].expand(*g_c.shape, C).masked_fill(~after_column, 0.0)
    return steps.cumsum(dim=-2).masked_fill(~causal, float("-inf")).exp()


def wy_representation(k_c, v_c, beta_c, gamma, decay):
    """Stage 2: the UT transform (math.md §2.2). Returns u [.., C, V] and w [.., C, K].

    Solves (I + L) [u w] = [diag(β) V, diag(β e^Γ) K] with L = strictly-lower(diag(β)(KKᵀ ⊙ D))
    by forward substitution, which is A = (I + L)⁻¹ applied without forming A.
    """
    V = v_c.shape[-1]
    L = (beta_c[..., :, None] * (k_c @ k_c.transpose(-1, -2)) * decay).tril(-1)
    gated_beta = beta_c if gamma is None else beta_c * gamma.exp()
    rhs = torch.cat([beta_c[..., None] * v_c, gated_beta[..., None] * k_c], dim=-1)
    # unitriangular: the solver takes the unit diagonal of I + L as given and reads only L.
    uw = torch.linalg.solve_triangular(L, rhs, upper=False, unitriangular=True)
    return uw[..., :V], uw[..., V:]


def state_pass(k_c, u, w, gamma, decay, state):
    """Stage 3: carry the state across chunks (math.md §3.2).

    A write at step j reaches the chunk's end decayed by e^{Γ_C − Γ_j}: the last row of D.
    Returns the state at the start of each chunk [N, HV, NC, K, V], the per-token writes
    Δ [N, HV, NC, C, V], and the final state [N, HV, K, V].
    """
    if gamma is None:
        k_to_end, chunk_decay = k_c, None
    else:
        k_to_end = k_c * decay[..., -1, :, None]
        chunk_decay = gamma[..., -1:, None].exp().unbind(2)          # e^{Γ_C} [N, HV, 1, 1]
    # unbind once: indexing x[:, :, n] per chunk would make autograd write a full-size
    # gradient per chunk (O(NC²) work in the backward).
    u_n, k_n = u.unbind(2), k_to_end.unbind(2)
    w_n = None if w is None else w.unbind(2)
    starts, deltas = [], []
    for n in range(k_c.shape[2]):
        starts.append(state)
        delta = u_n[n] if w_n is None else u_n[n] - w_n[n] @ state
        deltas.append(delta)
        if chunk_decay is not None:
            state = chunk_decay[n] * state
        state = state + k_n[n].transpose(-1, -2) @ delta
    return torch.stack(starts, dim=2), torch.stack(deltas, dim=2), state


def chunk_output(q_c, k_c, deltas, chunk_states, gamma, decay, scale):
    """Stage 4: inter-chunk (from the carried state) plus intra-chunk parts (math.md §3.3)."""
    q_gated = q_c if gamma is None else q_c * gamma.exp()[..., None]
    inter = q_gated @ chunk_states
    intra = ((q_c @ k_c.transpose(-1, -2)) * decay) @ deltas
    return scale * (inter + intra)


class ChunkLayout:
    """Maps [B, T, HV, D] tensors to chunks [N, HV, NC, C, D] and back.

    Without ``cu_seqlens`` each batch row is a sequence; with it, document n of the packed
    row is gathered into row n. Positions past a sequence's end hold zeros, which are
    identity steps of both recurrences (k = 0 writes nothing; g = 0 keeps the state).
    """

    def __init__(self, B: int, T: int, cu_seqlens, chunk_size: int, device):
        if cu_seqlens is None:
            self.N, self.length, self.gather = B, T, None
        else:
            bounds = cu_seqlens.to(device=device, dtype=torch.long)
            lengths = bounds[1:] - bounds[:-1]
            self.N, self.length = lengths.numel(), int(lengths.max())
            steps = torch.arange(max(self.length, 1), device=device)
            self.valid = steps[None, :] < lengths[:, None]             # [N, Tmax]
            self.gather = (bounds[:-1, None] + steps[None, :]).clamp(max=T - 1)
        # A chunk longer than every sequence would only add padding: cap it.
        self.C = min(chunk_size, max(self.length, 1))
        self.NC = -(-max(self.length, 1) // self.C)

    def to_chunks(self, x_BTHD: torch.Tensor) -> torch.Tensor:
        if self.gather is not None:
            x_BTHD = x_BTHD[0][self.gather] * self.valid[..., None, None]
        padding = self.NC * self.C - x_BTHD.shape[1]
        x_BTHD = torch.nn.functional.pad(x_BTHD, (0, 0, 0, 0, 0, padding))
        N, _, HV, D = x_BTHD.shape
        return x_BTHD.reshape(N, self.NC, self.C, HV, D).permute(0, 3, 1, 2, 4)

    def from_chunks(self, x_c: torch.Tensor) -> torch.Tensor:
        N, HV, NC, C, D = x_c.shape
        x_BTHD = x_c.permute(0, 2, 3, 1, 4).reshape(N, NC * C, HV, D)
        if self.gather is None:
            return x_BTHD[:, : self.length]
        return x_BTHD[:, : self.valid.shape[1]][self.valid][None]
