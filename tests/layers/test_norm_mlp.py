"""RMSNorm, GatedRMSNorm and SwiGLU against their formulas written out by hand.

Float64 comparisons are of the same arithmetic in a different order: 1e-12. Low-precision
inputs must give exactly the float32 computation cast back.
"""

import pytest
import torch
import torch.nn.functional as F

from gdn.layers.mlp import SwiGLU
from gdn.layers.norm import GatedRMSNorm, RMSNorm
from gdn.testing import rel_error

TOL = 1e-12


def _randn(*shape, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def _rms(x, eps):
    # rsqrt, as the layer does, so that the low-precision tests may ask for exact equality
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


def test_rmsnorm_formula():
    norm = RMSNorm(20, eps=1e-5).double()
    with torch.no_grad():
        norm.weight.copy_(_randn(20, seed=1))
    x = _randn(2, 7, 20)
    assert rel_error(norm(x), _rms(x, 1e-5) * norm.weight) <= TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rmsnorm_computes_in_float32(dtype):
    norm = RMSNorm(20)
    with torch.no_grad():
        norm.weight.copy_(_randn(20, seed=1, dtype=torch.float32))
    x = _randn(3, 20, dtype=dtype) * 30
    y = norm(x)
    assert y.dtype == dtype
    expected = (_rms(x.float(), 1e-6) * norm.weight).to(dtype)
    assert torch.equal(y, expected)


def test_gated_norm_then_gate_per_head():
    """Gated DeltaNet's convention: rmsnorm over each head's V, times weight, times silu."""
    HV, V = 3, 12
    norm = GatedRMSNorm(V, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.copy_(_randn(V, seed=1))
    x, gate = _randn(2, 5, HV, V, seed=2), _randn(2, 5, HV, V, seed=3)
    expected = torch.stack(
        [_rms(x[:, :, h], 1e-6) * norm.weight * F.silu(gate[:, :, h]) for h in range(HV)],
        dim=2)
    assert rel_error(norm(x, gate), expected) <= TOL


def test_gated_gate_then_norm_in_groups():
    """Mamba2's convention: rmsnorm(x · silu(z)) over each group of I / G channels."""
    inner, groups = 24, 3
    norm = GatedRMSNorm(inner, eps=1e-5, group_size=inner // groups,
                        gate_before_norm=True).double()
    with torch.no_grad():
        norm.weight.copy_(_randn(inner, seed=1))
    x, z = _randn(2, 5, inner, seed=2), _randn(2, 5, inner, seed=3)
    gated = x * F.silu(z)
    size = inner // groups
    expected = torch.cat([_rms(gated[..., i * size:(i + 1) * size], 1e-5)
                          for i in range(groups)], dim=-1) * norm.weight
    assert rel_error(norm(x, z), expected) <= TOL
    # the two conventions differ: the test above would catch a swapped flag
    other = GatedRMSNorm(inner, eps=1e-5, group_size=size).double()
    other.load_state_dict(norm.state_dict())
    assert rel_error(other(x, z), expected) > 1e-3


def test_gated_norm_bf16_output_dtype():
    norm = GatedRMSNorm(16)
    x, gate = _randn(4, 16, dtype=torch.bfloat16), _randn(4, 16, seed=1, dtype=torch.bfloat16)
    y = norm(x, gate)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, (_rms(x.float(), 1e-6) * F.silu(gate.float())).to(torch.bfloat16))


def test_swiglu_formula_and_size():
    mlp = SwiGLU(32, hidden_size=44).double()
    assert sum(p.numel() for p in mlp.parameters()) == 3 * 32 * 44
    assert all(m.bias is None for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    x = _randn(2, 5, 32)
    expected = (F.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)) \
        @ mlp.down_proj.weight.T
    assert rel_error(mlp(x), expected) <= TOL


@pytest.mark.parametrize(
    ("make", "error", "name"),
    [
        (lambda: RMSNorm(0), ValueError, "dim"),
        (lambda: RMSNorm(8, eps=0.0), ValueError, "eps"),
        (lambda: RMSNorm(8, eps="1e-6"), TypeError, "eps"),
        (lambda: GatedRMSNorm(12, group_size=5), ValueError, "group_size"),
        (lambda: GatedRMSNorm(12, gate_before_norm=None), TypeError, "gate_before_norm"),
        (lambda: SwiGLU(32, hidden_size=0), ValueError, "hidden_size"),
        (lambda: SwiGLU(32.0, hidden_size=8), TypeError, "d_model"),
    ],
)
def test_bad_arguments(make, error, name):
    with pytest.raises(error, match=name) as info:
        make()
    assert "\n" not in str(info.value)
