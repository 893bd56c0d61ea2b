"""Fabric strategies on 2 CPU processes (Gloo), checked against Lightning's own strategies.

Lightning's ``fsdp`` strategy (FSDP1) refuses CPU accelerators, so the FSDP reference here is Lightning's
``ModelParallelStrategy`` with eager FSDP2 (``fully_shard`` per block and root), plus ``ddp``: in fp32 all of
them compute the same training run.
"""

from __future__ import annotations

import pytest
import torch

from lightning_thunder.plugins import Plugin
from tests.strategies.helpers import lm_loss, spawn, tiny_gpt, token_batches

pytest.importorskip("litgpt", reason="litgpt is part of the `test` extra")

STEPS = 10
LR = 1e-2
# fp32; the compiled and eager programs differ by reassociation only (~1e-6 per step).
RTOL, ATOL = 1e-4, 1e-5


def _eager_fsdp2(module: torch.nn.Module, device_mesh) -> torch.nn.Module:
    """Lightning's ModelParallelStrategy with plain eager FSDP2: the reference for thunder_fsdp."""
    from litgpt.model import Block
    from torch.distributed.fsdp import fully_shard

    mesh = device_mesh["data_parallel"]
    for m in module.modules():
        if isinstance(m, Block):
            fully_shard(m, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


class CountTraces(Plugin):
    """A compiler plugin that counts the torch-level traces it sees (to check the strategy passes it on)."""

    def __init__(self) -> None:
        self.traces = 0

    def transform_torch_trace(self, trace):
        self.traces += 1
        return trace


def _strategy(name: str):
    from lightning.fabric.strategies import FSDPStrategy, ModelParallelStrategy

    from lightning_thunder.strategies import ThunderFSDPStrategy

    if name == "thunder_fsdp_options":
        return ThunderFSDPStrategy(plugins=[CountTraces()], activation_checkpointing=True, reshard_after_forward=False)

    if name == "thunder_ddp_buckets":  # tiny buckets: the model spans many, as real models do
        from lightning_thunder.strategies import ThunderDDPStrategy

        return ThunderDDPStrategy(bucket_cap_mb=0.01)
    if name == "lightning_fsdp2":
        return ModelParallelStrategy(parallelize_fn=_eager_fsdp2, data_parallel_size=2, tensor_parallel_size=1)
    if name == "fsdp":  # Lightning's FSDP1 strategy, one unit per block (GPU only)
        from litgpt.model import Block

        return FSDPStrategy(auto_wrap_policy={Block})
    return name


def _to_float(t: torch.Tensor) -> float:
    return float(t.full_tensor() if hasattr(t, "full_tensor") else t)


def _train(
    rank: int, strategy: str, *, clip: float | None = None, accumulate: int = 1, accelerator: str = "cpu"
) -> dict:
    """10 optimizer steps with AdamW on the tiny LitGPT model; returns the mean loss of each step and the
    gradient norms that clipping saw."""
    import lightning_thunder as lt
    from lightning.fabric import Fabric

    torch._dynamo.reset()
    strategy_obj = _strategy(strategy)
    fabric = Fabric(accelerator=accelerator, devices=2, strategy=strategy_obj, precision="32-true")
    fabric.launch()
    model = tiny_gpt(seed=0)
    if strategy == "lightning_fsdp2":  # Lightning's own FSDP2 needs the optimizer after sharding
        model = fabric.setup_module(model)
        opt = fabric.setup_optimizers(torch.optim.AdamW(model.parameters(), lr=LR))
    else:  # ours (and DDP) take the optimizer built first, as Fabric users write it
        opt = torch.optim.AdamW(model.parameters(), lr=LR)
        model, opt = fabric.setup(model, opt)
    losses, norms, synced_while_accumulating = [], [], []
    for x, y in token_batches(STEPS, batch=2 * accumulate):
        x, y = x[rank::2].to(fabric.device), y[rank::2].to(fabric.device)
        total = torch.zeros((), device=fabric.device)
        for i, (xm, ym) in enumerate(zip(x.chunk(accumulate), y.chunk(accumulate))):
            with fabric.no_backward_sync(model, enabled=i < accumulate - 1):
                loss = lm_loss(model(xm), ym) / accumulate
                fabric.backward(loss)
            if i < accumulate - 1:  # FSDP only writes the (reduced) sharded .grad when it synchronizes
                synced_while_accumulating.append(any(p.grad is not None for p in model.parameters()))
            total += loss.detach()
        if clip is not None:
            norms.append(_to_float(fabric.clip_gradients(model, opt, max_norm=clip)))
        opt.step()
        opt.zero_grad()
        losses.append(float(fabric.all_reduce(total, reduce_op="mean")))
    out = {"losses": losses, "norms": norms, "synced_while_accumulating": synced_while_accumulating}
    if strategy.startswith("thunder"):
        stats = lt.compile_stats(model)
        out["graphs"], out["graph_breaks"] = stats.graphs, stats.graph_breaks
    if strategy == "thunder_fsdp_options":
        block_ops = [op.name for op in lt.last_traces(model.transformer.h[0])[0].ops]
        out["checkpoint_in_block_graph"] = any("checkpoint" in op for op in block_ops)
        out["plugin_traces"] = strategy_obj.plugins[0].traces
        out["reshard_after_forward"] = strategy_obj.fsdp.reshard_after_forward
    if strategy == "thunder_fsdp":
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor

        blocks = list(model.transformer.h)
        out["blocks_compiled_and_sharded"] = all(isinstance(b, (lt.ThunderModule, FSDPModule)) for b in blocks)
        out["root_sharded"] = isinstance(model._forward_module, FSDPModule)
        out["optimizer_on_model_params"] = {id(p) for g in opt.param_groups for p in g["params"]} == {
            id(p) for p in model.parameters()
        }
        out["all_dtensor"] = all(isinstance(p, DTensor) for p in model.parameters())
    return out


def _train_all(rank: int, runs: list[tuple[str, dict]]) -> dict:
    return {f"{name}{sorted(kw.items())}": _train(rank, name, **kw) for name, kw in runs}


def _assert_losses_match(actual: list[float], expected: list[float], what: str) -> None:
    assert len(actual) == len(expected) == STEPS
    torch.testing.assert_close(torch.tensor(actual), torch.tensor(expected), rtol=RTOL, atol=ATOL, msg=what)


@pytest.mark.slow
def test_fabric_thunder_fsdp_and_ddp_match_lightning_strategies():
    plain = {}
    runs = [
        ("thunder_fsdp", plain), ("lightning_fsdp2", plain), ("thunder_ddp", plain), ("ddp", plain),
        ("thunder_fsdp_options", plain), ("thunder_ddp_buckets", plain),
    ]
    res = spawn(_train_all, runs)[0]
    ref = res["ddp[]"]["losses"]
    assert ref[-1] < ref[0] - 0.5, f"the reference run does not learn: {ref}"
    _assert_losses_match(res["lightning_fsdp2[]"]["losses"], ref, "Lightning FSDP2 vs Lightning DDP")
    _assert_losses_match(res["thunder_fsdp[]"]["losses"], res["lightning_fsdp2[]"]["losses"], "thunder_fsdp vs FSDP2")
    _assert_losses_match(res["thunder_ddp[]"]["losses"], ref, "thunder_ddp vs ddp")
    _assert_losses_match(res["thunder_ddp_buckets[]"]["losses"], ref, "thunder_ddp over several DDP buckets vs ddp")
    # Options reach the compiler (plugins), FSDP2 (reshard_after_forward) and the blocks (checkpointing inside the
    # compiled graph), and change nothing numerically.
    options = res["thunder_fsdp_options[]"]
    _assert_losses_match(options["losses"], ref, "thunder_fsdp with plugins, checkpointing, no resharding vs ddp")
    assert options["plugin_traces"] == 1 and options["checkpoint_in_block_graph"], options
    assert options["reshard_after_forward"] is False
    fsdp = res["thunder_fsdp[]"]
    assert fsdp["blocks_compiled_and_sharded"] and fsdp["root_sharded"] and fsdp["all_dtensor"]
    assert fsdp["optimizer_on_model_params"], "the optimizer built before setup must step the sharded parameters"
    # Regional compilation: both blocks run one shared graph, without graph breaks.
    assert fsdp["graphs"] == 1 and fsdp["graph_breaks"] == [], fsdp
    assert res["thunder_ddp[]"]["graphs"] == 1 and res["thunder_ddp[]"]["graph_breaks"] == []


@pytest.mark.slow
def test_fabric_clipping_and_accumulation_match_ddp():
    kw = {"clip": 0.3, "accumulate": 2}
    runs = [("thunder_fsdp", kw), ("thunder_ddp", kw), ("ddp", kw)]
    res = spawn(_train_all, runs)
    key = lambda name: f"{name}{sorted(kw.items())}"  # noqa: E731
    ref = res[0][key("ddp")]
    assert all(n > 0.3 for n in ref["norms"]), f"clipping must be active in this test: {ref['norms']}"
    for name in ("thunder_fsdp", "thunder_ddp"):
        got = res[0][key(name)]
        _assert_losses_match(got["losses"], ref["losses"], f"{name} losses with clipping + accumulation")
        _assert_losses_match(got["norms"], ref["norms"], f"{name} gradient norms before clipping")
    assert not any(res[0][key("thunder_fsdp")]["synced_while_accumulating"]), "no_backward_sync did not block FSDP"
    # Every rank clips by the same (global) norm.
    assert res[0][key("thunder_fsdp")]["norms"] == res[1][key("thunder_fsdp")]["norms"]


CHECKPOINT_RUNS = {
    # name: (strategy, file or directory on disk)
    "fsdp_sharded": ("thunder_fsdp", "dir"),
    "fsdp_full": ("thunder_fsdp_full", "file"),
    "ddp_full": ("thunder_ddp", "file"),
}


def _checkpoint_strategy(name: str):
    from lightning_thunder.strategies import ThunderFSDPStrategy

    return ThunderFSDPStrategy(save_distributed_checkpoint=False) if name == "thunder_fsdp_full" else name


def _setup(rank: int, strategy: str, seed: int):
    from lightning.fabric import Fabric

    torch._dynamo.reset()
    fabric = Fabric(accelerator="cpu", devices=2, strategy=_checkpoint_strategy(strategy))
    fabric.launch()
    model = tiny_gpt(seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    model, opt = fabric.setup(model, opt)
    return fabric, model, opt


def _step(fabric, model, opt, batch, rank: int) -> float:
    x, y = batch[0][rank::2], batch[1][rank::2]
    loss = lm_loss(model(x), y)
    fabric.backward(loss)
    opt.step()
    opt.zero_grad()
    return float(fabric.all_reduce(loss.detach(), reduce_op="mean"))


def _train_and_save(rank: int, root: str) -> dict:
    from pathlib import Path

    batches = token_batches(5)
    out = {}
    for name, (strategy, _) in CHECKPOINT_RUNS.items():
        fabric, model, opt = _setup(rank, strategy, seed=0)
        for i in range(3):
            _step(fabric, model, opt, batches[i], rank)
            if i >= 1:  # the second save replaces the first one
                fabric.save(Path(root) / name, {"model": model, "optimizer": opt, "step": i + 1})
        # Step 4's loss checks the weights; step 5's also the optimizer state step 4 used.
        out[name] = [_step(fabric, model, opt, b, rank) for b in batches[3:]]
    return out


def _load_and_step(rank: int, root: str) -> dict:
    from pathlib import Path

    batches = token_batches(5)
    out = {}
    for name, (strategy, _) in CHECKPOINT_RUNS.items():
        fabric, model, opt = _setup(rank, strategy, seed=123)  # different weights: the checkpoint must restore them
        state = {"model": model, "optimizer": opt, "step": 0}
        fabric.load(Path(root) / name, state)
        out[name] = (state["step"], [_step(fabric, model, opt, b, rank) for b in batches[3:]])
        if name == "fsdp_sharded":
            out["missing_shard"] = _load_without_a_shard(fabric, Path(root) / name, state, rank)
    return out


def _load_without_a_shard(fabric, path, state, rank: int) -> str | None:
    """Load the sharded checkpoint with rank 1's shard gone: the error every rank raises (``None``: no error)."""
    from lightning_thunder.strategies.checkpoint import CheckpointError

    shard, aside = path / "__1_0.distcp", path.parent / "shard-aside"
    fabric.barrier()
    if rank == 0:
        shard.rename(aside)
    fabric.barrier()
    try:
        fabric.load(path, state)
    except CheckpointError as e:
        return str(e)
    finally:
        fabric.barrier()
        if rank == 0:
            aside.rename(shard)
    return None


@pytest.mark.slow
def test_fabric_save_then_load_in_fresh_processes_gives_the_same_next_steps(tmp_path):
    expected = spawn(_train_and_save, str(tmp_path))[0]
    for name, (_, kind) in CHECKPOINT_RUNS.items():
        path = tmp_path / name
        assert path.is_dir() if kind == "dir" else path.is_file(), f"{name}: expected a {kind} at {path}"
        assert not (tmp_path / f".{name}.partial").exists() and not (tmp_path / f".{name}.old").exists()
    assert (tmp_path / "fsdp_sharded" / "meta.pt").is_file()
    ranks = spawn(_load_and_step, str(tmp_path))
    got = ranks[0]
    # A missing shard: the same one line on every rank, naming it (rank 0 checks the checksums and broadcasts).
    for result in ranks:
        assert result["missing_shard"].startswith(
            f"checkpoint {tmp_path / 'fsdp_sharded'} is incomplete: __1_0.distcp is missing"
        ), result["missing_shard"]
    for name in CHECKPOINT_RUNS:
        step, losses = got[name]
        assert step == 3, f"{name}: metadata not restored ({step})"
        assert losses == expected[name], f"{name}: losses of the 2 steps after loading {losses} != {expected[name]}"
