"""Public recurrences of gdn and the choice of backend that computes them.

Letters: B batch, T time, H q/k heads, HV v heads (a multiple of H: grouped value attention,
GVA), K key dim, V value dim, N sequences (B, or the documents of ``cu_seqlens``).

Two recurrences, each as a chunked function (training, prefill) and a recurrent one
(token by token; decoding):

- the gated delta rule, ``S_t = α_t (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ`` with the state
  S as [K, V] (Gated DeltaNet; ``g=None`` is DeltaNet), and
- gated linear attention, ``S_t = α_t S_{t-1} + k_t v_tᵀ``: Mamba2's SSD recurrence written
  as linear attention (q = C, k = B, v = Δt·x, g = Δt·A), or plain linear attention with
  ``g=None``.

In both, α_t = exp(g_t) and the output is o_t = scale · S_tᵀ q_t. The names and keywords
follow those other projects already call (``chunk_gated_delta_rule`` and friends).

Backends: ``"reference"`` steps token by token (``reference.py``, the truth in tests);
``"torch"`` runs the chunked WY algorithm in PyTorch (``chunked.py``); ``"triton"`` runs the
same algorithm as Triton kernels (``triton/``, chunked functions only; CUDA tensors, or CPU
tensors under ``TRITON_INTERPRET=1``). ``"auto"`` picks ``"triton"`` for CUDA tensors when it
can run them and ``"torch"`` otherwise, and logs its choice and the reason at debug level on
the ``gdn.ops`` logger.
"""

from __future__ import annotations

import importlib.util
import logging

import torch

from gdn.ops import chunked, reference
from gdn.ops.prepare import l2_normalize
from gdn.ops.validate import check_chunk_size, check_inputs, check_recompute

__all__ = [
    "chunk_gated_delta_rule",
    "recurrent_gated_delta_rule",
    "fused_recurrent_gated_delta_rule",
    "chunk_gated_linear_attention",
    "recurrent_gated_linear_attention",
    "BACKENDS",
]

log = logging.getLogger("gdn.ops")

BACKENDS = ("auto", "reference", "torch", "triton")
DEFAULT_CHUNK_SIZE = 64


_HAS_TRITON = importlib.util.find_spec("triton") is not None
_kernels = None


def _triton_kernels():
    """gdn.ops.triton, imported on first use (it needs Triton, which is optional)."""
    global _kernels
    if _kernels is None:
        from gdn.ops import triton as kernels

        _kernels = kernels
    return _kernels


def _debug(message: str, *args) -> None:
    # Logging inside a region that torch.compile traces would break its graph.
    if not torch.compiler.is_compiling():
        log.debug(message, *args)


def _triton_obstacle(q: torch.Tensor, chunk_size: int) -> str | None:
    """Why the Triton kernels cannot run these inputs, or None if they can."""
    if not _HAS_TRITON:
        return "Triton is not installed"
    kernels = _triton_kernels()
    if q.dtype == torch.float64:
        return "Triton kernels take float32, float16 or bfloat16, not float64"
    if q.shape[-1] > kernels.MAX_HEAD_DIM:
        return f"Triton kernels take K <= {kernels.MAX_HEAD_DIM}, got K = {q.shape[-1]}"
    if chunk_size != kernels.CHUNK_SIZE:
        return f"Triton kernels use chunk_size {kernels.CHUNK_SIZE}, got {chunk_size}"
    if q.device.type == "cpu" and not kernels.interpreting():
        return "Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)"
    if q.device.type not in ("cpu", "cuda"):
        return f"Triton kernels do not run on {q.device.type} tensors"
    return None


def _resolve_backend(backend: object, q: torch.Tensor, chunk_size: int | None) -> str:
    """The backend that runs; ``chunk_size`` is None for the recurrent functions."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "triton":
        if chunk_size is None:
            raise ValueError("backend='triton' has no recurrent (decode) kernel yet; use "
                             "'auto', 'reference' or 'torch' for recurrent_* functions")
        obstacle = _triton_obstacle(q, chunk_size)
        if obstacle is not None:
            raise ValueError(f"backend='triton' cannot run: {obstacle}")
        return "triton"
    if backend != "auto":
        return backend
    if chunk_size is None or q.device.type != "cuda":
        _debug("backend='auto' on %s resolves to 'torch'", q.device.type)
        return "torch"
    obstacle = _triton_obstacle(q, chunk_size)
    if obstacle is not None:
        _debug("backend='auto' resolves to 'torch': %s", obstacle)
        return "torch"
    _debug("backend='auto' on cuda resolves to 'triton'")
    return "triton"


def _run(q, k, v, g, beta, *, needs_beta, chunked_op, scale, initial_state,
         output_final_state, cu_seqlens, use_qk_l2norm_in_kernel, backend, chunk_size,
         check_values, exact=False, recompute=True, precise_state=False):
    """Validate, resolve the backend, normalise q/k if asked, and run.

    ``chunked_op`` is True for the chunk_* functions, whose "torch" backend is the chunked
    algorithm; the recurrent_* functions step token by token on every backend.
    """
    dims = check_inputs(
        q, k, v, g, beta, needs_beta=needs_beta, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, cu_seqlens=cu_seqlens,
        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, check_values=check_values,
    )
    if chunked_op:
        chunk_size = check_chunk_size(chunk_size)
    if not isinstance(exact, bool):
        raise TypeError(f"exact must be a bool; got {type(exact).__name__}")
    check_recompute(recompute)
    if not isinstance(precise_state, bool):
        raise TypeError(f"precise_state must be a bool; got {type(precise_state).__name__}")
    name = _resolve_backend(backend, q, chunk_size if chunked_op else None)
    if scale is None:
        scale = dims.K ** -0.5
    if use_qk_l2norm_in_kernel:
        normalize = _triton_kernels().triton_l2_normalize if name == "triton" else l2_normalize
        q, k = normalize(q), normalize(k)
    common = dict(scale=float(scale), initial_state=initial_state, cu_seqlens=cu_seqlens)
    if name == "triton":
        o, final_state = _triton_kernels().triton_chunked_recurrence(
            q, k, v, g, beta, exact=exact, recompute=recompute, precise_state=precise_state,
            **common)
    elif name == "torch" and chunked_op:
        o, final_state = chunked.chunked_recurrence(q, k, v, g, beta, chunk_size=chunk_size,
                                                    **common)
    else:
        o, final_state = reference.recurrence(q, k, v, g, beta, **common)
    return o, (final_state if output_final_state else None)


_ARGS_DOC = """
    Args:
        q: queries [B, T, H, K].
        k: keys [B, T, H, K].{k_note}
        v: values [B, T, HV, V]; HV a multiple of H, v head j reads q/k head j // (HV // H).
        g: per-step log decay [B, T, HV], finite and <= 0 (not cumulated); None: no decay.{beta}
        scale: multiplies the output; None means K ** -0.5.
        initial_state: [N, HV, K, V], float32 (float64 for float64 inputs); None is zeros.
        output_final_state: return the state after the last step of each sequence.
        cu_seqlens: int32/int64 [N+1] document boundaries in a packed B=1 batch; the
            state restarts from ``initial_state[n]`` at each document.
        use_qk_l2norm_in_kernel: L2-normalise q and k inside the op (differentiably), as
            x / sqrt(sum(x**2) + 1e-6).
        backend: {backend}{chunk}
        check_values: check value ranges (g <= 0 and finite{beta_range}, cu_seqlens starting at
            0, non-decreasing, ending at T). These read tensor values, a device-to-host sync
            on GPU: None means on for CPU tensors and off for CUDA tensors (and while
            torch.compile traces).

    Returns:
        ``(o, final_state)``: o [B, T, HV, V] in v's dtype; final_state [N, HV, K, V] in
        float32 (float64 for float64 inputs), or None unless ``output_final_state``.

    Raises:
        TypeError, ValueError: naming the argument, before any computation.
"""
_BETA_DOC = """
        beta: per-step write strength [B, T, HV] in [0, 2] (above 1: negative eigenvalues)."""
_UNIT_KEYS_DOC = """ L2-normalise them (or pass ``use_qk_l2norm_in_kernel=True``):
            the delta rule assumes unit keys (math.md §1.3)."""
_CHUNK_DOC = """
        chunk_size: tokens per chunk of the chunked algorithm (math.md §3); the Triton
            kernels use 64.
        exact: Triton backend with float32 inputs: IEEE float32 dot products instead of
            TF32 (slower, about 10⁻⁶ instead of 10⁻³ relative error). With bf16/fp16
            inputs: float32 throughout as well, the inputs' rounding aside: the torch
            path's accuracy, at 75-87× the kernel time of the default (H100,
            benchmarks/NOTES.md §22); ``precise_state`` is the fast remedy for the drift.
        precise_state: Triton backend with bf16/fp16 inputs: keep the chunk-to-chunk state
            recurrence at about float32 precision while its tiles stay 16-bit (float32
            w/u hand-offs, each chained product's operands split in two 16-bit parts,
            the triangular solve in tf32x3; math.md §5.6). For a rule that never forgets
            (no gate, β near 2, thousands of tokens), whose bf16 error grows with T: 4.5·10⁻²
            by default at 7,273 tokens, 2.5·10⁻³ with it. Costs about 40 % more kernel time
            (H100, 8 × 4096 tokens, 16 heads of 128: 3.08 → 4.26 ms DeltaNet, 3.53 → 5.03
            gated). Float32 inputs and the other backends ignore it (already float32).
        recompute: Triton backend, what the backward forms again (math.md §4.6). True:
            the forward keeps Δ for a rule with the delta term (V·2 bytes per token and v
            head in bf16: 128 MiB at 8 × 4096 tokens, 16 heads of 128), and the backward
            forms the chunk states from it in a pass without the delta term. "all": Δ too,
            from the inputs, for the least memory kept from the forward to the backward
            (2.68 against 2.63 ms at that shape on an H100). False: the forward keeps the
            chunk states as well (K·V·2 bytes per 64-token chunk and v head in bf16: 256
            MiB more), and the backward skips that pass. "all" and False give the same
            gradients bit for bit, True within a 16-bit rounding of them. The other
            backends ignore it (autograd saves what they need)."""
_CHUNK_BACKENDS = ('"auto", "reference" (token by token), "torch" (chunked) or "triton" '
                   '(chunked kernels); see ``gdn.ops``.')
_RECURRENT_BACKENDS = ('"auto", "reference" or "torch": all step token by token in PyTorch '
                       '(no Triton decode kernel yet).')


def _doc(summary: str, *, delta: bool, chunk: bool) -> str:
    args = _ARGS_DOC.format(
        beta=_BETA_DOC if delta else "",
        k_note=_UNIT_KEYS_DOC if delta else "",
        chunk=_CHUNK_DOC if chunk else "",
        beta_range=", beta in [0, 2]" if delta else "",
        backend=_CHUNK_BACKENDS if chunk else _RECURRENT_BACKENDS,
    )
    return summary + "\n" + args


def chunk_gated_delta_rule(
    q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
    cu_seqlens=None, use_qk_l2norm_in_kernel=False, backend="auto", *,
    chunk_size=DEFAULT_CHUNK_SIZE, check_values=None, exact=False, recompute=True,
    precise_state=False,
):
    return _run(q, k, v, g, beta, needs_beta=True, chunked_op=True, scale=scale,
                initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
                backend=backend, chunk_size=chunk_size, check_values=check_values,
                exact=exact, recompute=recompute, precise_state=precise_state)


def recurrent_gated_delta_rule(
    q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
    cu_seqlens=None, use_qk_l2norm_in_kernel=False, backend="auto", *, check_values=None,
):
    return _run(q, k, v, g, beta, needs_beta=True, chunked_op=False, scale=scale,
                initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
                backend=backend, chunk_size=None, check_values=check_values)


def chunk_gated_linear_attention(
    q, k, v, g=None, scale=None, initial_state=None, output_final_state=False,
    cu_seqlens=None, use_qk_l2norm_in_kernel=False, backend="auto", *,
    chunk_size=DEFAULT_CHUNK_SIZE, check_values=None, exact=False, recompute=True,
    precise_state=False,
):
    return _run(q, k, v, g, None, needs_beta=False, chunked_op=True, scale=scale,
                initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
                backend=backend, chunk_size=chunk_size, check_values=check_values,
                exact=exact, recompute=recompute, precise_state=precise_state)


def recurrent_gated_linear_attention(
    q, k, v, g=None, scale=None, initial_state=None, output_final_state=False,
    cu_seqlens=None, use_qk_l2norm_in_kernel=False, backend="auto", *, check_values=None,
):
    return _run(q, k, v, g, None, needs_beta=False, chunked_op=False, scale=scale,
                initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
                backend=backend, chunk_size=None, check_values=check_values)


chunk_gated_delta_rule.__doc__ = _doc(
    "Gated delta rule, chunked WY algorithm (math.md §3): training and prefill.",
    delta=True, chunk=True)
recurrent_gated_delta_rule.__doc__ = _doc(
    "Gated delta rule, token by token (math.md §1.2): decoding, and the reference.",
    delta=True, chunk=False)
chunk_gated_linear_attention.__doc__ = _doc(
    "Gated linear attention S_t = α_t S_{t-1} + k_t v_tᵀ (Mamba2's SSD recurrence), chunked.",
    delta=False, chunk=True)
recurrent_gated_linear_attention.__doc__ = _doc(
    "Gated linear attention (Mamba2's SSD recurrence), token by token (math.md §1.4).",
    delta=False, chunk=False)

fused_recurrent_gated_delta_rule = recurrent_gated_delta_rule
