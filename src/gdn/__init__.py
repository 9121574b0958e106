"""gdn: Gated DeltaNet — the gated delta rule, its chunked training algorithm, and models."""

from gdn.ops import (
    chunk_gated_delta_rule,
    chunk_gated_linear_attention,
    fused_recurrent_gated_delta_rule,
    recurrent_gated_delta_rule,
    recurrent_gated_linear_attention,
)

__version__ = "0.1.0"

__all__ = [
    "chunk_gated_delta_rule",
    "chunk_gated_linear_attention",
    "fused_recurrent_gated_delta_rule",
    "recurrent_gated_delta_rule",
    "recurrent_gated_linear_attention",
]
