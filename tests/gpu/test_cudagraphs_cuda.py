"""The CUDAGraphs plugin on a CUDA GPU: replays give bit-identical losses and gradients to the same compiled program
run uncaptured (training steps with changing data, gradient accumulation, dropout, FP8, blocks sharing one compiled
graph, Fabric), a graph break and an ``.item()`` split the program into segments, memory does not grow over 20
steps, and a capture that fails runs uncaptured with a warning.

Run on an H100: ``pytest tests/gpu/test_cudagraphs_cuda.py``. Skipped without CUDA, saying why.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_thunder as lt
from lightning_thunder.plugins import CUDAGraphs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run tests/gpu on an H100)")
_CAPABILITY = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
VOCAB = 512


class Net(nn.Module):
    """Embedding, a pre-norm MLP block and a head, with the loss: what one training step compiles."""

    def __init__(self, d: int = 256, dropout: float = 0.0) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d)
        self.norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(d, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx)
        h = h + self.drop(self.fc2(F.gelu(self.fc1(self.norm(h)))))
        return F.cross_entropy(self.head(h).flatten(0, 1).float(), targets.flatten())


def _batch(b: int = 4, t: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.randint(0, VOCAB, (b, t), device="cuda"), torch.randint(0, VOCAB, (b, t), device="cuda"))


def _pair(make=Net, plugins=None, **options):
    """The model compiled with CUDAGraphs, and a copy compiled with the same plugins but without it."""
    torch.manual_seed(0)
    model = make().cuda().to(torch.bfloat16)
    reference = copy.deepcopy(model)
    base = lt.default_plugins() if plugins is None else list(plugins)
    graphs = CUDAGraphs(**options)
    return lt.compile(model, plugins=[*base, graphs]), model, lt.compile(reference, plugins=base), reference, graphs


def _same(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    diff = (actual.float() - expected.float()).abs().max().item() if actual.numel() else 0.0
    assert torch.equal(actual, expected), f"{what}: not bit-identical (max |diff| {diff:.3g})"


def _train(cm, model, plain, reference, steps: int, micro: int = 1, seeded: bool = False) -> list:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-3, fused=True)
    losses = []
    for step in range(steps):
        for m in range(micro):
            idx, targets = _batch()
            if seeded:
                torch.manual_seed(100 * step + m)
            loss = cm(idx, targets)
            if seeded:
                torch.manual_seed(100 * step + m)
            ref_loss = plain(idx, targets)
            loss.backward()
            ref_loss.backward()
            _same(loss, ref_loss, f"loss of step {step}.{m}")
            losses.append((loss, ref_loss.detach()))
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            _same(p.grad, q.grad, f"gradient of {name} at step {step}")
        opt.step()
        ref_opt.step()
        opt.zero_grad(set_to_none=True)
        ref_opt.zero_grad(set_to_none=True)
    for i, (loss, ref_loss) in enumerate(losses):  # the losses the caller kept were never overwritten by a replay
        _same(loss.detach(), ref_loss, f"kept loss {i}")
    return losses


def test_training_steps_replay_bit_for_bit():
    cm, model, plain, reference, graphs = _pair()
    _train(cm, model, plain, reference, steps=5)
    stats = graphs.stats()
    assert (stats.segments, stats.graphs, stats.replays, stats.uncaptured_calls) == (2, 2, 10, 0), stats
    assert stats.pool_bytes > 0
    forward = lt.last_traces(cm)[-1]
    assert forward.name == "forward/CUDAGraphs" and "cudagraph_segment0(" in forward.python()
    assert "cudagraph_segment0(" in lt.last_backward_traces(cm)[-1].python()
    assert lt.compile_stats(cm).fusion_regions == lt.compile_stats(plain).fusion_regions > 0


def test_gradient_accumulation_bit_for_bit():
    cm, model, plain, reference, graphs = _pair()
    _train(cm, model, plain, reference, steps=3, micro=2)
    stats = graphs.stats()
    assert stats.graphs == 2 and stats.replays == 12 and stats.uncaptured_calls == 0, stats


def test_dropout_draws_what_the_uncaptured_program_draws():
    cm, model, plain, reference, graphs = _pair(lambda: Net(dropout=0.1))
    losses = _train(cm, model, plain, reference, steps=3, seeded=True)
    assert len({loss.item() for loss, _ in losses}) == 3
    assert graphs.stats().uncaptured_calls == 0


@pytest.mark.skipif(_CAPABILITY is None or _CAPABILITY < (8, 9), reason=f"FP8 needs compute capability >= 8.9 ({_CAPABILITY})")
def test_fp8_replays_bit_for_bit():
    from lightning_thunder.plugins import FP8

    cm, model, plain, reference, graphs = _pair(plugins=[*lt.default_plugins(), FP8()])
    _train(cm, model, plain, reference, steps=3, micro=2)
    assert "_scaled_mm" in lt.last_traces(cm)[-2].python()  # the final trace runs FP8 matmuls
    stats = graphs.stats()
    assert stats.graphs == 2 and stats.uncaptured_calls == 0, stats


def test_no_memory_growth_over_20_steps():
    cm, model, _, _, graphs = _pair()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)

    def step():
        loss = cm(*_batch())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(3):  # capture, optimizer state
        step()
    torch.cuda.synchronize()
    allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    for _ in range(20):
        step()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == allocated, (torch.cuda.memory_allocated(), allocated)
    assert torch.cuda.memory_reserved() == reserved, (torch.cuda.memory_reserved(), reserved)
    stats = graphs.stats()
    assert stats.graphs == 2 and stats.replays == 46 and 0 < stats.pool_bytes <= reserved, stats


class Breaking(nn.Module):
    """A graph break (two compiled graphs), and an ``.item()`` inside the second graph."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 256)
        self.fc1, self.fc2, self.fc3 = nn.Linear(256, 256), nn.Linear(256, 256), nn.Linear(256, 256)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc1(self.emb(idx)))
        torch._dynamo.graph_break()
        h = torch.tanh(self.fc2(h))
        scale = h.abs().amax().item()  # with capture_scalar_outputs: inside the graph, the host reads it
        out = self.fc3(h) * torch.full((1,), scale, device=h.device, dtype=h.dtype)
        return out.float().square().mean()


def test_graph_break_and_item_split_the_program_into_segments():
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        cm, model, plain, reference, graphs = _pair(Breaking)
        _train(cm, model, plain, reference, steps=3)
    assert lt.compile_stats(cm).graphs == 2  # the graph break
    text = lt.last_traces(cm)[-1].python()  # the second graph: .item() runs between segments
    captured = re.search(r"plugin CUDAGraphs: (\d+) segment\(s\) captured", text)
    assert captured and int(captured.group(1)) >= 2, text
    assert "aten._local_scalar_dense.default: the host reads a tensor's value" in text
    stats = graphs.stats()
    assert stats.segments >= 5 and stats.uncaptured_calls == 0, stats  # 1 + (2 or more) forward, 1 + 1 backward


class Block(nn.Module):
    def __init__(self, d: int = 256) -> None:
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(self.norm(x)))


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 256)
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        self.head = nn.Linear(256, VOCAB)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx)
        for block in self.blocks:
            h = block(h)
        return F.cross_entropy(self.head(h).flatten(0, 1).float(), targets.flatten())


def test_blocks_sharing_one_compiled_graph_get_a_graph_each():
    """Regional compilation: the three blocks run one compiled graph; each call's saved values are still in use
    when the next block runs, so each block replays its own CUDA graph."""
    from lightning_thunder.plugins import compile_blocks

    torch.manual_seed(0)
    model = Stack().cuda().to(torch.bfloat16)
    reference = copy.deepcopy(model)
    graphs = CUDAGraphs()
    compile_blocks(model, [*lt.default_plugins(), graphs], block_cls=Block)
    compile_blocks(reference, lt.default_plugins(), block_cls=Block)
    _train(model, model, reference, reference, steps=3)
    stats = graphs.stats()
    assert stats.graphs == 6 and stats.uncaptured_calls == 0, stats  # 3 forward + 3 backward graphs


def test_fabric_thunder_strategy_with_cudagraphs():
    from lightning.fabric import Fabric

    from lightning_thunder.strategies import ThunderStrategy

    losses = {}
    for name in ("plain", "cudagraphs"):
        graphs = CUDAGraphs()
        plugins = [*lt.default_plugins(), graphs] if name == "cudagraphs" else None
        fabric = Fabric(accelerator="cuda", devices=1, precision="bf16-true", strategy=ThunderStrategy(plugins=plugins))
        torch.manual_seed(0)
        model = Net()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model, opt = fabric.setup(model, opt)
        torch.manual_seed(1)
        losses[name] = []
        for _ in range(4):
            loss = model(*_batch())
            fabric.backward(loss)
            opt.step()
            opt.zero_grad()
            losses[name].append(loss.detach())
    for i, (a, b) in enumerate(zip(losses["cudagraphs"], losses["plain"])):
        _same(a, b, f"Fabric loss {i}")
    assert graphs.stats().replays == 8 and graphs.stats().uncaptured_calls == 0


_FAILING_CAPTURE = """
import warnings
import torch
import lightning_thunder as lt
from lightning_thunder.executors import OpExecutor
from lightning_thunder.plugins import CUDAGraphs, CUDAGraphsWarning, Plugin

def syncing_relu(x):
    if x.sum().item() == float("nan"):  # a host read its schema does not declare: the capture fails
        raise AssertionError
    return torch.relu(x)

class Syncing(Plugin):
    def executors(self):
        return [OpExecutor("syncing", {torch.ops.aten.relu.default: syncing_relu})]

model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1)).cuda()
graphs = CUDAGraphs()
cm = lt.compile(model, plugins=[Syncing(), graphs])
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(3):
        x = torch.randn(8, 64, device="cuda")
        loss = cm(x).sum()
        loss.backward()
        torch.testing.assert_close(loss, model(x).sum())
messages = [str(w.message) for w in caught if issubclass(w.category, CUDAGraphsWarning)]
assert any("graph 0 forward runs uncaptured: capturing it failed" in m for m in messages), messages
stats = graphs.stats()
assert stats.uncaptured_calls >= 3 and stats.replays >= 3, stats  # the forward runs uncaptured, the backward replays
assert torch.cuda.current_stream() == torch.cuda.default_stream()  # the failed capture left the caller's stream
y = torch.randn(1024, 1024, device="cuda") @ torch.randn(1024, 1024, device="cuda")  # CUDA still works
torch.cuda.synchronize()
print("ok", stats)
"""


def test_a_failed_capture_runs_uncaptured_with_a_warning():
    """An op that reads a value on the host without saying so makes the capture fail: the segment runs uncaptured
    from then on, with a warning, and the results are right. In its own process: a failed capture leaves nothing
    behind for later tests to trip on."""
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_FAILING_CAPTURE)], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
