"""benchmarks/pipeliner_hazards.py on TTGIR in the form Triton 3.6 prints (NOTES.md §25): the
race it names is a one-slot buffer read by an asynchronous wgmma that a later copy writes
before any wait retires the product."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from pipeliner_hazards import pipeliner_hazards  # noqa: E402

# The shape of output_backward's loop at c70caa9, cut to the lines that matter: S has one
# slot in a two-stage loop, is read by a wgmma left in flight (pendings = 4), then the copy
# for the next iteration writes it.
_LOOP = """
    %S_49 = ttg.local_alloc : () -> !ttg.memdesc<{slots}x64x64xbf16, #shared, #smem, mutable>
    %do_51 = ttg.local_alloc : () -> !ttg.memdesc<2x64x64xbf16, #shared, #smem, mutable>
    %r:3 = scf.for %i = %c0 to %c2 step %c1 iter_args(%acc = %cst) -> (tensor<64x64xf32>) {{
      %S_231 = ttg.memdesc_index %S_49[%k] : !ttg.memdesc<1x64x64xbf16>
      %S_233 = ttg.local_load %S_231 token %t : !ttg.memdesc<64x64xbf16>
      %S_t = ttg.memdesc_trans %S_231 {{order = array<i32: 1, 0>}} : !ttg.memdesc<64x64xbf16>
      %do_237 = ttg.memdesc_index %do_51[%j] : !ttg.memdesc<2x64x64xbf16>
      %d_w = ttng.warp_group_dot %do_237, %S_t, %acc {{inputPrecision = 0, isAsync = true}}
      %w:2 = ttng.warp_group_dot_wait %d_w, %S_t {{pendings = {pendings} : i32}}
      %S_264 = ttg.async_copy_global_to_local %ptr, %S_231 mask %m other %z
      %do_273 = ttg.async_copy_global_to_local %ptr2, %do_237 mask %m other %z
      scf.yield %w#0 : tensor<64x64xf32, #mma>
    }}
"""


def test_a_one_slot_buffer_overwritten_under_a_product_in_flight_is_a_hazard():
    assert pipeliner_hazards(_LOOP.format(slots=1, pendings=4), num_stages=2) == ["S_49"]


def test_a_wait_that_retires_the_product_before_the_copy_makes_it_safe():
    assert pipeliner_hazards(_LOOP.format(slots=1, pendings=0), num_stages=2) == []


def test_a_buffer_with_a_slot_per_stage_is_not_counted():
    assert pipeliner_hazards(_LOOP.format(slots=2, pendings=4), num_stages=2) == []


def test_the_loop_back_edge_counts_as_a_copy_to_come():
    # No copy in the body after the product, but the next iteration may copy before any
    # wait retires it: the back edge is a hazard too (wy_backward's k tile at c70caa9).
    loop = _LOOP.format(slots=1, pendings=4).replace(
        "ttg.async_copy_global_to_local %ptr, %S_231", "arith.addi %ptr, %S_231")
    assert pipeliner_hazards(loop, num_stages=2) == ["S_49"]
