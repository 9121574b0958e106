"""Property tests (300 seeded configs): random shapes, gates from 0 to −10⁴, β at 0, 1, 2.

For every valid input the chunked path agrees with the reference in float64 and nothing,
forward or backward, is non-finite in float64 or float32. Errors are relative RMS with an RMS
floor of 1, the scale of the inputs (``rel_error(..., floor_rms=1.0)``): under a full reset
or at the first step a gradient can be exactly zero in float64.
"""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gdn.ops import chunk_gated_delta_rule, chunk_gated_linear_attention
from gdn.testing import forward_backward, random_inputs, rel_error

GATE_MODES = ["zero", "none", "realistic", "strong", "mixed"]
BETA_MODES = ["zero", "one", "two", "tiny", "uniform"]


def _gate(mode, shape, gen):
    if mode == "zero":
        return torch.zeros(shape, dtype=torch.float64)
    if mode == "strong":
        return torch.full(shape, -1e4, dtype=torch.float64)
    if mode == "mixed":  # every decay scale at once, including full reset
        levels = torch.tensor([0.0, -1e-3, -1.0, -30.0, -1e4], dtype=torch.float64)
        return levels[torch.randint(len(levels), shape, generator=gen)]
    return None  # "none" (g=None) and "realistic" (keep random_inputs' logsigmoid)


def _beta(mode, shape, gen):
    fixed = {"zero": 0.0, "one": 1.0, "two": 2.0, "tiny": 1e-6}
    if mode in fixed:
        return torch.full(shape, fixed[mode], dtype=torch.float64)
    return 2 * torch.rand(shape, generator=gen, dtype=torch.float64)


@st.composite
def problems(draw):
    H = draw(st.sampled_from([1, 2]))
    return dict(
        kind=draw(st.sampled_from(["delta", "linear"])),
        B=draw(st.integers(1, 2)),
        T=draw(st.integers(1, 300)),
        H=H,
        HV=H * draw(st.sampled_from([1, 2, 3])),
        K=draw(st.sampled_from([1, 4, 16, 60, 100])),
        V=draw(st.sampled_from([1, 5, 32, 60, 100])),
        chunk_size=draw(st.sampled_from([8, 16, 64])),
        gate=draw(st.sampled_from(GATE_MODES)),
        beta=draw(st.sampled_from(BETA_MODES)),
        initial_state=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


# derandomize: CI sees the same 300 configs every run, so a red CI is reproducible.
@settings(max_examples=300, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_chunked_matches_reference_and_stays_finite(p):
    delta = p["kind"] == "delta"
    x = random_inputs(B=p["B"], T=p["T"], H=p["H"], HV=p["HV"], K=p["K"], V=p["V"],
                      gate=p["gate"] != "none", delta=delta, initial_state=p["initial_state"],
                      seed=p["seed"])
    gen = torch.Generator().manual_seed(p["seed"])
    per_step = (p["B"], p["T"], p["HV"])
    gate = _gate(p["gate"], per_step, gen)
    if gate is not None:
        x.g = gate
    if delta:
        x.beta = _beta(p["beta"], per_step, gen)
    op = chunk_gated_delta_rule if delta else chunk_gated_linear_attention

    expected = forward_backward(op, x.to(torch.float64, True), backend="reference")
    actual = forward_backward(op, x.to(torch.float64, True), chunk_size=p["chunk_size"])
    # Error of a T-step product in float64: a few ulps per step, far below 1e-10.
    assert rel_error(actual[0], expected[0], floor_rms=1.0) <= 1e-10
    assert rel_error(actual[1], expected[1], floor_rms=1.0) <= 1e-10
    for name, grad in expected[2].items():
        assert rel_error(actual[2][name], grad, floor_rms=1.0) <= 1e-10, name

    fp32 = forward_backward(op, x.to(torch.float32, True), chunk_size=p["chunk_size"])
    assert rel_error(fp32[0], expected[0], floor_rms=1.0) <= 1e-5
    assert rel_error(fp32[1], expected[1], floor_rms=1.0) <= 1e-5
    for name, grad in fp32[2].items():
        assert rel_error(grad, expected[2][name], floor_rms=1.0) <= 1e-4, name

