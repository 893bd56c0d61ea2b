"""FP8 all-gather's pieces on one process (emulated FP8, CPU): the gathered FP8 weight in ``fp8_linear`` (eager and
compiled), the grouped amax and cast against the reference, the two subclasses' dispatch, the ``all_gather`` checks,
and the FSDP plugin with ``FP8`` on a Gloo group of one rank (refresh per step, checkpoints, errors)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

import lightning_thunder as lt
from lightning_thunder.fp8 import fp8_linear
from lightning_thunder.fp8.quantize import E4M3, fp8_amax_group, fp8_cast_group, quantize_reference
from lightning_thunder.fp8.weights import FP8GatheredWeight, FP8ShardedWeight, OneRankShard
from lightning_thunder.plugins import FP8, FSDP
from tests.strategies.helpers import lm_loss, tiny_gpt, token_batches


def _gathered(w: torch.Tensor, requires_grad: bool = True) -> FP8GatheredWeight:
    q, scale_inv = quantize_reference(w.detach(), E4M3, rowwise=False)
    return FP8GatheredWeight(q, scale_inv, w.dtype, requires_grad=requires_grad)


def _linear_grads(weight: torch.Tensor, x: torch.Tensor, dy: torch.Tensor, compiled: bool) -> tuple:
    x = x.detach().requires_grad_()
    fn = (lambda a, w: fp8_linear(a, w, emulate=True))
    if compiled:
        fn = lt.compile(lambda a, w: torch.nn.functional.linear(a, w), plugins=[FP8(emulate=True)])
    y = fn(x, weight)
    y.backward(dy)
    return y, x.grad, weight.grad, fn


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_fp8_linear_consumes_the_gathered_weight_as_the_weight_quantized_in_the_layer(compiled):
    torch.manual_seed(0)
    w = torch.randn(48, 32, dtype=torch.bfloat16) * 0.1
    x, dy = torch.randn(3, 8, 32, dtype=torch.bfloat16), torch.randn(3, 8, 48, dtype=torch.bfloat16)
    torch._dynamo.reset()
    ref_y, ref_dx, ref_dw, _ = _linear_grads(w.clone().requires_grad_(), x, dy, compiled)
    torch._dynamo.reset()
    gathered = _gathered(w)
    y, dx, dw, fn = _linear_grads(gathered, x, dy, compiled)
    # The same scale and cast as the layer's own quantization: equal to the last bit, in both directions.
    assert torch.equal(y, ref_y) and torch.equal(dx, ref_dx) and torch.equal(dw, ref_dw)
    assert type(dw) is torch.Tensor and dw.dtype == torch.bfloat16 and dw.shape == w.shape
    if compiled:  # the forward takes the FP8 values and the scale, and quantizes only x
        forward = lt.last_traces(fn)[-1]
        assert [str(p.val.dtype) for p in forward.inputs].count("torch.float8_e4m3fn") == 1
        assert str(forward).count("fp8_amax_kernel(") == 1


def test_amax_and_cast_group_match_the_reference_with_a_given_maximum():
    torch.manual_seed(0)
    tensors = [torch.randn(16, 32, dtype=torch.bfloat16), torch.randn(5, 7, dtype=torch.bfloat16) * 3,
               torch.empty(0, 32, dtype=torch.bfloat16)]
    amax = fp8_amax_group(tensors)
    assert amax.dtype == torch.float32
    assert amax.tolist() == [float(t.abs().max()) if t.numel() else 0.0 for t in tensors]
    shared = torch.full((3,), 7.5)  # e.g. the maximum of each whole weight over all ranks
    for t, (q, scale_inv), m in zip(tensors, fp8_cast_group(tensors, shared, E4M3), shared):
        ref_q, ref_scale_inv = quantize_reference(torch.cat([t, t.new_full((1, t.shape[1]), float(m))]), E4M3, False)
        assert torch.equal(q.view(torch.uint8), ref_q[: t.shape[0]].view(torch.uint8))
        assert torch.equal(scale_inv, ref_scale_inv)  # an empty shard too: the whole weight's scale


def test_the_gathered_weight_is_a_high_precision_tensor_and_other_ops_dequantize_with_one_warning():
    w = torch.randn(16, 32, dtype=torch.bfloat16)
    g = _gathered(w, requires_grad=False)
    assert (g.shape, g.dtype, g.requires_grad) == (w.shape, torch.bfloat16, False)
    param = nn.Parameter(g)  # what FSDP2 makes of it: still the FP8 weight
    assert isinstance(param, FP8GatheredWeight) and param._data.dtype == E4M3 and param.requires_grad
    with pytest.warns(UserWarning, match=r"dequantized FP8 weight .* pass all_gather='bf16'"):
        doubled = g * 2
    assert type(doubled) is torch.Tensor and torch.equal(doubled, g.dequantize() * 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g * 3  # the same op warns once


def test_the_sharded_weight_runs_every_op_on_its_shard_and_stays_itself_only_for_fsdp_s_ops():
    shard = torch.randn(8, 4)
    w = FP8ShardedWeight(shard, group=None, index=3)  # type: ignore[arg-type]
    padded = w.new_zeros(10, 4)
    assert isinstance(padded, FP8ShardedWeight) and padded._index == 3
    view = padded.narrow(0, 0, 8)
    assert isinstance(view, FP8ShardedWeight) and view._tensor.data_ptr() == padded._tensor.data_ptr()
    assert view.copy_(w) is view and torch.equal(padded._tensor[:8], shard)  # in place: the destination
    assert type(torch.zeros_like(w)) is torch.Tensor  # optimizer states are plain
    before = w._tensor.clone()
    torch._foreach_mul_([w], 2.0)  # in place, and no result at the dispatch level (foreach and fused optimizers)
    assert torch.equal(w._tensor, before * 2)
    assert type(w.abs().max()) is torch.Tensor and float(w.abs().max()) == float(shard.abs().max())


class _Group:
    """An FP8AllGather stand-in that hands out fixed FP8 shards."""

    def __init__(self, q: torch.Tensor, scale_inv: torch.Tensor) -> None:
        self.q, self.scale_inv = q, scale_inv

    def quantized(self, weight: FP8ShardedWeight) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q, self.scale_inv


class _Mesh:
    def __init__(self, n: int) -> None:
        self.n = n

    def size(self) -> int:
        return self.n


def test_fsdp_extension_pads_uneven_shards_and_on_one_rank_gathers_nothing():
    shard = torch.randn(3, 16, dtype=torch.bfloat16)
    q, scale_inv = quantize_reference(shard, E4M3, False)
    w = FP8ShardedWeight(shard, _Group(q, scale_inv), 0)  # type: ignore[arg-type]
    # 7 rows over 2 ranks: shards of 4 rows, this one holds 3 and sends a zero row after them.
    (sent,), (meta,) = w.fsdp_pre_all_gather(_Mesh(2), torch.Size([7, 16]), (16, 1), None, None)
    assert sent.shape == (4, 16) and sent.dtype == E4M3 and meta is scale_inv
    assert torch.equal(sent[:3].view(torch.uint8), q.view(torch.uint8)) and not sent[3].float().any()
    gathered, inner = w.fsdp_post_all_gather((torch.cat([sent, sent]),), (scale_inv,), torch.bfloat16)
    assert isinstance(gathered, FP8GatheredWeight) and gathered.dtype == torch.bfloat16 and inner[0].shape == (8, 16)
    # One rank: an empty input, and the FP8 weight itself as the gathered one.
    (sent,), meta = w.fsdp_pre_all_gather(_Mesh(1), torch.Size([3, 16]), (16, 1), None, None)
    assert sent.numel() == 0 and meta[1] is q
    gathered, _ = w.fsdp_post_all_gather((sent,), meta, torch.bfloat16)
    assert gathered._data is q
    one = OneRankShard(shard)
    (sent,), meta = one.fsdp_pre_all_gather(_Mesh(1), torch.Size([3, 16]), (16, 1), None, None)
    unsharded, _ = one.fsdp_post_all_gather((sent,), meta, torch.bfloat16)
    assert sent.numel() == 0 and unsharded is shard  # used in place
    with pytest.raises(RuntimeError, match="cannot hand a torch.bfloat16 shard to a parameter computed in"):
        one.fsdp_post_all_gather((sent,), meta, torch.float32)


def test_all_gather_defaults_by_recipe_and_rejects_fp8_with_rowwise():
    assert FP8(emulate=True).all_gather == "fp8" and FP8(recipe="rowwise", emulate=True).all_gather == "bf16"
    assert lt.ThunderFP8(emulate=True, all_gather="bf16").all_gather == "bf16"
    with pytest.raises(ValueError, match=r"all_gather='fp8' needs recipe='tensorwise'.*pass all_gather='bf16'"):
        lt.ThunderFP8(recipe="rowwise", emulate=True, all_gather="fp8")
    with pytest.raises(ValueError, match=r"all_gather='int8' is not supported; choose one of \['fp8', 'bf16'\]"):
        FP8(emulate=True, all_gather="int8")


@pytest.fixture
def one_rank_group():
    """A Gloo process group of one rank in this process."""
    pytest.importorskip("litgpt", reason="litgpt is part of the `test` extra")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    dist.destroy_process_group()


def _train(all_gather: str, steps: int = 3, **adamw: bool) -> tuple[list[float], nn.Module, FSDP]:
    torch._dynamo.reset()
    fp8 = FP8(emulate=True, all_gather=all_gather)
    fsdp = FSDP(fp8=fp8)
    model = lt.compile(tiny_gpt().bfloat16(), plugins=[fsdp, fp8])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, **adamw)
    losses = []
    for x, y in token_batches(steps):
        loss = lm_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses, model, fsdp


def test_fsdp_plugin_gathers_fp8_weights_refreshes_once_per_step_and_keeps_state_dicts_plain(one_rank_group):
    bf16_losses, _, bf16_fsdp = _train("bf16")
    losses, model, fsdp = _train("fp8")
    assert bf16_fsdp.fp8_all_gather is None and losses == bf16_losses
    # The optimizer's foreach and fused implementations update the wrapped shards in place, as the for-loop one does.
    assert _train("fp8", foreach=True)[0] == losses and _train("fp8", fused=True)[0] == losses
    group = fsdp.fp8_all_gather
    assert len(group.names) == 10 and group.names[0] == "transformer.h.0.attn.qkv" and group.refreshes == 3
    qkv = model.original_module.transformer.h[0].attn.qkv
    assert isinstance(qkv.weight._local_tensor, FP8ShardedWeight)
    # On one rank nothing is gathered: between the forward and the backward the layer holds the FP8 weight the
    # refresh made, not a copy of it (one FSDP unit, the root, keeps its parameters gathered until the backward).
    x, y = token_batches(1)[0]
    loss = lm_loss(model(x), y)
    gathered = qkv.weight
    assert isinstance(gathered, FP8GatheredWeight) and gathered._data.data_ptr() == group._cache[0][0].data_ptr()
    loss.backward()
    assert group.refreshes == 4  # the third optimizer step's weights, quantized at this forward's first all-gather
    state = model.state_dict()
    assert {type(v._local_tensor) for v in state.values()} == {torch.Tensor}
    # Loading a state dict overwrites the shards: the next all-gather requantizes them.
    new = {k: (v.full_tensor() * 0.5).detach() for k, v in state.items()}
    mesh, placements = qkv.weight.device_mesh, qkv.weight.placements
    model.load_state_dict({k: torch.distributed.tensor.distribute_tensor(v, mesh, placements) for k, v in new.items()})
    q, scale_inv = group.quantized(qkv.weight._local_tensor)
    assert group.refreshes == 5
    ref_q, ref_scale_inv = quantize_reference(new["transformer.h.0.attn.qkv.weight"], E4M3, False)
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)) and torch.equal(scale_inv, ref_scale_inv)
    assert group.quantized(qkv.weight._local_tensor)[0] is q and group.refreshes == 5  # unchanged: reused


def test_fsdp_plugin_explains_where_fp8_all_gather_cannot_run(one_rank_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    model = tiny_gpt()
    fc = model.transformer.h[0].mlp.fc_1  # as tensor parallelism leaves it: a DTensor
    fc.weight = nn.Parameter(distribute_tensor(fc.weight.detach(), mesh, [Replicate()]))
    with pytest.raises(ValueError, match=r"FP8 all-gather is not available with tensor parallelism .* pass "
                                         r"all_gather='bf16' to ThunderFP8/FP8"):
        FSDP(fp8=FP8(emulate=True, all_gather="fp8")).gathers_fp8(model, mesh)
    with pytest.warns(UserWarning, match=r"not available with tensor parallelism .* all-gathered in bf16"):
        assert not FSDP(fp8=FP8(emulate=True)).gathers_fp8(model, mesh)
    # On one rank the model is one unit: resharding to a smaller group does not arise, FP8 all-gather applies.
    assert FSDP(reshard_after_forward=2, fp8=FP8(emulate=True, all_gather="fp8")).gathers_fp8(tiny_gpt(), mesh)
    assert not FSDP(fp8=FP8(emulate=True, all_gather="bf16")).gathers_fp8(tiny_gpt(), mesh)


def test_fp8_plugin_refuses_to_keep_a_gathered_weight_in_high_precision():
    torch._dynamo.reset()
    layer = nn.Linear(32, 48, bias=False).bfloat16()
    layer.weight = nn.Parameter(_gathered(layer.weight))
    fn = lt.compile(layer, plugins=[FP8(emulate=True, filter=lambda info: False)])
    with pytest.raises(Exception, match=r"filter keeps `.*` in high precision, but FSDP all-gathers its weight in FP8"):
        fn(torch.randn(4, 32, dtype=torch.bfloat16))
