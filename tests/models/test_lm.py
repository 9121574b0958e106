"""CausalLM: every family trains and decodes; prefill + decode equals one forward."""

import pytest
import torch

from gdn.models import CausalLM, ModelConfig
from gdn.testing import rel_error

FAMILIES = ("gdn", "h1", "h2", "mamba2", "deltanet", "transformer")


def tiny(family, **overrides):
    torch.manual_seed(0)
    return CausalLM(ModelConfig.from_preset(f"{family}-tiny", **overrides))


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_and_backward_are_finite(family):
    model = tiny(family)
    ids = torch.randint(0, model.config.vocab_size, (2, 13))
    out = model(ids, labels=ids)
    assert out.logits is None and out.loss.dtype == torch.float32
    # An untrained model is near-uniform over the vocabulary.
    assert abs(out.loss.item() - torch.log(torch.tensor(260.0)).item()) < 0.5
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    logits = model(ids).logits
    assert logits.shape == (2, 13, 260) and logits.dtype == torch.float32


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_prefill_then_decode_equals_the_full_forward(family):
    """Ragged prompts prefilled together (cu_seqlens), then 4 one-token steps for all rows;
    a window of 5 makes the sliding-window ring buffer wrap, chunks of 8 split the prompts."""
    model = tiny(family, window=5, chunk_size=8).eval()
    prompt_lengths, steps = [9, 1, 6], 4
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 256, (p + steps,), generator=gen) for p in prompt_lengths]
    with torch.no_grad():
        full = [model(s[None]).logits[0] for s in seqs]
        cache = model.new_cache(len(seqs), max_length=16)
        prompts = torch.cat([s[:p] for s, p in zip(seqs, prompt_lengths, strict=True)])[None]
        cu_seqlens = torch.tensor([0, *prompt_lengths]).cumsum(0)
        prefill = model(prompts, cu_seqlens=cu_seqlens, cache=cache).logits[0]
        for n, p in enumerate(prompt_lengths):
            got = prefill[cu_seqlens[n]:cu_seqlens[n + 1]]
            assert rel_error(got, full[n][:p]) <= 1e-4, (family, n)
        for s in range(steps):
            tokens = torch.stack([seq[p + s] for seq, p in zip(seqs, prompt_lengths,
                                                                strict=True)])
            step = model(tokens[:, None], cache=cache).logits[:, 0]
            expected = torch.stack([f[p + s] for f, p in zip(full, prompt_lengths, strict=True)])
            assert rel_error(step, expected) <= 1e-4, (family, s)
    assert cache.seen.tolist() == [p + steps for p in prompt_lengths]


def test_batched_prefill_without_cu_seqlens_then_decode():
    model = tiny("h2", window=4).eval()
    ids = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2, max_length=11)
        first = model(ids[:, :7], cache=cache).logits
        rest = [model(ids[:, t:t + 1], cache=cache).logits for t in range(7, 11)]
    assert rel_error(torch.cat([first, *rest], dim=1), full) <= 1e-4


def test_packed_documents_loss_equals_per_document_losses():
    model = tiny("h1", window=4, chunk_size=8)
    lengths = [5, 1, 7, 2]
    ids = torch.randint(0, 256, (1, sum(lengths)))
    cu_seqlens = torch.tensor([0, *lengths]).cumsum(0)
    packed = model(ids, labels=ids, cu_seqlens=cu_seqlens).loss
    total, count = 0.0, 0
    for n, length in enumerate(lengths):
        if length > 1:  # a one-token document has nothing to predict
            doc = ids[:, cu_seqlens[n]:cu_seqlens[n + 1]]
            total = total + model(doc, labels=doc).loss * (length - 1)
            count += length - 1
    assert rel_error(packed, total / count) <= 1e-5
    # ... and without cu_seqlens it differs: the documents would see each other.
    assert rel_error(model(ids, labels=ids).loss, total / count) > 1e-4


def test_model_cache_memory_is_bounded_by_the_window():
    model = tiny("h1", window=8)
    short = model.new_cache(2, max_length=16).nbytes()
    long = model.new_cache(2, max_length=100_000).nbytes()
    assert short == long
    gdn = tiny("gdn")
    assert gdn.new_cache(1, max_length=16).nbytes() == gdn.new_cache(1, max_length=10**6).nbytes()
    transformer = tiny("transformer")
    assert transformer.new_cache(1, max_length=64).nbytes() > \
        transformer.new_cache(1, max_length=16).nbytes()


def test_tied_and_untied_heads():
    tied, untied = tiny("gdn"), tiny("gdn", tie_embeddings=False)
    assert tied.head_weight is tied.embed.weight and tied.lm_head is None
    assert untied.head_weight is untied.lm_head.weight
    d, v = tied.config.d_model, tied.config.vocab_size
    assert untied.num_parameters() - tied.num_parameters() == d * v
    assert untied.num_parameters(include_embeddings=False) == \
        tied.num_parameters(include_embeddings=False)


def test_residual_output_projections_are_scaled_at_init():
    model = tiny("gdn", n_layers=8, d_model=384, gdn_num_heads=4)
    std = model.config.initializer_range
    mixer_out = model.blocks[0].mixer.out_proj.weight.std().item()
    down = model.blocks[0].mlp.down_proj.weight.std().item()
    up = model.blocks[0].mlp.up_proj.weight.std().item()
    assert abs(up / std - 1) < 0.05
    for got in (mixer_out, down):
        assert abs(got / (std / 4) - 1) < 0.05  # 1/√(2·8) = 1/4


def test_reset_parameters_initialises_every_parameter():
    """Built on the meta device and materialised with to_empty (as FSDP2 does), the model's
    reset_parameters must draw every parameter, the layers' own ones (A_log, dt_bias, D,
    conv, norm weights) included: to_empty leaves uninitialised memory."""
    config = ModelConfig.from_preset("h2-tiny")
    with torch.device("meta"):
        model = CausalLM(config)
    model.to_empty(device="cpu")
    for p in model.parameters():
        p.data.fill_(float("nan"))
    torch.manual_seed(0)
    model.reset_parameters()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
        if name.endswith("norm.weight"):
            assert (p == 1).all(), name
    for block in model.blocks:
        mixer = block.mixer
        if hasattr(mixer, "A_log"):
            A = mixer.A_log.exp()
            dt = torch.nn.functional.softplus(mixer.dt_bias)
            assert ((A >= 1) & (A <= 16)).all() and ((dt > 0.9e-3) & (dt < 0.11)).all()
        if hasattr(mixer, "D"):
            assert (mixer.D == 1).all()
    assert abs(model.blocks[0].mixer.out_proj.weight.std().item()
               / (config.initializer_range / (2 * config.n_layers) ** 0.5) - 1) < 0.1


def test_flops_per_token():
    model = tiny("transformer")
    c = model.config
    dense = 6 * (model.num_parameters(include_embeddings=False) + c.vocab_size * c.d_model)
    # Attention over the causal half: 3 · 4·H·Dh·(T + 1)/2 per layer.
    T = 100
    attention = 3 * 4 * c.attn_num_heads * c.attn_head_dim * (T + 1) / 2 * c.n_layers
    assert model.flops_per_token(T) == pytest.approx(dense + attention)
    gdn = tiny("gdn")
    assert gdn.flops_per_token(100) == gdn.flops_per_token(10_000)  # linear in T
    h1 = tiny("h1", window=64)
    assert h1.flops_per_token(10_000) < h1.flops_per_token(64) * 2


@pytest.mark.parametrize(("call", "message"), [
    (lambda m: m(torch.zeros(5, dtype=torch.long)), "input_ids must be a \\[B, T\\] tensor"),
    (lambda m: m(torch.zeros(1, 5)), "input_ids must be int64 or int32"),
    (lambda m: m(torch.zeros(2, 5, dtype=torch.long), cu_seqlens=torch.tensor([0, 5])),
     "B = 1 with cu_seqlens"),
    (lambda m: m(torch.zeros(1, 5, dtype=torch.long), labels=torch.zeros(1, 4,
                                                                         dtype=torch.long)),
     "labels must have input_ids' shape"),
    (lambda m: m(torch.zeros(1, 5, dtype=torch.long), cache=object()),
     "cache must be a ModelCache"),
    (lambda m: m.new_cache(0, max_length=4), "batch_size must be a positive int"),
    (lambda m: m.flops_per_token(0), "seq_len must be a positive int"),
])
def test_bad_calls_raise_one_line_errors(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call(tiny("gdn", n_layers=1))
