"""The FP8 compiler plugin (emulated on CPU): the rewrite and its traces, the filter, errors, and LitGPT training."""

from __future__ import annotations

import warnings
from unittest import mock

import pytest
import torch
from torch import nn

import lightning_thunder as lt
from lightning_thunder.fp8 import FP8Linear, restore_linears, swap_linears
from lightning_thunder.plugins import FP8, Fusion, LinearInfo, default_filter


class Net(nn.Module):
    """Two FP8-able layers, one whose dims are not multiples of 16, and an output head."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 32, bias=False)
        self.odd = nn.Linear(32, 24)
        self.lm_head = nn.Linear(24, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.relu(self.odd(self.fc2(torch.nn.functional.gelu(self.fc1(x))))))


def _compiled(plugin: FP8, *, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    model = Net()
    return model, lt.compile(model, plugins=[plugin])


def test_traces_show_the_fp8_op_the_quantization_and_the_matmuls():
    plugin = FP8(emulate=True)
    _, cm = _compiled(plugin)
    x = torch.randn(4, 8, 32, requires_grad=True)
    cm(x).sum().backward()
    traces = {t.name: t.python() for t in lt.last_traces(cm)}
    torch_level = traces["torch/FP8"]
    assert torch_level.count("lightning_thunder.fp8.linear.fp8_linear(") == 2
    assert "recipe='tensorwise', emulate=True" in torch_level
    assert "2 of 4 linear -> fp8_linear; kept in high precision: odd, lm_head" in torch_level
    assert torch_level.count("torch._C._nn.linear(") == 2  # odd, lm_head
    forward = traces["forward/final"]
    # x and W quantized with their transposed copies (saved for the backward), in the fp8 executor: tensorwise,
    # the amax pass and the cast pass are two ops (a fusion region may take the first over); the two weights
    # (graph inputs) are quantized together by one grouped op at the start.
    assert forward.count("fp8_amax_kernel(") == 2 and "[fp8]" in forward
    assert forward.count("fp8_cast_with_transpose_kernel(") == 2
    grouped = [line for line in forward.splitlines() if "fp8_quantize_group_kernel(" in line]
    assert len(grouped) == 1 and "fc1_weight, fc2_weight, dtype=torch.float8_e4m3fn, transpose=True)" in grouped[0]
    assert 'f8e4m3[32, 32]' in forward and 'f8e4m3[64, 32]' in forward  # x^T of fc1, W of fc1
    backward = "\n".join(t.python() for t in lt.last_backward_traces(cm))
    assert "torch.float8_e5m2" in backward and "f8e5m2[" in backward  # gradients in e5m2
    assert plugin.converted == ["fc1", "fc2"] and plugin.kept == ["odd", "lm_head"]
    stats = lt.compile_stats(cm)
    assert stats.executor_counts["fp8"] >= 4


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_compiled_matches_the_eager_fp8_modules(recipe):
    """The compiled rewrite and the eager FP8Linear modules (ThunderFP8's path for Lightning strategies) agree."""
    eager, cm = _compiled(FP8(recipe=recipe, emulate=True))
    reference = Net()
    reference.load_state_dict(eager.state_dict())
    swapped, kept = swap_linears(
        reference, lambda name, m: default_filter(LinearInfo(name, m.in_features, m.out_features)),
        recipe=recipe, emulate=True,
    )
    assert swapped == ["fc1", "fc2"] and kept == ["odd", "lm_head"]
    assert isinstance(reference.fc1, FP8Linear) and type(reference.odd) is nn.Linear
    x = torch.randn(4, 8, 32)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, ref = cm(xa), reference(xb)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    ref.square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(cm.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5, msg=name)
    assert restore_linears(reference) == ["fc1", "fc2"] and type(reference.fc1) is nn.Linear


def test_compile_turns_fp8_modules_back_into_linear():
    model = Net()
    swap_linears(model, lambda name, m: name == "fc1", recipe="tensorwise", emulate=True)
    plugin = FP8(emulate=True)
    cm = lt.compile(model, plugins=[plugin])
    assert type(model.fc1) is nn.Linear  # transform_module restored it; the trace is rewritten instead
    cm(torch.randn(2, 32))
    assert plugin.converted == ["fc1", "fc2"]


def test_custom_filter_and_a_filter_that_excludes_everything():
    plugin = FP8(emulate=True, filter=lambda info: info.name != "fc2")
    _, cm = _compiled(plugin)
    cm(torch.randn(2, 32))
    assert plugin.converted == ["fc1"] and plugin.kept == ["fc2", "odd", "lm_head"]
    # Even an accept-all filter cannot make dims that are not multiples of 16 run in FP8.
    everything = FP8(emulate=True, filter=lambda info: True)
    _, cm = _compiled(everything)
    cm(torch.randn(2, 32))
    assert everything.converted == ["fc1", "fc2"] and everything.kept == ["odd", "lm_head"]
    nothing = FP8(emulate=True, filter=lambda info: False)
    _, cm = _compiled(nothing)
    message = r"kept every linear layer of this graph in high precision \(fc1, fc2, odd, lm_head\)"
    with pytest.warns(UserWarning, match=message):
        cm(torch.randn(2, 32))
    with pytest.raises(TypeError, match="filter must be a callable"):
        FP8(emulate=True, filter="lm_head")


def test_default_filter():
    assert default_filter(LinearInfo("transformer.h.0.attn.qkv", 2048, 3072))
    assert not default_filter(LinearInfo("lm_head", 2048, 128256))
    assert not default_filter(LinearInfo("model.output", 4096, 32000))
    assert not default_filter(LinearInfo("mlp.fc", 100, 256))


def test_recipe_and_hardware_errors_name_the_fix():
    allowed = r"recipe='delayed' is not supported; choose one of \['tensorwise', 'rowwise'\]"
    with pytest.raises(ValueError, match=allowed):
        FP8(recipe="delayed", emulate=True)
    with mock.patch("torch.cuda.is_available", return_value=False):
        with pytest.raises(RuntimeError, match="CUDA is not available; set emulate=True"):
            FP8()
    with (
        mock.patch("torch.cuda.is_available", return_value=True),
        mock.patch("torch.cuda.get_device_capability", return_value=(8, 0)),
        mock.patch("torch.cuda.current_device", return_value=0),
        mock.patch("torch.cuda.get_device_name", return_value="NVIDIA A100-SXM4-80GB"),
    ):
        with pytest.raises(
            RuntimeError,
            match=r"compute capability >= 8.9 .*cuda:0 \(NVIDIA A100-SXM4-80GB\) has 8.0; set emulate=True",
        ):
            FP8(recipe="rowwise")
        FP8(emulate=True)  # emulation runs anywhere
    with (
        mock.patch("torch.cuda.is_available", return_value=True),
        mock.patch("torch.cuda.get_device_capability", return_value=(9, 0)),
    ):
        assert repr(FP8()) == "FP8(recipe='tensorwise', emulate=False)"


def test_with_the_fusion_plugin():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    ref = FP8(emulate=True)
    cm_ref = lt.compile(model, plugins=[ref])
    both = lt.compile(model, plugins=[Fusion(), FP8(emulate=True)])
    x = torch.randn(16, 32)
    torch.testing.assert_close(both(x), cm_ref(x), rtol=1e-5, atol=1e-5)


def _tiny_llama():
    from litgpt import GPT, Config

    from tests.strategies.helpers import TINY_LLAMA

    torch.manual_seed(0)
    return GPT(Config.from_name("Llama-3.2-1B", **TINY_LLAMA))


def _train(plugins: list, steps: int) -> list[float]:
    from tests.strategies.helpers import lm_loss, token_batches

    torch._dynamo.reset()
    model = _tiny_llama()
    cm = lt.compile(model, plugins=plugins)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for x, y in token_batches(steps, batch=4):
        loss = lm_loss(cm(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    return losses


_REFERENCE: dict[int, torch.Tensor] = {}


@pytest.fixture
def one_thread():
    """Tiny matmuls on a shared 2-core machine: intra-op threads only contend (10x slower under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_litgpt_50_steps_track_fp32(recipe, one_thread):
    pytest.importorskip("litgpt")
    steps = 50
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if steps not in _REFERENCE:
            _REFERENCE[steps] = torch.tensor(_train([], steps))
        reference = _REFERENCE[steps]
        fp8 = torch.tensor(_train([FP8(recipe=recipe, emulate=True)], steps))
    assert torch.isfinite(fp8).all()
    # Tolerance: at every step |loss_fp8 - loss_fp32| < 0.12 nats (observed: 0.04 tensorwise, 0.02 rowwise, of a
    # loss going from 4.4 to 1.0), and the mean of the last 10 losses within 3% of fp32's.
    gap = (fp8 - reference).abs()
    assert gap.max() < 0.12, f"max |loss_fp8 - loss_fp32| = {gap.max():.3f} at step {int(gap.argmax())}"
    assert fp8[-10:].mean() < 1.03 * reference[-10:].mean()
    assert reference[-10:].mean() < 0.5 * reference[:5].mean(), "the reference run did not learn; bad test data"
