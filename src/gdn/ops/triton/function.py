"""The Triton chunked recurrence as torch custom ops and an ``autograd.Function``.

Layering (as flash-attention does it): kernels (wy, state, output) → launchers (launch.py)
→ custom ops ``gdn::chunk_forward`` / ``gdn::chunk_backward`` with fake (meta) versions, so
``torch.compile(fullgraph=True)`` traces through them without running Triton → this
``autograd.Function`` → the public functions in ``gdn.ops``.

Custom ops cannot return None, so absent outputs are empty tensors, turned back into None
here. Besides o and the final state, the forward op returns A and, for a segmented state
pass (passes.py), the states at the segments' seams and their transitions: the backward
recomputes the chunk states from them in one pass instead of three (a few MiB: [B·P, HV, K,
V] and [B, P, HV, K, K] float32). Letters as in launch.py.
"""

from __future__ import annotations

import torch

from gdn.ops.triton import launch, passes

_EMPTY = (0,)


@torch.library.custom_op("gdn::chunk_forward", mutates_args=())
def chunk_forward_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
    beta: torch.Tensor | None, scale: float, initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None, exact: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """o, final state, A, and the segmented pass's seam states and transitions (for the
    backward; passes.Seams)."""
    o, final_state, a, seams = launch.chunk_forward(q, k, v, g, beta, scale=scale,
                                                    initial_state=initial_state,
                                                    cu_seqlens=cu_seqlens, exact=exact)

    def empty():
        return q.new_empty(_EMPTY, dtype=torch.float32)
    return (o, final_state, a if a is not None else empty(),
            seams.starts if seams is not None else empty(),
            seams.transitions if seams is not None else empty())


@chunk_forward_op.register_fake
def _(q, k, v, g, beta, scale, initial_state, cu_seqlens, exact):
    B, T, HV, V = v.shape
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    f32 = dict(dtype=torch.float32)
    a_shape = (B * T, HV, launch.BT) if beta is not None else _EMPTY
    starts, transitions = passes.seam_shapes(B, T, HV, q.shape[-1], V, launch.BT, cu_seqlens,
                                             q.device, delta=beta is not None)
    return (torch.empty_like(v), q.new_empty(N, HV, q.shape[-1], V, **f32),
            q.new_empty(a_shape, **f32), q.new_empty(starts, **f32),
            q.new_empty(transitions, **f32))


@torch.library.custom_op("gdn::chunk_backward", mutates_args=())
def chunk_backward_op(
    do: torch.Tensor, dht: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
    v: torch.Tensor, g: torch.Tensor | None, beta: torch.Tensor | None, a: torch.Tensor,
    scale: float, initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
    exact: bool, seam_starts: torch.Tensor, transitions: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    seams = passes.Seams(seam_starts, transitions) if seam_starts.numel() else None
    grads = launch.chunk_backward(do, dht, q, k, v, g, beta, a if beta is not None else None,
                                  scale=scale, initial_state=initial_state,
                                  cu_seqlens=cu_seqlens, exact=exact, seams=seams)
    return tuple(x if x is not None else q.new_empty(_EMPTY) for x in grads)


@chunk_backward_op.register_fake
def _(do, dht, q, k, v, g, beta, a, scale, initial_state, cu_seqlens, exact, seam_starts,
      transitions):
    def like(x):
        return torch.empty_like(x) if x is not None else q.new_empty(_EMPTY)
    return like(q), like(k), like(v), like(g), like(beta), like(initial_state)


class ChunkRecurrence(torch.autograd.Function):
    """o, final_state = chunked recurrence(q, k, v, g, beta, ...); see ``gdn.ops``."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale, initial_state, cu_seqlens, exact):
        o, final_state, a, seam_starts, transitions = chunk_forward_op(
            q, k, v, g, beta, scale, initial_state, cu_seqlens, exact)
        ctx.save_for_backward(q, k, v, g, beta, a, initial_state, cu_seqlens, seam_starts,
                              transitions)
        ctx.scale, ctx.exact = scale, exact
        ctx.set_materialize_grads(False)
        return o, final_state

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, a, initial_state, cu_seqlens, seam_starts, transitions = \
            ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(v)
        grads = chunk_backward_op(do.contiguous(), dht, q, k, v, g, beta, a, ctx.scale,
                                  initial_state, cu_seqlens, ctx.exact, seam_starts,
                                  transitions)
        present = (q, k, v, g, beta, initial_state)
        dq, dk, dv, dg, dbeta, dh0 = (d if x is not None else None
                                      for d, x in zip(grads, present, strict=True))
        return dq, dk, dv, dg, dbeta, None, dh0, None, None


def triton_chunked_recurrence(q, k, v, g, beta, *, scale: float, initial_state, cu_seqlens,
                              exact: bool):
    """Same contract as ``chunked.chunked_recurrence``; computed by the Triton kernels."""
    return ChunkRecurrence.apply(q, k, v, g, beta, scale, initial_state, cu_seqlens, exact)
