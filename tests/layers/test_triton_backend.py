"""The recurrent mixers on backend="triton" (Triton's CPU interpreter here, float32).

The chunked calls run the Triton kernels, the one-token decode steps the token loop (no
Triton decode kernel yet: ``step_backend``). Both must match the torch backend: float32
kernels agree with the float64 reference to ~1e-7 (tests/ops/test_triton.py), so 1e-5.
"""

import os

import pytest
import torch

from gdn.layers.gated_deltanet import GatedDeltaNet
from gdn.layers.mamba2 import Mamba2
from gdn.testing import rel_error

pytest.importorskip("triton")
# CPU tensors through Triton's interpreter, which tests/conftest.py turns on only where no
# GPU is visible; on a CUDA machine the gpu-marked tests run the kernels for real.
pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs TRITON_INTERPRET=1 (set by tests/conftest.py when no GPU is visible)")

D = 32
MIXERS = {
    "gdn": lambda b, **kw: GatedDeltaNet(D, num_heads=2, head_k_dim=16, head_v_dim=16,
                                         num_v_heads=4, backend=b, **kw),
    "mamba2": lambda b, **kw: Mamba2(D, num_heads=2, head_dim=16, state_size=16, backend=b,
                                     **kw),
}


@pytest.mark.parametrize("name", MIXERS)
def test_triton_backend_matches_torch_with_prefill_and_decode(name):
    torch.manual_seed(0)
    fast = MIXERS[name]("triton")
    slow = MIXERS[name]("torch")
    slow.load_state_dict(fast.state_dict())
    x = torch.randn(2, 70, D, generator=torch.Generator().manual_seed(1))
    assert rel_error(fast(x), slow(x)) <= 1e-5
    cache = fast.new_cache(2, max_length=72, dtype=x.dtype, device="cpu")
    prefill = fast(x[:, :69], cache=cache)
    step = fast(x[:, 69:], cache=cache)
    assert rel_error(torch.cat([prefill, step], dim=1), slow(x)) <= 1e-5


@pytest.mark.parametrize("name", MIXERS)
def test_recompute_false_reaches_the_op_and_changes_no_gradient(name, monkeypatch):
    """The layer's recompute=False is the op's (gdn.ops): the same output and parameter
    gradients bit for bit, and the backward runs no forward state pass. The recomputing
    forward's state pass would compute o itself (launch.fused_output), where the keeping one
    stores the states for output_forward, and the two outputs differ by rounding
    (tests/ops/test_triton_fused_output.py); that is turned off here, so the outputs and
    every gradient must be equal."""
    from gdn.ops.triton import launch, passes

    monkeypatch.setattr(launch, "fused_output", lambda K: False)
    torch.manual_seed(0)
    keeping = MIXERS[name]("triton", recompute=False)
    recomputing = MIXERS[name]("triton")
    recomputing.load_state_dict(keeping.state_dict())
    x = torch.randn(2, 70, D, generator=torch.Generator().manual_seed(2))
    passes_run = []
    forward_pass = passes.state_forward
    monkeypatch.setattr(passes, "state_forward",
                        lambda *a, **kw: passes_run.append(1) or forward_pass(*a, **kw))
    outputs = []
    dy = torch.randn(2, 70, D, generator=torch.Generator().manual_seed(3))
    for layer in (recomputing, keeping):
        passes_run.clear()
        y = layer(x)
        y.backward(dy)
        outputs.append((y, passes_run.copy()))
    assert torch.equal(outputs[0][0], outputs[1][0])
    assert outputs[0][1] == [1, 1] and outputs[1][1] == [1]
    for (n, p), (_, q) in zip(recomputing.named_parameters(), keeping.named_parameters(),
                              strict=True):
        assert torch.equal(p.grad, q.grad), n


@pytest.mark.parametrize("letter", ["G", "D"])
def test_the_model_configs_precise_state_reaches_the_op(letter, monkeypatch):
    """ModelConfig.precise_state goes to every delta-rule layer's chunked calls (gdn.ops);
    the one-token decode step, float32 inside, takes none."""
    from gdn.layers import gated_deltanet
    from gdn.models.config import ModelConfig
    from gdn.models.lm import build_mixer

    seen = []
    chunk_op = gated_deltanet.chunk_gated_delta_rule
    monkeypatch.setattr(gated_deltanet, "chunk_gated_delta_rule",
                        lambda *a, **kw: seen.append(kw["precise_state"]) or chunk_op(*a, **kw))
    for precise in (False, True):
        config = ModelConfig.from_preset("gdn-tiny", backend="triton", precise_state=precise)
        mixer = build_mixer(config, letter)
        mixer(torch.randn(1, 70, config.d_model))
    assert seen == [False, True]


@pytest.mark.parametrize("letter", ["G", "D", "M"])
def test_the_model_configs_recompute_choice_reaches_the_op(letter, monkeypatch):
    """ModelConfig.recompute, any of True, False and "all" (gdn.ops), goes to every
    recurrent layer's chunked calls, Mamba2's included (no Δ there: "all" is True)."""
    from gdn.layers import gated_deltanet, mamba2
    from gdn.models.config import ModelConfig
    from gdn.models.lm import build_mixer

    seen = []
    for module, name in ((gated_deltanet, "chunk_gated_delta_rule"),
                         (mamba2, "chunk_gated_linear_attention")):
        op = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, op=op, **kw: seen.append(kw["recompute"])
                            or op(*a, **kw))
    for choice in (True, False, "all"):
        config = ModelConfig.from_preset("gdn-tiny", backend="triton", recompute=choice)
        build_mixer(config, letter)(torch.randn(1, 70, config.d_model))
    assert seen == [True, False, "all"]
