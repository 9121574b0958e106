"""ModelConfig: presets, derived sizes, overrides, and one-line errors that name the field."""

import pytest

from gdn.models import MIXERS, ModelConfig, preset_names

FAMILIES = ("gdn", "h1", "h2", "mamba2", "deltanet", "transformer")


def test_every_family_has_the_three_sizes():
    expected = {f"{family}-{size}" for family in FAMILIES for size in ("tiny", "0.4b", "1.3b")}
    assert set(preset_names()) == expected


@pytest.mark.parametrize("name", preset_names())
def test_presets_follow_the_paper_shapes(name):
    c = ModelConfig.from_preset(name)
    size = name.rsplit("-", 1)[1]
    if size != "tiny":
        assert (c.n_layers, c.d_model) == {"0.4b": (11, 1536), "1.3b": (16, 2400)}[size]
        assert c.vocab_size == 32000
    # Gated DeltaNet: key dim 0.75·d, value dim 1.5·d; conv 4.
    assert c.gdn_num_heads * c.gdn_head_k_dim * 4 == 3 * c.d_model
    assert c.gdn_num_v_heads * c.gdn_head_v_dim * 2 == 3 * c.d_model
    assert c.conv_size == 4
    family = name.rsplit("-", 1)[0]
    assert c.pattern == {"gdn": "G", "h1": "GS", "h2": "MGS", "mamba2": "M", "deltanet": "D",
                         "transformer": "A"}[family]
    if family in ("h1", "h2") and size != "tiny":
        assert c.window == 2048


def test_pattern_repeats_over_the_depth():
    c = ModelConfig.from_preset("h2-tiny", n_layers=7)
    assert "".join(c.layer_types) == "MGSMGSM"


def test_overrides_re_derive_sizes():
    c = ModelConfig.from_preset("gdn-0.4b", d_model=768)
    assert (c.gdn_head_k_dim, c.gdn_head_v_dim, c.mlp_hidden_size) == (64, 128, 2048)


def test_to_dict_round_trips():
    c = ModelConfig.from_preset("h2-1.3b")
    assert ModelConfig.from_dict(c.to_dict()) == c


def test_unknown_preset_lists_the_valid_names():
    with pytest.raises(ValueError, match="unknown preset 'gdn-7b'.*gdn-0.4b.*transformer-1.3b"):
        ModelConfig.from_preset("gdn-7b")


def test_unknown_override_lists_the_fields():
    with pytest.raises(ValueError, match="unknown ModelConfig field 'hidden'.*d_model"):
        ModelConfig.from_preset("gdn-tiny", hidden=3)


BAD = [
    (dict(pattern="GX"), ValueError, "pattern: unknown mixer letter 'X' at index 1"),
    (dict(pattern=""), ValueError, "pattern must be a non-empty string"),
    (dict(gdn_num_heads=5), ValueError, "gdn_num_heads=5 does not divide"),
    (dict(d_model=190), ValueError, "gdn_num_heads=3 does not divide the key dim"),
    (dict(attn_num_heads=5), ValueError, "attn_num_heads=5 does not divide d_model=192"),
    (dict(attn_num_kv_heads=2), ValueError, "attn_num_kv_heads=2 must divide attn_num_heads"),
    (dict(pattern="GS", window=0), ValueError, "window must be a positive int, got 0"),
    (dict(pattern="GS", window=-3), ValueError, "window must be a positive int, got -3"),
    (dict(pattern="S", window=None), ValueError, "window must be set"),
    (dict(gdn_num_v_heads=4), ValueError, "gdn_num_v_heads=4 must be a multiple"),
    (dict(mamba_head_dim=100), ValueError, "mamba_head_dim=100 does not divide"),
    (dict(mamba_n_groups=5), ValueError, "mamba_n_groups=5 must divide mamba_num_heads=12"),
    (dict(n_layers=0), ValueError, "n_layers must be a positive int, got 0"),
    (dict(vocab_size=2.5), TypeError, "vocab_size must be an int"),
    (dict(norm_eps=0.0), ValueError, "norm_eps must be a finite number > 0"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(tie_embeddings=1), TypeError, "tie_embeddings must be a bool"),
    (dict(recompute="no"), TypeError, "recompute must be True, False or 'all'"),
    (dict(recompute=1), TypeError, "recompute must be True, False or 'all'"),
    (dict(precise_state=1), TypeError, "precise_state must be a bool"),
    (dict(attn_head_dim=63), ValueError, "attn_head_dim must be even"),
]


@pytest.mark.parametrize(("overrides", "error", "message"), BAD)
def test_bad_configs_raise_one_line_errors_naming_the_field(overrides, error, message):
    with pytest.raises(error, match=message) as info:
        ModelConfig.from_preset("gdn-tiny", **overrides)
    assert "\n" not in str(info.value)


def test_mixer_letters_are_documented():
    assert set(MIXERS) == set("GDMSA")
