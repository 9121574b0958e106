"""``recompute=False`` on the Triton backend (launch.Kept): the forward hands Δ and the
chunk states to the backward, which skips the forward state pass. The kernels
are the same ones on the same inputs, so outputs and gradients must equal the recomputing
backward's bit for bit, in Triton's interpreter (CPU) as on a GPU.
"""


import pytest
import torch
from triton_cases import COMMON_CASES, case_inputs, interpreter_only, op_for

from gdn.ops import chunk_gated_delta_rule
from gdn.testing import forward_backward, random_inputs, rel_error

pytest.importorskip("triton")
pytestmark = interpreter_only

CASES = {
    **COMMON_CASES,
    "gva_varlen": (dict(T=150, H=2, HV=4, K=32, V=100, initial_state=True,
                        doc_lengths=[1, 70, 0, 14, 65]), True, False),
    "gated_segmented": (dict(B=2, T=300, H=1, HV=2, K=16, V=20, initial_state=True), True,
                        True),
    "gla_segmented": (dict(B=1, T=300, H=1, K=16, V=16, initial_state=True), False, True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_kept_tensors_give_the_same_gradients_bit_for_bit(case, dtype, monkeypatch):
    """recompute=True here recomputes Δ as well (keep_delta off): the same kernels on the
    same inputs. The default keeps Δ, rounded once more (test_triton_keep_delta.py)."""
    from gdn.ops.triton import launch

    monkeypatch.setattr(launch, "KEEP_DELTA", False)
    x, delta = case_inputs(CASES[case], dtype, 51, monkeypatch)
    runs = [forward_backward(op_for(delta), x, seed=6, backend="triton", recompute=recompute)
            for recompute in (True, False)]
    (o0, s0, g0), (o1, s1, g1) = runs
    # The recomputing forward's state pass computes o itself (launch.fused_output), the
    # keeping one stores the states for output_forward: o agrees to rounding.
    assert rel_error(o0, o1) <= (1e-6 if dtype == torch.float32 else 2e-3)
    assert torch.equal(s0, s1)
    assert g0.keys() == g1.keys()
    for name, grad in g0.items():
        assert torch.equal(grad, g1[name]), name


def test_the_backward_skips_the_recomputation(monkeypatch):
    """recompute=False: no forward state pass in the backward."""
    from gdn.ops.triton import passes

    launches = []
    original = passes.state_forward

    def counted(*args, **kwargs):
        launches.append("state_forward")
        return original(*args, **kwargs)
    monkeypatch.setattr(passes, "state_forward", counted)
    x = random_inputs(B=1, T=70, H=1, K=16, V=16, seed=52).to(torch.float32,
                                                              requires_grad=True)
    for recompute, in_backward in ((True, 1), (False, 0)):
        launches.clear()
        o, _ = chunk_gated_delta_rule(**x.kwargs(), backend="triton", recompute=recompute)
        assert launches == ["state_forward"]
        o.square().sum().backward()
        assert len(launches) == 1 + in_backward


@pytest.mark.parametrize("recompute", ["no", 1, "ALL", None])
def test_recompute_must_be_true_false_or_all(recompute):
    x = random_inputs(B=1, T=10, H=1, K=16, V=16, seed=53)
    with pytest.raises(TypeError, match="recompute must be True, False or 'all'"):
        chunk_gated_delta_rule(**x.kwargs(), backend="triton", recompute=recompute)
