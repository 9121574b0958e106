"""The combine of the segmented state passes (math.md §3.8) as a float64 loop, the reference
for combine.py's kernel: S ← M_p S + R_p over the segments in order, or dS ← M_pᵀ dS + R_p in
reverse, the state before each step kept as that segment's seam."""

import torch


def seam_combine_reference(transitions, own, s_in, *, reverse: bool):
    """Seams [B·P, HV, K, V] and the state leaving the walk [B, HV, K, V], in float64.
    ``transitions`` is [B, P, HV, K, K] or [B, P, HV, 1, 1] (a scalar decay), ``own``
    [B, P, HV, K, V], ``s_in`` [B, HV, K, V] or None (zeros)."""
    transitions, own = transitions.double(), own.double()
    P = own.shape[1]
    S = torch.zeros_like(own[:, 0]) if s_in is None else s_in.double()
    seams = [None] * P
    for j in reversed(range(P)) if reverse else range(P):
        seams[j] = S
        M = transitions[:, j]
        if M.shape[-1] == 1:
            S = M * S + own[:, j]
        else:
            S = (M.transpose(-1, -2) if reverse else M) @ S + own[:, j]
    return torch.stack(seams, dim=1).flatten(0, 1), S


def random_combine_inputs(B, P, HV, K, V, *, scalar: bool, with_s_in: bool, device="cpu",
                          seed=0):
    """float32 transitions scaled as a product of chunk transitions is (norm below one),
    segment parts and an entering state of unit scale."""
    gen = torch.Generator().manual_seed(seed)
    if scalar:
        M = torch.rand(B, P, HV, 1, 1, generator=gen) * 0.5 + 0.4
    else:
        M = torch.randn(B, P, HV, K, K, generator=gen) * (0.7 / K ** 0.5)
    own = torch.randn(B, P, HV, K, V, generator=gen)
    s_in = torch.randn(B, HV, K, V, generator=gen) if with_s_in else None
    return [None if t is None else t.to(device) for t in (M, own, s_in)]
