"""Compute routes of causal (sliding-window) attention, one rule for all of them.

Letters: B batch rows, H query heads, H_kv key/value heads (H a multiple of H_kv), T queries,
S prefix keys (cache slots), L keys of one query block, D head dim, W window.

The rule: query i may attend to key j iff they belong to the same document, pos[j] <= pos[i]
and, with a window W, pos[j] > pos[i] − W (W keys including itself). Positions restart at 0
in each document, so inside a document they differ exactly as token indices do.

Routes:
- ``masked_attention``: SDPA with an explicit boolean mask, taken in blocks of queries. Each
  block sees only the keys it can reach (for a window, the W − 1 tokens before the block and
  the block itself), so memory is O(T·W) and no [T, T] mask is built. Keys may be preceded
  by a prefix (the cache), which every block sees, masked by its own positions and
  documents (document −1 marks an empty slot). Runs on any device, forward and backward.
- ``causal_sdpa``: SDPA's ``is_causal`` kernel for full attention over one document per row.
- ``flex_causal_attention``: CUDA only; ``flex_attention`` compiled once per process with a
  block mask for window and documents, cached per (T, window, cu_seqlens tensor). Not on CPU:
  flex_attention has no backward there.
"""

from __future__ import annotations

import importlib.util
import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gdn.layers.rope import document_ids

log = logging.getLogger("gdn.layers")

# SDPA's enable_gqa (torch >= 2.5) lets H query heads share H_kv key/value heads without
# copying K and V H / H_kv times.
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


@dataclass
class KeyPrefix:
    """Keys every query block sees first (the cache): key, value [B, H_kv, S, D]; pos, doc
    [B, S] int64 (doc −1: empty slot, matched by no query)."""

    key: torch.Tensor
    value: torch.Tensor
    pos: torch.Tensor
    doc: torch.Tensor


def sdpa(q, k, v, *, attn_mask=None, is_causal=False, scale):
    """SDPA on q [B, H, T, D], k and v [B, H_kv, L, D], sharing K/V heads across groups."""
    group = q.shape[1] // k.shape[1]
    if group > 1 and not _SDPA_HAS_GQA:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    extra = {"enable_gqa": True} if group > 1 and _SDPA_HAS_GQA else {}
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                          scale=scale, **extra)


def causal_sdpa(q, k, v, *, scale: float) -> torch.Tensor:
    """Full causal attention, q [B, H, T, D], k and v [B, H_kv, T, D] → [B, H, T, D]."""
    return sdpa(q, k, v, is_causal=True, scale=scale)


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    pos: torch.Tensor,
    doc: torch.Tensor,
    window: int | None,
    scale: float,
    block_size: int | None,
    prefix: KeyPrefix | None = None,
) -> torch.Tensor:
    """Causal attention by the rule above, in blocks of ``block_size`` queries.

    Args:
        q: [B, H, T, D]; k, v: [B, H_kv, T, D], the same tokens as the queries.
        pos, doc: [B, T] int64 position and document of each token (of q and k alike).
        window: W or None (full).
        block_size: queries per block; None: one block.
        prefix: keys before the tokens (cache), seen by every block.

    Returns:
        [B, H, T, D]. Every query sees at least itself, so no row of the mask is empty.
    """
    T = q.shape[2]
    step = T if block_size is None else block_size
    outputs = []
    for start in range(0, T, step):
        end = min(start + step, T)
        # Keys after the block are in the future; with a window, keys more than W − 1
        # before the block's first query are out of reach of all of its queries.
        lo = 0 if window is None else max(0, start - window + 1)
        keys, values = k[:, :, lo:end], v[:, :, lo:end]
        key_pos, key_doc = pos[:, lo:end], doc[:, lo:end]
        if prefix is not None:
            keys = torch.cat([prefix.key.to(k.dtype), keys], dim=2)
            values = torch.cat([prefix.value.to(v.dtype), values], dim=2)
            key_pos = torch.cat([prefix.pos, key_pos], dim=1)
            key_doc = torch.cat([prefix.doc, key_doc], dim=1)
        mask = allowed(pos[:, start:end], doc[:, start:end], key_pos, key_doc, window)
        outputs.append(sdpa(q[:, :, start:end], keys, values, attn_mask=mask[:, None],
                            scale=scale))
    return torch.cat(outputs, dim=2)


def allowed(q_pos, q_doc, k_pos, k_doc, window: int | None) -> torch.Tensor:
    """The rule as a mask [B, T, L]: q_pos, q_doc [B, T]; k_pos, k_doc [B, L]."""
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    mask = (q_doc[:, :, None] == k_doc[:, None, :]) & (kp <= qp)
    if window is not None:
        mask &= kp > qp - window
    return mask


# ---- flex_attention (CUDA) ----------------------------------------------------------------

_compiled_flex = None
_flex_missing_logged = False
_compiled_create_block_mask = None
_BLOCK_MASKS: OrderedDict = OrderedDict()
_BLOCK_MASKS_KEPT = 8  # a few (T, window, documents) layouts per step; layers share them


def flex_available() -> bool:
    """Whether torch has flex_attention (2.5+); says once on the log when it has not."""
    global _flex_missing_logged
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is not None:
        return True
    if not _flex_missing_logged:
        log.info("torch %s has no flex_attention: windowed/document attention on CUDA takes "
                 "the masked SDPA route", torch.__version__)
        _flex_missing_logged = True
    return False


def flex_causal_attention(q, k, v, *, window: int | None, cu_seqlens: torch.Tensor | None,
                          scale: float) -> torch.Tensor:
    """q [B, H, T, D], k and v [B, H_kv, T, D] on CUDA → [B, H, T, D] by the rule above.

    cu_seqlens [N+1] (B = 1) marks documents; the block mask is reused while the same
    cu_seqlens tensor (unchanged) comes back, as it does for every layer of one step.
    """
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if _compiled_flex is None:
        # dynamic=False: one kernel per sequence length, which training keeps fixed.
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    block_mask = _block_mask(q.shape[2], window, cu_seqlens, q.device)
    return _compiled_flex(q, k, v, block_mask=block_mask, scale=scale,
                          enable_gqa=q.shape[1] != k.shape[1])


def _block_mask(T: int, window: int | None, cu_seqlens: torch.Tensor | None,
                device: torch.device):
    global _compiled_create_block_mask
    from torch.nn.attention.flex_attention import create_block_mask

    if _compiled_create_block_mask is None:
        # Compiled, it builds the mask block by block instead of as a [T, T] tensor.
        _compiled_create_block_mask = torch.compile(create_block_mask)

    # Keyed by the identity and version of cu_seqlens (no device-to-host copy); the entry
    # holds the tensor, so its id cannot be reused while the entry lives.
    docs_key = None if cu_seqlens is None else (id(cu_seqlens), cu_seqlens._version)
    key = (T, window, docs_key, str(device))
    entry = _BLOCK_MASKS.get(key)
    if entry is not None:
        _BLOCK_MASKS.move_to_end(key)
        return entry[0]
    doc_of = None if cu_seqlens is None else document_ids(cu_seqlens.to(device), T)

    def mask_mod(b, h, q_idx, kv_idx):
        ok = kv_idx <= q_idx
        if window is not None:
            ok = ok & (q_idx - kv_idx < window)
        if doc_of is not None:
            ok = ok & (doc_of[q_idx] == doc_of[kv_idx])
        return ok

    block_mask = _compiled_create_block_mask(mask_mod, None, None, T, T, device=device)
    _BLOCK_MASKS[key] = (block_mask, cu_seqlens)
    if len(_BLOCK_MASKS) > _BLOCK_MASKS_KEPT:
        _BLOCK_MASKS.popitem(last=False)
    return block_mask
