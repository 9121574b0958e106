"""Triton kernels of the chunked recurrence, by stage: gate decays for the state passes
(decays.py), wy (wy_solve.py, wy.py), state (state.py; passes.py launches it whole or in
segments, combine.py joins the segments; up to K = 128 its forward pass computes the output
too, §3.9), output (output.py) (math.md §3, §4), and of the q/k L2 norm (l2norm.py, §5.4).

Importing this package needs Triton; ``gdn.ops`` imports it lazily, so the rest of gdn works
without it. Kernels run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``
(Triton's interpreter, used by the CPU tests; it mishandles bfloat16).
"""

import os

from gdn.ops.triton.function import triton_chunked_recurrence
from gdn.ops.triton.l2norm import triton_l2_normalize
from gdn.ops.triton.launch import BT as CHUNK_SIZE

__all__ = ["triton_chunked_recurrence", "triton_l2_normalize", "CHUNK_SIZE", "MAX_HEAD_DIM",
           "interpreting"]

MAX_HEAD_DIM = 256  # K: one [64, K] key tile per program


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
