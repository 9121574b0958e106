"""The Triton chunked recurrence as torch custom ops and an ``autograd.Function``.

Layering (as flash-attention does it): kernels (wy, state, output) → launchers (launch.py)
→ custom ops ``gdn::chunk_forward`` / ``gdn::chunk_backward`` with fake (meta) versions, so
``torch.compile(fullgraph=True)`` traces through them without running Triton → this
``autograd.Function`` → the public functions in ``gdn.ops``.

Custom ops cannot return None, so absent outputs are empty tensors, turned back into None
here. Besides o and the final state, the forward op returns A and, for a segmented state
pass (passes.py), the states at the segments' seams and their transitions: the backward
recomputes the chunk states from them in one pass instead of three (a few MiB: [B·P, HV, K,
V] and [B, P, HV, K, K] float32), and when a backward will follow (``save_scores``) the chunk
scores scale·P for the reverse pass (scores.py). With ``keep`` (``recompute=False`` in
``gdn.ops``) it also returns the chunk states and Δ (``launch.Kept``), and the backward
recomputes nothing; by default (``launch.keeps_delta``) Δ alone, and the backward forms the
states from it, or with 16-bit operands (``launch.keeps_even_states``, the default up to
K = 128) Δ and the even chunks' states, and output_backward forms the others.
Letters as in launch.py.
"""

from __future__ import annotations

import torch

from gdn.ops.triton import launch, passes

_EMPTY = (0,)


@torch.library.custom_op("gdn::chunk_forward", mutates_args=())
def chunk_forward_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
    beta: torch.Tensor | None, scale: float, initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None, exact: bool, keep: bool, precise_state: bool,
    save_scores: bool, keep_delta: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    """o, final state, A, the segmented pass's seam states and transitions (for the backward;
    passes.Seams), with ``keep`` the chunk states and Δ (launch.Kept), Δ alone where
    ``launch.keeps_delta`` says so, and with ``save_scores`` the chunk scores (scores.py)."""
    o, final_state, a, seams, kept, chunk_scores = launch.chunk_forward(
        q, k, v, g, beta, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens,
        exact=exact, keep=keep, precise_state=precise_state, save_scores=save_scores,
        keep_delta=keep_delta)
    lo = launch.operand_dtype(q.dtype, exact)

    def present(x, dtype=torch.float32):
        return x if x is not None else q.new_empty(_EMPTY, dtype=dtype)
    return (o, final_state, present(a),
            present(seams and seams.starts), present(seams and seams.transitions),
            present(kept and kept.states, lo),
            present(kept and kept.v_new, lo),
            present(chunk_scores, lo))


@chunk_forward_op.register_fake
def _(q, k, v, g, beta, scale, initial_state, cu_seqlens, exact, keep, precise_state,
      save_scores, keep_delta):
    B, T, HV, V = v.shape
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    f32 = dict(dtype=torch.float32)
    lo = launch.operand_dtype(q.dtype, exact)    # A's parts, the kept states and Δ
    a_shape = launch.a_shape(B * T, HV, lo) if beta is not None else _EMPTY
    starts, transitions = passes.seam_shapes(B, T, HV, q.shape[-1], V, launch.BT, cu_seqlens,
                                             q.device, delta=beta is not None)
    delta_kept = launch.keeps_delta(keep, save_scores, beta is not None, precise_state,
                                    keep_delta)
    kept = launch.kept_shapes(B, T, HV, q.shape[-1], V, cu_seqlens, delta=beta is not None,
                              keep=keep, keep_delta=delta_kept,
                              keep_even=launch.keeps_even_states(delta_kept, q.shape[-1],
                                                                 lo != torch.float32))
    scores = (launch.scores_shape(launch.chunk_count(B, T, cu_seqlens, launch.BT), HV)
              if save_scores else _EMPTY)
    return (torch.empty_like(v), q.new_empty(N, HV, q.shape[-1], V, **f32),
            q.new_empty(a_shape, dtype=lo if beta is not None else torch.float32),
            q.new_empty(starts, **f32),
            q.new_empty(transitions, **f32),
            *(q.new_empty(shape, dtype=lo) for shape in kept),
            q.new_empty(scores, dtype=lo))


@torch.library.custom_op("gdn::chunk_backward", mutates_args=())
def chunk_backward_op(
    do: torch.Tensor, dht: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
    v: torch.Tensor, g: torch.Tensor | None, beta: torch.Tensor | None, a: torch.Tensor,
    chunk_scores: torch.Tensor, scale: float, initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None, exact: bool, seam_starts: torch.Tensor,
    transitions: torch.Tensor, kept_states: torch.Tensor, kept_v_new: torch.Tensor,
    precise_state: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    seams = passes.Seams(seam_starts, transitions) if seam_starts.numel() else None
    kept = None
    if kept_states.numel():
        delta = beta is not None
        # The even chunks' states alone (launch.keeps_even_states) are fewer than the chunks
        # wherever there are two or more; with one, either reading is the same.
        B, T = v.shape[:2]
        every = launch.chunk_count(B, T, cu_seqlens, launch.BT)
        kept = launch.Kept(kept_states, kept_v_new if delta else None,
                           even=kept_states.shape[0] < every)
    elif kept_v_new.numel():            # Δ alone (launch.keeps_delta)
        kept = launch.Kept(None, kept_v_new)
    grads = launch.chunk_backward(do, dht, q, k, v, g, beta, a if beta is not None else None,
                                  chunk_scores, scale=scale, initial_state=initial_state,
                                  cu_seqlens=cu_seqlens, exact=exact, seams=seams, kept=kept,
                                  precise_state=precise_state)
    return tuple(x if x is not None else q.new_empty(_EMPTY) for x in grads)


@chunk_backward_op.register_fake
def _(do, dht, q, k, v, g, beta, a, chunk_scores, scale, initial_state, cu_seqlens, exact,
      seam_starts, transitions, kept_states, kept_v_new, precise_state):
    def like(x):
        return torch.empty_like(x) if x is not None else q.new_empty(_EMPTY)
    return like(q), like(k), like(v), like(g), like(beta), like(initial_state)


class ChunkRecurrence(torch.autograd.Function):
    """o, final_state = chunked recurrence(q, k, v, g, beta, ...); see ``gdn.ops``."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale, initial_state, cu_seqlens, exact, keep,
                precise_state, save_scores, keep_delta):
        o, final_state, a, *for_backward, chunk_scores = chunk_forward_op(
            q, k, v, g, beta, scale, initial_state, cu_seqlens, exact, keep, precise_state,
            save_scores, keep_delta)
        # for_backward: seam starts, transitions, and the kept states and Δ.
        ctx.save_for_backward(q, k, v, g, beta, a, chunk_scores, initial_state, cu_seqlens,
                              *for_backward)
        ctx.scale, ctx.exact, ctx.precise_state = scale, exact, precise_state
        ctx.set_materialize_grads(False)
        return o, final_state

    @staticmethod
    def backward(ctx, do, dht):
        (q, k, v, g, beta, a, chunk_scores, initial_state, cu_seqlens,
         *for_backward) = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(v)
        grads = chunk_backward_op(do.contiguous(), dht, q, k, v, g, beta, a, chunk_scores,
                                  ctx.scale, initial_state, cu_seqlens, ctx.exact,
                                  *for_backward, ctx.precise_state)
        present = (q, k, v, g, beta, initial_state)
        dq, dk, dv, dg, dbeta, dh0 = (d if x is not None else None
                                      for d, x in zip(grads, present, strict=True))
        return dq, dk, dv, dg, dbeta, None, dh0, None, None, None, None, None, None


def triton_chunked_recurrence(q, k, v, g, beta, *, scale: float, initial_state, cu_seqlens,
                              exact: bool, recompute: bool | str = True,
                              precise_state: bool = False):
    """Same contract as ``chunked.chunked_recurrence``; computed by the Triton kernels. With
    ``recompute=False`` the forward keeps the chunk states as well as Δ for the backward
    (``launch.Kept``) instead of the backward forming them, with "all" neither;
    ``precise_state`` as in ``gdn.ops``. The chunk scores (scores.py) are stored only where
    autograd will call the backward: grad mode on and an input that requires grad."""
    tracked = (q, k, v, g, beta, initial_state)
    save_scores = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in tracked)
    return ChunkRecurrence.apply(q, k, v, g, beta, scale, initial_state, cu_seqlens, exact,
                                 recompute is False, precise_state, save_scores,
                                 recompute != "all")
