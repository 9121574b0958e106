"""One typed config for every model of the family, the layer pattern, and the presets.

A model is ``n_layers`` blocks [RMSNorm → mixer → residual, RMSNorm → SwiGLU → residual]; the
mixer of layer i is ``pattern[i % len(pattern)]``:

    G  Gated DeltaNet      D  DeltaNet      M  Mamba2
    S  sliding-window attention (``window`` tokens)      A  full causal attention

Sizes left as ``None`` are derived in ``__post_init__`` from ``d_model`` (so that
``from_preset("gdn-0.4b", d_model=768)`` re-derives them); the paper's ratios are the
defaults: Gated DeltaNet key dim 0.75·d and value dim 1.5·d, Mamba2 inner dim 2·d, SwiGLU
hidden ``mlp_ratio``·d rounded up to a multiple of 64. Every bad value raises a one-line
``ValueError``/``TypeError`` that names the field.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

from gdn.ops import BACKENDS
from gdn.ops.validate import check_recompute

__all__ = ["MIXERS", "ModelConfig", "PRESETS", "preset_names"]

MIXERS = {
    "G": "Gated DeltaNet",
    "D": "DeltaNet",
    "M": "Mamba2",
    "S": "sliding-window attention",
    "A": "full attention",
}
_MLP_MULTIPLE = 64  # hidden sizes that tile evenly on tensor cores


@dataclass
class ModelConfig:
    """Shapes and numerics of a causal LM; see the module docstring for the pattern letters."""

    vocab_size: int = 260
    d_model: int = 192
    n_layers: int = 6
    pattern: str = "G"
    # Gated DeltaNet and DeltaNet (G, D): q/k heads and dims; num_v_heads > heads is GVA.
    gdn_num_heads: int = 3
    gdn_head_k_dim: int | None = None  # default 0.75·d_model / gdn_num_heads
    gdn_head_v_dim: int | None = None  # default 2·gdn_head_k_dim (value dim 1.5·d_model)
    gdn_num_v_heads: int | None = None  # default gdn_num_heads
    allow_neg_eigval: bool = False
    # Attention (S, A).
    attn_num_heads: int = 3
    attn_num_kv_heads: int | None = None  # default attn_num_heads (no grouping)
    attn_head_dim: int | None = None  # default d_model / attn_num_heads
    window: int | None = 64  # tokens a sliding-window layer sees, itself included
    rope_theta: float = 10000.0
    # Mamba2 (M).
    mamba_num_heads: int | None = None  # default 2·d_model / mamba_head_dim (expand 2)
    mamba_head_dim: int = 32
    mamba_state_size: int = 32
    mamba_n_groups: int = 1
    # Shared.
    conv_size: int = 4
    mlp_ratio: float = 8 / 3
    mlp_hidden_size: int | None = None  # default mlp_ratio·d_model rounded up to 64
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    initializer_range: float = 0.02
    chunk_size: int = 64
    backend: str = "auto"
    # Triton backend, what each recurrent layer's backward forms again (gdn.ops, math.md
    # §4.6): True the chunk states from the kept Δ, "all" Δ too (least memory), False
    # nothing (the chunk states kept as well).
    recompute: bool | str = True
    # Triton backend with bf16/fp16: the recurrent (G, D) layers' state kept at about
    # float32 precision with 16-bit tiles, against the bf16 drift of a rule that never
    # forgets (DeltaNet with allow_neg_eigval, long sequences); ~40 % more kernel time
    # (gdn.ops).
    precise_state: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "gdn_num_heads", "attn_num_heads",
                     "mamba_head_dim", "mamba_state_size", "mamba_n_groups", "conv_size",
                     "chunk_size"):
            _check_positive_int(name, getattr(self, name))
        for name in ("gdn_head_k_dim", "gdn_head_v_dim", "gdn_num_v_heads",
                     "attn_num_kv_heads", "attn_head_dim", "mamba_num_heads",
                     "mlp_hidden_size"):
            if getattr(self, name) is not None:
                _check_positive_int(name, getattr(self, name))
        for name in ("rope_theta", "mlp_ratio", "norm_eps", "initializer_range"):
            _check_positive_float(name, getattr(self, name))
        check_recompute(self.recompute)
        for name in ("allow_neg_eigval", "tie_embeddings", "precise_state"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        self._check_pattern()
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; "
                             f"got {self.backend!r}")
        self._derive_recurrent()
        self._derive_attention()
        self._derive_mamba()
        if self.mlp_hidden_size is None:
            wanted = round(self.mlp_ratio * self.d_model)  # 8/3·1536 is 4095.99…, not 4097
            self.mlp_hidden_size = -(-wanted // _MLP_MULTIPLE) * _MLP_MULTIPLE

    def _check_pattern(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ValueError(f"pattern must be a non-empty string of mixer letters "
                             f"({', '.join(MIXERS)}); got {self.pattern!r}")
        for i, letter in enumerate(self.pattern):
            if letter not in MIXERS:
                raise ValueError(f"pattern: unknown mixer letter {letter!r} at index {i} of "
                                 f"{self.pattern!r}; valid letters: {', '.join(MIXERS)}")
        if "S" in self.layer_types:
            if self.window is None:
                raise ValueError("window must be set (an int > 0) when the pattern has "
                                 "S (sliding-window attention) layers; got None")
            _check_positive_int("window", self.window)
        elif self.window is not None:
            _check_positive_int("window", self.window)

    def _derive_recurrent(self) -> None:
        heads = self.gdn_num_heads
        if self.gdn_head_k_dim is None:
            key_dim = 3 * self.d_model / 4
            if key_dim != int(key_dim) or int(key_dim) % heads:
                raise ValueError(f"gdn_num_heads={heads} does not divide the key dim "
                                 f"0.75·d_model = {key_dim:g}; set gdn_head_k_dim or change "
                                 f"gdn_num_heads")
            self.gdn_head_k_dim = int(key_dim) // heads
        if self.gdn_head_v_dim is None:
            self.gdn_head_v_dim = 2 * self.gdn_head_k_dim
        if self.gdn_num_v_heads is None:
            self.gdn_num_v_heads = heads
        if self.gdn_num_v_heads % heads:
            raise ValueError(f"gdn_num_v_heads={self.gdn_num_v_heads} must be a multiple of "
                             f"gdn_num_heads={heads} (grouped value heads)")

    def _derive_attention(self) -> None:
        heads = self.attn_num_heads
        if self.attn_head_dim is None:
            if self.d_model % heads:
                raise ValueError(f"attn_num_heads={heads} does not divide "
                                 f"d_model={self.d_model}; set attn_head_dim or change "
                                 f"attn_num_heads")
            self.attn_head_dim = self.d_model // heads
        if self.attn_head_dim % 2:
            raise ValueError(f"attn_head_dim must be even (RoPE rotates pairs); "
                             f"got {self.attn_head_dim}")
        if self.attn_num_kv_heads is None:
            self.attn_num_kv_heads = heads
        if heads % self.attn_num_kv_heads:
            raise ValueError(f"attn_num_kv_heads={self.attn_num_kv_heads} must divide "
                             f"attn_num_heads={heads} (grouped key/value heads)")

    def _derive_mamba(self) -> None:
        if self.mamba_num_heads is None:
            inner = 2 * self.d_model
            if inner % self.mamba_head_dim:
                raise ValueError(f"mamba_head_dim={self.mamba_head_dim} does not divide the "
                                 f"inner dim 2·d_model = {inner}; set mamba_num_heads or "
                                 f"change mamba_head_dim")
            self.mamba_num_heads = inner // self.mamba_head_dim
        if self.mamba_num_heads % self.mamba_n_groups:
            raise ValueError(f"mamba_n_groups={self.mamba_n_groups} must divide "
                             f"mamba_num_heads={self.mamba_num_heads}")

    @property
    def layer_types(self) -> tuple[str, ...]:
        """The mixer letter of every layer, [n_layers]."""
        return tuple(self.pattern[i % len(self.pattern)] for i in range(self.n_layers))

    def to_dict(self) -> dict:
        """Every field, derived ones resolved (round-trips through ``from_dict``)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        """A config from field values; unknown keys raise a one-line error listing the fields."""
        _check_fields(values)
        return cls(**values)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> ModelConfig:
        """A preset by name (see ``preset_names()``) with keyword overrides of any field."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; valid presets: "
                             f"{', '.join(preset_names())}")
        _check_fields(overrides)
        return cls(**{**PRESETS[name], **overrides})


def _check_fields(values: dict) -> None:
    valid = [f.name for f in dataclasses.fields(ModelConfig)]
    unknown = [key for key in values if key not in valid]
    if unknown:
        raise ValueError(f"unknown ModelConfig field {unknown[0]!r}; valid fields: "
                         f"{', '.join(valid)}")


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")


def _check_positive_float(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not 0 < float(value) < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


# --- presets -------------------------------------------------------------------------------
#
# Shapes from ANCHORS.md (the paper's official configs): 0.4B = 11 layers × 1536 wide,
# 1.3B = 16 × 2400; Gated DeltaNet key dim 0.75·d, value dim 1.5·d, short conv 4; H1 = G, S
# alternating with a 2K window; H2 = M, G, S. Choices ANCHORS leaves open, and why:
# - vocab 32,000 (the paper's Llama-2 tokenizer) with tied embeddings: untied, the 32K × d
#   head would add 49M / 77M and push gdn-1.3b to 1.44B, outside 10% of 1.3B.
# - A Gated DeltaNet mixer holds 6·d² (q, k: 0.75·d²; v, gate, out: 1.5·d²) and the SwiGLU
#   8·d² at hidden 8/3·d (4096 at 1536, 6400 at 2400), so a block is ≈14·d². The other
#   families are sized to the same ≈14·d² per block, so families compare at equal size:
#   Mamba2 at expand 2 (in_proj 4·d² + out_proj 2·d²) keeps the 8/3 MLP; DeltaNet uses the
#   Gated DeltaNet projections (the only difference is the gate); attention holds 4·d², so the
#   Transformer's SwiGLU is 10/3·d (5120 at 1536, 8000 at 2400). Hybrids keep 8/3 everywhere
#   (their S blocks are 12·d²), which lands H1/H2 a few percent under GDN.
# - Heads at 1536: 9 Gated DeltaNet heads (the paper's; k 128, v 256), attention 12 × 128,
#   Mamba2 48 × 64 with state 128. At 2400 = 2⁵·75 no head dim of 128 divides: 15 Gated
#   DeltaNet heads (k 120, v 240: the nearest to 0.4b's 128/256, which pad to the same
#   power-of-two kernel tiles) and attention 20 × 120; Mamba2 75 × 64.
# The README "## Models" table lists what these give (a test keeps it in step).

_SIZES = {
    "0.4b": dict(vocab_size=32000, d_model=1536, n_layers=11, gdn_num_heads=9,
                 attn_num_heads=12, window=2048, mamba_head_dim=64, mamba_state_size=128),
    "1.3b": dict(vocab_size=32000, d_model=2400, n_layers=16, gdn_num_heads=15,
                 attn_num_heads=20, window=2048, mamba_head_dim=64, mamba_state_size=128),
    # A few million parameters over bytes (256 + 4 specials): CPU tests and demos in seconds.
    "tiny": dict(vocab_size=260, d_model=192, n_layers=6, gdn_num_heads=3,
                 attn_num_heads=3, window=64, mamba_head_dim=32, mamba_state_size=32),
}
_FAMILIES = {
    "gdn": dict(pattern="G"),
    "h1": dict(pattern="GS"),
    "h2": dict(pattern="MGS"),
    "mamba2": dict(pattern="M"),
    "deltanet": dict(pattern="D"),
    "transformer": dict(pattern="A", mlp_ratio=10 / 3),
}

PRESETS: dict[str, dict] = {
    f"{family}-{size}": {**shape, **fields}
    for family, fields in _FAMILIES.items()
    for size, shape in _SIZES.items()
}


def preset_names() -> list[str]:
    return list(PRESETS)
