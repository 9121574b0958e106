"""Attention mixer: every route against a slow [T, T] reference, documents, and the KV cache.

Letters: B batch, T time, H query heads, H_kv key/value heads, D head dim, W window.
"""

import pytest
import torch

from gdn.layers.attention import Attention
from gdn.layers.attention_masks import masked_attention
from gdn.layers.cache import KVCache

D_MODEL = 32


def make_layer(*, heads=4, kv_heads=2, head_dim=12, window=None, dtype=torch.float64,
               seed=0, **kwargs) -> Attention:
    torch.manual_seed(seed)
    return Attention(D_MODEL, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                     window=window, rope_theta=100.0, **kwargs).to(dtype)


def same_weights(layer: Attention, **changes) -> Attention:
    """A layer with ``layer``'s weights and some constructor arguments changed."""
    args = dict(heads=layer.num_heads, kv_heads=layer.num_kv_heads, head_dim=layer.head_dim,
                window=layer.window, dtype=layer.q_proj.weight.dtype)
    other = make_layer(**{**args, **changes})
    other.load_state_dict(layer.state_dict())
    return other


def reference(layer: Attention, x: torch.Tensor, doc_lengths=None) -> torch.Tensor:
    """Slow attention: explicit [T, T] scores per row, masked, softmax. x [B, T, D_model]."""
    B, T, _ = x.shape
    H, H_kv, D = layer.num_heads, layer.num_kv_heads, layer.head_dim
    doc_lengths = doc_lengths or [T]
    pos = torch.cat([torch.arange(n) for n in doc_lengths])
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(doc_lengths)])
    angle = pos[:, None].double() * layer.rope_theta ** (-torch.arange(0, D, 2).double() / D)
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)  # [T, D/2]

    def rope(t):  # [B, T, heads, D]
        a, b = t[..., : D // 2], t[..., D // 2:]
        c, s = cos[:, None], sin[:, None]
        return torch.cat([a * c - b * s, b * c + a * s], dim=-1)

    q = rope((x @ layer.q_proj.weight.T).view(B, T, H, D))
    k = rope((x @ layer.k_proj.weight.T).view(B, T, H_kv, D))
    v = (x @ layer.v_proj.weight.T).view(B, T, H_kv, D)
    kv_head = torch.arange(H) // (H // H_kv)
    k, v = k[:, :, kv_head], v[:, :, kv_head]
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / D ** 0.5
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    mask = (j <= i) & (doc[:, None] == doc[None, :])
    if layer.window is not None:
        mask &= i - j < layer.window
    scores = scores.masked_fill(~mask, float("-inf"))
    o = torch.einsum("bhij,bjhd->bihd", scores.softmax(dim=-1), v)
    return o.reshape(B, T, H * D) @ layer.o_proj.weight.T


def outputs_and_grads(fn, layer, x):
    """fn(x) and the gradients of a fixed random projection of it w.r.t. x and weights."""
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad()
    out = fn(x)
    weight = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(7))
    weight = weight.to(out.device)
    (out * weight).sum().backward()
    grads = [x.grad] + [p.grad.clone() for p in layer.parameters()]
    return out.detach(), grads


def assert_same(a, b, *, rtol=1e-10, atol=1e-10):
    a_out, a_grads = a
    b_out, b_grads = b
    torch.testing.assert_close(a_out, b_out, rtol=rtol, atol=atol)
    for ga, gb in zip(a_grads, b_grads, strict=True):
        torch.testing.assert_close(ga, gb, rtol=rtol, atol=atol)


# ---- against the reference ----------------------------------------------------------------

@pytest.mark.parametrize("T", [13, 37])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (3, 3), (4, 1)])
@pytest.mark.parametrize("window", [None, 1, 3, 40])
@pytest.mark.parametrize("backend", ["auto", "masked"])
def test_matches_reference(T, heads, kv_heads, window, backend):
    layer = make_layer(heads=heads, kv_heads=kv_heads, window=window, backend=backend,
                       block_size=8)
    x = torch.randn(2, T, D_MODEL, dtype=torch.float64)
    assert_same(outputs_and_grads(layer, layer, x),
                outputs_and_grads(lambda x: reference(layer, x), layer, x))


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("backend", ["auto", "masked"])
def test_float32_error_within_twice_plain_torch(window, backend):
    """float32 layer vs float64 truth: at most 2× the float32 reference's error + a floor."""
    layer64 = make_layer(window=window, head_dim=20)
    layer32 = same_weights(layer64, dtype=torch.float32)
    layer32.backend, layer32.block_size = backend, 8
    x = torch.randn(2, 37, D_MODEL, dtype=torch.float64)
    truth = outputs_and_grads(lambda x: reference(layer64, x), layer64, x)
    fast = outputs_and_grads(layer32, layer32, x.float())
    plain = outputs_and_grads(lambda x: reference(layer32, x), layer32, x.float())
    for t, f, p in zip([truth[0], *truth[1]], [fast[0], *fast[1]], [plain[0], *plain[1]],
                       strict=True):
        fast_err = (f.double() - t).abs().max().item()
        plain_err = (p.double() - t).abs().max().item()
        assert fast_err <= 2 * plain_err + 1e-6 * t.abs().max().item(), (fast_err, plain_err)


def test_window_at_least_T_equals_full_attention():
    full = make_layer(window=None)
    x = torch.randn(2, 13, D_MODEL, dtype=torch.float64)
    expected = outputs_and_grads(full, full, x)
    for window in (13, 20):
        for backend in ("auto", "masked"):
            windowed = same_weights(full, window=window, backend=backend)
            assert_same(outputs_and_grads(windowed, windowed, x), expected)


# ---- packed documents ---------------------------------------------------------------------

@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("backend", ["auto", "masked"])
def test_packed_documents_equal_separate_runs(window, backend):
    layer = make_layer(window=window, backend=backend, block_size=4)
    lengths = [5, 1, 9, 4]
    cu = torch.tensor([0, 5, 6, 15, 19])
    x = torch.randn(1, sum(lengths), D_MODEL, dtype=torch.float64)
    packed = outputs_and_grads(lambda x: layer(x, cu_seqlens=cu), layer, x)

    def separate(x):
        return torch.cat([layer(part) for part in x.split(lengths, dim=1)], dim=1)

    assert_same(packed, outputs_and_grads(separate, layer, x))
    assert_same(packed, outputs_and_grads(lambda x: reference(layer, x, lengths), layer, x))


# ---- blocking -----------------------------------------------------------------------------

@pytest.mark.parametrize("window", [None, 1, 4])
def test_blocked_equals_unblocked(window):
    torch.manual_seed(1)
    T = 23
    q = torch.randn(2, 4, T, 12, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, T, 12, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, T, 12, dtype=torch.float64, requires_grad=True)
    pos = torch.tensor([list(range(10)) + list(range(13))] * 2)
    doc = torch.tensor([[0] * 10 + [1] * 13] * 2)

    def run(block_size):
        o = masked_attention(q, k, v, pos=pos, doc=doc, window=window, scale=0.3,
                             block_size=block_size)
        grads = torch.autograd.grad((o * o).sum(), (q, k, v))
        return o.detach(), list(grads)

    whole = run(None)
    for block_size in (1, 3, 7, T):
        assert_same(run(block_size), whole)


def test_window_blocks_only_see_reachable_keys(monkeypatch):
    """Memory O(T·W): each SDPA call of a long windowed sequence gets ≤ block + W − 1 keys."""
    from gdn.layers import attention_masks

    key_lengths = []
    real_sdpa = attention_masks.sdpa

    def recording_sdpa(q, k, v, **kwargs):
        key_lengths.append(k.shape[2])
        return real_sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(attention_masks, "sdpa", recording_sdpa)
    layer = make_layer(window=5, dtype=torch.float32, block_size=16)
    layer(torch.randn(1, 400, D_MODEL))
    assert len(key_lengths) == 25 and max(key_lengths) <= 16 + 5 - 1


# ---- KV cache -----------------------------------------------------------------------------

# Decode steps take another route without autograd (write first, attend over the cache).
@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("window", [None, 3])
def test_prefill_then_decode_equals_one_call(window, grad):
    """Prefill 4, then 5 more at once into the non-empty cache, then one token at a time."""
    layer = make_layer(window=window)
    x = torch.randn(2, 13, D_MODEL, dtype=torch.float64)
    expected = layer(x)
    cache = layer.new_cache(2, max_length=16, dtype=torch.float64, device="cpu")
    with torch.set_grad_enabled(grad):
        pieces = [layer(x[:, :4], cache=cache), layer(x[:, 4:9], cache=cache)]
        pieces += [layer(x[:, t:t + 1], cache=cache) for t in range(9, 13)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), expected, rtol=1e-10, atol=1e-10)
    assert cache.seen.tolist() == [13, 13]


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("window", [None, 3])
def test_ragged_prompts_prefilled_packed_then_decoded_by_row(window, grad):
    layer = make_layer(window=window)
    prompts, steps = [4, 1, 7], 6
    sequences = [torch.randn(1, n + steps, D_MODEL, dtype=torch.float64) for n in prompts]
    cache = layer.new_cache(3, max_length=16, dtype=torch.float64, device="cpu")
    packed = torch.cat([s[:, :n] for s, n in zip(sequences, prompts, strict=True)], dim=1)
    prefill = layer(packed, cu_seqlens=torch.tensor([0, 4, 5, 12]), cache=cache)
    assert cache.seen.tolist() == prompts
    with torch.set_grad_enabled(grad):
        decoded = [layer(torch.cat([s[:, n + t:n + t + 1]
                                    for s, n in zip(sequences, prompts, strict=True)]),
                         cache=cache)
                   for t in range(steps)]
    decoded = torch.cat(decoded, dim=1)  # [3, steps, D_model]
    for row, (s, n) in enumerate(zip(sequences, prompts, strict=True)):
        expected = layer(s)
        start = sum(prompts[:row])
        torch.testing.assert_close(prefill[:, start:start + n], expected[:, :n],
                                   rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(decoded[row:row + 1], expected[:, n:], rtol=1e-10,
                                   atol=1e-10)


def test_window_cache_memory_is_the_window():
    layer = make_layer(window=3, heads=4, kv_heads=2, head_dim=12)
    cache = layer.new_cache(2, max_length=1000, dtype=torch.float32, device="cpu")
    assert isinstance(cache, KVCache) and cache.window == 3
    assert cache.key.shape == cache.value.shape == (2, 2, 3, 12) and cache.slots == 3
    layer = layer.float()
    for _ in range(4):  # 20 tokens through 3 slots
        layer(torch.randn(2, 5, D_MODEL), cache=cache)
    assert cache.key.shape == (2, 2, 3, 12) and cache.seen.tolist() == [20, 20]
    full = make_layer(window=None).new_cache(2, max_length=50, dtype=torch.float32,
                                             device="cpu")
    assert full.key.shape == (2, 2, 50, 12) and full.window is None


def test_full_cache_overflow_raises():
    layer = make_layer()
    cache = layer.new_cache(2, max_length=6, dtype=torch.float64, device="cpu")
    layer(torch.randn(2, 5, D_MODEL, dtype=torch.float64), cache=cache)
    with pytest.raises(ValueError, match="max_length=6"):
        layer(torch.randn(2, 2, D_MODEL, dtype=torch.float64), cache=cache)
    assert cache.seen.tolist() == [5, 5]  # nothing written by the failed call


def test_cache_writes_detached_keys_and_keeps_dtype():
    layer = make_layer(window=4).float()
    cache = layer.new_cache(1, max_length=8, dtype=torch.bfloat16, device="cpu")
    out = layer(torch.randn(1, 6, D_MODEL), cache=cache)
    assert out.dtype == torch.float32 and cache.key.dtype == torch.bfloat16
    assert not cache.key.requires_grad and cache.key.abs().sum() > 0


# ---- bad arguments ------------------------------------------------------------------------

GOOD = dict(num_heads=4, num_kv_heads=2, head_dim=12)


@pytest.mark.parametrize("changes,error,field", [
    (dict(d_model=0), ValueError, "d_model"),
    (dict(d_model=32.0), TypeError, "d_model"),
    (dict(num_heads=0), ValueError, "num_heads"),
    (dict(num_heads=6, num_kv_heads=4), ValueError, "num_heads"),
    (dict(num_kv_heads=-2), ValueError, "num_kv_heads"),
    (dict(num_kv_heads="2"), TypeError, "num_kv_heads"),
    (dict(head_dim=11), ValueError, "head_dim"),
    (dict(head_dim=0), ValueError, "head_dim"),
    (dict(window=0), ValueError, "window"),
    (dict(window=-3), ValueError, "window"),
    (dict(window=2.5), TypeError, "window"),
    (dict(window=True), TypeError, "window"),
    (dict(rope_theta=0.0), ValueError, "rope_theta"),
    (dict(rope_theta=float("nan")), ValueError, "rope_theta"),
    (dict(rope_theta="big"), TypeError, "rope_theta"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(block_size=0), ValueError, "block_size"),
])
def test_bad_constructor_arguments(changes, error, field):
    args = {"d_model": D_MODEL, **GOOD, **changes}
    d_model = args.pop("d_model")
    with pytest.raises(error, match=field) as info:
        Attention(d_model, **args)
    assert "\n" not in str(info.value)


def test_bad_call_arguments():
    layer = make_layer(window=3)
    x = torch.randn(2, 5, D_MODEL, dtype=torch.float64)
    cache = layer.new_cache(2, max_length=8, dtype=torch.float64, device="cpu")
    cases = [
        (lambda: layer(x[:, :, :7]), ValueError, "x"),
        (lambda: layer(x, cu_seqlens=torch.tensor([0, 5])), ValueError, "cu_seqlens"),
        (lambda: layer(x[:1], cu_seqlens=torch.tensor([0, 2, 4])), ValueError, "cu_seqlens"),
        (lambda: layer(x[:1], cu_seqlens=torch.tensor([0.0, 5.0])), TypeError, "cu_seqlens"),
        (lambda: layer(x[:1], cache=cache), ValueError, "cache"),
        (lambda: layer(x, cache=(cache.key, cache.value)), TypeError, "cache"),
        (lambda: make_layer(window=4)(x, cache=cache), ValueError, "cache.window"),
        (lambda: make_layer(window=3, backend="flex")(x), ValueError, "flex"),
        (lambda: layer.new_cache(0, max_length=8, dtype=torch.float32, device="cpu"),
         ValueError, "batch_size"),
        (lambda: layer.new_cache(2, max_length=8, dtype=torch.int64, device="cpu"),
         TypeError, "dtype"),
    ]
    for call, error, field in cases:
        with pytest.raises(error, match=field):
            call()


# ---- CUDA routes --------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("window,lengths", [(None, None), (None, [70, 1, 129, 56]),
                                            (64, None), (64, [70, 1, 129, 56]), (300, None)])
def test_cuda_routes_match_masked_route(window, lengths):
    """auto (SDPA is_causal or flex_attention) vs the masked route on CUDA, float32."""
    torch.manual_seed(0)
    fast = Attention(128, num_heads=8, num_kv_heads=2, head_dim=64, window=window).cuda()
    slow = Attention(128, num_heads=8, num_kv_heads=2, head_dim=64, window=window,
                     backend="masked", block_size=64).cuda()
    slow.load_state_dict(fast.state_dict())
    T = 256
    cu = None if lengths is None else torch.tensor([0, *lengths], device="cuda").cumsum(0)
    x = torch.randn(1 if cu is not None else 2, T, 128, device="cuda")
    a = outputs_and_grads(lambda x: fast(x, cu_seqlens=cu), fast, x)
    b = outputs_and_grads(lambda x: slow(x, cu_seqlens=cu), slow, x)
    # The fused kernels may use TF32 in their dots and reorder the softmax sums.
    assert_same(a, b, rtol=5e-3, atol=5e-3)
