"""Dynamo's recompile limit never turns lightning_thunder off silently.

Dynamo keeps graphs and its recompile budget per code object. Each set of plugins gets its own code object, so the
N-th model of a sweep compiled with new plugins compiles with them; where the budget of one set is spent (shapes
that keep changing with ``dynamic=False``), the calls that run eagerly are warned about and counted, and
``last_traces`` never presents another instance's graph as this one's. The limit is lowered to 2 here so a few tiny
compiles reach it (the default is 8).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_thunder as lt
from tests.helpers import assert_close


class Tag(lt.Plugin):
    """Marks the torch-level trace with its id: proof that this plugin instance compiled the graph."""

    def __init__(self, i: int) -> None:
        self.i = i

    def transform_torch_trace(self, trace):
        return trace.derive(f"plugin Tag {self.i}", ops=trace.ops)


class Small(nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x):
        return torch.relu(self.lin(x))


def fresh_class(name: str) -> type[Small]:
    """A class of its own: the limit is per set of plugins *per class*, so each test counts from zero."""
    return type(name, (Small,), {})


class Broken(nn.Module):
    """A graph break inside forward: Dynamo compiles the user's own `forward` code object (shared by every set of
    plugins) and its resume function."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        x = torch.relu(self.a(x))
        torch._dynamo.graph_break()
        return self.b(x)


@pytest.fixture
def limit_2():
    with torch._dynamo.config.patch(recompile_limit=2):
        yield 2


def _tags(cm) -> list[str]:
    return [t.provenance for t in lt.last_traces(cm) if t.name == "torch/Tag"]


def test_every_instance_of_a_class_compiles_with_its_own_plugins_past_the_limit(limit_2):
    for i in range(limit_2 + 3):  # the 3rd, 4th and 5th would have run eagerly with one code object per class
        model = Small()
        cm = lt.compile(model, plugins=[Tag(i)])
        x = torch.randn(3, 4, requires_grad=True)
        out = cm(x)
        out.sum().backward()
        stats = lt.compile_stats(cm)
        assert stats.graphs == 1 and stats.eager_calls == 0, (i, stats)
        assert _tags(cm) == [f"plugin Tag {i}"], i  # its own graph, from its own plugin
        assert_close(out, torch.relu(model.lin(x)), "output")


def test_functions_compiled_with_different_plugins_get_their_own_budget(limit_2):
    def f(x):
        return torch.sin(x) * 2

    for i in range(limit_2 + 2):
        cf = lt.compile(f, plugins=[Tag(i)])
        x = torch.randn(5)
        assert_close(cf(x), torch.sin(x) * 2, "output")
        assert _tags(cf) == [f"plugin Tag {i}"] and lt.compile_stats(cf).eager_calls == 0


def test_a_class_with_a_graph_break_compiles_with_every_set_of_plugins(limit_2):
    for i in range(limit_2 + 2):  # its `forward` and resume function hold the graphs of every set
        model = Broken()
        cm = lt.compile(model, plugins=[Tag(i)])
        x = torch.randn(2, 4)
        assert_close(cm(x), model.b(torch.relu(model.a(x))), "output")
        stats = lt.compile_stats(cm)
        assert (stats.graphs, len(stats.graph_breaks), stats.eager_calls) == (2, 1, 0), (i, stats)
        assert _tags(cm) == [f"plugin Tag {i}"]


def test_dynamic_false_past_the_limit_warns_and_counts_the_eager_calls(limit_2):
    cm = lt.compile(fresh_class("Fixed")(), plugins=[], dynamic=False)
    for n in (1, 2):
        cm(torch.randn(n, 4))
    with pytest.warns(RuntimeWarning, match=r"compiled Fixed ran eagerly, without lightning_thunder and its plugins: "
                                            r"Dynamo's recompile limit was reached \(config.recompile_limit=2 .*"
                                            r"size mismatch"):
        out = cm(x := torch.randn(3, 4))
    assert_close(out, torch.relu(cm.lin(x)), "eager output")  # eager, and right
    cm(torch.randn(4, 4))  # Dynamo logs nothing this time; the call still counts
    stats = lt.compile_stats(cm)
    assert stats.graphs == 2 and stats.eager_calls == 2
    assert len(stats.eager_fallbacks) == 1 and "recompile_limit=2" in stats.eager_fallbacks[0]
    # The traces are this module's own last graph (batch 2), the last one that ran a compiled program.
    assert '"cpu f32[2, 4]"' in lt.last_traces(cm)[0].python()
    cm(torch.randn(1, 4))  # a shape it compiled still runs compiled
    assert lt.compile_stats(cm).eager_calls == 2


def test_an_instance_that_only_ran_eagerly_shows_no_other_instances_traces(limit_2):
    plugins, cls = [Tag(0)], fresh_class("Shared")  # one backend for all: instances share its code object and budget
    for width in (2, 3):
        lt.compile(cls(width), plugins=plugins, dynamic=False)(torch.randn(1, width))
    for width in (5, 6):  # the first of these hits the limit (logged by Dynamo), the second is silent in Dynamo
        cm = lt.compile(cls(width), plugins=plugins, dynamic=False)
        with pytest.warns(RuntimeWarning, match="ran eagerly"):
            cm(torch.randn(1, width))
        assert lt.compile_stats(cm).eager_calls == 1 and lt.compile_stats(cm).graphs == 0
        with pytest.raises(RuntimeError, match=r"no compiled graph ran for this module or function: its calls ran "
                                               r"eagerly, without lightning_thunder and its plugins"):
            lt.last_traces(cm)


def test_instances_sharing_a_graph_show_the_graph_they_ran():
    plugins = [Tag(7)]
    a, b = Small(), Small()
    ca, cb = lt.compile(a, plugins=plugins), lt.compile(b, plugins=plugins)
    ca(torch.randn(2, 4))
    cb(torch.randn(2, 4))  # runs the graph `a` compiled
    assert lt.compile_stats(cb).graphs == 0 and lt.compile_stats(cb).eager_calls == 0
    assert lt.last_traces(cb)[-1] is lt.last_traces(ca)[-1]
    with pytest.raises(RuntimeError, match="nothing has been compiled yet"):
        lt.last_traces(lt.compile(Small(), plugins=plugins))  # never called


def test_hooks_added_after_the_first_call_warn_once():
    model = Small()
    cm = lt.compile(model, plugins=[])
    early = []
    model.lin.register_forward_hook(lambda *a: early.append(1))  # before the first call: captured and run
    cm(torch.randn(2, 4))
    assert early == [1]
    cm.register_forward_hook(lambda *a: early.append("cm"))  # on the compiled module: runs outside the graphs
    late = model.lin.register_forward_pre_hook(lambda *a: None)
    with pytest.warns(RuntimeWarning, match=r"forward pre hook on lin \(Linear\) registered after the first call of "
                                            r"the compiled Small will not run"):
        cm(torch.randn(2, 4))
    assert early == [1, 1, "cm"]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cm(torch.randn(2, 4))  # warned once per hook
        late.remove()
        cm(torch.randn(2, 4))


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"fullgraph": "no"}, TypeError, r"option fullgraph='no' must be True or False, got str; did you mean "
                                         r"fullgraph=False\?"),
        ({"cse": None}, TypeError, r"option cse=None must be True or False, got NoneType"),
        ({"dynamic": 1}, TypeError, r"option dynamic=1 must be None, True or False, got int; did you mean "
                                    r"dynamic=True\?"),
        ({"partitioner": 3}, TypeError, r"partitioner=3 must be a string"),
        ({"partitioner": "greedy"}, ValueError, r"partitioner='greedy' is not one of"),
    ],
)
def test_options_are_type_checked(options, error, message):
    with pytest.raises(error, match=message):
        lt.compile(Small(), **options)


def test_plugins_given_as_a_string_are_refused_clearly():
    with pytest.raises(TypeError, match=r"plugins='fusion' must be a list of Plugin instances \(a str is not\); "
                                        r"e.g. plugins=\[Fusion\(\)\]"):
        lt.compile(Small(), plugins="fusion")


def test_forced_eager_is_not_reported_as_a_fallback():
    cm = lt.compile(Small(), plugins=[])
    cm(torch.randn(2, 4))
    import warnings

    with warnings.catch_warnings(), torch.compiler.set_stance("force_eager"):
        warnings.simplefilter("error")
        cm(torch.randn(2, 4))
    assert lt.compile_stats(cm).eager_calls == 0
