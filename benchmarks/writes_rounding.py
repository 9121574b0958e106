"""The 16-bit roundings of the chunk writes Δ, emulated in float64: u − w S from w and u handed
over in bf16 (the kernels before 2026-12-03) against A X formed in the state pass (math.md
§3.10), with A rounded to bf16 (hi alone, the default) or carried as hi + lo.

    python3 benchmarks/writes_rounding.py [--tokens 4096] [--out benchmarks/results/rounding]

Everything but the roundings the kernels make (the inputs, the state and the writes handed to
the products, the bf16 operands of the output's products) is float64, so the figures compare
the two forms' rounding alone, one head of (K, V) = (128, 128), chunks of 64, against the
same recurrence unrounded. Prints and saves the output's and final state's relative errors.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
import torch.nn.functional as F

C, K, V = 64, 128, 128
FORMS = ("w_u_handed_over", "a_hi", "a_hi_lo")


def _bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).double()


def errors(T: int, gated: bool, beta_max: float, seed: int = 0) -> dict[str, tuple]:
    """(output, final state) relative errors of each form against the unrounded recurrence."""
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)
    q, k, v = _bf16(normal(T, K)), _bf16(F.normalize(normal(T, K), dim=-1)), _bf16(normal(T, V))
    beta = _bf16(torch.rand(T, generator=gen, dtype=torch.float64) * beta_max)
    g = F.logsigmoid(normal(T) + 3) if gated else torch.zeros(T, dtype=torch.float64)
    exact = torch.zeros(K, V, dtype=torch.float64)
    states = {form: exact.clone() for form in FORMS}
    outs = {form: [] for form in (*FORMS, "exact")}
    for t0 in range(0, T, C):
        Kc, Vc, Qc, bc = k[t0:t0 + C], v[t0:t0 + C], q[t0:t0 + C], beta[t0:t0 + C]
        G = g[t0:t0 + C].cumsum(0)
        D = (G[:, None] - G[None, :]).exp().tril()
        A = torch.linalg.inv(torch.eye(len(G), dtype=torch.float64)
                             + (bc[:, None] * (Kc @ Kc.T) * D).tril(-1))
        u, w = A @ (bc[:, None] * Vc), A @ ((bc * G.exp())[:, None] * Kc)
        tail = (G[-1] - G).exp()
        delta = u - w @ exact
        outs["exact"].append(G.exp()[:, None] * (Qc @ exact) + ((Qc @ Kc.T) * D) @ delta)
        exact = G[-1].exp() * exact + Kc.T @ (tail[:, None] * delta)
        for form in FORMS:
            S = _bf16(states[form])          # the state as the passes' 16-bit operand
            if form == "w_u_handed_over":
                delta = _bf16(u) - _bf16(w) @ S
            else:
                X = _bf16(bc[:, None] * (Vc - G.exp()[:, None] * (Kc @ S)))
                hi = _bf16(A)
                delta = hi @ X + (_bf16(A - hi) @ X if form == "a_hi_lo" else 0.0)
            outs[form].append(G.exp()[:, None] * (Qc @ S) + _bf16((Qc @ Kc.T) * D)
                              @ _bf16(delta))
            states[form] = G[-1].exp() * states[form] + Kc.T @ _bf16(tail[:, None] * delta)
    o_exact = torch.cat(outs["exact"])
    return {form: ((torch.cat(outs[form]) - o_exact).norm().item() / o_exact.norm().item(),
                   (states[form] - exact).norm().item() / exact.norm().item())
            for form in FORMS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent / "results" / "rounding")
    args = parser.parse_args()
    configs = {"gated": (True, 1.0, args.tokens), "deltanet": (False, 1.0, args.tokens),
               "deltanet_beta2": (False, 2.0, args.tokens // 2)}
    rows = {}
    print(f"{'config':16} {'form':16} {'output':>8} {'state':>8}")
    for name, (gated, beta_max, T) in configs.items():
        for form, (o, s) in errors(T, gated, beta_max).items():
            rows.setdefault(name, {})[form] = dict(output=o, state=s, tokens=T)
            print(f"{name:16} {form:16} {o:8.2e} {s:8.2e}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "writes-rounding.json"
    path.write_text(json.dumps({"torch": torch.__version__, "machine": platform.machine(),
                                "K": K, "V": V, "chunk": C, "errors": rows}, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
