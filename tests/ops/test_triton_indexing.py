"""The chunk tables and segment plans kept from call to call (indexing.kept_per_stream): the
same sizes give the same tensors, equal to a fresh build; other sizes, devices or streams
get their own; nothing is kept while a CUDA graph is being captured (GPU)."""

import pytest
import torch

from gdn.ops.triton import indexing, passes


def _same_table(a: indexing.ChunkTable, b: indexing.ChunkTable) -> bool:
    tensors = ("cu", "offsets", "seq", "start")
    return (all(torch.equal(getattr(a, n), getattr(b, n)) for n in tensors)
            and (a.num_chunks, a.num_seqs) == (b.num_chunks, b.num_seqs))


def test_row_tables_are_kept_and_right():
    first = indexing.chunk_table(3, 200, None, 64, torch.device("cpu"))
    again = indexing.chunk_table(3, 200, None, 64, "cpu")
    assert again is first
    assert _same_table(first, indexing._rows(3, 200, 64, torch.device("cpu")))
    # Rows of 200 tokens: chunks of 64, 64, 64, 8 each, numbered row by row.
    assert first.start.tolist()[:5] == [0, 64, 128, 192, 200]
    other = indexing.chunk_table(3, 201, None, 64, "cpu")
    assert other is not first and other.start.tolist()[:5] == [0, 64, 128, 192, 201]


def test_varlen_tables_are_built_each_call():
    cu = torch.tensor([0, 5, 140, 300])
    a = indexing.chunk_table(1, 300, cu, 64, "cpu")
    b = indexing.chunk_table(1, 300, cu, 64, "cpu")
    assert a is not b and _same_table(a, b)


def test_segment_plans_are_kept():
    a = passes._segments(2, 4096, 64, 16, "cpu")
    assert passes._segments(2, 4096, 64, 16, torch.device("cpu")) is a
    assert passes._segments(2, 4096, 64, 32, "cpu") is not a
    assert a.cu.tolist()[:5] == [0, 1024, 2048, 3072, 4096]


@pytest.mark.gpu
def test_tables_per_stream_and_not_under_graph_capture():
    device = torch.device("cuda")
    table = indexing.chunk_table(2, 1000, None, 64, device)
    assert indexing.chunk_table(2, 1000, None, 64, device) is table
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        on_side = indexing.chunk_table(2, 1000, None, 64, device)
    torch.cuda.synchronize()
    assert on_side is not table and _same_table(on_side, table)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = indexing.chunk_table(2, 1001, None, 64, device)
    assert captured is not indexing.chunk_table(2, 1001, None, 64, device)
