"""Test-wide settings."""

import torch

# The tests use tiny tensors, where extra CPU threads only add hand-off cost; and on a busy
# 2-core machine OpenMP threads waiting on each other slowed this suite 40× (5 s → 7 min).
torch.set_num_threads(1)
