"""The scaling identity of math.md §4.7 as a check on dg: in float64, the op's dg equals the
reverse sum over each sequence of q·dq − v·dv plus ⟨S_T, dS_T⟩, computed from its own dq and
dv. A wrong gate term anywhere in the backward breaks it; the kernels do not use it (it
cancels in low precision, benchmarks/dg_identity.py)."""

import pytest
import torch

from gdn.ops import chunk_gated_delta_rule, chunk_gated_linear_attention
from gdn.testing import dg_by_scaling, random_inputs, rel_error

CASES = {
    "gated": (dict(B=2, T=150, H=2, K=20, V=12, initial_state=True), True),
    "varlen": (dict(T=200, H=1, K=16, V=24, doc_lengths=[1, 70, 0, 129]), True),
    "gla": (dict(B=1, T=130, H=2, K=16, V=16, initial_state=True), False),
}


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_dg_equals_the_scaling_identity(case, backend):
    kwargs, delta = CASES[case]
    x = random_inputs(**kwargs, delta=delta, seed=21).to(torch.float64, requires_grad=True)
    x.g = (x.g.detach() * torch.linspace(0.0, 3.0, x.g.shape[1])[None, :, None]).requires_grad_()
    op = chunk_gated_delta_rule if delta else chunk_gated_linear_attention
    o, s = op(**x.kwargs(delta=delta), output_final_state=True, backend=backend)
    gen = torch.Generator().manual_seed(2)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64)
    ds = torch.randn(s.shape, generator=gen, dtype=torch.float64)
    dq, dv, dg = torch.autograd.grad((o * do).sum() + (s * ds).sum(), [x.q, x.v, x.g])
    assert rel_error(dg_by_scaling(x, dq, dv, s.detach(), ds), dg) <= 1e-10
