"""Tensor parallelism and 2-D FSDP x TP on CPU (Gloo): the ``TensorParallel`` plugin's plan, and the ``thunder_fsdp``
strategies with ``tensor_parallel_size`` on 4 processes, checked against eager single-process training.

One spawn of 4 processes runs every distributed scenario in turn (starting 4 processes on 2 cores is the slow part).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.strategies.helpers import lm_loss, spawn, token_batches

pytest.importorskip("litgpt", reason="litgpt is part of the `test` extra")

WORLD = 4
STEPS = 5
SAVE_AFTER = 3  # the checkpoint holds the state after this many steps
ROWS = 4  # sequences per global batch (token_batches)
LR = 1e-2
CLIP = 0.3
# fp32; tensor-parallel and sharded programs sum in another order than eager (~1e-6 per step).
RTOL, ATOL = 1e-4, 1e-5

#: GQA (8 query heads, 4 query groups), so tensor parallelism over 2 and over 4 ranks both split whole groups.
TP_LLAMA = dict(
    n_layer=2, n_embd=32, n_head=8, n_query_groups=4, intermediate_size=64, vocab_size=96, padded_vocab_size=96,
    block_size=16,
)


def tp_gpt(seed: int = 0) -> nn.Module:
    from litgpt import GPT, Config

    torch.manual_seed(seed)
    return GPT(Config.from_name("Llama-3.2-1B", **TP_LLAMA))


def _eager_reference(clip: float | None, batches: list | None = None) -> dict:
    """Single-process eager training on the global batches: the losses (and clipped norms) to match."""
    model = tp_gpt()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses, norms = [], []
    for x, y in batches or token_batches(STEPS):
        loss = lm_loss(model(x), y)
        loss.backward()
        if clip is not None:
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    moments = {name: opt.state[p]["exp_avg"] for name, p in model.named_parameters()}
    return {"losses": losses, "norms": norms, "state": model.state_dict(), "exp_avg": moments}


# ------------------------------------------------------------------------------------------------ Fabric
def _fabric(tp: int, fp8: bool = False, **kwargs):
    from lightning.fabric import Fabric

    import lightning_thunder as lt
    from lightning_thunder.strategies import ThunderFSDPStrategy

    torch._dynamo.reset()
    strategy = ThunderFSDPStrategy(tensor_parallel_size=tp, **kwargs)
    precision = {"plugins": [lt.ThunderFP8(emulate=True)]} if fp8 else {"precision": "32-true"}
    fabric = Fabric(accelerator="cpu", devices=WORLD, strategy=strategy, **precision)
    fabric.launch()
    return fabric


def _fabric_steps(fabric, model, opt, steps: range, clip: float | None = None) -> tuple[list[float], list[float]]:
    """Train on global batches ``steps``; each data-parallel rank takes its rows (a tensor-parallel group shares)."""
    sampler = fabric.strategy.distributed_sampler_kwargs
    rank, replicas = sampler["rank"], sampler["num_replicas"]
    losses, norms = [], []
    batches = token_batches(STEPS)
    for i in steps:
        x, y = batches[i]
        loss = lm_loss(model(x[rank::replicas]), y[rank::replicas])
        fabric.backward(loss)
        if clip is not None:
            norms.append(float(fabric.clip_gradients(model, opt, max_norm=clip)))
        opt.step()
        opt.zero_grad()
        losses.append(float(fabric.all_reduce(loss.detach(), reduce_op="mean")))
    return losses, norms


def _fabric_run(
    tp: int, root: Path, name: str, *, clip: float | None = None, sharded: bool = True, replay: bool = True,
    fp8: bool = False,
) -> dict:
    """Train all steps, saving after ``SAVE_AFTER``; then a fresh model loads the checkpoint and replays the rest."""
    import lightning_thunder as lt
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    fabric = _fabric(tp, fp8=fp8, save_distributed_checkpoint=sharded)
    model = tp_gpt(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    model, opt = fabric.setup(model, opt)
    first, norms = _fabric_steps(fabric, model, opt, range(SAVE_AFTER), clip)
    fabric.save(root / name, {"model": model, "optimizer": opt, "step": SAVE_AFTER})
    rest, more_norms = _fabric_steps(fabric, model, opt, range(SAVE_AFTER, STEPS), clip)
    mesh = fabric.strategy.device_mesh
    block = model.transformer.h[0]
    out = {
        "losses": first + rest,
        "norms": norms + more_norms,
        "mesh": (mesh.mesh_dim_names, tuple(mesh.shape), mesh["tensor_parallel"].mesh.tolist()),
        "sampler": fabric.strategy.distributed_sampler_kwargs,
        "graphs": lt.compile_stats(model).graphs,
        "units": [
            isinstance(m, FSDPModule) for m in (model.transformer.wte, block, model.transformer.ln_f, model.lm_head)
        ],
        "placements": {n: str(p.placements) for n, p in model.module.named_parameters() if isinstance(p, DTensor)},
        "local_qkv": tuple(block.attn.qkv.weight.to_local().shape),
    }
    if tp > 1:  # what the compiled block runs: per-rank shapes and the tensor-parallel collectives
        forward, backward = lt.last_traces(block)[-1], lt.last_backward_traces(block)[-1]
        out["forward_ops"] = [op.name for op in forward.ops]
        out["backward_ops"] = [op.name for op in backward.ops]
        out["forward_inputs"] = [tuple(p.val.shape) for p in forward.inputs if hasattr(p.val, "shape")]
    if tp > 1:  # sequence parallelism needs a sequence length divisible by tp: refused up front, not a hang
        try:
            model(token_batches(1)[0][0][:, : 12 - 1])
        except ValueError as e:
            out["uneven_sequence"] = str(e)
    if not replay:
        return out
    # A fresh model with other weights (and a fresh optimizer) loads the checkpoint and replays the last steps.
    fabric = _fabric(tp, save_distributed_checkpoint=sharded)
    model = tp_gpt(seed=123)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    model, opt = fabric.setup(model, opt)
    state = {"model": model, "optimizer": opt, "step": 0}
    fabric.load(root / name, state)
    out["loaded_step"] = state["step"]
    out["replayed"], _ = _fabric_steps(fabric, model, opt, range(SAVE_AFTER, STEPS), clip)
    return out


def _load_elsewhere(tp: int, root: Path, name: str) -> list[float]:
    """Load a checkpoint saved under another mesh and replay the last steps."""
    fabric = _fabric(tp, save_distributed_checkpoint=False)
    model = tp_gpt(seed=123)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    model, opt = fabric.setup(model, opt)
    fabric.load(root / name, {"model": model, "optimizer": opt})
    return _fabric_steps(fabric, model, opt, range(SAVE_AFTER, STEPS))[0]


# ------------------------------------------------------------------------------------------------ Trainer
def _trainer_run(tp: int, checkpoint: Path) -> dict:
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_thunder.strategies import ThunderFSDPTrainerStrategy

    class LitTP(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model: nn.Module | None = None
            self.losses: list[float] = []

        def configure_model(self) -> None:
            if self.model is None:
                self.model = tp_gpt(seed=0)

        def training_step(self, batch, batch_idx):
            return lm_loss(self.model(batch[0]), batch[1])

        def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
            self.losses.append(float(self.trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")))

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=LR)

    x, y = _trainer_dataset()
    torch._dynamo.reset()
    strategy = ThunderFSDPTrainerStrategy(tensor_parallel_size=tp)
    trainer = L.Trainer(
        accelerator="cpu", devices=WORLD, strategy=strategy, max_steps=STEPS, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=CLIP,
    )
    module = LitTP()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=ROWS // (WORLD // tp)))
    trainer.save_checkpoint(checkpoint)  # sharded: the model and AdamW's state, as DTensor shards
    mesh = strategy.device_mesh
    return {
        "losses": module.losses, "mesh": tuple(mesh.shape), "module_mesh": module.device_mesh is mesh,
        "eager_steps_warning": [str(w.message) for w in caught if "does not compile the steps" in str(w.message)],
    }


def _trainer_dataset() -> tuple[torch.Tensor, torch.Tensor]:
    batches = token_batches(STEPS)
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def _trainer_global_batches(data_parallel_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The global batches the Trainer trains on: Lightning's DistributedSampler (it shuffles the training set, seed 0)
    for each data-parallel rank, ``ROWS / data_parallel_size`` rows per rank and step."""
    from torch.utils.data import DistributedSampler

    x, y = _trainer_dataset()
    per_rank = ROWS // data_parallel_size
    orders = [list(DistributedSampler(x, num_replicas=data_parallel_size, rank=r)) for r in range(data_parallel_size)]
    steps = range(STEPS)
    rows = [torch.tensor([i for order in orders for i in order[k * per_rank : (k + 1) * per_rank]]) for k in steps]
    return [(x[r], y[r]) for r in rows]


def _all_scenarios(rank: int, root: str) -> dict:
    root_path = Path(root)
    out = {
        "2x2": _fabric_run(2, root_path, "2x2", clip=CLIP),
        "1x4": _fabric_run(4, root_path, "1x4", sharded=False),
        "4x1": _fabric_run(1, root_path, "4x1", replay=False),
        "2x2 fp8": _fabric_run(2, root_path, "2x2 fp8", replay=False, fp8=True),
    }
    out["1x4 full checkpoint loaded on 2x2"] = _load_elsewhere(2, root_path, "1x4")
    out["trainer 2x2"] = _trainer_run(2, root_path / "trainer 2x2")
    return out


def _assert_close(actual, expected, what: str) -> None:
    assert len(actual) == len(expected), what
    torch.testing.assert_close(torch.tensor(actual), torch.tensor(expected), rtol=RTOL, atol=ATOL, msg=what)


@pytest.mark.slow
def test_fsdp_and_tensor_parallel_on_2d_meshes_match_eager_training(tmp_path):
    results = spawn(_all_scenarios, str(tmp_path), world_size=WORLD, timeout=600)
    res = results[0]
    clipped, plain = _eager_reference(clip=CLIP), _eager_reference(clip=None)
    assert plain["losses"][-1] < plain["losses"][0] - 0.2, f"the reference does not learn: {plain['losses']}"
    assert all(n > CLIP for n in clipped["norms"]), f"clipping must be active: {clipped['norms']}"

    two_by_two = res["2x2"]
    _assert_close(two_by_two["losses"], clipped["losses"], "2x2 losses vs eager")
    _assert_close(two_by_two["norms"], clipped["norms"], "2x2 gradient norms (both mesh dims) vs eager")
    assert all(r["2x2"]["norms"] == two_by_two["norms"] for r in results), "every rank clips by the same norm"
    for name in ("1x4", "4x1"):
        _assert_close(res[name]["losses"], plain["losses"], f"{name} losses vs eager")
    # A fresh model loading the checkpoint replays the remaining steps exactly.
    for name in ("2x2", "1x4"):
        assert res[name]["loaded_step"] == SAVE_AFTER
        assert res[name]["replayed"] == res[name]["losses"][SAVE_AFTER:], f"{name}: replay after loading differs"
    # A full checkpoint is the model in LitGPT's layout: it loads onto another mesh (and the optimizer state with it).
    _assert_close(res["1x4 full checkpoint loaded on 2x2"], plain["losses"][SAVE_AFTER:], "1x4 checkpoint on 2x2")
    full = torch.load(tmp_path / "1x4", weights_only=False)
    assert full["model"].keys() == plain["state"].keys()
    reference_after_save = _eager_state_after(SAVE_AFTER)
    for key, value in full["model"].items():
        torch.testing.assert_close(value, reference_after_save[key], rtol=RTOL, atol=ATOL, msg=key)

    # The mesh: ("data_parallel", "tensor_parallel"), tensor parallelism innermost (consecutive ranks).
    assert res["2x2"]["mesh"] == (("data_parallel", "tensor_parallel"), (2, 2), [0, 1])
    assert results[3]["2x2"]["mesh"][2] == [2, 3]
    assert [r["2x2"]["sampler"] for r in results] == [{"num_replicas": 2, "rank": r // 2} for r in range(WORLD)]
    assert res["1x4"]["mesh"][1] == (1, 4) and res["4x1"]["mesh"][1] == (4, 1)
    # FSDP units: embedding, each block, [final norm + head] (and the root); one compiled graph for both blocks.
    for name in ("2x2", "1x4", "4x1"):
        assert res[name]["units"] == [True] * 4 and res[name]["graphs"] == 1, (name, res[name])
    # 2-D parameters: sharded over data parallel and split over tensor parallel (fused qkv by query groups).
    placements = res["2x2"]["placements"]
    assert "Shard(dim=0)" in placements["transformer.h.0.attn.qkv.weight"], placements
    assert placements["transformer.h.0.norm_1.weight"].endswith("Replicate())"), placements
    qkv_rows = (TP_LLAMA["n_head"] + 2 * TP_LLAMA["n_query_groups"]) * 4  # head size 4
    assert res["2x2"]["local_qkv"] == (qkv_rows // 4, 32), "qkv rows split over tp=2, then over dp=2"
    assert res["1x4"]["local_qkv"] == (qkv_rows // 4, 32) and res["4x1"]["local_qkv"] == (qkv_rows // 4, 32)
    assert "sequence length 11, not divisible by 2" in res["2x2"]["uneven_sequence"]
    assert "sequence length 11, not divisible by 4" in res["1x4"]["uneven_sequence"]
    # The compiled block runs per-rank shapes (the sequence-sharded input, a quarter of qkv for tp=4) and the
    # tensor-parallel collectives are in its traces.
    for name, tp in (("2x2", 2), ("1x4", 4)):
        r = res[name]
        assert (2 if tp == 2 else 4, 12 // tp, 32) in r["forward_inputs"], r["forward_inputs"]
        assert (qkv_rows // tp, 32) in r["forward_inputs"], r["forward_inputs"]
        for ops in (r["forward_ops"], r["backward_ops"]):
            assert any("all_gather_into_tensor" in op for op in ops) and any("reduce_scatter" in op for op in ops)

    # ThunderFP8 composes: the split linear layers run FP8 matmuls on their shards (bf16 weights, FP8 rounding).
    fp8 = res["2x2 fp8"]
    assert any("fp8_cast" in op for op in fp8["forward_ops"]) and any("fp8_cast" in op for op in fp8["backward_ops"])
    assert max(abs(a - b) for a, b in zip(fp8["losses"], plain["losses"])) < 0.1, (fp8["losses"], plain["losses"])
    assert fp8["losses"][-1] < fp8["losses"][0] - 0.2, fp8["losses"]

    trainer = res["trainer 2x2"]
    assert trainer["mesh"] == (2, 2) and trainer["module_mesh"]
    # The steps stay eager under tensor parallelism (Dynamo cannot trace the vocabulary-parallel embedding), said once.
    assert len(trainer["eager_steps_warning"]) == 1 and "tensor_parallel_size=2" in trainer["eager_steps_warning"][0]
    # The Trainer's samplers split by data-parallel rank: its global batches are the data-parallel ranks' rows.
    reference = _eager_reference(clip=CLIP, batches=_trainer_global_batches(data_parallel_size=2))
    _assert_close(trainer["losses"], reference["losses"], "Trainer 2x2 losses (clipped) vs eager")
    # Its sharded checkpoint holds the model and AdamW's moments in LitGPT's layout (qkv rows included).
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(tmp_path / "trainer 2x2", tmp_path / "trainer.pt")
    saved = torch.load(tmp_path / "trainer.pt", weights_only=False)
    # (Adam's normalized update magnifies the reassociation noise of tiny gradients: 1e-4 absolute on weights of
    # ~0.02-0.1; a wrong row order would be off by the weights themselves.)
    for key, value in reference["state"].items():
        got = saved["state_dict"][f"model.{key}"]
        torch.testing.assert_close(got, value, rtol=1e-3, atol=1e-4, msg=lambda m, key=key: f"{key}: {m}")
    for key, value in reference["exp_avg"].items():
        moment = saved["optimizer_0"]["state"][f"model.{key}"]["exp_avg"]
        torch.testing.assert_close(moment, value, rtol=1e-3, atol=1e-5, msg=lambda m, key=key: f"exp_avg {key}: {m}")


def _eager_state_after(steps: int) -> dict:
    model = tp_gpt()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    for x, y in token_batches(STEPS)[:steps]:
        lm_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return model.state_dict()


# ------------------------------------------------------------------------------------------------ single process
def test_inferred_plan_for_litgpt_blocks():
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel, SequenceParallel

    from lightning_thunder.plugins.tensor_parallel import infer_plan

    plan = infer_plan(tp_gpt(), 2)
    block = {k.removeprefix("transformer.h.0."): type(v) for k, v in plan.items() if k.startswith("transformer.h.0.")}
    assert block == {
        "attn.qkv": ColwiseParallel, "attn.proj": RowwiseParallel, "mlp.fc_1": ColwiseParallel,
        "mlp.fc_2": ColwiseParallel, "mlp.proj": RowwiseParallel, "attn": PrepareModuleInput,
        "mlp": PrepareModuleInput, "norm_1": SequenceParallel, "norm_2": SequenceParallel,
    }
    assert {k for k in plan if not k.startswith("transformer.h.")} == {"transformer.wte", "transformer.ln_f", "lm_head"}
    assert plan["transformer.wte"].output_layouts == (Shard(1),) and plan["lm_head"].output_layouts == (Replicate(),)
    # Without sequence parallelism the residual stream is replicated: no norm entries, no input gathering.
    plain = infer_plan(tp_gpt(), 2, sequence_parallel=False)
    assert not any(isinstance(v, (SequenceParallel, PrepareModuleInput)) for v in plain.values())
    assert plain["transformer.h.1.attn.proj"].output_layouts == (Replicate(),)
    # loss_parallel leaves the logits sharded over the vocabulary (a DTensor).
    sharded = infer_plan(tp_gpt(), 2, loss_parallel=True)["lm_head"]
    assert sharded.output_layouts == (Shard(-1),) and sharded.use_local_output is False


def test_qkv_rows_are_reordered_into_whole_query_groups_per_rank():
    from lightning_thunder.plugins.tensor_parallel import qkv_tp_order

    # 4 query heads in 2 groups, head size 1: rows q0 q1 q2 q3 | k0 k1 | v0 v1.
    order = qkv_tp_order(n_head=4, n_query_groups=2, head_size=1, size=2)
    assert order.tolist() == [0, 1, 4, 6, 2, 3, 5, 7]  # rank 0: q0 q1 k0 v0; rank 1: q2 q3 k1 v1
    assert sorted(qkv_tp_order(8, 4, 3, 4).tolist()) == list(range((8 + 2 * 4) * 3))


def test_tensor_parallel_errors_name_the_sizes_and_the_fix():
    from lightning_thunder.plugins import TensorParallel
    from lightning_thunder.plugins.tensor_parallel import infer_plan
    from tests.strategies.helpers import tiny_gpt

    with pytest.raises(ValueError, match=r"n_head=8 and n_query_groups=4: both must be divisible by the tensor-par"
                                         r"allel size 3; choose a tensor-parallel size that divides 4"):
        infer_plan(tp_gpt(), 3)
    with pytest.raises(ValueError, match=r"n_head=4 and n_query_groups=2: .* divisible by the tensor-parallel size 4"):
        infer_plan(tiny_gpt(), 4)  # GQA with 2 groups cannot be split 4 ways
    with pytest.raises(ValueError, match=r"cannot infer a plan for `0.attn`: no fused `qkv`.*TensorParallel\(plan="):
        infer_plan(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), 2, block_cls=nn.Linear)
    with pytest.raises(ValueError, match=r"1-D mesh, got a 2-D mesh"):
        TensorParallel(mesh=type("Mesh", (), {"ndim": 2, "mesh_dim_names": ("a", "b")})())
    with pytest.raises(TypeError, match="plan must map qualified module names to ParallelStyle"):
        TensorParallel(plan=["attn.qkv"])
    with pytest.raises(RuntimeError, match="The TensorParallel plugin needs an initialized process group"):
        TensorParallel().transform_module(tp_gpt())


@pytest.mark.parametrize("kind", ["fabric", "trainer"])
def test_world_size_not_divisible_by_the_tensor_parallel_size(kind):
    from lightning_thunder.strategies import ThunderFSDPStrategy, ThunderFSDPTrainerStrategy

    cls = ThunderFSDPStrategy if kind == "fabric" else ThunderFSDPTrainerStrategy
    with pytest.raises(ValueError, match=r"tensor_parallel_size=0 must be an int >= 1"):
        cls(tensor_parallel_size=0)
    strategy = cls(tensor_parallel_size=2)
    strategy.parallel_devices = [torch.device("cpu")] * 3
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 does not divide the world size 3 \(num_nodes=1 x "
                                         r"devices=3\).*choose tensor_parallel_size among 1, 3"):
        strategy.setup_environment()


# ------------------------------------------------------------------------------------------------ recipes
def test_recipe_key_tensor_parallel_size():
    from lightning_thunder.recipes import load_config
    from lightning_thunder.recipes.errors import ConfigError
    from lightning_thunder.recipes.plugins import RecipePlugins, build_strategy

    recipe = Path(__file__).resolve().parents[2] / "examples" / "recipes" / "llama-fsdp-tp-4gpu.yaml"
    cfg = load_config(recipe)
    assert (cfg.strategy, cfg.devices, cfg.tensor_parallel_size) == ("thunder_fsdp", 4, 2)
    strategy = build_strategy(cfg.strategy, RecipePlugins(activation_checkpointing=True), cfg.tensor_parallel_size)
    assert strategy.tensor_parallel_size == 2 and strategy.fsdp.activation_checkpointing
    with pytest.raises(ConfigError, match=r"tensor_parallel_size=2 does not divide devices=3: .* allowed "
                                          r"tensor_parallel_size values for devices=3: 1, 3"):
        load_config(recipe, ["devices=3"])
    with pytest.raises(ConfigError, match=r"tensor_parallel_size=2 with strategy='thunder_ddp'.*strategy=thunder_fsdp"):
        load_config(recipe, ["strategy=thunder_ddp"])
    # A tensor-parallel pair reads one batch: the global batch counts data-parallel ranks, not devices.
    with pytest.raises(ConfigError, match=r"multiple of train.micro_batch_size \(2\) times the data-parallel size "
                                          r"\(devices 4 / tensor_parallel_size 2\) = 4"):
        load_config(recipe, ["train.global_batch_size=6"])
    assert load_config(recipe, ["train.global_batch_size=4"]).train.global_batch_size == 4
