"""The fusion-passes issue's repros, end to end: each failed before the executor became a pipeline of checked plan
passes (see executor.py)."""

from __future__ import annotations

import gc
import re
import subprocess
import sys
import weakref

import torch

import lightning_thunder as lt
from lightning_thunder.plugins import Fusion
from tests.helpers import assert_close


def test_an_abandoned_cat_plan_changes_nothing():
    """The first cat cannot be written in place (its second piece is a matmul no region can copy), the second can.
    The abandoned plan used to leave its piece marked for a buffer: the region wrote it into the second cat's
    buffer and the program raised ``NameError: name 't1' is not defined``."""

    def fn(q, x, w):
        y1, y2, y3 = (q * 2).sin(), (q * 3).cos(), (q * 4).tanh()
        heads = lambda y: y.transpose(1, 2).reshape(2, 4, 24)  # noqa: E731
        return torch.cat([heads(y1), x @ w], -1), torch.cat([heads(y2), heads(y3)], -1)

    args = (torch.randn(2, 3, 4, 8), torch.randn(2, 4, 16), torch.randn(16, 24))
    compiled = lt.compile(fn, plugins=[Fusion()])
    assert_close(compiled(*args), fn(*args), "outputs")
    final = lt.last_traces(compiled)[-1].python()
    assert final.count("aten.cat.default(") == 1 and "_buffer0 = aten.empty" in final
    assert "t1: strides (96, 8, 24, 1)" in final  # the layout the abandoned cat's piece had is kept


def test_compiled_regions_do_not_outlive_their_program():
    """Printing a trace kept every generated region alive for the life of the process."""
    from lightning_thunder.executors.triton.runtime import FusedRegion

    made: list[weakref.ref] = []
    init = FusedRegion.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(weakref.ref(self))

    FusedRegion.__init__ = recording_init
    try:
        for _ in range(2):
            compiled = lt.compile(lambda x: (x * 2).sin() * 3, plugins=[Fusion()])
            compiled(torch.randn(4, 8))
            assert "fusion0" in lt.last_traces(compiled)[-1].python()
            del compiled
    finally:
        FusedRegion.__init__ = init
    torch._dynamo.reset()
    gc.collect()
    assert made and not any(ref() is not None for ref in made)


def test_import_without_triton():
    """``import lightning_thunder`` (and the FP8 ops) works where Triton is not installed; fusion says what it needs."""
    code = """
import importlib.abc, sys
class NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("No module named 'triton'")
sys.meta_path.insert(0, NoTriton())
import torch, lightning_thunder
from lightning_thunder.fp8.quantize import quantize_reference
cm = lightning_thunder.compile(lambda x: (x * 2).sin(), plugins=[])
print(cm(torch.ones(3)).sum().item() > 0)
try:
    lightning_thunder.plugins.Fusion()
except ImportError as e:
    print("Fusion:", e)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "True"
    assert lines[1].startswith("Fusion:") and "pip install triton" in lines[1]


def test_a_symbolic_row_count_still_fuses():
    """With ``dynamic=None`` the second sequence length recompiles with a symbolic dimension; the regions of that
    graph used to be dropped (0 regions, every decomposed op on PyTorch, no word why). Now the row count is a
    kernel argument: outputs and every gradient match eager at each length."""

    def fn(x, w, b):
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
        return torch.nn.functional.silu(h) * 2 + b

    w, b = torch.randn(32, requires_grad=True), torch.randn(32, requires_grad=True)
    compiled = lt.compile(fn, plugins=[Fusion()])
    for t in (8, 12, 20):
        x = torch.randn(2, t, 32, requires_grad=True)
        out = compiled(x, w, b)
        cot = torch.randn_like(out)
        got = torch.autograd.grad(out, (x, w, b), cot)
        x_ref, w_ref, b_ref = (v.detach().clone().requires_grad_() for v in (x, w, b))
        ref = fn(x_ref, w_ref, b_ref)
        want = torch.autograd.grad(ref, (x_ref, w_ref, b_ref), cot)
        assert_close(out, ref, f"output at T={t}")
        for name, g, e in zip("xwb", got, want):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5, msg=lambda m: f"grad of {name} at T={t}: {m}")
    explanation = lt.explain(compiled)

    def symbolic_rows(graph) -> bool:  # a region note reads "kernel: persistent, R=2*s27, N=32"
        return any(re.search(r"R=[^,]*[a-z]", note) for _, _, _, notes in graph.regions for note in notes)

    dynamic = [g for g in explanation.graphs if symbolic_rows(g)]
    assert {g.stage for g in dynamic} == {"forward", "backward"}, str(explanation)
    forward = next(g for g in dynamic if g.stage == "forward")
    assert not forward.unfused, str(forward)  # every op of the dynamic forward is fused


def test_a_cast_of_a_column_sum_computed_in_another_region_is_not_folded():
    """Fuzzer seed 6451: the column-sum pass folded a cast that followed the sum into its finisher while another
    region computed that cast too: the lowered program read a value before any op made it."""
    import torch.nn.functional as F  # noqa: N812

    def program(x1, x2):
        v6 = torch.maximum(torch.log_softmax(x1, 0), x2[:, 3:5])
        return torch.log_softmax(F.gelu(torch.log_softmax(v6, -1)), 2)

    g = torch.Generator().manual_seed(6451)
    x1 = torch.randn((8,), generator=g).to(torch.bfloat16)
    x2 = torch.randn((8, 5, 2), generator=g).to(torch.bfloat16)[..., ::2]
    from tests.helpers import check_module_parity

    class Program(torch.nn.Module):
        def forward(self, a, b):
            return program(a, b)

    check_module_parity(Program(), lambda: [x1.clone().requires_grad_(), x2.clone().requires_grad_()], plugins=[Fusion()])


def test_a_kernel_triton_cannot_compile_runs_its_region_on_pytorch(monkeypatch):
    """On the H100, a float64 region (float_power's backward) failed to compile (Triton's math functions are
    fp32-only) and the first call raised. Now float64 stays on PyTorch, and a kernel that fails to compile before the
    first step drops its region with a FusionWarning (raises under LIGHTNING_THUNDER_STRICT_FUSION)."""
    import pytest

    from lightning_thunder.executors.triton import FusionWarning
    from lightning_thunder.executors.triton import executor as executor_module
    from lightning_thunder.executors.triton import runtime

    x = torch.randn(4, 8, dtype=torch.float64)
    compiled = lt.compile(lambda x: (x * 2).exp() * 3, plugins=[Fusion()])
    assert_close(compiled(x), (x * 2).exp() * 3, "float64")
    assert lt.compile_stats(compiled).fusion_regions == 0
    assert "float64 results stay on PyTorch" in str(lt.explain(compiled))

    monkeypatch.delenv("LIGHTNING_THUNDER_STRICT_FUSION")
    monkeypatch.setattr(executor_module, "_precompiles", lambda plan: True)
    monkeypatch.setattr(runtime, "precompile_all", lambda kernels: {k.spec.kernel_name: RuntimeError("ptxas died") for k in kernels})
    compiled = lt.compile(lambda x: (x * 2).sin() * 3, plugins=[Fusion()])
    y = torch.randn(4, 8)
    with pytest.warns(FusionWarning, match="Triton could not compile its kernel: RuntimeError: ptxas died"):
        assert_close(compiled(y), (y * 2).sin() * 3, "outputs")
    assert lt.compile_stats(compiled).fusion_regions == 0


def test_a_region_with_a_column_sum_does_not_grow_wider_than_the_sum():
    """Fuzzer seed 20353: a slice's gradient (16 columns wide) joined a region that already summed a 5-column value
    over its rows; the kernel then stored 16 partial sums per program into a buffer of 5: a write out of bounds
    (heap corruption under the interpreter, memory corruption on a GPU)."""

    def program(x):
        v = x[:, 10:15]
        return x.amax(-1) * v, v[3:4]

    g = torch.Generator().manual_seed(20353)
    x = torch.randn((16, 5), generator=g).to(torch.bfloat16).transpose(-1, -2)
    from tests.helpers import check_module_parity

    class Program(torch.nn.Module):
        def forward(self, a):
            return program(a)

    check_module_parity(Program(), lambda: [x.clone().requires_grad_()], plugins=[Fusion()])
