"""The CUDAGraphs plugin without a GPU: which ops split segments (on traces with fake CUDA tensors), what a CPU model
is told, option checks, and the segment runner's bookkeeping with an emulated graph (the capture runs the segment
once and each replay writes its results into the same output tensors, as a CUDA graph does). tests/gpu/
test_cudagraphs_cuda.py runs real CUDA graphs."""

from __future__ import annotations

import warnings
import weakref

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import ShapeEnv

import lightning_thunder as lt
from lightning_thunder.cudagraphs import GraphPool, SegmentRunner, capture_blocker, plan_segments
from lightning_thunder.cudagraphs import runner as runner_module
from lightning_thunder.passes import insert_deletions
from lightning_thunder.plugins import CUDAGraphs, CUDAGraphsWarning, FinalContext, Plugin
from lightning_thunder.trace import BoundOp, Proxy, Trace, trace_from_fx

aten = torch.ops.aten


def _fake_trace(fn, *shapes_and_devices):
    """The final trace of ``fn`` traced with fake tensors (CUDA ones too: no GPU needed)."""
    mode = FakeTensorMode(shape_env=ShapeEnv())
    with mode:
        args = [torch.empty(shape, device=device) for shape, device in shapes_and_devices]
    gm = make_fx(fn, tracing_mode="fake")(*args)
    return insert_deletions(trace_from_fx(gm, name="forward", provenance="make_fx"), name="forward/final")


def _names(ops):
    return [op.name for op in ops]


CUDA = "cuda"


# ---------------------------------------------------------------------------------------------- segmenting
def test_item_splits_the_program_and_the_ops_using_its_value_stay_out():
    def fn(x, w):
        h = torch.relu(x @ w)
        s = h.sum().item()
        return (h * s).exp() * 2, h

    trace = _fake_trace(fn, ((4, 8), CUDA), ((8, 8), CUDA))
    plan = plan_segments(trace)
    assert [_names(s.ops) for s in plan.segments] == [
        ["aten.mm.default", "aten.relu.default", "aten.sum.default"],
        ["aten.exp.default", "aten.mul.Tensor"],
    ]
    reasons = {op.name: why for op, why in plan.uncaptured}
    assert "host reads a tensor's value" in reasons["aten._local_scalar_dense.default"]
    assert "number the host read from the device" in reasons["aten.mul.Tensor"]
    first, second = plan.segments
    assert [p.name for p in first.inputs] == ["x_1", "w_1"] and len(first.outputs) == 2  # h and its sum
    assert second.device == torch.device("cuda", 0)


def test_cpu_tensors_data_dependent_sizes_and_devices_split_segments():
    env = ShapeEnv()
    mode = FakeTensorMode(shape_env=env)
    with mode:
        x, y, nz, z = (Proxy(n, torch.empty(6, device=CUDA)) for n in ("x", "y", "nz", "z"))
        c, d = Proxy("c", torch.empty(3)), Proxy("d", torch.empty(3))
        nz.val = torch.empty(env.create_unbacked_symint(), 1, dtype=torch.long, device=CUDA)  # nonzero's size
        s = Proxy("s", torch.empty((), device=CUDA))
    ops = [
        BoundOp(aten.sin.default, (x,), outputs=(y,)),
        BoundOp(aten.add.Tensor, (c, 1), outputs=(d,)),  # a CPU op
        BoundOp(aten.nonzero.default, (y,), outputs=(nz,)),
        BoundOp(aten.sum.default, (nz,), outputs=(s,)),  # reads a data-dependent size
        BoundOp(aten.cos.default, (y,), outputs=(z,)),
    ]
    plan = plan_segments(Trace("forward", [x, c], ops, (z, d, s)))
    reasons = {op.name: why for op, why in plan.uncaptured}
    assert "cpu tensors" in reasons["aten.add.Tensor"]
    assert "data-dependent size" in reasons["aten.nonzero.default"] and "data-dependent" in reasons["aten.sum.default"]
    assert [_names(seg.ops) for seg in plan.segments] == [["aten.sin.default"], ["aten.cos.default"]]
    assert [p.name for p in plan.segments[1].inputs] == ["y"]

    def two_devices(x, y):
        return x.sin(), y.cos()

    mode = FakeTensorMode()
    with mode:
        args = [torch.empty(3, device="cuda:0"), torch.empty(3, device="cuda:1")]
    trace = trace_from_fx(make_fx(two_devices, tracing_mode="fake")(*args), name="forward", provenance="make_fx")
    assert [s.device.index for s in plan_segments(trace).segments] == [0, 1]


def test_integer_indexing_with_a_static_size_is_captured():
    with FakeTensorMode():
        table, idx = Proxy("table", torch.empty(10, 4, device=CUDA)), Proxy("idx", torch.empty(5, dtype=torch.long, device=CUDA))
        rows, out = Proxy("rows", torch.empty(5, 4, device=CUDA)), Proxy("out", torch.empty(5, 4, device=CUDA))
    ops = [BoundOp(aten.index.Tensor, (table, [idx]), outputs=(rows,)), BoundOp(aten.mul.Tensor, (rows, 2), outputs=(out,))]
    plan = plan_segments(Trace("forward", [table, idx], ops, (out,)))
    assert len(plan.segments) == 1 and not plan.uncaptured  # tagged dynamic_output_shape, but its size is known
    rows.val = None  # no example value: it could depend on the data
    assert "may depend on the data" in capture_blocker(ops[0])


def test_collectives_generators_skip_list_and_declared_unsafe_ops_are_not_captured():
    mode = FakeTensorMode()
    with mode:
        x = Proxy("x", torch.empty(4, device=CUDA))
        y = Proxy("y", torch.empty(4, device=CUDA))

    def op(target, *args, **kwargs):
        return BoundOp(target, (x, *args), kwargs, outputs=(y,))

    assert capture_blocker(op(aten.sin.default)) is None
    assert "collective" in capture_blocker(op(torch.ops._c10d_functional.all_reduce.default, "sum", "0"))
    gen = torch.Generator()
    assert "torch.Generator" in capture_blocker(op(aten.sin.default, generator=gen))
    assert "skip_ops" in capture_blocker(op(aten.sin.default), skip={aten.sin.default})
    assert "skip_ops" in capture_blocker(op(aten.sin.default), skip={aten.sin})  # the packet: every overload

    def kernel(t):
        return t

    kernel.cudagraph_unsafe = "reads a host counter"
    assert capture_blocker(op(kernel)) == "reads a host counter"

    with FakeTensorMode():  # PyTorch's embedding gradient sorts (a host sync) above 3072 indices
        grad, w = Proxy("g", torch.empty(4096, 8, device=CUDA)), Proxy("w", torch.empty(100, 8, device=CUDA))
        few, many = (Proxy(n, torch.empty(k, dtype=torch.long, device=CUDA)) for n, k in (("few", 256), ("many", 4096)))
    backward = aten.embedding_dense_backward.default
    assert capture_blocker(BoundOp(backward, (grad, few, 100, -1, False), outputs=(w,))) is None
    assert "host" in capture_blocker(BoundOp(backward, (grad, many, 100, -1, False), outputs=(w,)))
    assert "host" in capture_blocker(BoundOp(backward, (grad, few, 100, -1, True), outputs=(w,)))


def test_a_run_of_views_is_left_alone_and_input_mutations_are_found():
    def views(x):
        a = x.sin()
        b = a.sum().item()
        return (a.view(-1).t() * b,)

    trace = _fake_trace(views, ((2, 2), CUDA))
    plan = plan_segments(trace)
    assert [_names(s.ops) for s in plan.segments] == [["aten.sin.default", "aten.sum.default"]]
    reasons = {op.name: why for op, why in plan.uncaptured}
    assert reasons["aten.view.default"] == reasons["aten.t.default"] == "no GPU work to capture (views and size arithmetic)"

    def mutates(buf, x):
        aten.copy_.default(aten.narrow.default(buf, 0, 1, 4), aten.sin.default(x))  # writes through a view of buf
        return (x.cos(),)

    trace = _fake_trace(mutates, ((5,), CUDA), ((4,), CUDA))
    (segment,) = plan_segments(trace).segments
    assert [segment.inputs[i].name for i in segment.written] == ["buf_1"]


# ---------------------------------------------------------------------------------------------- the plugin
def test_cpu_model_warns_and_says_why_in_the_trace():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    plugin = CUDAGraphs()
    cm = lt.compile(model, plugins=[plugin])
    x = torch.randn(3, 4)
    with pytest.warns(CUDAGraphsWarning, match="nothing captured in graph 0 forward: the program runs on cpu"):
        out = cm(x)
    with pytest.warns(CUDAGraphsWarning, match="graph 0 backward"):
        out.sum().backward()
    torch.testing.assert_close(out, model(x))
    traces = lt.last_traces(cm)
    assert [t.name for t in traces[-2:]] == ["forward/final", "forward/CUDAGraphs"]
    assert "nothing captured: the program runs on cpu; CUDA graphs capture CUDA kernels only" in traces[-1].python()
    assert lt.last_backward_traces(cm)[-1].name == "backward/CUDAGraphs"
    stats = lt.compile_stats(cm)  # counted on the executors' final traces
    assert stats.executor_counts["torch"] > 0 and stats.fusion_regions == 0
    assert plugin.stats().graphs == 0 and plugin.stats().segments == 0


def test_segmented_trace_runs_and_names_its_segments():
    def fn(x, w):
        h = torch.relu(x @ w)
        s = h.sum().item()
        return (h * s).exp() * 2, h

    trace = _fake_trace(fn, ((4, 8), CUDA), ((8, 8), CUDA))
    out = CUDAGraphs().transform_final(trace, FinalContext("forward", False, 1, 0))
    text = out.python()
    assert "plugin CUDAGraphs: 2 segment(s) captured as CUDA graphs (cudagraph_segment0: 3 ops" in text
    assert "t1, t2 = cudagraph_segment0(x_1, w_1)" in text
    assert "then not captured: f0 = aten._local_scalar_dense.default: the host reads" in text
    runners = [op.target for op in out.ops if op.executor == "cudagraphs"]
    assert [r.__name__ for r in runners] == ["cudagraph_segment0", "cudagraph_segment1"]
    # the first output (the caller's) is copied out, h (saved) is handed out where the graph wrote it
    assert runners[0].copy_outputs == frozenset() and runners[1].copy_outputs == frozenset({0})


def test_options_are_checked():
    with pytest.raises(ValueError, match="max_graphs=0"):
        CUDAGraphs(max_graphs=0)
    with pytest.raises(ValueError, match="max_graphs=True"):
        CUDAGraphs(max_graphs=True)
    with pytest.raises(TypeError, match="not a name"):
        CUDAGraphs(skip_ops=["aten.nonzero"])
    with pytest.raises(TypeError, match="must be a list of ops"):
        CUDAGraphs(skip_ops=aten.nonzero.default)
    with pytest.raises(TypeError, match="unexpected keyword"):
        CUDAGraphs(max_graph=3)
    plugin = CUDAGraphs(max_graphs=3, skip_ops=[aten.nonzero])
    import copy
    import pickle

    clone = pickle.loads(pickle.dumps(plugin))
    assert clone.max_graphs == 3 and aten.nonzero.default in clone.skip_ops and copy.deepcopy(plugin).stats().graphs == 0


def test_transform_final_stage_runs_after_final_and_keeps_statistics():
    calls = []

    class Negate(Plugin):
        """Appends a negation of the first output to the executable program (what runs is the last stage)."""

        def transform_final(self, trace: Trace, context: FinalContext) -> Trace:
            calls.append((context.stage, context.inference, context.user_outputs))
            if context.stage != "forward":
                return trace
            out = trace.output[0]
            neg = Proxy(trace.name_generator()("t"), out.val)
            ops = [*trace.ops, BoundOp(aten.neg.default, (out,), outputs=(neg,))]
            return trace.derive("negated", ops=ops, output=(neg, *trace.output[1:]))

    x = torch.randn(3, 4, requires_grad=True)
    cf = lt.compile(lambda t: (t * 2).sum(), plugins=[Negate()])
    y = cf(x)
    torch.testing.assert_close(y, -(x * 2).sum())
    y.backward()
    assert [t.name for t in lt.last_traces(cf)[-2:]] == ["forward/final", "forward/Negate"]
    assert lt.last_backward_traces(cf)[-1].name == "backward/final"  # unchanged: no stage added
    assert calls[0][:2] == ("forward", False) and calls[0][2] == 1 and calls[1][0] == "backward"
    assert lt.compile_stats(cf).executor_counts["torch"] >= 2


# ---------------------------------------------------------------------------------------------- the runner
class _EmulatedGraph:
    """Replays by running the segment and writing the results into the outputs of the "capture". Like a CUDA graph
    it holds no reference to its inputs: it reads the call's arguments where they are at the captured addresses,
    and its own buffers for the copied ones."""

    def __init__(self, fn, inputs, outputs):
        self.fn, self.outputs, self.args = fn, outputs, None
        self.inputs = [weakref.ref(a) if isinstance(a, torch.Tensor) else a for a in inputs]

    def _input(self, i):
        captured = self.inputs[i]
        if not isinstance(captured, weakref.ref):
            return captured
        arg, held = self.args[i], captured()  # a copy buffer is held by the runner; a static input is at its address
        return held if held is not None and held.data_ptr() != arg.data_ptr() else arg

    @torch.no_grad()
    def replay(self):
        for static, new in zip(self.outputs, self.fn(*[self._input(i) for i in range(len(self.inputs))])):
            if isinstance(static, torch.Tensor) and static.data_ptr() != new.data_ptr():
                static.data.copy_(new)  # through .data: a replay bumps no version counter


@torch.no_grad()
def _emulated_capture(pool, fn, warm_inputs, inputs):
    rng = torch.get_rng_state()  # like the real capture: the first replay draws what an uncaptured call would
    fn(*warm_inputs)
    # A capture records without running: inputs the segment writes into keep their values.
    saved = [a.clone() if isinstance(a, torch.Tensor) else None for a in inputs]
    outputs = fn(*inputs)
    for a, s in zip(inputs, saved):
        if s is not None:
            a.data.copy_(s)
    torch.set_rng_state(rng)
    return _EmulatedGraph(fn, inputs, list(outputs)), outputs


@pytest.fixture
def emulated(monkeypatch):
    monkeypatch.setattr(runner_module, "capture_cuda_graph", _emulated_capture)
    replay = runner_module.CapturedGraph.replay

    def replay_with_arguments(self, args, pool):
        self.graph.args = args  # what the emulated graph reads for the inputs it does not copy
        try:
            return replay(self, args, pool)
        finally:
            self.graph.args = None

    monkeypatch.setattr(runner_module.CapturedGraph, "replay", replay_with_arguments)


def _runner(fn, copy_outputs=(0,), **kwargs):
    return SegmentRunner("cudagraph_segment0", fn, GraphPool(torch.device("cpu")), copy_outputs=frozenset(copy_outputs),
                         where="graph 0 forward", **kwargs)


def test_replays_follow_new_data_and_the_callers_outputs_are_never_overwritten(emulated):
    w = torch.nn.Parameter(torch.randn(4, 4))

    def segment(x, w):
        h = x @ w
        return (h.sum(), h.relu())  # the caller's loss, and a value saved for the backward

    run = _runner(segment)
    results = []
    for _ in range(4):
        x = torch.randn(2, 4)
        loss, saved = run(x, w)
        torch.testing.assert_close(loss, (x @ w).sum())
        torch.testing.assert_close(saved, (x @ w).relu())
        results.append((loss, (x @ w).sum()))
        del saved  # the backward consumed it
    for loss, expected in results:  # every loss still holds its own step's value
        torch.testing.assert_close(loss, expected)
    assert len(run.graphs) == 1 and run.replays == 4 and run.uncaptured_calls == 0
    graph = run.graphs[0]
    assert graph.static == [(1, w.data_ptr())] and graph.copied == [0]  # the parameter read in place, x copied


def test_outputs_in_use_get_another_graph_then_run_uncaptured(emulated):
    def segment(x):
        return (x * 2, x + 1)

    run = _runner(segment, copy_outputs=(), max_graphs=2)
    a = run(torch.ones(3))  # handed out, still held: the graph is in use
    b = run(torch.full((3,), 2.0))  # a second graph
    assert len(run.graphs) == 2
    with pytest.warns(CUDAGraphsWarning, match="more than max_graphs=2"):
        c = run(torch.full((3,), 3.0))  # both in use: uncaptured
    assert run.uncaptured_calls == 1
    for out, v in ((a, 1.0), (b, 2.0), (c, 3.0)):
        torch.testing.assert_close(out[0], torch.full((3,), 2 * v))
    del a  # the first graph's outputs are gone, but the second graph (captured later) is still in use
    torch.testing.assert_close(run(torch.full((3,), 4.0))[0], torch.full((3,), 8.0))
    assert run.uncaptured_calls == 2
    del b
    torch.testing.assert_close(run(torch.full((3,), 5.0))[0], torch.full((3,), 10.0))
    assert run.replays == 3 and run.uncaptured_calls == 2 and len(run.graphs) == 2


def test_a_graph_captured_later_in_use_blocks_replaying_an_earlier_one(emulated):
    pool = GraphPool(torch.device("cpu"))
    first = SegmentRunner("cudagraph_segment0", lambda x: (x * 2,), pool, copy_outputs=frozenset())
    second = SegmentRunner("cudagraph_segment1", lambda x: (x + 1,), pool, copy_outputs=frozenset())
    (a,) = first(torch.ones(2))
    del a
    (b,) = second(torch.ones(2))  # captured after `first`, its output still held
    first(torch.ones(2))  # may not replay its graph (it could hold b's memory): captures another
    assert len(first.graphs) == 2
    del b
    assert pool.may_replay(first.graphs[0])


def test_written_copied_inputs_are_copied_back_and_static_ones_survive_the_warm_up(emulated):
    def segment(buf, x):
        buf.add_(x)
        return (buf.sum(),)

    run = _runner(segment, written=frozenset({0}))
    buf = torch.zeros(3)
    for step in range(1, 4):
        (total,) = run(buf, torch.ones(3))
        torch.testing.assert_close(buf, torch.full((3,), float(step)))
        torch.testing.assert_close(total, torch.tensor(3.0 * step))

    static = torch.nn.Parameter(torch.zeros(3), requires_grad=False)
    run = _runner(lambda b, x: (b.add_(x).sum(),), written=frozenset({0}))
    run(static, torch.ones(3))  # warm-up on a clone, capture, one replay: added once
    torch.testing.assert_close(static, torch.ones(3))


def test_outputs_that_view_an_input_view_the_callers_tensor(emulated):
    run = _runner(lambda x: (x.t()[1:], x * 2), copy_outputs=(1,))
    base = torch.arange(12.0).reshape(6, 2)
    x = base[1:4]  # a view with a storage offset
    view, doubled = run(x)
    torch.testing.assert_close(view, x.t()[1:])
    assert view.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
    torch.testing.assert_close(doubled, x * 2)


def test_copied_outputs_that_share_memory_keep_their_layout(emulated):
    run = _runner(lambda x: ((x * 2).t(), (x * 2)[1]), copy_outputs=(0, 1))

    def both(x):
        y = x * 2
        return y.t(), y[1]

    run = _runner(both, copy_outputs=(0, 1))
    x = torch.randn(3, 2)
    t, row = run(x)
    torch.testing.assert_close(t, (x * 2).t())
    torch.testing.assert_close(row, (x * 2)[1])
    assert t.untyped_storage().data_ptr() == row.untyped_storage().data_ptr()  # still views of one copy


def test_a_parameter_whose_memory_moves_is_copied_from_then_on(emulated):
    w = torch.nn.Parameter(torch.randn(3))
    run = _runner(lambda x, w: ((x * w).sum(),))
    run(torch.ones(3), w)
    w.data = torch.randn(3)  # same parameter, new memory (as FSDP's gathered parameters)
    (out,) = run(torch.ones(3), w)
    torch.testing.assert_close(out, w.sum())
    assert run.volatile == {1} and run.graphs[-1].copied == [0, 1]
    w.data = torch.randn(3)
    (out,) = run(torch.ones(3), w)
    torch.testing.assert_close(out, w.sum())
    assert len(run.graphs) == 2  # no more captures


def test_a_failed_capture_runs_uncaptured_with_a_warning(monkeypatch):
    def failing(pool, fn, warm_inputs, inputs):
        fn(*warm_inputs)
        raise runner_module.GraphCaptureError("RuntimeError: operation not permitted when stream is capturing")

    monkeypatch.setattr(runner_module, "capture_cuda_graph", failing)
    run = _runner(lambda x: (x + 1,))
    with pytest.warns(CUDAGraphsWarning, match="capturing it failed .RuntimeError: operation not permitted"):
        (out,) = run(torch.zeros(2))
    torch.testing.assert_close(out, torch.ones(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(torch.zeros(2))  # warned once
    assert run.uncaptured_calls == 2 and run.disabled.startswith("capturing it failed")

    def broken(x):
        raise ValueError("the program's own error")

    with pytest.raises(ValueError, match="the program's own error"):  # raised by the warm-up, as uncaptured
        _runner(broken)(torch.zeros(2))


def test_numbers_and_shapes_select_the_graph(emulated):
    run = _runner(lambda x, n: (x * n,))
    torch.testing.assert_close(run(torch.ones(2), 3)[0], torch.full((2,), 3.0))
    torch.testing.assert_close(run(torch.ones(2), 4)[0], torch.full((2,), 4.0))
    torch.testing.assert_close(run(torch.ones(5), 4)[0], torch.full((5,), 4.0))
    torch.testing.assert_close(run(torch.ones(2), 3)[0], torch.full((2,), 3.0))
    assert len(run.graphs) == 3 and run.replays == 4


# ---------------------------------------------------------------------------------------------- end to end, emulated
@pytest.fixture
def emulated_on_cpu(monkeypatch, emulated):
    """CPU ops count as capturable and graphs are emulated: the whole runtime runs in the compiled program."""
    from lightning_thunder.cudagraphs import segments

    monkeypatch.setattr(segments, "CAPTURE_DEVICES", ("cuda", "cpu"))


def _mlp():
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.GELU(), torch.nn.Linear(16, 3))


def test_training_steps_match_the_uncaptured_program(emulated_on_cpu):
    import copy

    model = _mlp()
    reference = copy.deepcopy(model)
    plugin = CUDAGraphs()
    cm = lt.compile(model, plugins=[plugin])
    plain = lt.compile(reference, plugins=[])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    losses = []
    for step in range(4):
        for micro in range(2):  # gradient accumulation: two backwards per optimizer step
            x, y = torch.randn(8, 6), torch.randn(8, 3)
            loss = torch.nn.functional.mse_loss(cm(x), y)
            ref_loss = torch.nn.functional.mse_loss(plain(x), y)
            loss.backward()
            ref_loss.backward()
            torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
            losses.append((loss, ref_loss.detach()))
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
        opt.step()
        ref_opt.step()
        opt.zero_grad(set_to_none=True)
        ref_opt.zero_grad(set_to_none=True)
    for b, rb in zip(model.buffers(), reference.buffers()):  # running statistics updated once per step
        torch.testing.assert_close(b, rb, rtol=0, atol=0)
    for loss, ref_loss in losses:  # each loss kept its own value
        torch.testing.assert_close(loss.detach(), ref_loss, rtol=0, atol=0)
    stats = plugin.stats()
    assert stats.segments == 2 and stats.graphs == 2 and stats.replays == 16 and stats.uncaptured_calls == 0
    text = lt.last_traces(cm)[-1].python()
    assert "cudagraph_segment0(" in text and "1 segment(s) captured" in text
    assert "cudagraph_segment0(" in lt.last_backward_traces(cm)[-1].python()
    fw_runner = next(op.target for op in lt.last_traces(cm)[-1].ops if op.executor == "cudagraphs")
    bw_runner = next(op.target for op in lt.last_backward_traces(cm)[-1].ops if op.executor == "cudagraphs")
    assert fw_runner.graphs[0].copied == [2]  # only the data is copied in: parameters and buffers are read in place
    bw_inputs = [p.name for p in next(op for op in lt.last_backward_traces(cm)[-1].ops if op.executor == "cudagraphs").args]
    # the backward copies the gradient of the loss and the data the forward saved; what the forward graph wrote
    # (activations) and the parameters it reads in place
    assert sorted(bw_inputs[i] for i in bw_runner.graphs[0].copied) == ["primals_3", "tangents_1"], bw_inputs  # primals_3: the data


def test_two_forwards_before_their_backwards_keep_their_saved_values(emulated_on_cpu):
    import copy

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    reference = copy.deepcopy(model)
    plugin = CUDAGraphs()
    cm = lt.compile(model, plugins=[plugin])
    xs = [torch.randn(5, 4) for _ in range(2)]
    for _ in range(2):
        total = sum(cm(x).sum() for x in xs)  # both forwards' saved values alive until this backward
        total.backward()
    ref_total = sum(reference(x).sum() for x in xs)
    ref_total.backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, 2 * q.grad)
    fw_runner = next(op.target for op in lt.last_traces(cm)[-1].ops if op.executor == "cudagraphs")
    assert len(fw_runner.graphs) == 2 and fw_runner.uncaptured_calls == 0


# ---------------------------------------------------------------------------------------------- recipes and strategies
def test_recipe_plugin_cudagraphs_maps_to_the_plugin():
    from pathlib import Path

    from lightning_thunder.recipes import ConfigError, load_config
    from lightning_thunder.recipes.plugins import build_plugins, build_strategy

    resolved = build_plugins([{"cudagraphs": {"max_graphs": 4}}])
    (plugin,) = resolved.compile_plugins
    assert isinstance(plugin, CUDAGraphs) and plugin.max_graphs == 4
    assert resolved.compiler_plugins() == [*lt.default_plugins(), plugin]  # after the compiler's defaults
    assert build_strategy("thunder", resolved).plugins == resolved.compiler_plugins()
    assert isinstance(build_plugins(["cudagraphs"]).compile_plugins[0], CUDAGraphs)
    with pytest.raises(ConfigError, match=r"cudagraphs options \{'max_graphs': 0\} were refused by CUDAGraphs"):
        build_plugins([{"cudagraphs": {"max_graphs": 0}}])
    pytest.importorskip("litgpt", reason="litgpt is part of the `test` extra")
    recipe = Path(__file__).resolve().parents[1] / "examples" / "recipes" / "debug.yaml"
    assert load_config(recipe, ["plugins=[cudagraphs]"]).plugins == ["cudagraphs"]


class _ItemModel(torch.nn.Module):
    """``.item()`` inside the compiled graph (Dynamo's ``capture_scalar_outputs``): the value feeds a new tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        scale = h.abs().amax().item()
        return (self.fc2(h) * torch.full((1,), scale, device=x.device)).square().sum()


def test_item_inside_the_graph_runs_between_segments(emulated_on_cpu):
    import copy

    model = _ItemModel()
    reference = copy.deepcopy(model)
    plugin = CUDAGraphs()
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        cm = lt.compile(model, plugins=[plugin])
        plain = lt.compile(reference, plugins=[])
        for _ in range(3):
            x = torch.randn(4, 16)
            loss, ref_loss = cm(x), plain(x)
            loss.backward()
            ref_loss.backward()
            torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
            for p, q in zip(model.parameters(), reference.parameters()):
                torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
    text = lt.last_traces(cm)[-1].python()
    assert "3 segment(s) captured" in text and "then not captured: f0 = aten._local_scalar_dense.default" in text
    assert "t7 = aten.full.default([1], f0" in text  # uses the value read: not captured
    stats = plugin.stats()
    assert stats.uncaptured_calls == 0 and stats.graphs == 4 and stats.replays == 12


def test_trainer_thunder_strategy_runs_the_segments(emulated_on_cpu, tmp_path):
    """The Trainer's ``thunder`` strategy compiles the LightningModule's network with the plugin: its steps replay
    (emulated graphs) and match the same strategy without it, with gradient accumulation."""
    import lightning as L

    from lightning_thunder.strategies import ThunderTrainerStrategy

    class Lit(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
            self.losses: list[torch.Tensor] = []

        def training_step(self, batch, batch_idx):
            loss = torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])
            self.losses.append(loss.detach())
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(16, 6), torch.randn(16, 1))
    results = {}
    for name in ("plain", "cudagraphs"):
        plugin = CUDAGraphs()
        trainer = L.Trainer(
            accelerator="cpu", devices=1, max_steps=4, accumulate_grad_batches=2, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            strategy=ThunderTrainerStrategy(plugins=[plugin] if name == "cudagraphs" else []), default_root_dir=tmp_path,
        )
        module = Lit()
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))
        results[name] = module.losses
    assert len(results["cudagraphs"]) == 8
    for a, b in zip(results["cudagraphs"], results["plain"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    stats = plugin.stats()
    assert stats.replays == 16 and stats.uncaptured_calls == 0, stats


def test_benchmark_modes_with_cuda_graphs_on_cpu():
    """The benchmark's CUDA graph modes: on CPU ours runs uncaptured and reports it, reduce-overhead says it needs
    CUDA (their figures come from GPU runs)."""
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("litgpt", reason="litgpt is part of the `test` extra")
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "benchmarks/litgpt_train.py", "--model", "pythia-14m", "--n-layer", "1", "--steps", "1",
           "--warmup", "1", "--device", "cpu", "--modes", "thunder+cudagraphs,torch.compile-reduce-overhead"]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| thunder+cudagraphs | " in proc.stdout and "| torch.compile-reduce-overhead | skipped: " in proc.stdout
    assert "thunder+cudagraphs: 0 segments, 0 CUDA graphs, 0 replays" in proc.stdout
