"""Backend choice: what "auto" resolves to, and that it says so."""

import logging

import pytest
import torch

from gdn.ops import BACKENDS, chunk_gated_delta_rule
from gdn.testing import random_inputs, rel_error


def test_auto_resolves_to_torch_and_logs_it(caplog, monkeypatch):
    import gdn.ops.chunked as chunked

    calls = []
    original = chunked.chunked_recurrence
    monkeypatch.setattr(chunked, "chunked_recurrence",
                        lambda *a, **kw: calls.append(1) or original(*a, **kw))
    x = random_inputs(T=9, H=1, K=4, V=4)
    with caplog.at_level(logging.DEBUG, logger="gdn.ops"):
        chunk_gated_delta_rule(**x.kwargs())
    assert calls == [1]
    assert any("resolves to 'torch'" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_every_backend_computes_the_same_function(backend):
    # float64 inputs: the Triton kernels take float32 and below (tests/ops/test_triton.py)
    x = random_inputs(B=2, T=40, H=2, HV=4, K=8, V=6, initial_state=True, seed=1)
    o, s = chunk_gated_delta_rule(**x.kwargs(), output_final_state=True, backend=backend)
    o_ref, s_ref = chunk_gated_delta_rule(**x.kwargs(), output_final_state=True,
                                          backend="reference")
    assert rel_error(o, o_ref) <= 1e-10 and rel_error(s, s_ref) <= 1e-10


@pytest.mark.gpu
def test_torch_path_on_cuda_matches_the_cpu_reference():
    if not torch.cuda.is_available():
        pytest.fail("marked gpu but no CUDA device: run `pytest -m gpu` on the lent GPU")
    docs = [1, 300, 0, 77, 133]
    x = random_inputs(T=sum(docs), H=2, HV=4, K=100, V=60, initial_state=True,
                      doc_lengths=docs, seed=2)
    expected = chunk_gated_delta_rule(**x.kwargs(), output_final_state=True,
                                      backend="reference")
    x32 = x.to(torch.float32)
    on_gpu = {name: (None if t is None else t.cuda()) for name, t in x32.kwargs().items()}
    o, s = chunk_gated_delta_rule(**on_gpu, output_final_state=True, backend="torch")
    assert o.is_cuda and s.dtype == torch.float32
    # TF32 may be on for CUDA matmuls; the bound allows it (2^-10 rounding of the operands).
    tol = 1e-5 if not torch.backends.cuda.matmul.allow_tf32 else 5e-3
    assert rel_error(o.cpu(), expected[0]) <= tol
    assert rel_error(s.cpu(), expected[1]) <= tol
