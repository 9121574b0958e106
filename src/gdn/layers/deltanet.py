"""DeltaNet (Yang et al., 2024): Gated DeltaNet without the decay gate (math.md §1.4).

A thin subclass: the layer is written once, in gated_deltanet.py, and ``use_decay_gate``
is the only difference. DeltaNet keeps the output gate and gated norm of the paper's GDN
layer so that the comparison isolates the decay.
"""

from __future__ import annotations

from gdn.layers.gated_deltanet import GatedDeltaNet


class DeltaNet(GatedDeltaNet):
    """DeltaNet token mixer: x [B, T, D] → [B, T, D]; the delta rule with α ≡ 1 (g = None)."""

    def __init__(
        self, d_model: int, *, num_heads: int, head_k_dim: int | None = None,
        head_v_dim: int | None = None, num_v_heads: int | None = None, conv_size: int = 4,
        allow_neg_eigval: bool = False,
        norm_eps: float = 1e-6, chunk_size: int = 64, backend: str = "auto",
        recompute: bool | str = True, precise_state: bool = False,
    ) -> None:
        super().__init__(d_model, num_heads=num_heads, head_k_dim=head_k_dim,
                         head_v_dim=head_v_dim, num_v_heads=num_v_heads, conv_size=conv_size,
                         allow_neg_eigval=allow_neg_eigval, norm_eps=norm_eps,
                         chunk_size=chunk_size, backend=backend, recompute=recompute,
                         use_decay_gate=False, precise_state=precise_state)
