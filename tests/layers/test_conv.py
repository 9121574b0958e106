"""The causal short convolution against a slow reference that loops over sequences, time
and taps, in float64: both are exact sums of W products, so they agree to rounding (1e-12).

Letters: B batch, T time, C channels, W width, N sequences.
"""

import pytest
import torch
import torch.nn.functional as F

from gdn.layers.conv import ShortConvolution, causal_conv1d
from gdn.testing import rel_error

TOL = 1e-12
C = 6


def reference_conv(x, weight, bias, *, doc_lengths, initial_state):
    """y and final state of each sequence, one tap at a time.

    x [B, T, C]; doc_lengths None (each batch row is a sequence) or the document lengths of a
    packed B = 1 row; initial_state [N, C, W − 1] or None.
    """
    B, T, _ = x.shape
    W = weight.shape[-1]
    if doc_lengths is None:
        sequences = [x[b] for b in range(B)]
    else:
        sequences = list(torch.split(x[0], doc_lengths))
    outputs, finals = [], []
    for n, seq in enumerate(sequences):
        state = x.new_zeros(C, W - 1) if initial_state is None else initial_state[n]

        def tap_input(i, seq=seq, state=state):
            # input at sequence position i; negative positions read the state
            return seq[i] if i >= 0 else state[:, W - 1 + i]

        for t in range(seq.shape[0]):
            acc = x.new_zeros(C) if bias is None else bias.clone()
            for j in range(W):
                acc = acc + weight[:, 0, j] * tap_input(t - (W - 1) + j)
            outputs.append(F.silu(acc))
        L = seq.shape[0]
        finals.append(torch.stack([tap_input(L - (W - 1) + i) for i in range(W - 1)], dim=1)
                      if W > 1 else x.new_zeros(C, 0))
    y = torch.stack(outputs).view(B, T, C)
    return y, torch.stack(finals)


def _inputs(*, B, T, W, N, bias, state, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    return dict(
        x=randn(B, T, C), weight=randn(C, 1, W), bias=randn(C) if bias else None,
        initial_state=randn(N, C, W - 1) if state else None,
    )


def _check_against_reference(inputs, *, doc_lengths):
    cu_seqlens = None
    if doc_lengths is not None:
        cu_seqlens = torch.tensor([0, *doc_lengths]).cumsum(0)
    y, final = causal_conv1d(inputs["x"], inputs["weight"], inputs["bias"],
                             cu_seqlens=cu_seqlens, initial_state=inputs["initial_state"])
    y_ref, final_ref = reference_conv(inputs["x"], inputs["weight"], inputs["bias"],
                                      doc_lengths=doc_lengths,
                                      initial_state=inputs["initial_state"])
    assert y.shape == y_ref.shape and final.shape == final_ref.shape
    assert rel_error(y, y_ref) <= TOL
    assert rel_error(final, final_ref) <= TOL

    wrt = {name: t for name, t in inputs.items() if t is not None}
    gen = torch.Generator().manual_seed(7)
    cot_y = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    cot_s = torch.randn(final.shape, generator=gen, dtype=torch.float64)
    # allow_unused: with W = 1 the state is empty, and the reference never touches it
    grads = torch.autograd.grad((y * cot_y).sum() + (final * cot_s).sum(), list(wrt.values()),
                                allow_unused=True)
    grads_ref = torch.autograd.grad((y_ref * cot_y).sum() + (final_ref * cot_s).sum(),
                                    list(wrt.values()), allow_unused=True)
    for (name, x), grad, grad_ref in zip(wrt.items(), grads, grads_ref, strict=True):
        if x.numel() > 0:
            assert rel_error(grad, grad_ref) <= TOL, name


@pytest.mark.parametrize("state", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("W", [1, 2, 4])
def test_batch_rows_match_reference(W, bias, state):
    inputs = _inputs(B=2, T=13, W=W, N=2, bias=bias, state=state)
    _check_against_reference(inputs, doc_lengths=None)


@pytest.mark.parametrize("state", [False, True])
@pytest.mark.parametrize("W", [1, 3, 4])
def test_packed_documents_match_reference(W, state):
    # a 1-token document, one shorter than W − 1, an empty one, and longer ones
    doc_lengths = [5, 1, 2, 0, 7]
    inputs = _inputs(B=1, T=sum(doc_lengths), W=W, N=len(doc_lengths), bias=True,
                     state=state, seed=W)
    _check_against_reference(inputs, doc_lengths=doc_lengths)


def test_short_document_keeps_the_older_state():
    """W = 4: state [1, 2, 3] then one token 4 leaves [2, 3, 4]; no token leaves [1, 2, 3]."""
    state = torch.tensor([[1.0, 2.0, 3.0], [5.0, 6.0, 7.0]]).view(2, 1, 3)
    x = torch.tensor([4.0]).view(1, 1, 1)
    _, final = causal_conv1d(x, torch.ones(1, 1, 4), cu_seqlens=torch.tensor([0, 1, 1]),
                             initial_state=state)
    assert final.flatten().tolist() == [2.0, 3.0, 4.0, 5.0, 6.0, 7.0]


def test_no_tap_crosses_a_document_boundary():
    """Perturbing document 0 leaves document 1's outputs exactly unchanged."""
    conv = ShortConvolution(C, width=4, bias=True).double()
    x = torch.randn(1, 9, C, dtype=torch.float64)
    cu_seqlens = torch.tensor([0, 4, 9])
    y, _ = conv(x, cu_seqlens=cu_seqlens)
    x2 = x.clone()
    x2[:, :4] += 100.0
    y2, _ = conv(x2, cu_seqlens=cu_seqlens)
    assert torch.equal(y[:, 4:], y2[:, 4:])
    assert not torch.equal(y[:, :4], y2[:, :4])


def test_prefill_then_steps_equal_one_call():
    """Ragged documents prefilled together, then one-token steps with B = N, equal one call
    over each whole sequence (the conv state carries exactly W − 1 inputs)."""
    conv = ShortConvolution(C, width=4, bias=True).double()
    prompts, steps = [5, 1, 2], 4
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randn(L + steps, C, generator=gen, dtype=torch.float64) for L in prompts]
    packed = torch.cat([s[:L] for s, L in zip(seqs, prompts, strict=True)]).unsqueeze(0)
    y_prompt, state = conv(packed, cu_seqlens=torch.tensor([0, *prompts]).cumsum(0))
    outputs = list(torch.split(y_prompt[0], prompts))
    for i in range(steps):
        token = torch.stack([s[L + i] for s, L in zip(seqs, prompts, strict=True)])
        y_step, state = conv(token.unsqueeze(1), initial_state=state)
        outputs = [torch.cat([o, y_step[n]]) for n, o in enumerate(outputs)]
    for n, (seq, out) in enumerate(zip(seqs, outputs, strict=True)):
        y_full, final = conv(seq.unsqueeze(0))
        assert rel_error(out, y_full[0]) <= TOL
        assert rel_error(state[n], final[0]) <= TOL


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        (dict(channels=0), ValueError, "channels"),
        (dict(channels=2.0), TypeError, "channels"),
        (dict(channels=4, width=0), ValueError, "width"),
        (dict(channels=4, width=True), TypeError, "width"),
        (dict(channels=4, bias=1), TypeError, "bias"),
    ],
)
def test_bad_arguments(kwargs, error, name):
    with pytest.raises(error, match=name) as info:
        ShortConvolution(**kwargs)
    assert "\n" not in str(info.value)


def test_bad_call_arguments():
    x, weight = torch.randn(2, 5, C), torch.randn(C, 1, 4)
    with pytest.raises(ValueError, match="cu_seqlens needs the documents packed into B=1"):
        causal_conv1d(x, weight, cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="initial_state must be"):
        causal_conv1d(x, weight, initial_state=torch.zeros(2, C, 4))
