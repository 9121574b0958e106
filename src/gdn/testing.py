"""One input generator and one comparison helper, shared by tests and benchmarks.

Letters: B batch, T time, H q/k heads, HV v heads, K key dim, V value dim, N sequences.
Ranges follow what a Gated DeltaNet layer feeds the op: g = logsigmoid of a normal around 3
(decays near 1), β = sigmoid (in (0, 1)), k L2-normalised.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F


@dataclass
class RecurrenceInputs:
    """Arguments of a recurrence; ``kwargs()`` spreads them into a call."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    g: torch.Tensor | None
    beta: torch.Tensor | None
    initial_state: torch.Tensor | None
    cu_seqlens: torch.Tensor | None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The floating tensors (the differentiable ones), by argument name."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "cu_seqlens" and getattr(self, f.name) is not None}

    def kwargs(self, delta: bool = True) -> dict:
        args = {f.name: getattr(self, f.name) for f in fields(self)}
        if not delta:
            del args["beta"]
        return args

    def slice(self, time: slice, sequences: slice | None = None) -> RecurrenceInputs:
        """The steps ``time`` of every row, as separate sequences (``cu_seqlens`` dropped).

        ``sequences`` picks the rows of ``initial_state`` that go with them (all by default).
        """
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, x in self.tensors().items():
            if name == "initial_state":
                out[name] = x if sequences is None else x[sequences]
            else:
                out[name] = x[:, time]
        out["cu_seqlens"] = None
        return RecurrenceInputs(**out)

    def to(self, dtype: torch.dtype, requires_grad: bool = False) -> RecurrenceInputs:
        """A copy in ``dtype`` (the state stays float32 unless dtype is float64)."""
        state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        out = {}
        for f in fields(self):
            x = getattr(self, f.name)
            if x is not None and f.name != "cu_seqlens":
                x = x.detach().to(state_dtype if f.name == "initial_state" else dtype)
                x.requires_grad_(requires_grad)
            out[f.name] = x
        return RecurrenceInputs(**out)


def random_inputs(
    *,
    B: int = 1,
    T: int,
    H: int,
    K: int,
    V: int,
    HV: int | None = None,
    gate: bool = True,
    delta: bool = True,
    initial_state: bool = False,
    doc_lengths: list[int] | None = None,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> RecurrenceInputs:
    """Fresh inputs at realistic ranges; ``doc_lengths`` packs documents into B = 1."""
    HV = H if HV is None else HV
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    if doc_lengths is not None:
        if B != 1 or sum(doc_lengths) != T:
            raise ValueError(f"doc_lengths {doc_lengths} must sum to T={T} with B=1")
        bounds = torch.tensor([0, *doc_lengths]).cumsum(0)
        cu_seqlens, N = bounds.to(device=device, dtype=torch.int32), len(doc_lengths)
    else:
        cu_seqlens, N = None, B
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    made = dict(
        q=normal(B, T, H, K).to(dtype),
        k=F.normalize(normal(B, T, H, K), dim=-1).to(dtype),
        v=normal(B, T, HV, V).to(dtype),
        g=F.logsigmoid(normal(B, T, HV) + 3).to(dtype) if gate else None,
        beta=torch.sigmoid(normal(B, T, HV)).to(dtype) if delta else None,
        initial_state=normal(N, HV, K, V).to(state_dtype) if initial_state else None,
    )
    made = {name: None if x is None else x.to(device) for name, x in made.items()}
    return RecurrenceInputs(cu_seqlens=cu_seqlens, **made)


def rel_error(actual: torch.Tensor, expected: torch.Tensor, *, floor_rms: float = 0.0) -> float:
    """‖actual − expected‖ / max(‖expected‖, floor_rms·√n) (Frobenius: RMS over RMS), in float64.

    ``floor_rms`` measures against an RMS of at least that much: use the scale of the inputs
    (1 for ``random_inputs``) where the reference can be exactly zero, e.g. a gradient that
    vanishes in float64 while float32 leaves the residue of two cancelling order-one terms.
    Both zero gives 0; a non-finite value anywhere in ``actual`` gives inf.
    """
    actual, expected = actual.detach().double(), expected.detach().double()
    if not torch.isfinite(actual).all():
        return float("inf")
    denom = max(expected.norm().item(), floor_rms * expected.numel() ** 0.5)
    diff = (actual - expected.to(actual.device)).norm().item()
    if denom == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / denom


def forward_backward(op, inputs: RecurrenceInputs, *, seed: int = 1, **kwargs):
    """Call ``op`` on ``inputs`` and backpropagate fixed random cotangents.

    Returns ``(o, final_state, grads)`` with grads keyed by argument name. The cotangents are
    drawn in float64 from ``seed`` so that calls in different dtypes see the same ones.
    """
    delta = inputs.beta is not None
    o, final_state = op(**inputs.kwargs(delta=delta), output_final_state=True, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    loss = 0.0
    for out in (o, final_state):
        cotangent = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        loss = loss + (out.double() * cotangent.to(out.device)).sum()
    wrt = inputs.tensors()
    grads = torch.autograd.grad(loss, list(wrt.values()), allow_unused=True)
    return o.detach(), final_state.detach(), dict(zip(wrt, grads, strict=True))


def dg_by_scaling(inputs: RecurrenceInputs, dq: torch.Tensor, dv: torch.Tensor,
                  final_state: torch.Tensor, d_final_state: torch.Tensor) -> torch.Tensor:
    """dg [B, T, HV] from the op's dq, dv by the scaling identity of math.md §4.7: the
    reverse sum over each sequence of q·dq − v·dv, plus ⟨S_T, dS_T⟩. Needs HV = H (with GVA
    the identity takes each v head's own part of dq, which the op does not return)."""
    if inputs.q.shape[2] != inputs.v.shape[2]:
        raise ValueError("dg_by_scaling needs as many q/k heads as v heads")
    term = (inputs.q * dq).sum(-1) - (inputs.v * dv).sum(-1)
    tail = (final_state * d_final_state).sum((-2, -1))              # [N, HV]
    if inputs.cu_seqlens is None:
        return term.flip(1).cumsum(1).flip(1) + tail[:, None, :]
    bounds = inputs.cu_seqlens.tolist()
    dg = torch.empty_like(term)
    for n, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        dg[:, a:b] = term[:, a:b].flip(1).cumsum(1).flip(1) + tail[n]
    return dg
