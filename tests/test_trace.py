"""The trace IR on its own: printing, executing, FX round trips and the generic passes."""

from __future__ import annotations

import operator

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from lightning_thunder.passes import common_subexpression_elimination, dead_code_elimination, insert_deletions
from lightning_thunder.trace import DELETE, BoundOp, ConstRef, Proxy, Trace, fx_from_trace, trace_from_fx
from lightning_thunder.trace.printing import source_comment

aten = torch.ops.aten


def _aten_trace(fn, *args, name="forward", tracing_mode="fake"):
    gm = make_fx(fn, tracing_mode=tracing_mode)(*args)
    return gm, trace_from_fx(gm, name=name, provenance="make_fx")


def test_hand_built_trace_prints_and_runs():
    x = Proxy("x", torch.empty(2, 3))
    w = Proxy("w", torch.empty(3, 4))
    t0 = Proxy("t0", torch.empty(2, 4))
    t1 = Proxy("t1", torch.empty(2, 4))
    ops = [BoundOp(aten.mm.default, (x, w), outputs=(t0,)), BoundOp(aten.relu.default, (t0,), outputs=(t1,))]
    trace = Trace("demo", [x, w], ops, (t1,), provenance="hand written", elapsed_ms=1.25)
    src = trace.python()
    assert src.splitlines()[0] == '# lightning_thunder trace "demo": hand written (took 1.2 ms)'
    assert "def forward(x, w):" in src
    assert '  t0 = aten.mm.default(x, w)  # t0: "cpu f32[2, 4]"' in src
    assert '  # x: "cpu f32[2, 3]"' in src
    a, b = torch.randn(2, 3), torch.randn(3, 4)
    (out,) = trace.python_callable()(a, b)
    torch.testing.assert_close(out, torch.relu(a @ b))
    # The printed text alone is a complete program: exec it in an empty namespace.
    namespace: dict = {}
    exec(compile(src, "<test>", "exec"), namespace)
    torch.testing.assert_close(namespace["forward"](a, b)[0], torch.relu(a @ b))
    assert repr(trace) == src


def test_readers_map_each_proxy_to_the_ops_reading_it():
    x = Proxy("x", torch.empty(2, 3))
    t0, t1, t2 = (Proxy(f"t{k}", torch.empty(2, 3)) for k in range(3))
    relu = BoundOp(aten.relu.default, (x,), outputs=(t0,))
    add = BoundOp(aten.add.Tensor, (x, t0), outputs=(t1,))
    mul = BoundOp(aten.mul.Tensor, (t1, t1), outputs=(t2,))
    readers = Trace("demo", [x], [relu, add, mul], (t2,)).readers()
    assert readers[id(x)] == [relu, add] and readers[id(t1)] == [mul]  # an op reading twice counts once
    assert readers[id(t2)] == []


def test_producers_map_each_made_proxy_to_its_op():
    x = Proxy("x", torch.empty(2, 3))
    t0, t1 = (Proxy(f"t{k}", torch.empty(2, 3)) for k in range(2))
    relu = BoundOp(aten.relu.default, (x,), outputs=(t0,))
    neg = BoundOp(aten.neg.default, (t0,), outputs=(t1,))
    producers = Trace("demo", [x], [relu, neg], (t1,)).producers()
    assert producers == {id(t0): relu, id(t1): neg}  # the trace input has no producer


def test_boxed_callable_clears_its_argument_list():
    x = Proxy("x", torch.empty(3))
    t0 = Proxy("t0", torch.empty(3))
    trace = Trace("demo", [x], [BoundOp(aten.neg.default, (x,), outputs=(t0,))], (t0,))
    args = [torch.ones(3)]
    (out,) = trace.python_callable(boxed=True)(args)
    assert args == [] and torch.equal(out, -torch.ones(3))


def test_proxy_names_must_be_identifiers():
    with pytest.raises(ValueError, match="not a valid Python identifier"):
        Proxy("1x")
    with pytest.raises(TypeError, match="is not a tensor"):
        _ = Proxy("n", 3).shape


def test_fx_round_trip_preserves_semantics_and_unpacks_tuples():
    def fn(x, w, b):
        y, mean, rstd = aten.native_layer_norm.default(x, [4], w, b, 1e-5)
        return (y * 2 + mean.sum()).sin()

    args = (torch.randn(3, 4), torch.randn(4), torch.randn(4))
    gm, trace = _aten_trace(fn, *args)
    src = trace.python()
    assert "t0, t1, _ = aten.native_layer_norm.default(x_1, [4], w_1, b_1, 1e-05)" in src
    expected = fn(*args)
    torch.testing.assert_close(trace.python_callable()(*args), expected)
    back = fx_from_trace(trace)
    torch.testing.assert_close(back(*args), expected)
    again = trace_from_fx(back, name="again", provenance="round trip")
    torch.testing.assert_close(again.python_callable()(*args), expected)


def test_constants_are_named_and_bound():
    c = torch.arange(4.0)

    def fn(x):
        return x + c

    gm, trace = _aten_trace(fn, torch.randn(4), tracing_mode="real")
    assert any(isinstance(a, ConstRef) for op in trace.ops for a in op.args)
    assert "# constant tensor_constant0: cpu f32[4]" in trace.python()
    x = torch.randn(4)
    torch.testing.assert_close(trace.python_callable()(x), x + c)
    torch.testing.assert_close(fx_from_trace(trace)(x), x + c)


def test_source_comment_reads_the_innermost_user_frame():
    meta = {
        "stack_trace": '  File "/a/model.py", line 12, in forward\n    h = self.fc1(x)\n'
        '  File "/a/layers.py", line 7, in fc\n    return x @ w\n           ~~^~~\n'
    }
    assert source_comment(meta) == "layers.py:7 in fc: return x @ w"
    assert source_comment({}) is None


def test_dce_drops_unused_pure_ops_and_keeps_mutations():
    def fn(x, buf):
        unused = x.exp()  # noqa: F841 - dead on purpose
        buf.add_(1)
        return x.sin()

    gm, trace = _aten_trace(fn, torch.randn(3), torch.zeros(3))
    names = [op.name for op in trace.ops]
    assert "aten.exp.default" in names
    out = dead_code_elimination(trace)
    names = [op.name for op in out.ops]
    assert "aten.exp.default" not in names and "aten.add_.Tensor" in names and "aten.sin.default" in names
    assert out.provenance == "dead code elimination" and out is not trace and len(trace.ops) > len(out.ops)


def test_cse_merges_repeats_but_never_random_ops():
    def fn(x):
        a = x.cos() + x.cos()
        r = torch.rand_like(x) + torch.rand_like(x)
        return a, r

    gm, trace = _aten_trace(fn, torch.randn(5))
    before = [op.name for op in trace.ops]
    out = common_subexpression_elimination(trace)
    after = [op.name for op in out.ops]
    assert before.count("aten.cos.default") == 2 and after.count("aten.cos.default") == 1
    assert after.count("aten.rand_like.default") == 2
    x = torch.randn(5)
    a, _ = out.python_callable()(x)
    torch.testing.assert_close(a, 2 * x.cos())


def test_del_insertion_frees_after_last_use_but_never_outputs():
    def fn(x):
        a = x.sin()
        b = a.cos()
        c = b.exp()
        return c, a

    gm, trace = _aten_trace(fn, torch.randn(4))
    out = insert_deletions(trace)
    dels = [op for op in out.ops if op.target is DELETE]
    deleted = {p.name for op in dels for p in op.args}
    returned = {p.name for p in out.output_proxies()}
    assert deleted and not (deleted & returned)
    src = out.python()
    b_name = trace.ops[1].outputs[0].name
    lines = src.splitlines()
    use = next(i for i, ln in enumerate(lines) if f"({b_name})" in ln)
    assert lines[use + 1].strip().startswith("del ") and b_name in lines[use + 1]
    x = torch.randn(4)
    c, a = out.python_callable(boxed=True)([x])
    torch.testing.assert_close(c, x.sin().cos().exp())


def test_symbolic_sizes_print_and_run():
    def fn(x):
        return x.view(x.shape[0] * x.shape[1]).sum()

    gm = make_fx(fn, tracing_mode="symbolic")(torch.randn(3, 5))
    trace = trace_from_fx(gm, name="sym", provenance="make_fx symbolic")
    src = trace.python()
    assert "operator.mul" in src or "aten.sym_size" in src
    x = torch.randn(4, 7)
    torch.testing.assert_close(trace.python_callable()(x), x.sum())


def test_bound_op_rejects_inconsistent_outputs():
    with pytest.raises(ValueError, match="exactly one output"):
        BoundOp(operator.add, (1, 2), outputs=(None, None))
