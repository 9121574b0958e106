"""`gdn check`: the chunked path against the token-by-token reference on this machine.

Runs both recurrences on fresh random inputs, forward and backward, and reports the relative
error of the chunked path (float64 and float32) against the float64 reference, with the
time each path took. Returns whether every error is within the test suite's tolerances.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from gdn.ops import chunk_gated_delta_rule, chunk_gated_linear_attention
from gdn.testing import forward_backward, random_inputs, rel_error

# Same bounds as tests/ops/test_chunked_vs_reference.py: (outputs and states, gradients).
TOLERANCES = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-4)}
OPS = {"gated delta rule": chunk_gated_delta_rule,
       "gated linear attention (Mamba2)": chunk_gated_linear_attention}


@dataclass
class CheckRow:
    op: str
    dtype: str
    output_error: float
    state_error: float
    worst_grad: str
    grad_error: float
    seconds: float
    ok: bool


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def run_check(*, B: int, T: int, H: int, HV: int, K: int, V: int, chunk_size: int,
              seed: int) -> tuple[list[CheckRow], float]:
    """Compare the chunked path with the reference; returns rows and the reference's time."""
    rows, reference_seconds = [], 0.0
    for name, op in OPS.items():
        delta = op is chunk_gated_delta_rule
        x = random_inputs(B=B, T=T, H=H, HV=HV, K=K, V=V, delta=delta, initial_state=True,
                          seed=seed)
        expected, seconds = _timed(lambda op=op, x=x: forward_backward(
            op, x.to(torch.float64, True), backend="reference"))
        reference_seconds += seconds
        for dtype, (out_tol, grad_tol) in TOLERANCES.items():
            actual, seconds = _timed(lambda op=op, x=x, dtype=dtype: forward_backward(
                op, x.to(dtype, True), backend="torch", chunk_size=chunk_size))
            grad_errors = {k: rel_error(actual[2][k], g) for k, g in expected[2].items()}
            worst = max(grad_errors, key=grad_errors.get)
            row = CheckRow(op=name, dtype=str(dtype).removeprefix("torch."),
                           output_error=rel_error(actual[0], expected[0]),
                           state_error=rel_error(actual[1], expected[1]),
                           worst_grad=worst, grad_error=grad_errors[worst], seconds=seconds,
                           ok=False)
            row.ok = (max(row.output_error, row.state_error) <= out_tol
                      and row.grad_error <= grad_tol)
            rows.append(row)
    return rows, reference_seconds


def format_rows(rows: list[CheckRow]) -> str:
    header = (f"{'op':<32} {'dtype':<8} {'out err':>9} {'state err':>9} "
              f"{'worst grad err':>20} {'fwd+bwd s':>9}  ok")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r.op:<32} {r.dtype:<8} {r.output_error:>9.2e} {r.state_error:>9.2e} "
                     f"{r.worst_grad + ' ' + format(r.grad_error, '.2e'):>20} "
                     f"{r.seconds:>9.3f}  {'yes' if r.ok else 'NO'}")
    return "\n".join(lines)
