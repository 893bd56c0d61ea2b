"""The FSDP and DDP compiler plugins outside Lightning (2 CPU processes, Gloo), and the block helpers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_thunder as lt
from lightning_thunder.plugins import DDP, FSDP, checkpoint_block, compile_blocks, find_block_class, find_blocks
from tests.strategies.helpers import lm_loss, spawn, tiny_gpt, token_batches

pytest.importorskip("litgpt", reason="litgpt is part of the `test` extra")


def _grads_match_eager(model: nn.Module, ref: nn.Module) -> float:
    """Largest difference between the (gathered) gradients of ``model`` and those of ``ref``."""
    worst = 0.0
    ref_grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        worst = max(worst, float((grad - ref_grads[name.removeprefix("module.")].grad).abs().max()))
    return worst


def _plugins_outside_lightning(rank: int) -> dict:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    x, y = token_batches(1)[0]
    ref = tiny_gpt()
    ref_loss = lm_loss(ref(x), y)  # the global batch; each rank trains on half of it
    ref_loss.backward()
    out = {}
    runs = {
        # compile() shards the blocks and the root, then compiles the root; Dynamo stops at FSDP's hooks, so
        # each block's forward becomes its own graph.
        "compile_with_fsdp": lambda m: lt.compile(m, plugins=[FSDP()]),
        # The strategies' order: compile every block, then the plugin adds checkpointing inside and shards.
        "blocks_then_fsdp_with_ac": lambda m: (
            compile_blocks(m),
            FSDP(activation_checkpointing=True, reshard_after_forward=False).transform_module(m),
        )[1],
        "compile_with_ddp": lambda m: lt.compile(m, plugins=[DDP()]),
    }
    for name, build in runs.items():
        torch._dynamo.reset()
        net = build(tiny_gpt())
        loss = lm_loss(net(x[rank::2]), y[rank::2])
        loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        stats = lt.compile_stats(net)
        torch_ops = [op.name for op in lt.last_traces(net)[0].ops]
        out[name] = {
            "loss_diff": abs(float(mean_loss) / 2 - float(ref_loss.detach())),
            "grad_diff": _grads_match_eager(net, ref),
            "graphs": stats.graphs,
            "graph_breaks": stats.graph_breaks,
            "ops": stats.executor_counts.get("torch", 0),
            "checkpointed": any("checkpoint" in op for op in torch_ops),
        }
    return out


@pytest.mark.slow
def test_fsdp_and_ddp_plugins_outside_lightning_match_eager():
    out = spawn(_plugins_outside_lightning)[0]
    for name, r in out.items():
        assert r["loss_diff"] < 1e-5 and r["grad_diff"] < 1e-5, (name, r)
        assert r["graphs"] >= 1 and r["ops"] > 0, (name, r)
    assert out["blocks_then_fsdp_with_ac"]["graphs"] == 1, "all blocks must share one compiled graph"
    assert out["blocks_then_fsdp_with_ac"]["checkpointed"], "activation checkpointing must be inside the graph"
    assert not out["compile_with_fsdp"]["checkpointed"]
    # torch.compile(DDP(model)): the model is one graph; Dynamo skips DDP's own bookkeeping (graph breaks there).
    ddp = out["compile_with_ddp"]
    assert ddp["graphs"] == 1 and all("ddp" in b.lower() or "distributed.py" in b for b in ddp["graph_breaks"]), ddp


def _wide_gpt() -> nn.Module:
    """~2.5 MB of fp32 parameters: three of DDP's 1 MB buckets."""
    from litgpt import GPT, Config

    torch.manual_seed(0)
    config = dict(n_layer=4, n_embd=128, n_head=4, n_query_groups=2, intermediate_size=256, vocab_size=96)
    return GPT(Config.from_name("Llama-3.2-1B", padded_vocab_size=96, block_size=16, **config))


def _ddp_overlap(rank: int) -> dict:
    """Per backward, the order in which DDP reduces buckets (seen by a comm hook) and compiled backward graphs
    finish."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    dist.init_process_group("gloo")
    x, y = token_batches(1)[0]
    ref = _wide_gpt()
    lm_loss(ref(x), y).backward()
    model = lt.compile(_wide_gpt(), plugins=[DDP(bucket_cap_mb=1)])
    events: list[str] = []

    def hook(state, bucket):
        events.append(f"bucket {bucket.index()}")
        return default_hooks.allreduce_hook(state, bucket)

    model.original_module.register_comm_hook(None, hook)
    orders, grad_diff = [], None
    for step in range(2):  # DDP settles its buckets after the first backward
        events.clear()
        loss = lm_loss(model(x[rank::2]), y[rank::2])
        for node in _compiled_backward_nodes(loss):
            node.register_hook(lambda grad_inputs, grad_outputs: events.append("graph"))
        loss.backward()
        orders.append(list(events))
        if step == 0:
            grad_diff = _grads_match_eager(model, ref)
            model.zero_grad()
    stats = lt.compile_stats(model)
    return {"orders": orders, "grad_diff": grad_diff, "graphs": stats.graphs, "recompiles": stats.recompiles}


def _compiled_backward_nodes(loss: torch.Tensor) -> list:
    found, seen, stack = [], set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "CompiledFunction" in type(node).__name__:
            found.append(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


@pytest.mark.slow
def test_ddp_overlaps_bucket_all_reduces_with_the_backward():
    out = spawn(_ddp_overlap)[0]
    assert out["grad_diff"] < 1e-5, out
    # Dynamo's DDPOptimizer splits the graph at the 1 MB buckets: one compiled piece per bucket, not recompiles.
    assert out["graphs"] == 3 and out["recompiles"] == [], out
    order = out["orders"][-1]
    assert order.count("graph") == 3, order
    last_graph = max(i for i, event in enumerate(order) if event == "graph")
    during_backward = [event for event in order[:last_graph] if event.startswith("bucket")]
    assert len(during_backward) > 1, f"buckets must be reduced while the backward still runs: {order}"


def test_ddp_buckets_below_the_first_bucket_keep_one_graph_with_a_warning():
    """Dynamo's DDPOptimizer cannot split at buckets smaller than DDP's first bucket: the compiled call keeps its
    graph whole (no overlap) and says so once per DDP module."""
    import warnings

    from torch.nn.parallel import DistributedDataParallel

    from lightning_thunder.capture.compiled import ddp_graph_splitting

    ddp = object.__new__(DistributedDataParallel)  # only its bucket size is read
    object.__setattr__(ddp, "bucket_bytes_cap", 2**19)
    with pytest.warns(UserWarning, match=r"bucket_cap_mb=0.5 is below its first bucket's 1 MB.*no overlap"):
        assert ddp_graph_splitting(ddp) == {"optimize_ddp": False}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ddp_graph_splitting(ddp) == {"optimize_ddp": False}  # warned once
    object.__setattr__(ddp, "bucket_bytes_cap", 2**20)
    assert ddp_graph_splitting(ddp) == {}  # split at the buckets
    assert ddp_graph_splitting(None) == {}  # no DDP: nothing changes


def test_find_block_class_and_blocks():
    from litgpt.model import Block

    model = tiny_gpt()
    assert find_block_class(model) is Block
    blocks = find_blocks(model, Block)
    assert [name for _, name, _ in blocks] == ["0", "1"]
    assert all(parent is model.transformer.h for parent, _, _ in blocks)
    compiled = compile_blocks(model)
    assert all(isinstance(b, lt.ThunderModule) for b in model.transformer.h) and compiled == list(model.transformer.h)
    assert find_block_class(model) is Block, "compiled blocks are still found by the class they compiled"
    assert list(model.state_dict()) == list(tiny_gpt().state_dict()), "regional compilation must keep the keys"


def test_block_errors_name_the_fix():
    mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="could not find the repeated transformer block of Sequential.*block_cls="):
        find_block_class(mlp)
    with pytest.raises(ValueError, match=r"block_cls=Conv2d does not occur in GPT .*leave block_cls=None"):
        find_blocks(tiny_gpt(), nn.Conv2d)
    with pytest.raises(TypeError, match="block_cls must be an nn.Module subclass"):
        find_blocks(tiny_gpt(), "Block")


def test_checkpoint_block_keeps_names_and_gradients():
    from litgpt.model import Block

    model, ref = tiny_gpt(), tiny_gpt()
    for _, _, block in find_blocks(model, Block):
        checkpoint_block(block)
        checkpoint_block(block)  # idempotent
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in ref.named_parameters()]
    x, y = token_batches(1)[0]
    lm_loss(model(x), y).backward()
    lm_loss(ref(x), y).backward()
    assert _grads_match_eager(model, ref) < 1e-6


def test_plugin_options_are_checked_up_front():
    with pytest.raises(ValueError, match=r"reshard_after_forward=1 must be True .* or an int >= 2"):
        FSDP(reshard_after_forward=1)
    with pytest.raises(TypeError, match=r"DDP got unknown argument\(s\) \['bucket_mb'\]"):
        DDP(bucket_mb=10)
    with pytest.raises(RuntimeError, match="needs an initialized process group: call torch.distributed.init_process"):
        FSDP().transform_module(tiny_gpt())
    with pytest.raises(RuntimeError, match="needs an initialized process group"):
        DDP().transform_module(tiny_gpt())


def test_compiled_module_keeps_its_own_class_when_reassigned():
    """fully_shard swaps ``module.__class__``; on a compiled module that must change the wrapper, not the original."""
    linear = nn.Linear(4, 4)
    cm = lt.compile(linear)
    subclass = type("Sub", (type(cm),), {})
    cm.__class__ = subclass
    assert type(cm) is subclass and type(linear) is nn.Linear
    assert cm(torch.randn(2, 4)).shape == (2, 4)
