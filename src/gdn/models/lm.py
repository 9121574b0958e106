"""The causal language model of every family: embedding → blocks → norm → head.

Letters: B batch, T time, D d_model, V vocab, N documents (``cu_seqlens``) or cache rows.

    x = embed(input_ids)
    for each layer i (mixer letter config.layer_types[i]):
        x = x + mixer_i(rmsnorm(x))            G, D, M, S or A (config.py)
        x = x + swiglu_i(rmsnorm(x))
    logits = rmsnorm(x) @ headᵀ                head = embed.weight when tie_embeddings
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from gdn.layers.attention import Attention
from gdn.layers.deltanet import DeltaNet
from gdn.layers.gated_deltanet import GatedDeltaNet
from gdn.layers.mamba2 import Mamba2
from gdn.layers.mlp import SwiGLU
from gdn.layers.norm import RMSNorm
from gdn.models.cache import ModelCache, new_model_cache
from gdn.models.config import ModelConfig
from gdn.models.loss import chunked_cross_entropy, next_token_targets

__all__ = ["Block", "CausalLM", "CausalLMOutput", "build_mixer"]

# The projections that write into the residual stream, by attribute name in each layer.
_RESIDUAL_OUTPUTS = ("out_proj", "o_proj", "down_proj")


def build_mixer(config: ModelConfig, letter: str) -> nn.Module:
    """The token mixer for one pattern letter (see config.py)."""
    if letter in "GD":
        cls = GatedDeltaNet if letter == "G" else DeltaNet
        return cls(config.d_model, num_heads=config.gdn_num_heads,
                   head_k_dim=config.gdn_head_k_dim, head_v_dim=config.gdn_head_v_dim,
                   num_v_heads=config.gdn_num_v_heads, conv_size=config.conv_size,
                   allow_neg_eigval=config.allow_neg_eigval, norm_eps=config.norm_eps,
                   chunk_size=config.chunk_size, backend=config.backend,
                   recompute=config.recompute, precise_state=config.precise_state)
    if letter == "M":
        return Mamba2(config.d_model, num_heads=config.mamba_num_heads,
                      head_dim=config.mamba_head_dim, state_size=config.mamba_state_size,
                      n_groups=config.mamba_n_groups, conv_size=config.conv_size,
                      norm_eps=config.norm_eps, chunk_size=config.chunk_size,
                      backend=config.backend, recompute=config.recompute)
    assert letter in "SA", letter  # config validated the pattern
    return Attention(config.d_model, num_heads=config.attn_num_heads,
                     num_kv_heads=config.attn_num_kv_heads, head_dim=config.attn_head_dim,
                     window=config.window if letter == "S" else None,
                     rope_theta=config.rope_theta)


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then + SwiGLU(norm(x)); [B, T, D]."""

    def __init__(self, config: ModelConfig, letter: str) -> None:
        super().__init__()
        self.letter = letter
        self.mixer_norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.mixer = build_mixer(config, letter)
        self.mlp_norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.mlp = SwiGLU(config.d_model, hidden_size=config.mlp_hidden_size)

    def forward(self, x: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None,
                cache=None) -> torch.Tensor:
        x = x + self.mixer(self.mixer_norm(x), cu_seqlens=cu_seqlens, cache=cache)
        return x + self.mlp(self.mlp_norm(x))


@dataclass
class CausalLMOutput:
    """loss: mean next-token cross-entropy, a float32 scalar (float64 for a float64 model),
    when labels were given, else None.
    logits: [B, T, V] float32 (float64 likewise), or None when not asked for — the default
    when labels are given, since the loss never builds them for the whole batch."""

    loss: torch.Tensor | None
    logits: torch.Tensor | None


class CausalLM(nn.Module):
    """A causal LM built from a ``ModelConfig``; see the module docstring."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, letter) for letter in config.layer_types)
        self.norm = RMSNorm(config.d_model, eps=config.norm_eps)
        # Tied: no separate head parameter at all, so state dicts hold the matrix once.
        self.lm_head = (None if config.tie_embeddings
                        else nn.Linear(config.d_model, config.vocab_size, bias=False))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """normal(0, σ) for every nn.Linear / nn.Embedding weight, σ = initializer_range,
        and σ / √(2·n_layers) for the projections that write into the residual stream
        (mixer out_proj / o_proj, SwiGLU down_proj), as GPT-2 does and fla's Gated DeltaNet
        does: the residual stream sums 2·n_layers such outputs, and this keeps its variance
        at initialisation independent of the depth. The layers' own parameters (A_log,
        dt_bias, D, conv and norm weights) are drawn by their reset_parameters() first, so
        this re-initialises the whole model (e.g. after ``to_empty`` from the meta device)."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters") and \
                    not isinstance(module, (nn.Linear, nn.Embedding)):
                module.reset_parameters()
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for block in self.blocks:
            for layer in (block.mixer, block.mlp):
                outputs = [getattr(layer, name) for name in _RESIDUAL_OUTPUTS
                           if isinstance(getattr(layer, name, None), nn.Linear)]
                assert len(outputs) == 1, f"{type(layer).__name__}: no single output projection"
                nn.init.normal_(outputs[0].weight, mean=0.0, std=residual_std)

    def init_projection(self, module: nn.Linear | nn.Embedding) -> None:
        """Redraw one nn.Linear / nn.Embedding of this model as ``reset_parameters`` does
        (for weights a checkpoint lacked; see ``hf.GDNForCausalLM._init_weights``)."""
        std = self.config.initializer_range
        if any(getattr(layer, name, None) is module for block in self.blocks
               for layer in (block.mixer, block.mlp) for name in _RESIDUAL_OUTPUTS):
            std /= math.sqrt(2 * self.config.n_layers)
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)

    @property
    def head_weight(self) -> torch.Tensor:
        """The LM head [V, D] (the embedding matrix when tied)."""
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def hidden_states(self, input_ids: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None,
                      cache: ModelCache | None = None) -> torch.Tensor:
        """The final-normed hidden states [B, T, D] of input_ids [B, T]."""
        self._check_inputs(input_ids, cu_seqlens, cache)
        x = self.embed(input_ids)
        for i, block in enumerate(self.blocks):
            x = block(x, cu_seqlens=cu_seqlens, cache=None if cache is None else cache.layers[i])
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits [..., V] of hidden states [..., D], in float32 (float64 for
        a float64 model)."""
        logits = torch.nn.functional.linear(hidden, self.head_weight)
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, cache: ModelCache | None = None, *,
                return_logits: bool | None = None) -> CausalLMOutput:
        """input_ids [B, T] → loss and/or logits [B, T, V].

        labels [B, T] (usually input_ids): position t is trained to predict labels[t + 1];
        −100 is ignored; with ``cu_seqlens`` [N + 1] (packed documents, B = 1) the last token
        of a document predicts nothing. The loss is computed in chunks of tokens
        (``loss.chunked_cross_entropy``). ``return_logits`` defaults to ``labels is None``.
        ``cache`` (``new_cache``) is read and advanced in place: see ``ModelCache``.
        """
        hidden = self.hidden_states(input_ids, cu_seqlens=cu_seqlens, cache=cache)
        loss = None if labels is None else self.loss(hidden, labels, cu_seqlens=cu_seqlens)
        if return_logits is None:
            return_logits = labels is None
        return CausalLMOutput(loss=loss, logits=self.logits(hidden) if return_logits else None)

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor, *,
             cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy of hidden states [B, T, D] against labels [B, T]
        (the shift and the document boundaries as in ``forward``), float32 scalar."""
        if labels.shape != hidden.shape[:2]:
            raise ValueError(f"labels must have input_ids' shape {tuple(hidden.shape[:2])}; "
                             f"got {tuple(labels.shape)}")
        targets = next_token_targets(labels, cu_seqlens)
        return chunked_cross_entropy(hidden, self.head_weight, targets)

    def new_cache(self, batch_size: int, *, max_length: int, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> ModelCache:
        """A zeroed generation cache of ``batch_size`` rows for up to ``max_length`` tokens
        per row (only full-attention layers allocate by it). dtype/device default to the
        parameters'; recurrent states are float32 whatever dtype is."""
        weight = self.embed.weight
        return new_model_cache([block.mixer for block in self.blocks], batch_size,
                               max_length=max_length, dtype=dtype or weight.dtype,
                               device=device or weight.device)

    def num_parameters(self, include_embeddings: bool = True) -> int:
        """Parameter count; without embeddings it leaves out the embedding matrix and an
        untied LM head (the convention of the scaling-law papers)."""
        total = sum(p.numel() for p in self.parameters())
        if include_embeddings:
            return total
        embedding = self.embed.weight.numel()
        return total - embedding - (0 if self.lm_head is None else self.lm_head.weight.numel())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token at sequence length T = seq_len:

            6·(N_non-embedding + V·D) + 3·Σ_layers mixer_sequence_flops(T)

        6·N for every weight matmul (2 forward, 4 backward), the LM head's V·D included
        (its matmul is work even when tied); the mixers' token-mixing work is counted as
        3× its forward. Per token, per layer, forward:
        - A: 4·H·Dh·(T + 1)/2 — q·k and p·v over the causal half (PaLM counts 2× this);
        - S: 4·H·Dh·mean_p min(p + 1, W);
        - G, D: HV·(6·K·V + 6·C·K + 4·C·V + C²/3), the chunked algorithm's cost model
          (ANCHORS.md; C = chunk_size);
        - M: H·(4·N·P + 2·C·N + 2·C·P), state update and readout plus the intra-chunk
          scores and mix (N = state_size, P = head_dim).
        Norms, convs, gates and the softmax are left out (< 1%).
        """
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
        c = self.config
        dense = self.num_parameters(include_embeddings=False) + c.vocab_size * c.d_model
        mixing = sum(_mixer_forward_flops(c, letter, seq_len) for letter in c.layer_types)
        return 6.0 * dense + 3.0 * mixing

    def _check_inputs(self, input_ids, cu_seqlens, cache) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a [B, T] tensor; got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be int64 or int32, got {input_ids.dtype}")
        if cu_seqlens is not None and input_ids.shape[0] != 1:
            raise ValueError(f"input_ids must have B = 1 with cu_seqlens (packed documents); "
                             f"got B = {input_ids.shape[0]}")
        if cache is not None and (not isinstance(cache, ModelCache)
                                  or len(cache.layers) != len(self.blocks)):
            raise ValueError(f"cache must be a ModelCache from new_cache() with "
                             f"{len(self.blocks)} layers")


def _mixer_forward_flops(c: ModelConfig, letter: str, T: int) -> float:
    """Forward FLOPs per token of one mixer's token mixing (see CausalLM.flops_per_token)."""
    C = c.chunk_size
    if letter in "GD":
        K, V, HV = c.gdn_head_k_dim, c.gdn_head_v_dim, c.gdn_num_v_heads
        return HV * (6 * K * V + 6 * C * K + 4 * C * V + C * C / 3)
    if letter == "M":
        N, P = c.mamba_state_size, c.mamba_head_dim
        return c.mamba_num_heads * (4 * N * P + 2 * C * N + 2 * C * P)
    W = T if letter == "A" else min(c.window, T)
    mean_keys = (W * (W + 1) / 2 + (T - W) * W) / T  # mean over p < T of min(p + 1, W)
    return 4 * c.attn_num_heads * c.attn_head_dim * mean_keys
