"""Layers of the Gated DeltaNet family: the mixers, the MLP and the norms.

Every mixer maps [B, T, D] → [B, T, D], accepts packed documents (``cu_seqlens``, state reset
at each boundary) and a per-layer generation cache (``cache.py``); see ``gdn.models`` for
how they stack into language models.
"""

from gdn.layers.attention import Attention
from gdn.layers.cache import KVCache, RecurrentCache
from gdn.layers.conv import ShortConvolution, causal_conv1d
from gdn.layers.deltanet import DeltaNet
from gdn.layers.gated_deltanet import GatedDeltaNet
from gdn.layers.mamba2 import Mamba2
from gdn.layers.mlp import SwiGLU
from gdn.layers.norm import GatedRMSNorm, RMSNorm
from gdn.layers.rope import apply_rope, rope_angles

__all__ = [
    "Attention",
    "DeltaNet",
    "GatedDeltaNet",
    "GatedRMSNorm",
    "KVCache",
    "Mamba2",
    "RMSNorm",
    "RecurrentCache",
    "ShortConvolution",
    "SwiGLU",
    "apply_rope",
    "causal_conv1d",
    "rope_angles",
]
