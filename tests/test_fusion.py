"""The Triton fusion executor against eager PyTorch (Triton's interpreter on CPU, real kernels on GPU).

Property tests draw random op chains over random shapes (odd sizes, size-1 dims, broadcasting) and
dtypes; every case checks the forward output and the gradient of every input, and that fusion happened.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_thunder as lt
from lightning_thunder.plugins import Fusion
from tests.helpers import assert_close, assert_close_to_reference, check_module_parity

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover - conftest sets it
    pytest.skip("fusion on CPU needs TRITON_INTERPRET=1", allow_module_level=True)

UNARY = [
    torch.sin,
    torch.tanh,
    torch.sigmoid,
    torch.relu,
    torch.erf,
    F.gelu,
    F.silu,
    lambda x: x * x,
    lambda x: -x,
    lambda x: torch.exp(-x * x),
    lambda x: torch.sqrt(x * x + 1),
    lambda x: torch.rsqrt(x * x + 1),
    lambda x: torch.log(x.abs() + 1),
    lambda x: x.clamp(-1.0, 1.0),
    lambda x: torch.where(x > 0, x, 0.1 * x),
    lambda x: x.pow(3) / 4,
    lambda x: torch.cat((x[..., 1:], x[..., :1]), -1) * 0.5 if x.dim() else x,  # rotate the last dim (cat, slices)
    # Rounding to bf16 mid-program turns fp32-level differences into bf16 ulps: only in low-precision runs.
    lambda x: x.to(torch.bfloat16).to(x.dtype),
]
_ROUNDING = len(UNARY) - 1
BINARY = [
    torch.add,
    torch.sub,
    torch.mul,
    lambda a, b: a / (b * b + 1),
    torch.maximum,
    torch.minimum,
    lambda a, b: torch.where(a > b, a, b * 0.5),
    lambda a, b: a * 2.0 - b,
]
REDUCE = [
    lambda x: x.sum(-1, keepdim=True),
    lambda x: x.mean(-1, keepdim=True),
    lambda x: x.amax(-1, keepdim=True),
    lambda x: torch.softmax(x, -1),
    lambda x: torch.log_softmax(x, -1),
    lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5),
]
SHAPES = [(7,), (3, 5), (2, 3, 17), (1, 4, 33), (5, 1, 64), (2, 130), (4, 9, 1)]


def random_program(seed: int, *, rounding: bool = False):
    """A random function of four tensors (full, last-dim, row-broadcast, scalar) and its input shapes."""
    rng = random.Random(seed)
    n_unary = len(UNARY) if rounding else _ROUNDING
    shape = rng.choice(SHAPES)
    plan = []
    n_values = 4
    for _ in range(rng.randint(3, 8)):
        kind = rng.choices(["unary", "binary", "reduce"], weights=[4, 4, 2])[0]
        pick = lambda: rng.randrange(max(0, n_values - 3), n_values) if rng.random() < 0.7 else rng.randrange(n_values)  # noqa: E731
        if kind == "unary":
            plan.append((kind, rng.randrange(n_unary), pick()))
        elif kind == "binary":
            plan.append((kind, rng.randrange(len(BINARY)), pick(), rng.randrange(n_values)))
        else:
            plan.append((kind, rng.randrange(len(REDUCE)), pick()))
        n_values += 1

    def program(x, w, r, s):
        vals = [x, w.expand_as(x) if rng_free_expand[0] else w, r, s]
        for step in plan:
            if step[0] == "unary":
                vals.append(UNARY[step[1]](vals[step[2]]))
            elif step[0] == "binary":
                vals.append(BINARY[step[1]](vals[step[2]], vals[step[3]]))
            else:
                vals.append(REDUCE[step[1]](vals[step[2]]))
        return vals[-1] + x * 0.5, vals[-2]

    rng_free_expand = [rng.random() < 0.3]
    shapes = [shape, shape[-1:], shape[:-1] + (1,), ()]
    return program, shapes


def _inputs(shapes, dtype):
    return [torch.randn(s, device=DEVICE, dtype=dtype).requires_grad_() for s in shapes]


def _check_function(fn, inputs, *, expect_regions: int = 1, **compile_options):
    """Compile ``fn`` with fusion; compare outputs and every input gradient with eager."""
    cf = lt.compile(fn, plugins=[Fusion()], **compile_options)
    ref_inputs = [i.detach().clone().requires_grad_() for i in inputs]
    low = inputs[0].dtype in (torch.bfloat16, torch.float16)
    in64 = [i.detach().double().requires_grad_() for i in inputs] if low else None
    out, ref = cf(*inputs), fn(*ref_inputs)
    out64 = fn(*in64) if low else None
    cots = [torch.randn_like(r) for r in ref]
    torch.autograd.backward(list(out), cots)
    torch.autograd.backward(list(ref), cots)
    if low:
        torch.autograd.backward(list(out64), [c.double() for c in cots])
        assert_close_to_reference(list(out), list(ref), list(out64), "output")
        for k, (i, r, r64) in enumerate(zip(inputs, ref_inputs, in64)):
            assert_close_to_reference(i.grad, r.grad, r64.grad, f"grad of input {k}")
    else:
        assert_close(list(out), list(ref), "output")
        for k, (i, r) in enumerate(zip(inputs, ref_inputs)):
            assert_close(i.grad, r.grad, f"grad of input {k}")
    stats = lt.compile_stats(cf)
    assert stats.fusion_regions >= expect_regions, (stats, lt.last_traces(cf)[-1])
    return cf


@pytest.mark.parametrize("seed", range(16))
def test_random_programs_fp32(seed):
    program, shapes = random_program(seed)
    _check_function(program, _inputs(shapes, torch.float32))


@pytest.mark.parametrize("seed", range(16, 24))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_random_programs_low_precision(seed, dtype):
    program, shapes = random_program(seed, rounding=True)
    _check_function(program, _inputs(shapes, dtype))


def test_non_contiguous_and_expanded_inputs():
    def fn(a, b, c):
        return (torch.sigmoid(a) * b + c).softmax(-1), (a * c).sum(-1)

    a = torch.randn(9, 6, device=DEVICE).t().requires_grad_()  # transposed: strides (1, 6)
    b = torch.randn(1, 9, device=DEVICE).expand(6, 9).requires_grad_()  # stride 0 on rows
    c = torch.randn(6, 1, device=DEVICE).requires_grad_()
    _check_function(fn, [a, b, c])
    assert not a.is_contiguous()


def test_long_rows_use_looped_kernels():
    def fn(x, t):
        return torch.log_softmax(x, -1) * t, x.amax(-1)

    x = torch.randn(2, 20000, device=DEVICE, requires_grad=True)
    t = torch.randn(2, 20000, device=DEVICE, requires_grad=True)
    cf = _check_function(fn, [x, t])
    sources = lt.kernel_sources(cf)
    assert any("for c0 in range(0, 20000, BLOCK_N):" in src for src in sources.values()), list(sources)
    # max and sum(exp(x - max)) share one online pass; the outputs take a second.
    forward = sources["forward/fusion0"]
    assert "(online)" in forward and forward.count("for c0 in range(") == 2, forward


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_cross_entropy_decomposition_matches_eager(reduction, weighted):
    def loss(logits, weight, target):
        w = weight if weighted else None
        return (F.cross_entropy(logits.float(), target, weight=w, ignore_index=2, reduction=reduction),)

    logits = torch.randn(6, 37, device=DEVICE, requires_grad=True)
    weight = torch.rand(37, device=DEVICE, requires_grad=False) + 0.5
    target = torch.tensor([0, 2, 5, 36, 2, 7], device=DEVICE)  # two ignored rows
    cf = lt.compile(loss, plugins=[Fusion()])
    ref_logits = logits.detach().clone().requires_grad_()
    (out,), (ref,) = cf(logits, weight, target), loss(ref_logits, weight, target)
    assert_close(out, ref, "loss")
    cot = torch.randn_like(ref)
    out.backward(cot)
    ref.backward(cot)
    assert_close(logits.grad, ref_logits.grad, "grad")
    final = lt.last_traces(cf)[-1].python() + lt.last_backward_traces(cf)[-1].python()
    assert "nll_loss" not in final and "gather" not in final and "scatter" not in final
    # The class index of the one-hot comparison is computed in the kernels, never loaded from memory.
    traces = (lt.last_traces(cf)[-1], lt.last_backward_traces(cf)[-1])
    assert not [op for t in traces for op in t.ops if op.name.startswith("aten.arange")]
    sources = lt.kernel_sources(cf)
    assert "# aten.arange.default" in "".join(sources.values() if isinstance(sources, dict) else sources)


def test_cross_entropy_over_long_rows_reads_each_row_once():
    """The target logit is loaded directly (a one-hot sum is its summand at the target column), so the
    forward makes one pass over each row (the online softmax) and the backward one (the gradient)."""

    def loss(logits, target):
        return (F.cross_entropy(logits.float(), target, ignore_index=1),)

    logits = torch.randn(5, 20000, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)  # looped kernels
    target = torch.tensor([3, 1, 19999, 0, 4500], device=DEVICE)  # row 1 ignored
    cf = lt.compile(loss, plugins=[Fusion()])
    ref_logits = logits.detach().clone().requires_grad_()
    (out,), (ref,) = cf(logits, target), loss(ref_logits, target)
    out.backward()
    ref.backward()
    assert_close(out, ref, "loss")
    assert_close(logits.grad, ref_logits.grad, "grad")
    sources = lt.kernel_sources(cf)
    assert [src.count("for c0 in range(") for src in sources.values()] == [1, 1], sources
    assert all("(one-hot" in src for src in sources.values())


def test_rope_forward_and_backward_are_one_kernel_each():
    def rope(x, cos, sin):
        half = x.size(-1) // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        roped = x * cos + rotated * sin
        return (torch.cat((roped, x[..., x.size(-1) :]), dim=-1),)  # LitGPT appends the un-roped rest

    x = torch.randn(2, 4, 8, 32, device=DEVICE, requires_grad=True)
    cos = torch.randn(8, 32, device=DEVICE, requires_grad=True)
    sin = torch.randn(8, 32, device=DEVICE, requires_grad=True)
    cf = _check_function(rope, [x, cos, sin])
    for trace in (lt.last_traces(cf)[-1], lt.last_backward_traces(cf)[-1]):
        torch_ops = {op.name for op in trace.ops if op.executor == "torch"}
        assert not torch_ops & {"aten.cat.default", "aten.neg.default", "aten.slice_backward.default"}, torch_ops
        assert sum(1 for op in trace.ops if op.subops) == 1, trace


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transposed_reads_get_the_layout_and_no_copy(dtype):
    """A region output read only as ``y.transpose(1, 2).reshape(...)`` (heads back beside each other, as
    attention code does) is stored transposed by the region, so the reshape's copy has nothing to do."""

    def heads_back(x, scale, w):
        y = torch.tanh(x) * scale + 1  # [B, H, T, D]
        merged = y.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)  # [B, T, H * D]
        return (merged @ w,)

    x = torch.randn(2, 3, 5, 8, device=DEVICE, dtype=dtype, requires_grad=True)
    scale = torch.randn(8, device=DEVICE, dtype=dtype, requires_grad=True)
    w = torch.randn(24, 4, device=DEVICE, dtype=dtype, requires_grad=True)
    cf = _check_function(heads_back, [x, scale, w])
    forward = lt.last_traces(cf)[-1]
    names = [op.name for op in forward.ops]
    assert "aten.clone.default" not in names and "aten.contiguous.default" in names, forward
    (region,) = [op for op in forward.ops if op.subops]
    (k,) = [k for k, a in enumerate(region.target.spec.outputs) if not a.contiguous]
    assert region.target.spec.outputs[k].stride == (120, 8, 24, 1)  # [B, H, T, D] stored as [B, T, H, D]
    # At run time the stored value really is in that order: the contiguous() of its transpose is free.
    values = {}
    region_fn = region.target

    def spy(*args):
        values["y"] = region_fn(*args)
        return values["y"]

    region.target = spy
    try:
        forward.python_callable()(*[t.detach() for t in (x, scale, w)])
    finally:
        region.target = region_fn
    y = values["y"] if len(region.outputs) == 1 else values["y"][k]
    assert y.transpose(1, 2).is_contiguous()


def test_attention_query_is_stored_in_the_order_the_output_is_read():
    """The query (made by a region) goes to attention in [B, T, H, D] memory order, so the attention
    output, allocated in the query's order, is read back as [B, T, H * D] without a copy."""

    def attention(x, k, v, scale, w):
        q = torch.tanh(x) * scale  # [B, H, T, D], a region
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return (o.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1) @ w,)

    shapes = [(2, 3, 5, 8), (2, 3, 5, 8), (2, 3, 5, 8), (8,), (24, 4)]
    inputs = [torch.randn(s, device=DEVICE, requires_grad=True) for s in shapes]
    cf = _check_function(attention, inputs)
    forward = lt.last_traces(cf)[-1]
    names = [op.name for op in forward.ops]
    assert "aten.clone.default" not in names and "aten.contiguous.default" in names, forward
    (region,) = [op for op in forward.ops if op.subops]
    strides = [a.stride for a in region.target.spec.outputs if not a.contiguous]
    assert strides == [(120, 8, 24, 1)], region.target.spec.outputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_gradients_are_summed_in_the_region(dtype):
    """The gradients of a norm's weight and bias (sums over every row) are accumulated by the backward
    region itself and finished by one small kernel each, which also casts to the weight's dtype."""

    class Norm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(48, device=DEVICE))
            self.bias = nn.Parameter(torch.randn(48, device=DEVICE))

        def forward(self, x):
            xf = x.float()
            y = xf * torch.rsqrt((xf * xf).mean(-1, keepdim=True) + 1e-5)
            return (y * self.weight.float() + self.bias.float()).to(x.dtype)

    model = Norm().to(dtype)
    cm = check_module_parity(
        model, lambda: [torch.randn(3, 37, 48, device=DEVICE, dtype=dtype, requires_grad=True)], plugins=[Fusion()]
    )
    backward = lt.last_backward_traces(cm)[-1]
    # Only a sum of a backward input itself (fp32: the bias gradient is the incoming gradient's sum) is
    # left to PyTorch; sums of values the region computes are finished by colsum ops.
    inputs = {id(p) for p in backward.inputs}
    left = [op for op in backward.ops if op.executor == "torch" and "sum" in op.name]
    assert all(id(op.args[0]) in inputs for op in left), backward
    finishes = [op for op in backward.ops if op.name.startswith("colsum")]
    assert len(finishes) == 2 - len(left) and all(op.outputs[0].val.dtype == dtype for op in finishes), backward
    # A fixed grid and block size fix the order of every addition: the same gradients every run.
    x = torch.randn(3, 37, 48, device=DEVICE, dtype=dtype)
    grads = []
    for _ in range(2):
        cm.zero_grad()
        cm(x).float().square().sum().backward()
        grads.append([p.grad.clone() for p in cm.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wide_bias_gradient_splits_the_columns(dtype):
    """A bias gradient over more than COLUMN_TILE_MIN_N columns (an MLP's intermediate size) is summed by
    programs that each take a block of columns; a norm over as many columns (a reduction along the row)
    keeps whole rows per program. Both match eager."""
    from lightning_thunder.executors.triton.shapes import COLUMN_TILE_MIN_N

    n = COLUMN_TILE_MIN_N + 52  # ragged against the 512-column blocks
    bias = torch.randn(n, device=DEVICE, dtype=dtype, requires_grad=True)
    x = torch.randn(2, 19, n, device=DEVICE, dtype=dtype, requires_grad=True)

    def bias_gelu(x, b):
        return F.gelu(x + b, approximate="tanh")

    cf = _check_function(bias_gelu, [x, bias])
    sources = [s for k, s in lt.kernel_sources(cf).items() if k.startswith("backward/fusion")]
    assert len(sources) == 1 and "tl.program_id(1) * BLOCK_N" in sources[0], sources

    def norm_weight(x, w):  # the weight's gradient sums a value of the region that a row reduction feeds
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype) * w

    cf = _check_function(norm_weight, [x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()])
    sources = [s for k, s in lt.kernel_sources(cf).items() if k.startswith("backward/fusion")]
    with_sums = [s for s in sources if "csum0" in s]
    assert with_sums and not any("tl.program_id(1)" in s for s in with_sums), sources


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_column_sum_finish_kernel(dtype):
    from lightning_thunder.executors.triton.colsum import ColumnSum

    partials = torch.randn(150, 70, device=DEVICE)  # more partial rows than one block, ragged columns
    out = ColumnSum("colsum0", (1, 70), dtype)(partials)
    assert out.shape == (1, 70) and out.dtype == dtype
    assert_close(out, partials.double().sum(0, keepdim=True).to(dtype), "column sums")


def test_a_column_sum_read_elsewhere_is_finished_unfolded():
    def fn(x, w):
        g = torch.tanh(x) * w  # [rows, 16]
        s = g.sum(0)  # a column sum ...
        return (s * 2, s.exp())  # ... read by two ops: finished as is, its readers stay outside

    x, w = torch.randn(23, 16, device=DEVICE, requires_grad=True), torch.randn(16, device=DEVICE, requires_grad=True)
    cf = _check_function(fn, [x, w])
    forward = lt.last_traces(cf)[-1]
    (finish,) = [op for op in forward.ops if op.name.startswith("colsum")]
    assert finish.outputs[0].val.dtype == torch.float32 and tuple(finish.outputs[0].shape) == (16,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cat_of_region_outputs_is_written_in_place(dtype):
    """Heads put back side by side and concatenated (attention's q/k/v gradients before the fused QKV
    matmul): the regions store their pieces into the cat's result, and the third piece (made outside any
    region) is copied there by the region of the second, which has the same grid."""

    def qkv(a, b, v, w):
        B, _, T, _ = a.shape
        q = torch.tanh(a) * 2  # [B, H, T, D], a region
        k = torch.sigmoid(b) + 1  # [B, G, T, D], a region with v's grid
        pieces = [t.transpose(1, 2).reshape(B, T, -1) for t in (q, k, v)]
        return (torch.cat(pieces, dim=-1) @ w,)

    shapes = [(2, 4, 5, 8), (2, 2, 5, 8), (2, 2, 5, 8), (64, 3)]
    cf = _check_function(qkv, [torch.randn(s, device=DEVICE, dtype=dtype, requires_grad=True) for s in shapes])
    forward = lt.last_traces(cf)[-1]
    names = [op.name for op in forward.ops]
    assert "aten.cat.default" not in names and "aten.empty.memory_format" in names, forward
    writers = [op for op in forward.ops if op.subops and tuple(op.outputs[-1].shape) == (2, 5, 64)]
    assert len(writers) == 2, forward  # each passes the buffer on; the last one's output is the cat's result


def test_cat_in_place_only_when_the_pieces_are_read_by_the_cat_alone():
    def read_twice(a, b, w):
        q = torch.tanh(a) * 2
        k = torch.sigmoid(b) + 1
        c = torch.cat([q.transpose(1, 2).reshape(2, 5, -1), k.transpose(1, 2).reshape(2, 5, -1)], -1)
        return (c @ w, q.sum())  # q is read again: its region cannot hand its memory to the cat

    def outside_first(a, v, w):  # the first piece is an input, copied by the region of the second
        q = torch.tanh(a) * 2
        c = torch.cat([v.transpose(1, 2).reshape(2, 5, -1), q.transpose(1, 2).reshape(2, 5, -1)], -1)
        return (c @ w,)

    cases = [
        (read_twice, [(2, 4, 5, 8), (2, 2, 5, 8), (48, 3)], True),
        (outside_first, [(2, 4, 5, 8)] * 2 + [(64, 3)], False),
    ]
    for fn, shapes, keeps_cat in cases:
        cf = _check_function(fn, [torch.randn(s, device=DEVICE, requires_grad=True) for s in shapes])
        names = [op.name for op in lt.last_traces(cf)[-1].ops]
        assert ("aten.cat.default" in names) == keeps_cat, names


def test_independent_reductions_over_one_input_share_a_kernel():
    def fn(x):
        return x.sum(-1), (x * x).sum(-1), x.amax(-1)

    cf = _check_function(fn, [torch.randn(5, 37, device=DEVICE, requires_grad=True)])
    forward = [op for op in lt.last_traces(cf)[-1].ops if op.subops]
    assert len(forward) == 1 and len(forward[0].outputs) == 3


def _two_regions(x, w):
    h = torch.tanh(x) * 2 + 1
    return torch.sigmoid(h @ w) * 3 - 1


def test_fuel_limits_the_number_of_regions():
    x = torch.randn(4, 8, device=DEVICE)
    w = torch.randn(8, 8, device=DEVICE)
    for fuel, expected in ((0, 0), (1, 1), (None, 2)):
        torch._dynamo.reset()
        cf = lt.compile(_two_regions, plugins=[Fusion(fuel=fuel)])
        with torch.no_grad():
            assert_close(cf(x, w), _two_regions(x, w), f"fuel={fuel}")
        assert lt.compile_stats(cf).fusion_regions == expected, fuel
    with pytest.raises(ValueError, match="fuel=-1 must be None or a non-negative int"):
        Fusion(fuel=-1)


def test_final_trace_shows_regions_and_sources_are_retrievable():
    cf = lt.compile(_two_regions, plugins=[Fusion()])
    x = torch.randn(4, 8, device=DEVICE, requires_grad=True)
    cf(x, torch.randn(8, 8, device=DEVICE)).sum().backward()
    final = lt.last_traces(cf)[-1].python()
    assert re.search(
        r"# fusion0: \d ops: aten.tanh.default, (aten.detach.default, )?aten.mul.Tensor, aten.add.Tensor", final
    ), final
    assert "= fusion0(x)" in final and "[triton]" in final
    sources = lt.kernel_sources(cf)
    assert {"forward/fusion0", "forward/fusion1"} <= set(sources)
    assert all("@triton.jit" in s and "tl.store" in s for s in sources.values())
    assert any(k.startswith("backward/") for k in sources)
    stats = lt.compile_stats(cf)
    assert stats.executor_counts["triton"] >= 6 and stats.fusion_regions >= 3


def _two_identical_blocks(x, w1, w2):
    for w in (w1, w2):  # the same ops on other values: each block's region differs only in its comments
        xf = x.float()
        x = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype) * w
        x = torch.tanh(x) @ w.diag()
    return x


def test_identical_regions_share_one_kernel():
    x = torch.randn(6, 16, device=DEVICE, requires_grad=True)
    w1, w2 = (torch.randn(16, device=DEVICE, requires_grad=True) for _ in range(2))
    cf = _check_function(_two_identical_blocks, [x, w1, w2], expect_regions=2)
    sources = lt.kernel_sources(cf)
    names = {key: re.search(r"def (fused_[0-9a-f]{16})\(", src).group(1) for key, src in sources.items()}
    forward = [names[k] for k in sorted(names) if k.startswith("forward/")]
    # One kernel for both blocks' forward regions (compiled and autotuned once), though the sources differ
    # in the comments that name each block's values.
    assert len(forward) == 2 and forward[0] == forward[1], names
    first, second = (sources[k] for k in sorted(sources) if k.startswith("forward/"))
    assert first != second


def test_unfusible_ops_stay_on_torch():
    def fn(x):
        y = torch.exp(x) * 2
        z = torch.cumsum(y, -1)  # not a pointwise op or a supported reduction
        return torch.sin(z) + 1

    cf = _check_function(fn, [torch.randn(3, 11, device=DEVICE, requires_grad=True)], expect_regions=1)
    final = lt.last_traces(cf)[-1].python()
    assert "aten.cumsum.default" in final and "[torch]" in final


def test_generated_sources_are_cached_on_disk(tmp_path):
    script = (
        "import torch, lightning_thunder as lt\n"
        "from lightning_thunder.plugins import Fusion\n"
        "f = lt.compile(lambda x: (torch.tanh(x) * 2).softmax(-1), plugins=[Fusion()])\n"
        "print(f(torch.randn(3, 5)).shape)\n"
    )
    env = {**os.environ, "LIGHTNING_THUNDER_CACHE": str(tmp_path), "TRITON_INTERPRET": "1"}
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        files = sorted(Path(tmp_path, "kernels").glob("*.py"))
        if _ == 0:
            first = {f.name: f.stat().st_mtime_ns for f in files}
    assert first and {f.name: f.stat().st_mtime_ns for f in files} == first  # reused, not rewritten


def test_cpu_tensors_are_not_fused_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cf = lt.compile(lambda x: torch.tanh(x) * 2 + 1, plugins=[Fusion()])
    cf(torch.randn(3, 4))
    assert lt.compile_stats(cf).fusion_regions == 0
    (claim,) = [t for t in lt.last_traces(cf) if t.name == "forward/executor:triton"]
    assert "0 fused regions (CPU tensors are fused only under TRITON_INTERPRET=1)" in claim.python()


def test_default_plugins_fuse_only_with_cuda():
    names = [type(p).__name__ for p in lt.default_plugins()]
    assert names == (["NativeGQA", "FusedLinearCrossEntropy", "Fusion"] if torch.cuda.is_available() else [])
    assert lt.default_plugins()[0] is lt.default_plugins()[0] if names else True


# ------------------------------------------------------------------------------------ model corpus
def _corpus():
    from tests import test_models as tm

    cases = {
        "mlp": (lambda: tm.MLP(), lambda: [torch.randn(6, 16, requires_grad=True)]),
        "mlp-bf16": (
            lambda: tm.MLP().to(torch.bfloat16),
            lambda: [torch.randn(6, 16, dtype=torch.bfloat16, requires_grad=True)],
        ),
        "cnn-train": (lambda: tm.CNN(), lambda: [torch.randn(4, 3, 12, 12, requires_grad=True)]),
        "buffers": (lambda: tm.Counter(), lambda: [torch.randn(5, 4, requires_grad=True)]),
        "attention": (lambda: tm.Attention(), lambda: [torch.randn(2, 5, 16, requires_grad=True)]),
        "autocast": (lambda: tm.AutocastRegion(), lambda: [torch.randn(4, 16, requires_grad=True)]),
    }
    return cases


@pytest.mark.parametrize("name", list(_corpus()))
def test_model_corpus_with_fusion(name):
    make_model, make_inputs = _corpus()[name]
    model = make_model().to(DEVICE)

    def inputs():
        return [i.to(DEVICE).detach().requires_grad_(i.requires_grad) for i in make_inputs()]

    cm = check_module_parity(model, inputs, steps=2, plugins=[Fusion()], reference=True)
    assert lt.compile_stats(cm).fusion_regions >= 1


@pytest.mark.parametrize("name", ["pythia-14m", "llama-3", "gemma", "phi-2", "mixtral"])
def test_litgpt_with_fusion(name):
    pytest.importorskip("litgpt", reason="litgpt is part of the `test` extra")
    from litgpt import GPT, Config

    from tests.test_litgpt import CONFIGS

    config = Config.from_name("pythia-14m", n_layer=2) if name == "pythia-14m" else CONFIGS[name]()
    model = GPT(config).to(DEVICE)
    vocab = config.padded_vocab_size
    cm = check_module_parity(
        model, lambda: [torch.randint(0, vocab, (2, 12), device=DEVICE)], steps=2, plugins=[Fusion()], reference=True
    )
    stats = lt.compile_stats(cm)
    assert stats.fusion_regions >= 4 and stats.executor_counts["triton"] > 20, stats
    if name != "mixtral":  # (graph breaks: the embedding is in the first graph, not the last compiled)
        assert stats.executor_counts.get("embedding") == 1, stats  # the embedding gradient's Triton kernel


class _TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(12, 24)
        self.b = nn.Linear(24, 12)

    def forward(self, x):
        return self.b(F.gelu(self.a(x))).softmax(-1)


def test_fuel_bisects_a_model():
    model = _TwoLayer().to(DEVICE)
    x = torch.randn(3, 12, device=DEVICE)
    full = lt.compile(model, plugins=[Fusion()])
    full(x).sum().backward()
    total = lt.compile_stats(full).fusion_regions
    torch._dynamo.reset()
    half = lt.compile(model, plugins=[Fusion(fuel=1)])
    half(x).sum().backward()
    assert total >= 2 and lt.compile_stats(half).fusion_regions == 1
