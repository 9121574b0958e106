"""Gated DeltaNet, DeltaNet and Mamba2 layers: invariants of the cache and of packing.

Equalities run in float64, where the chunked and token-by-token paths are both exact
algorithms and agree to ~1e-14 (TOL 1e-10 leaves room without hiding a wrong tap or a lost
state row, which cost O(1)). One float32 check holds decode to 1e-4 of the chunked call.
Letters: B batch, T time, D model width, N sequences.
"""

import pytest
import torch

from gdn.layers.cache import KVCache, RecurrentCache
from gdn.layers.deltanet import DeltaNet
from gdn.layers.gated_deltanet import GatedDeltaNet
from gdn.layers.mamba2 import Mamba2
from gdn.testing import rel_error

D = 32
TOL = 1e-10
MIXERS = {
    "gdn": lambda **kw: GatedDeltaNet(D, num_heads=2, head_k_dim=12, head_v_dim=20,
                                      chunk_size=8, **kw),
    "gdn-gva-neg": lambda **kw: GatedDeltaNet(D, num_heads=1, head_k_dim=12, head_v_dim=20,
                                              num_v_heads=3, allow_neg_eigval=True,
                                              conv_size=3, chunk_size=8, **kw),
    "deltanet": lambda **kw: DeltaNet(D, num_heads=2, head_k_dim=12, head_v_dim=20,
                                      chunk_size=8, **kw),
    "deltanet-gva-neg": lambda **kw: DeltaNet(D, num_heads=2, head_k_dim=12, head_v_dim=12,
                                              num_v_heads=4, allow_neg_eigval=True,
                                              chunk_size=8, **kw),
    "mamba2": lambda **kw: Mamba2(D, num_heads=3, head_dim=12, state_size=8, chunk_size=8,
                                  **kw),
    "mamba2-groups": lambda **kw: Mamba2(D, num_heads=4, head_dim=10, state_size=6,
                                         n_groups=2, conv_size=3, chunk_size=8, **kw),
}
DOCS = [5, 1, 2, 7]  # a 1-token document and one shorter than W − 1


def _mixer(name, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    return MIXERS[name](backend="torch", **kw).to(dtype)


def _randn(*shape, seed=1, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def _cu(lengths):
    return torch.tensor([0, *lengths]).cumsum(0)


@pytest.mark.parametrize("name", MIXERS)
def test_decode_steps_equal_one_call(name):
    m = _mixer(name)
    x = _randn(2, 13, D)
    y = m(x)
    cache = m.new_cache(2, max_length=13, dtype=x.dtype, device="cpu")
    steps = torch.cat([m(x[:, t:t + 1], cache=cache) for t in range(13)], dim=1)
    assert rel_error(steps, y) <= TOL
    assert cache.seen.tolist() == [13, 13]
    # the chunked path writes the same state as the steps
    other = m.new_cache(2, max_length=13, dtype=x.dtype, device="cpu")
    m(x, cache=other)
    assert rel_error(other.recurrent_state, cache.recurrent_state) <= TOL
    assert rel_error(other.conv_state, cache.conv_state) <= TOL


@pytest.mark.parametrize("name", MIXERS)
def test_prefill_then_steps_equal_one_call(name):
    m = _mixer(name)
    x = _randn(2, 14, D)
    cache = m.new_cache(2, max_length=14, dtype=x.dtype, device="cpu")
    outputs = [m(x[:, :9], cache=cache)]
    outputs += [m(x[:, t:t + 1], cache=cache) for t in range(9, 14)]
    assert rel_error(torch.cat(outputs, dim=1), m(x)) <= TOL


@pytest.mark.parametrize("name", ["gdn-gva-neg", "mamba2-groups"])
def test_decode_float32(name):
    m = _mixer(name, dtype=torch.float32)
    x = _randn(2, 21, D, dtype=torch.float32)
    cache = m.new_cache(2, max_length=21, dtype=x.dtype, device="cpu")
    assert cache.recurrent_state.dtype == torch.float32
    with torch.no_grad():
        steps = torch.cat([m(x[:, t:t + 1], cache=cache) for t in range(21)], dim=1)
        assert rel_error(steps, m(x)) <= 1e-4


@pytest.mark.parametrize("name", MIXERS)
def test_packed_documents_equal_separate_runs(name):
    """Outputs and gradients (input and every parameter) of one packed call equal the
    separate runs: nothing, conv taps included, crosses a document boundary."""
    m = _mixer(name)
    x = _randn(1, sum(DOCS), D).requires_grad_()
    cotangent = _randn(1, sum(DOCS), D, seed=2)
    params = dict(m.named_parameters())

    y = m(x, cu_seqlens=_cu(DOCS))
    grads = torch.autograd.grad((y * cotangent).sum(), [x, *params.values()])

    ys = [m(part) for part in torch.split(x, DOCS, dim=1)]
    y_sep = torch.cat(ys, dim=1)
    grads_sep = torch.autograd.grad((y_sep * cotangent).sum(), [x, *params.values()])

    assert rel_error(y, y_sep) <= TOL
    for label, g, g_sep in zip(["x", *params], grads, grads_sep, strict=True):
        assert rel_error(g, g_sep) <= TOL, label


@pytest.mark.parametrize("name", MIXERS)
def test_ragged_prompts_prefilled_together_then_decoded(name):
    m = _mixer(name)
    steps = 4
    seqs = [_randn(1, L + steps, D, seed=10 + n) for n, L in enumerate(DOCS)]
    cache = m.new_cache(len(DOCS), max_length=20, dtype=torch.float64, device="cpu")
    prompts = torch.cat([s[:, :L] for s, L in zip(seqs, DOCS, strict=True)], dim=1)
    outputs = list(torch.split(m(prompts, cu_seqlens=_cu(DOCS), cache=cache), DOCS, dim=1))
    for i in range(steps):
        token = torch.cat([s[:, L + i:L + i + 1] for s, L in zip(seqs, DOCS, strict=True)])
        y = m(token, cache=cache)
        outputs = [torch.cat([o, y[n:n + 1]], dim=1) for n, o in enumerate(outputs)]
    assert cache.seen.tolist() == [L + steps for L in DOCS]
    for seq, out in zip(seqs, outputs, strict=True):
        assert rel_error(out, m(seq)) <= TOL


@pytest.mark.parametrize("name", MIXERS)
def test_backward_reaches_every_parameter(name):
    m = _mixer(name, dtype=torch.float32)
    x = _randn(2, 13, D, dtype=torch.float32).requires_grad_()
    y = m(x)
    (y * _randn(*y.shape, seed=3, dtype=torch.float32)).sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    for pname, p in m.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname
    expected = {"gdn": {"A_log", "dt_bias"}, "deltanet": set(), "mamba2": {"A_log", "dt_bias",
                                                                          "D", "conv.bias"}}
    assert expected[name.split("-")[0]] <= {n for n, _ in m.named_parameters()}


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3, 1e6])
@pytest.mark.parametrize("name", ["gdn", "gdn-gva-neg", "deltanet-gva-neg"])
def test_gate_and_beta_ranges(name, scale):
    m = _mixer(name, dtype=torch.float32)
    x = _randn(2, 9, D, dtype=torch.float32) * scale
    g, beta = m.gates(x)
    beta_max = 2.0 if m.allow_neg_eigval else 1.0
    assert (beta >= 0).all() and (beta <= beta_max).all()
    if g is None:
        assert name.startswith("deltanet")
    else:
        assert torch.isfinite(g).all() and (g <= 0).all()
    if scale >= 1e3:  # saturated: the extremes must be reachable
        assert beta.min() == 0 and beta.max() == beta_max


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3, 1e6])
def test_mamba2_steps_and_decays(scale):
    m = _mixer("mamba2", dtype=torch.float32)
    dt, g = m.time_steps(_randn(2, 9, D, dtype=torch.float32) * scale)
    assert torch.isfinite(g).all() and (g <= 0).all() and (dt >= 0).all()


def test_initialisation_is_mamba2s():
    m = _mixer("gdn")
    A = m.A_log.exp()
    dt = torch.nn.functional.softplus(m.dt_bias)
    assert ((A >= 1) & (A <= 16)).all()
    assert ((dt >= 1e-3 * (1 - 1e-9)) & (dt <= 0.1 * (1 + 1e-9))).all()
    mamba = _mixer("mamba2")
    assert torch.equal(mamba.D, torch.ones_like(mamba.D))


def _gdn_size(H, HV, K, V, W, decay=True):
    return (D * (2 * H * K + 3 * HV * V + (2 if decay else 1) * HV)
            + W * (2 * H * K + HV * V) + (2 * HV if decay else 0) + V)


def _mamba2_size(HV, P, G, S, W):
    inner = HV * P
    return D * (3 * inner + 2 * G * S + HV) + (W + 1) * (inner + 2 * G * S) + 3 * HV + inner


@pytest.mark.parametrize(("name", "size"), [
    ("gdn", _gdn_size(2, 2, 12, 20, 4)),
    ("gdn-gva-neg", _gdn_size(1, 3, 12, 20, 3)),
    ("deltanet", _gdn_size(2, 2, 12, 20, 4, decay=False)),
    ("deltanet-gva-neg", _gdn_size(2, 4, 12, 12, 4, decay=False)),
    ("mamba2", _mamba2_size(3, 12, 1, 8, 4)),
    ("mamba2-groups", _mamba2_size(4, 10, 2, 6, 3)),
])
def test_parameter_count_formula(name, size):
    assert sum(p.numel() for p in _mixer(name).parameters()) == size


def test_reference_backend_agrees():
    torch.manual_seed(0)
    x = _randn(1, 11, D)
    fast = _mixer("gdn-gva-neg")
    slow = MIXERS["gdn-gva-neg"](backend="reference").double()
    slow.load_state_dict(fast.state_dict())
    assert rel_error(slow(x, cu_seqlens=_cu([4, 7])), fast(x, cu_seqlens=_cu([4, 7]))) <= TOL


@pytest.mark.parametrize("name", ["gdn", "mamba2"])
def test_new_cache_layout(name):
    m = _mixer(name, dtype=torch.bfloat16)
    cache = m.new_cache(3, max_length=8, dtype=torch.bfloat16, device="cpu")
    assert isinstance(cache, RecurrentCache)
    assert cache.conv_state.dtype == torch.bfloat16
    assert cache.conv_state.shape == (3, m.conv_channels, m.conv_size - 1)
    assert cache.recurrent_state.dtype == torch.float32
    assert cache.recurrent_state.shape == (3, *m.state_shape)
    assert cache.seen.tolist() == [0, 0, 0]
    with torch.no_grad():  # bf16 activations run against the float32 state
        y = m(_randn(3, 5, D, dtype=torch.bfloat16), cache=cache)
    assert y.dtype == torch.bfloat16 and cache.seen.tolist() == [5, 5, 5]


@pytest.mark.parametrize("name", ["gdn", "mamba2"])
def test_bad_cache(name):
    m = _mixer(name)
    x = _randn(2, 3, D)
    with pytest.raises(ValueError, match="cache has 3 rows"):
        m(x, cache=m.new_cache(3, max_length=8, dtype=x.dtype, device="cpu"))
    kv = KVCache(key=x, value=x, seen=torch.zeros(2, dtype=torch.long), window=None)
    with pytest.raises(TypeError, match="cache must be a RecurrentCache"):
        m(x, cache=kv)
    with pytest.raises(ValueError, match="max_length"):
        m.new_cache(2, max_length=0, dtype=x.dtype, device="cpu")


GDN_ARGS = dict(num_heads=2, head_k_dim=12, head_v_dim=20)
MAMBA_ARGS = dict(num_heads=4, head_dim=12, state_size=8)


@pytest.mark.parametrize(("cls", "overrides", "error", "field"), [
    (GatedDeltaNet, dict(num_heads=0), ValueError, "num_heads"),
    (GatedDeltaNet, dict(head_k_dim=12.0), TypeError, "head_k_dim"),
    (GatedDeltaNet, dict(head_v_dim=-1), ValueError, "head_v_dim"),
    (GatedDeltaNet, dict(num_v_heads=3), ValueError, "num_v_heads"),
    (GatedDeltaNet, dict(conv_size=0), ValueError, "conv_size"),
    (GatedDeltaNet, dict(allow_neg_eigval=1), TypeError, "allow_neg_eigval"),
    (GatedDeltaNet, dict(norm_eps=-1e-6), ValueError, "norm_eps"),
    (GatedDeltaNet, dict(chunk_size=0), ValueError, "chunk_size"),
    (GatedDeltaNet, dict(backend="cuda"), ValueError, "backend"),
    (DeltaNet, dict(num_v_heads=5), ValueError, "num_v_heads"),
    (DeltaNet, dict(head_k_dim=True), TypeError, "head_k_dim"),
    (Mamba2, dict(n_groups=3), ValueError, "n_groups"),
    (Mamba2, dict(state_size=0), ValueError, "state_size"),
    (Mamba2, dict(head_dim=None), TypeError, "head_dim"),
    (Mamba2, dict(conv_size=2.5), TypeError, "conv_size"),
    (Mamba2, dict(backend=None), ValueError, "backend"),
])
def test_bad_constructor_arguments(cls, overrides, error, field):
    kwargs = {**(MAMBA_ARGS if cls is Mamba2 else GDN_ARGS), **overrides}
    with pytest.raises(error, match=field) as info:
        cls(D, **kwargs)
    assert "\n" not in str(info.value)


def test_bad_d_model():
    with pytest.raises(ValueError, match="d_model"):
        GatedDeltaNet(0, **GDN_ARGS)
    with pytest.raises(TypeError, match="d_model"):
        Mamba2("32", **MAMBA_ARGS)


def test_head_dims_default_to_the_papers_shape():
    """Key dim 0.75·d and value dim 1.5·d when the head dims are not given."""
    m = GatedDeltaNet(64, num_heads=4, num_v_heads=8)
    assert (m.key_dim, m.value_dim) == (48, 96) and (m.head_k_dim, m.head_v_dim) == (12, 12)
    d = DeltaNet(64, num_heads=2)
    assert (d.key_dim, d.value_dim) == (48, 96)
    with pytest.raises(ValueError, match="head_k_dim must be given"):
        GatedDeltaNet(64, num_heads=5)
