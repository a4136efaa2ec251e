"""dreampose_rt.graphs: one warm-up stream per device, capture then replay."""

import pytest
import torch

from dreampose_rt import graphs


def test_graphs_need_a_cuda_device():
    with pytest.raises(ValueError, match="need a CUDA device, got cpu"):
        graphs.warmup_stream("cpu")


@pytest.mark.gpu
def test_one_warmup_stream_per_device_and_captures_replay():
    assert graphs.warmup_stream("cuda") is graphs.warmup_stream(torch.device("cuda", torch.cuda.current_device()))
    x = torch.randn(64, 64, device="cuda")
    w = torch.randn(64, 64, device="cuda")
    calls = []

    def fn():
        calls.append(1)
        return x @ w

    graph, out = graphs.capture(fn, "cuda", warmup=2)
    assert len(calls) == 3  # two warm-ups, one capture
    x.copy_(torch.randn(64, 64, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, x @ w)  # the replay read the new x

    # repeated captures keep no memory per capture (a new stream each time kept a cuBLAS workspace)
    graphs.capture(fn, "cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(4):
        graphs.capture(fn, "cuda")
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - before <= 1 << 20
