"""The public API: compile(), last_traces(), last_backward_traces(), compile_stats(), Plugin, executors."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import lightning_thunder as lt
from lightning_thunder.trace import BoundOp, Proxy, Trace
from tests.helpers import assert_close, check_module_parity

aten = torch.ops.aten


class MLP(nn.Module):
    def __init__(self, d_in: int = 8, hidden: int = 16, d_out: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)
        self.register_buffer("scale", torch.tensor(0.5))
        self.label = "mlp"

    def forward(self, x: torch.Tensor, *, shift: float = 0.0) -> torch.Tensor:
        return self.fc2(torch.nn.functional.gelu(self.fc1(x))) * self.scale + shift


def test_module_keeps_parameters_buffers_state_dict_and_signature():
    model = MLP()
    cm = lt.compile(model)
    assert isinstance(cm, nn.Module) and isinstance(cm, lt.ThunderModule)
    assert list(cm.state_dict()) == list(model.state_dict())
    assert all(p is q for p, q in zip(cm.parameters(), model.parameters()))
    assert [n for n, _ in cm.named_buffers()] == ["scale"]
    assert inspect.signature(cm.forward) == inspect.signature(model.forward)
    assert cm.original_module is model
    # Attributes the wrapper lacks come from (and go to) the original module.
    assert cm.label == "mlp"
    cm.label = "renamed"
    assert model.label == "renamed"
    # load_state_dict writes into the shared parameters.
    sd = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    cm.load_state_dict(sd)
    assert float(model.fc1.weight.detach().abs().sum()) == 0.0
    assert "ThunderModule(MLP(" in repr(cm)


def test_train_eval_and_to_reach_the_original_module():
    model = MLP()
    cm = lt.compile(model)
    cm.eval()
    assert not model.training and not model.fc1.training and not cm.training
    cm.train()
    assert model.training and model.fc1.training
    cm.to(torch.float64)
    assert model.fc1.weight.dtype == torch.float64
    out = cm(torch.randn(3, 8, dtype=torch.float64))
    assert out.dtype == torch.float64


def test_keyword_arguments_and_parity():
    model = MLP()
    cm = check_module_parity(model, lambda: [torch.randn(5, 8, requires_grad=True)])
    x = torch.randn(2, 8)
    assert_close(cm(x, shift=1.5), model(x, shift=1.5), "keyword argument")


def test_compile_a_function():
    def f(x, w):
        return torch.tanh(x @ w).sum(-1)

    cf = lt.compile(f)
    assert cf.__name__ == "f" and callable(cf)
    x = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(4, 5, requires_grad=True)
    out = cf(x, w)
    ref_x, ref_w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = f(ref_x, ref_w)
    assert_close(out, ref, "output")
    out.sum().backward()
    ref.sum().backward()
    assert_close(x.grad, ref_x.grad, "grad x")
    assert_close(w.grad, ref_w.grad, "grad w")
    names = [t.name for t in lt.last_traces(cf)]
    assert names[0] == "torch" and names[-1] == "forward/final"
    assert [p.name for p in lt.last_traces(cf)[0].inputs] == ["x", "w"]


def test_trace_stages_are_named_and_headed():
    cm = lt.compile(MLP())
    cm(torch.randn(2, 8, requires_grad=True)).sum().backward()
    fw = lt.last_traces(cm)
    assert [t.name for t in fw] == [
        "torch",
        "forward",
        "forward/dce",
        "forward/cse",
        "forward/executor:torch",
        "forward/final",
    ]
    bw = lt.last_backward_traces(cm)
    assert bw[0].name == "backward" and bw[-1].name == "backward/final"
    for t in fw + bw:
        assert isinstance(t, Trace)
        assert t.python().startswith(f'# lightning_thunder trace "{t.name}"')
    final = fw[-1].python()
    assert "[torch]" in final and "del " in final
    # Shape/dtype/device annotations and user source lines.
    assert '"cpu f32[2, 16]"' in final
    assert "test_api.py" in fw[0].python() and "self.fc1(x)" in fw[0].python()


def test_compile_stats_fields():
    cm = lt.compile(MLP())
    with pytest.raises(RuntimeError, match="nothing has been compiled yet"):
        lt.last_traces(cm)
    cm(torch.randn(2, 8)).sum().backward()
    stats = lt.compile_stats(cm)
    assert isinstance(stats, lt.CompileStats)
    assert stats.graphs == 1 and stats.graph_breaks == [] and stats.recompiles == []
    assert stats.compile_time_s > 0 and stats.fusion_regions == 0
    assert stats.executor_counts["torch"] > 0 and set(stats.executor_counts) == {"torch"}


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['fusion'\]; valid options are"):
        lt.compile(MLP(), fusion=True)
    with pytest.raises(ValueError, match="partitioner='greedy' is not one of"):
        lt.compile(MLP(), partitioner="greedy")
    with pytest.raises(TypeError, match=r"got the class Plugin; use Plugin\(\)"):
        lt.compile(MLP(), plugins=[lt.Plugin])
    with pytest.raises(TypeError, match=r"wrap the single plugin: plugins=\[Plugin\(\)\]"):
        lt.compile(MLP(), plugins=lt.Plugin())
    with pytest.raises(TypeError, match="must hold lightning_thunder.Plugin instances, got str"):
        lt.compile(MLP(), plugins=["fp8"])
    with pytest.raises(TypeError, match="expects an nn.Module or a callable, got int"):
        lt.compile(3)
    with pytest.raises(TypeError, match="was not compiled by lightning_thunder"):
        lt.last_traces(MLP())
    cm = lt.compile(MLP())
    with pytest.raises(TypeError, match="already compiled"):
        lt.compile(cm)


class Recorder(lt.Plugin):
    """Records the hooks called, in order, into a shared log."""

    def __init__(self, tag: str, log: list) -> None:
        self.tag, self.log = tag, log

    @property
    def name(self) -> str:
        return f"Recorder{self.tag}"

    def transform_module(self, module):
        self.log.append((self.tag, "module"))
        return module

    def transform_torch_trace(self, trace):
        self.log.append((self.tag, "torch"))
        return trace

    def transform_forward_backward(self, fw, bw):
        self.log.append((self.tag, "fw_bw", bw is None))
        return fw, bw


def test_plugins_compose_in_order_and_each_gets_a_trace():
    log: list = []
    cm = lt.compile(MLP(), plugins=[Recorder("A", log), Recorder("B", log)])
    assert log == [("A", "module"), ("B", "module")]
    cm(torch.randn(2, 8, requires_grad=True)).sum().backward()
    assert log[2:] == [("A", "torch"), ("B", "torch"), ("A", "fw_bw", False), ("B", "fw_bw", False)]
    names = [t.name for t in lt.last_traces(cm)]
    assert names[:5] == ["torch", "torch/RecorderA", "torch/RecorderB", "forward", "forward/RecorderA"]
    assert "plugin RecorderA (no change)" in lt.last_traces(cm)[1].python().splitlines()[0]
    with torch.no_grad():
        cm(torch.randn(3, 8))
    assert log[-2:] == [("A", "fw_bw", True), ("B", "fw_bw", True)]
    assert lt.last_traces(cm)[-1].name == "forward/final" and lt.compile_stats(cm).graphs == 2
    # The inference graph has no backward: the training graph's backward is still reported.
    assert lt.last_backward_traces(cm)[-1].name == "backward/final"


class ReluToClamp(lt.Plugin):
    """Post-autograd rewrite: relu(x) -> clamp_min(x, 0) in the forward trace."""

    def transform_forward_backward(self, fw, bw):
        ops = [
            op.replace(target=aten.clamp_min.default, args=(op.args[0], 0.0))
            if op.target is aten.relu.default
            else op
            for op in fw.ops
        ]
        return fw.derive("plugin ReluToClamp: relu -> clamp_min", ops=ops), bw


class DoubleBeforeSigmoid(lt.Plugin):
    """Pre-autograd rewrite that changes the math: sigmoid(x) -> sigmoid(2 * x)."""

    def transform_torch_trace(self, trace):
        names = trace.name_generator()
        ops = []
        for op in trace.ops:
            if op.target is torch.sigmoid:
                (x,) = op.args
                doubled = Proxy(names("t"), x.val * 2)
                ops.append(BoundOp(torch.mul, (x, 2), outputs=(doubled,), meta=op.meta))
                op = op.replace(args=(doubled,))
            ops.append(op)
        return trace.derive("plugin DoubleBeforeSigmoid", ops=ops)


def test_trace_rewriting_plugins_change_what_runs():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 6)

        def forward(self, x):
            return torch.sigmoid(torch.relu(self.fc(x)))

    model = Net()
    cm = check_module_parity(model, lambda: [torch.randn(4, 6, requires_grad=True)], plugins=[ReluToClamp()])
    final = lt.last_traces(cm)[-1].python()
    assert "aten.clamp_min.default" in final and "aten.relu.default" not in final

    cm2 = lt.compile(Net(), plugins=[DoubleBeforeSigmoid()])
    cm2.load_state_dict(model.state_dict())
    x = torch.randn(4, 6, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    out = cm2(x)
    ref = torch.sigmoid(2 * torch.relu(model.fc(xr)))
    assert_close(out, ref, "rewritten forward")
    out.sum().backward()
    ref.sum().backward()
    assert_close(x.grad, xr.grad, "rewritten backward")
    assert "torch.mul" in lt.last_traces(cm2)[1].python()


def test_plugin_executor_claims_ops_and_torch_takes_the_rest():
    calls = []

    def my_gelu(x, approximate="none"):
        calls.append(tuple(x.shape))
        return aten.gelu.default(x, approximate=approximate)

    class GeluKernel(lt.Plugin):
        def executors(self):
            return [lt.OpExecutor("mygelu", {aten.gelu.default: my_gelu})]

    cm = check_module_parity(MLP(), lambda: [torch.randn(3, 8, requires_grad=True)], plugins=[GeluKernel()])
    assert calls, "the plugin's executor never ran"
    final = lt.last_traces(cm)[-1].python()
    assert "[mygelu]" in final and "[torch]" in final
    counts = lt.compile_stats(cm).executor_counts
    assert counts["mygelu"] == 1 and counts["torch"] > 1
    assert [t.name for t in lt.last_traces(cm)][-3:] == [
        "forward/executor:mygelu",
        "forward/executor:torch",
        "forward/final",
    ]


def test_plugin_returning_garbage_is_named_in_the_error():
    class Broken(lt.Plugin):
        def transform_torch_trace(self, trace):
            return None

    cm = lt.compile(MLP(), plugins=[Broken()])
    with pytest.raises(Exception, match="Broken.transform_torch_trace must return a Trace, got NoneType"):
        cm(torch.randn(2, 8))


def test_capture_failure_names_the_op_and_a_workaround():
    def explode(x):
        raise RuntimeError("unsupported kernel")

    class InsertBadOp(lt.Plugin):
        def transform_torch_trace(self, trace):
            ops = list(trace.ops)
            first = ops[0]
            ops[0] = first.replace(target=explode, args=first.args[:1], kwargs={})
            return trace.derive("plugin InsertBadOp", ops=ops)

    cm = lt.compile(MLP(), plugins=[InsertBadOp()])
    with pytest.raises(Exception, match=r"(?s)could not trace graph 0 through autograd at op `explode` \(node t0\), from test_api.py:\d+ in forward: .*unsupported kernel\nWorkaround"):
        cm(torch.randn(2, 8, requires_grad=True))


def test_instances_of_one_class_share_compiled_graphs():
    models = [MLP() for _ in range(10)]
    compiled = [lt.compile(m) for m in models]
    x = torch.randn(2, 8)
    for m, cm in zip(models, compiled):
        assert_close(cm(x), m(x), "output")
    assert lt.compile_stats(compiled[0]).graphs == 1
    assert sum(lt.compile_stats(cm).graphs for cm in compiled[1:]) == 0
    # The later instances report the graph they run.
    assert lt.last_traces(compiled[-1])[-1].name == "forward/final"


def test_pickle_and_deepcopy_recompile_the_original_module():
    import copy
    import pickle

    model = MLP()
    cm = lt.compile(model, partitioner="default")
    x = torch.randn(2, 8)
    expected = cm(x)
    for clone in (pickle.loads(pickle.dumps(cm)), copy.deepcopy(cm)):
        assert isinstance(clone, lt.ThunderModule) and clone.original_module is not model
        assert clone._lt_backend.options.partitioner == "default"
        assert_close(clone(x), expected, "copy output")
        assert lt.compile_stats(clone).graphs >= 0
        assert list(clone.state_dict()) == list(cm.state_dict())


def test_backward_traces_survive_a_later_inference_graph():
    cm = lt.compile(MLP())
    cm(torch.randn(2, 8, requires_grad=True)).sum().backward()
    with torch.no_grad():
        cm(torch.randn(2, 8))
    assert lt.last_backward_traces(cm)[-1].name == "backward/final"
    assert lt.last_traces(cm)[-1].name == "forward/final"
    cm2 = lt.compile(nn.Sequential(nn.Linear(8, 4)))  # a class never trained: only an inference graph
    with torch.no_grad():
        cm2(torch.randn(2, 8))
    assert lt.last_backward_traces(cm2) == []


def test_modules_defined_in_torch_nn_are_compiled_too():
    for module in (nn.Sequential(nn.Linear(8, 4), nn.ReLU()), nn.Linear(8, 4), nn.LayerNorm(8)):
        check_module_parity(module, lambda: [torch.randn(3, 8, requires_grad=True)])
        cm = lt.compile(module)
        cm(torch.randn(3, 8))
        assert lt.compile_stats(cm).graphs == 1, type(module).__name__
        assert len(lt.last_traces(cm)[0].ops) >= 1
