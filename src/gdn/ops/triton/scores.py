"""The chunk scores the forward leaves for the backward: scale·P, P = QKᵀ ⊙ D (math.md §4.1).

The backward's reverse pass needs the in-chunk part of dΔ, scale·Pᵀ dO, in every step. A
parallel kernel (dv_local) used to form it before the pass: it read q, k and dO and wrote a
[TT, HV, V] tensor that the pass read back, 4 × 134 MB at 8x4096-h16 and 0.196 ms on an H100
(NOTES.md §28). The forward's output stage forms P anyway, so it stores scale·P per chunk and
v head, [NC, HV, BT, BT] in the operand dtype (BT·2 = 128 bytes per token and v head for
16-bit inputs, kept from the forward to the backward as A is), and the reverse pass takes
scale·Pᵀ dO as one more product, (dOᵀ · scale·P), its dOᵀ tile already in registers and the
stored tile from memory as the right operand. P is rounded to the operand dtype once, where
dv_local's product rounded it too. Rows and columns past a sequence's end are zero (q, k and
D are masked there). Letters as in launch.py.
"""

import triton
import triton.language as tl


@triton.jit
def _chunk_offset(i_c, i_hv, HV: tl.constexpr, BT: tl.constexpr):
    return (i_c.to(tl.int64) * HV + i_hv) * (BT * BT)


@triton.jit
def store_scores(chunk_scores, scaled_p, i_c, i_hv, HV: tl.constexpr, BT: tl.constexpr):
    """Chunk i_c's scale·P [BT, BT] (float32 in registers) for v head i_hv."""
    o = tl.arange(0, BT)
    p = chunk_scores + _chunk_offset(i_c, i_hv, HV, BT) + o[:, None] * BT + o[None, :]
    tl.store(p, scaled_p.to(chunk_scores.dtype.element_ty))


@triton.jit
def load_scores(chunk_scores, i_c, i_hv, HV: tl.constexpr, BT: tl.constexpr):
    """Chunk i_c's stored scale·P [BT, BT] for v head i_hv, in the stored dtype, to go from
    memory straight into a product."""
    o = tl.arange(0, BT)
    return tl.load(chunk_scores + _chunk_offset(i_c, i_hv, HV, BT) + o[:, None] * BT
                   + o[None, :])
