"""Test-wide settings."""

import os

import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter. The variable is read when
# a kernel module is imported, which gdn.ops does lazily, after this file runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tests use tiny tensors, where extra CPU threads only add hand-off cost; and on a busy
# 2-core machine OpenMP threads waiting on each other slowed this suite 40× (5 s → 7 min).
torch.set_num_threads(1)
