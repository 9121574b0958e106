"""Causal multi-head attention with RoPE and grouped KV heads, full or sliding-window.

Letters: B batch rows, T time, D_model model width, H query heads, H_kv key/value heads
(H a multiple of H_kv: grouped-query attention), D head dim, W window, N sequences (cache
rows, or documents of ``cu_seqlens``), S cache slots.

Token at position p attends to positions j ≤ p of its own document (full attention) or to
p − W < j ≤ p (sliding window of W tokens, itself included). Positions restart at 0 in each
document of ``cu_seqlens`` and continue from ``cache.seen`` with a cache; RoPE rotates q and
k at those positions (rope.py), and keys are cached already rotated.

Parameters: d_model·D·(2H + 2H_kv) (q, k, v, o projections, no biases).

Compute routes (attention_masks.py), chosen by ``backend``:
- "auto": full attention without documents or cache → SDPA's ``is_causal`` kernel; on CUDA,
  windows or documents → ``flex_attention`` (torch ≥ 2.5; else the masked route, logged
  once); everything else (CPU windows/documents, any call with a cache) → SDPA with an
  explicit mask in blocks of ``block_size`` queries.
- "masked": always the blocked explicit-mask route (the correctness route, any device).
- "flex": ``flex_attention`` for calls without a cache (CUDA only; it has no CPU backward);
  calls with a cache take the masked route.
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

from gdn.layers.attention_masks import (
    KeyPrefix,
    allowed,
    causal_sdpa,
    flex_available,
    flex_causal_attention,
    masked_attention,
    sdpa,
)
from gdn.layers.cache import KVCache
from gdn.layers.checks import positive_int
from gdn.layers.rope import apply_rope, compute_dtype, document_ids, packed_positions, rope_angles

BACKENDS = ("auto", "masked", "flex")


class Attention(nn.Module):
    """Causal attention mixer: x [B, T, D_model] → [B, T, D_model].

    Args:
        d_model: width of the input and output.
        num_heads: H query heads.
        num_kv_heads: H_kv key/value heads; H must be a multiple of it.
        head_dim: D, even (RoPE rotates pairs).
        window: W for sliding-window attention (W tokens including itself), None: full.
        rope_theta: base of the RoPE frequencies.
        backend: "auto", "masked" or "flex" (see the module docstring).
        block_size: queries per block of the masked route (memory O(block_size · keys)).
    """

    def __init__(
        self,
        d_model: int,
        *,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        window: int | None = None,
        rope_theta: float = 10000.0,
        backend: str = "auto",
        block_size: int = 256,
    ):
        super().__init__()
        self.d_model = positive_int("d_model", d_model)
        self.num_heads = positive_int("num_heads", num_heads)
        self.num_kv_heads = positive_int("num_kv_heads", num_kv_heads)
        self.head_dim = positive_int("head_dim", head_dim)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads must be a multiple of num_kv_heads={num_kv_heads}, "
                             f"got {num_heads}")
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
        self.window = None if window is None else positive_int("window", window)
        if isinstance(rope_theta, bool) or not isinstance(rope_theta, numbers.Real):
            raise TypeError(f"rope_theta must be a number, got {rope_theta!r}")
        if not 1.0 < float(rope_theta) < float("inf"):
            raise ValueError(f"rope_theta must be finite and > 1, got {rope_theta}")
        self.rope_theta = float(rope_theta)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
        self.backend = backend
        self.block_size = positive_int("block_size", block_size)
        self.scale = head_dim ** -0.5
        self.q_proj = nn.Linear(d_model, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, d_model, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Attention has no special parameters; the projections keep nn.Linear's init."""
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            proj.reset_parameters()

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"window={self.window}, rope_theta={self.rope_theta}, backend={self.backend!r}")

    def new_cache(self, batch_size: int, *, max_length: int, dtype: torch.dtype,
                  device: torch.device | str) -> KVCache:
        """Zeroed KV cache for ``batch_size`` sequences.

        Full attention: S = max_length slots, position p in slot p. Sliding window: S = W
        slots used as a ring buffer (position p in slot p % W), whatever max_length is.
        """
        batch_size = positive_int("batch_size", batch_size)
        max_length = positive_int("max_length", max_length)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        slots = max_length if self.window is None else self.window
        shape = (batch_size, self.num_kv_heads, slots, self.head_dim)
        return KVCache(
            key=torch.zeros(shape, dtype=dtype, device=device),
            value=torch.zeros(shape, dtype=dtype, device=device),
            seen=torch.zeros(batch_size, dtype=torch.int64, device=device),
            window=self.window,
        )

    def forward(self, x: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """x [B, T, D_model] → [B, T, D_model].

        cu_seqlens [N+1] (B = 1): packed documents, attention stays inside each. cache: rows
        continue at ``cache.seen``; new keys/values are written in place (detached) and
        ``seen`` advances. Row b is cache row b, or document n is row n with cu_seqlens.
        """
        B, T = self._check_call(x, cu_seqlens, cache)
        H, H_kv, D = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).view(B, T, H, D)
        k = self.k_proj(x).view(B, T, H_kv, D)
        v = self.v_proj(x).view(B, T, H_kv, D)
        pos = self._positions(B, T, x.device, cu_seqlens, cache)
        cos, sin = rope_angles(pos, head_dim=D, theta=self.rope_theta,
                               dtype=compute_dtype(x.dtype))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, T, D]
        if cache is None:
            o = self._attend(q, k, v, pos, cu_seqlens)
        elif cu_seqlens is None:
            o = self._attend_cached(q, k, v, pos, cache, rows=slice(None))
        else:
            bounds = cu_seqlens.tolist()
            o = torch.cat([
                self._attend_cached(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], pos[:, s:e],
                                    cache, rows=slice(n, n + 1))
                for n, (s, e) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)) if e > s
            ], dim=2)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, H * D))

    def _positions(self, B, T, device, cu_seqlens, cache) -> torch.Tensor:
        """Position of every token, [B, T] int64."""
        if cu_seqlens is None:
            pos = torch.arange(T, device=device).expand(B, T)
            return pos if cache is None else pos + cache.seen[:, None]
        pos = packed_positions(cu_seqlens.to(device), T)
        if cache is not None:
            pos = pos + cache.seen[document_ids(cu_seqlens.to(device), T)]
        return pos[None]

    def _attend(self, q, k, v, pos, cu_seqlens) -> torch.Tensor:
        """Attention of a call without a cache: q [B, H, T, D], k, v [B, H_kv, T, D]."""
        on_cuda = q.device.type == "cuda"
        if self.backend == "flex" and not on_cuda:
            raise ValueError(f"backend='flex' needs CUDA tensors (flex_attention has no CPU "
                             f"backward), got {q.device}")
        if self.backend == "auto" and self.window is None and cu_seqlens is None:
            return causal_sdpa(q, k, v, scale=self.scale)
        if self.backend == "flex" or (self.backend == "auto" and on_cuda and flex_available()):
            return flex_causal_attention(q, k, v, window=self.window, cu_seqlens=cu_seqlens,
                                         scale=self.scale)
        T = q.shape[2]
        if cu_seqlens is None:
            doc = torch.zeros_like(pos)
        else:
            doc = document_ids(cu_seqlens.to(q.device), T)[None]
        return masked_attention(q, k, v, pos=pos, doc=doc, window=self.window,
                                scale=self.scale, block_size=self.block_size)

    def _attend_cached(self, q, k, v, pos, cache: KVCache, *, rows: slice) -> torch.Tensor:
        """Attend to cache rows ``rows`` plus the new tokens, then write them and advance.

        q [b, H, t, D], k, v [b, H_kv, t, D], pos [b, t] for the b rows of ``rows``.
        """
        key, value, seen = cache.key[rows], cache.value[rows], cache.seen[rows]
        if q.shape[2] == 1 and not (k.requires_grad or v.requires_grad):
            # Decode step without autograd: write the token first and attend over the cache
            # alone, so the cache is not copied. Right for a ring too: the token at p takes
            # the slot of p − W, which p no longer sees.
            self._write(key, value, k, v, pos)
            seen += 1
            prefix = self._cached_keys(key, value, seen)
            mask = allowed(pos, torch.zeros_like(pos), prefix.pos, prefix.doc, self.window)
            # The H / H_kv query heads of one KV head go in as that head's queries
            # ([b, H_kv, group, D], one mask row for all): no copies of K/V for GQA, and
            # kernels that take a mask but not enable_gqa stay usable.
            b, H, _, D = q.shape
            o = sdpa(q.reshape(b, self.num_kv_heads, H // self.num_kv_heads, D),
                     key.to(q.dtype), value.to(q.dtype), attn_mask=mask[:, None],
                     scale=self.scale)
            return o.reshape(b, H, 1, D)
        # Attend before writing: with a ring, the new tokens may overwrite slots that the
        # earlier of them still see.
        o = masked_attention(q, k, v, pos=pos, doc=torch.zeros_like(pos), window=self.window,
                             scale=self.scale, block_size=self.block_size,
                             prefix=self._cached_keys(key, value, seen))
        self._write(key, value, k, v, pos)
        seen += q.shape[2]
        return o

    def _cached_keys(self, key, value, seen) -> KeyPrefix:
        """Cache rows key, value [b, H_kv, S, D] with the position held in each slot."""
        slots = torch.arange(key.shape[2], device=key.device)
        if self.window is None:
            slot_pos = slots.expand(key.shape[0], -1)
            filled = slot_pos < seen[:, None]
        else:
            # The newest position p < seen with p % W == slot; negative: never written.
            last = seen[:, None] - 1
            slot_pos = last - (last - slots) % self.window
            filled = slot_pos >= 0
        return KeyPrefix(key=key, value=value, pos=slot_pos, doc=torch.where(filled, 0, -1))

    def _write(self, key, value, k, v, pos) -> None:
        """Store k, v [b, H_kv, t, D] at positions pos [b, t] into cache rows key, value."""
        if self.window is not None:
            # Only the last W tokens survive in a ring of W slots; writing more would put
            # two tokens in one slot in an unspecified order.
            k, v, pos = k[:, :, -self.window:], v[:, :, -self.window:], pos[:, -self.window:]
            pos = pos % self.window
        batch = torch.arange(key.shape[0], device=key.device)[:, None]
        key.transpose(1, 2)[batch, pos] = k.detach().transpose(1, 2).to(key.dtype)
        value.transpose(1, 2)[batch, pos] = v.detach().transpose(1, 2).to(value.dtype)

    def _check_call(self, x, cu_seqlens, cache) -> tuple[int, int]:
        """Validate the arguments of forward; returns (B, T)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[2] != self.d_model or x.shape[1] == 0:
            raise ValueError(f"x must have shape [B, T >= 1, d_model={self.d_model}], "
                             f"got {tuple(x.shape)}")
        B, T = x.shape[:2]
        rows = B
        if cu_seqlens is not None:
            if not isinstance(cu_seqlens, torch.Tensor):
                raise TypeError(f"cu_seqlens must be a torch.Tensor, got "
                                f"{type(cu_seqlens).__name__}")
            if cu_seqlens.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
            if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
                raise ValueError(f"cu_seqlens must have shape [N+1] with N >= 1, got "
                                 f"{tuple(cu_seqlens.shape)}")
            if B != 1:
                raise ValueError(f"cu_seqlens needs the documents packed into B=1, got B={B}")
            rows = cu_seqlens.numel() - 1
            # Reading the values costs a device-to-host copy: done on CPU, and with a cache
            # (which reads the boundaries anyway).
            if cu_seqlens.device.type == "cpu" or cache is not None:
                bounds = cu_seqlens.tolist()
                steps_ok = all(a <= b for a, b in zip(bounds[:-1], bounds[1:], strict=True))
                if bounds[0] != 0 or bounds[-1] != T or not steps_ok:
                    raise ValueError(f"cu_seqlens must go from 0 to T={T} without decreasing, "
                                     f"got {bounds}")
        if cache is None:
            return B, T
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache (from new_cache), got "
                            f"{type(cache).__name__}")
        if cache.window != self.window:
            raise ValueError(f"cache.window must be this layer's window={self.window}, "
                             f"got {cache.window}")
        expected = (rows, self.num_kv_heads, cache.slots, self.head_dim)
        if tuple(cache.key.shape) != expected or tuple(cache.value.shape) != expected:
            raise ValueError(f"cache.key/value must have shape [N, H_kv, S, D] = {expected}, "
                             f"got {tuple(cache.key.shape)}")
        if tuple(cache.seen.shape) != (rows,):
            raise ValueError(f"cache.seen must have shape [N] = ({rows},), "
                             f"got {tuple(cache.seen.shape)}")
        # The check reads seen (a device-to-host sync), which CUDA-graph capture forbids.
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
        if self.window is None and not capturing:
            new = (torch.full_like(cache.seen, T) if cu_seqlens is None
                   else cu_seqlens.to(cache.seen).diff())
            end = cache.seen + new
            if bool((end > cache.slots).any()):
                row = int((end > cache.slots).nonzero()[0, 0])
                raise ValueError(f"cache full: row {row} at position {int(cache.seen[row])} "
                                 f"+ {int(new[row])} new tokens exceeds max_length="
                                 f"{cache.slots}")
        return B, T
