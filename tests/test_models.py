"""Parity with eager PyTorch on a corpus of small models (outputs, every gradient, buffers)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_thunder as lt
from tests.helpers import assert_close, check_module_parity


class MLP(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.LayerNorm(d))

    def forward(self, x):
        return self.net(x) + x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mlp_parity_by_dtype(dtype):
    model = MLP().to(dtype)
    check_module_parity(model, lambda: [torch.randn(6, 16, dtype=dtype, requires_grad=True)], steps=2)


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.nn.functional.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cnn_with_batchnorm(training):
    model = CNN().train(training)
    # Buffers (running stats, num_batches_tracked) are compared after every step.
    check_module_parity(model, lambda: [torch.randn(4, 3, 12, 12, requires_grad=True)], steps=3)


class GraphBreaks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 8)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        print("graph break: printing inside forward")
        if h.sum() > 0:  # data-dependent branch: another graph break
            h = h * 2
        else:
            h = h - 1
        return self.fc2(h).relu()


def test_graph_breaks_compile_every_subgraph(capsys):
    model = GraphBreaks()
    # Both branches are taken across the steps (the sign of h.sum() varies with the input).
    inputs = iter([torch.full((3, 8), 2.0), -torch.full((3, 8), 2.0), torch.randn(3, 8)])
    cm = check_module_parity(model, lambda: [next(inputs).requires_grad_()], steps=3)
    assert "graph break: printing inside forward" in capsys.readouterr().out
    stats = lt.compile_stats(cm)
    assert stats.graphs >= 3, stats
    assert any("print" in reason for reason in stats.graph_breaks), stats.graph_breaks
    assert any("if h.sum() > 0" in reason for reason in stats.graph_breaks), stats.graph_breaks
    assert stats.executor_counts["torch"] > 0


class Counter(nn.Module):
    """Updates buffers in place every call (a step counter and an exponential moving average)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("ema", torch.zeros(4))

    def forward(self, x):
        y = self.fc(x)
        self.steps += 1
        self.ema.mul_(0.9).add_(0.1 * y.detach().mean(0))
        return y * self.steps + self.ema


@pytest.mark.parametrize("partitioner", ["min_cut", "default"])
def test_in_place_buffer_updates(partitioner):
    model = Counter()
    # torch.compile gets this gradient wrong (it saves the buffer, then mutates it before backward).
    cm = check_module_parity(model, lambda: [torch.randn(5, 4, requires_grad=True)], steps=3, partitioner=partitioner)
    if partitioner == "min_cut":
        assert "forward/protect-mutated-saves" in [t.name for t in lt.last_traces(cm)]
    assert int(cm.steps) == 3 == int(model.steps)
    with torch.no_grad():
        cm(torch.randn(5, 4))
    assert int(model.steps) == 3 and int(cm.original_module.steps) == 4


class Attention(nn.Module):
    def __init__(self, d: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.heads = heads

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


@pytest.mark.parametrize("dynamic", [None, False])
def test_changing_sequence_length(dynamic):
    model = Attention()
    lengths = iter([5, 9, 12, 7])
    cm = check_module_parity(model, lambda: [torch.randn(2, next(lengths), 16, requires_grad=True)], steps=4, dynamic=dynamic)
    stats = lt.compile_stats(cm)
    assert stats.recompiles and "size mismatch" in stats.recompiles[0], stats.recompiles
    if dynamic is False:
        assert stats.graphs == 4  # one graph per sequence length
    else:
        assert stats.graphs == 2  # the second length makes the dimension dynamic
        sizes = [d for p in lt.last_traces(cm)[-1].inputs if p.is_tensor for d in p.shape]
        assert any(isinstance(d, torch.SymInt) for d in sizes)  # a symbolic size in the trace


def test_no_grad_inference():
    model = MLP()
    cm = lt.compile(model)
    with torch.no_grad():
        x = torch.randn(3, 16)
        assert_close(cm(x), model(x), "no_grad output")
    assert lt.last_backward_traces(cm) == []
    assert lt.last_traces(cm)[-1].name == "forward/final"
    with torch.inference_mode():
        x = torch.randn(3, 16)
        assert_close(cm(x), model(x), "inference_mode output")


class AutocastRegion(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 16)
        self.fc2 = nn.Linear(16, 8)

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = torch.relu(self.fc1(x))
        return self.fc2(h.to(x.dtype))


def test_autocast_inside_the_module():
    model = AutocastRegion()
    cm = check_module_parity(model, lambda: [torch.randn(4, 16, requires_grad=True)])
    final = lt.last_traces(cm)[-1].python()
    assert "bf16" in final and "dtype=torch.bfloat16" in final


def test_autocast_around_the_call():
    model = MLP()
    cm = lt.compile(model)
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cm(x)
        ref = model(x)
    assert out.dtype == ref.dtype == torch.float32  # LayerNorm runs in fp32 under autocast
    assert_close(out, ref, "autocast output")
