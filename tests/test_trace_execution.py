"""Every printed trace runs and reproduces the compiled module's result, stage by stage."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lightning_thunder as lt
from tests.helpers import assert_close


class Block(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.silu(self.fc1(self.norm(x)))).softmax(-1)


def _values_by_name(model: nn.Module, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Trace input names for parameters and buffers (``fc1.weight`` -> ``fc1_weight``) and user inputs."""
    values = {n.replace(".", "_"): p.detach() for n, p in model.named_parameters()}
    values.update({n.replace(".", "_"): b for n, b in model.named_buffers()})
    values.update(inputs)
    return values


def _run(trace: lt.Trace, args: list) -> tuple:
    out = trace.python_callable()(*args)
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _check_all_stages(model: nn.Module, **inputs: torch.Tensor) -> None:
    eager = copy.deepcopy(model)
    cm = lt.compile(model)
    out = cm(*inputs.values())
    out.sum().backward()
    ref = eager(*inputs.values())
    ref.sum().backward()
    values = _values_by_name(model, **inputs)

    forward_traces = lt.last_traces(cm)
    torch_args = [values[p.name] for p in forward_traces[0].inputs]
    for trace in forward_traces:
        args = torch_args if trace.name.startswith("torch") else [values[p.name] for p in trace.inputs]
        result = _run(trace, list(args))
        assert_close(result[0], ref.detach(), f"trace {trace.name!r} output")

    # The backward stages take the forward's saved values plus the cotangent of the output.
    final_forward = forward_traces[-1]
    fw_out = _run(final_forward, [values[p.name] for p in final_forward.inputs])
    backward_traces = lt.last_backward_traces(cm)
    assert backward_traces and backward_traces[-1].name == "backward/final"
    n_tangents = sum(p.name.startswith("tangents") for p in backward_traces[0].inputs)
    n_saved = len(backward_traces[0].inputs) - n_tangents
    bw_args = [*fw_out[len(fw_out) - n_saved :], torch.ones_like(ref)]
    input_names = [p.name for p in final_forward.inputs]
    expected = {n.replace(".", "_"): p.grad for n, p in eager.named_parameters()}
    for trace in backward_traces:
        grads = _run(trace, list(bw_args))
        assert len(grads) == len(input_names)
        compared = 0
        for name, grad in zip(input_names, grads):
            if name in expected:
                assert_close(grad, expected[name], f"trace {trace.name!r} grad of {name}")
                compared += 1
        assert compared == len(expected), f"compared {compared} of {len(expected)} parameter gradients"


def test_every_stage_of_a_block_reproduces_forward_and_backward():
    _check_all_stages(Block(), x=torch.randn(3, 5, 16))


def test_printed_source_is_a_standalone_program():
    cm = lt.compile(Block())
    x = torch.randn(2, 16, requires_grad=True)
    cm(x).sum().backward()
    for trace in lt.last_traces(cm) + lt.last_backward_traces(cm):
        src = trace.python()
        assert "# bound" not in src, f"{trace.name} needs objects that are not importable"
        namespace: dict = {}
        exec(compile(src, f"<{trace.name}>", "exec"), namespace)
        assert callable(namespace[trace.fn_name])


def test_every_stage_of_a_litgpt_model_reproduces_forward_and_backward():
    pytest.importorskip("litgpt", reason="litgpt is part of the `test` extra")
    from litgpt import GPT, Config

    config = Config.from_name(
        "Llama-3.2-1B", n_layer=1, n_embd=32, n_head=4, n_query_groups=2, intermediate_size=64,
        padded_vocab_size=64, vocab_size=64, block_size=32,
    )
    _check_all_stages(GPT(config), idx=torch.randint(0, 64, (2, 8)))
