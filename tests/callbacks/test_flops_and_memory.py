"""FLOPs on a meta copy (a compiled LitGPT model counts what eager counts, compiling nothing more), and the
MemoryMonitor's CUDA figures and names with the CUDA statistics mocked."""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch
from lightning.fabric.utilities.throughput import measure_flops
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import lightning_thunder
from lightning_thunder.callbacks import MEMORY_METRICS, MemoryMonitor
from lightning_thunder.callbacks.flops import loss_of, measure_step_flops, meta_copy
from lightning_thunder.callbacks.memory import format_bytes, tensor_bytes


def test_meta_copy_of_a_compiled_llama_counts_the_flops_eager_counts():
    litgpt = pytest.importorskip("litgpt")
    config = litgpt.Config.from_name(
        "Llama-3.2-1B", n_layer=2, n_embd=32, n_head=4, n_query_groups=2, intermediate_size=64,
        padded_vocab_size=96, vocab_size=96, block_size=64,
    )
    eager = litgpt.GPT(config)
    model = lightning_thunder.compile(copy.deepcopy(eager))
    idx = torch.randint(0, 96, (2, 16))
    model(idx).sum().backward()  # compiled once, for real
    graphs = lightning_thunder.compile_stats(model).graphs

    def step(m, batch):
        return m(batch)

    measured = measure_step_flops(model, idx, step)
    # Eager on real tensors, attention by the math backend (FlopCounterMode has no formula for the CPU
    # flash kernel; on meta tensors SDPA runs the math decomposition too).
    with sdpa_kernel(SDPBackend.MATH):
        expected = measure_flops(eager, lambda: eager(idx), lambda out: out.sum())
    assert measured == expected > 0
    assert lightning_thunder.compile_stats(model).graphs == graphs  # the meta run compiled nothing
    assert all(p.device.type == "cpu" for p in model.parameters())  # the model itself is untouched


def test_meta_copy_drops_the_given_references_and_holds_no_data():
    class Owner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.trainer = object()

    owner = Owner()
    copied = meta_copy(owner, drop=[owner.trainer])
    assert copied.trainer is None and owner.trainer is not None
    assert copied.lin.weight.device.type == "meta" and copied.lin.weight is not owner.lin.weight


def test_loss_of_finds_the_loss_or_says_what_to_pass():
    t = torch.ones(2, requires_grad=True)
    assert loss_of({"loss": t}).shape == () and loss_of((t, 3)).shape == ()
    with pytest.raises(ValueError, match="pass step_fn= returning one"):
        loss_of(None)
    with pytest.raises(ValueError, match="does not require grad"):
        loss_of(torch.ones(2))


class _TwoRankCudaContext:
    """Just what MemoryMonitor's logging step uses: 2 ranks on a (mocked) CUDA device."""

    device = torch.device("cuda", 0)
    is_global_zero = True

    def __init__(self) -> None:
        self.logged: dict[str, float] = {}

    def all_gather(self, values):
        return [list(values), [v * 2 for v in values]]  # rank 1 uses twice as much

    def log_metrics(self, metrics, step):
        self.logged.update(metrics)


def test_memory_monitor_cuda_figures_per_rank_and_max(monkeypatch):
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * gib)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 4 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1 * gib)
    reset = mock.Mock()
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    monitor = MemoryMonitor()
    context = _TwoRankCudaContext()
    monitor._log_step(context, step=1)
    assert reset.call_count == 1  # the next logged peak starts here
    expected = {"peak_allocated_gib": 3.0, "peak_reserved_gib": 4.0, "allocated_gib": 1.0}
    for name, value in expected.items():
        assert context.logged[f"memory/rank0/{name}"] == value
        assert context.logged[f"memory/rank1/{name}"] == context.logged[f"memory/max/{name}"] == 2 * value
    assert {f"memory/max/{m}" for m in MEMORY_METRICS} <= set(context.logged)
    assert "cuda" not in monitor.unavailable


def test_byte_helpers():
    assert tensor_bytes(torch.empty(3, 5, dtype=torch.bfloat16)) == 30
    assert [format_bytes(n) for n in (512, 1536, 3 * 2**20, 5 * 2**30)] == ["512 B", "1.50 KiB", "3.00 MiB", "5.00 GiB"]
