"""Regression tests: the repros of issue 22 and the failures the OpInfo sweep and the fuzzer found.

Each compiles with ``plugins=[Fusion()]`` (Triton's interpreter on CPU) unless it says otherwise and
compares outputs and the gradient of every input with eager (fp32) or against fp64 (bf16), with
:func:`tests.parity.fuzz.check_program`. Every bug these nets found is fixed (:mod:`tests.parity.bugs` keeps
each one's repro); a bug found later is marked with its :meth:`~tests.parity.bugs.Bug.mark` until it is.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch._dynamo.exc import BackendCompilerFailed

import lightning_thunder as lt
from lightning_thunder.plugins import Fusion
from tests.parity.bugs import BUGS
from tests.parity.checks import Mismatch
from tests.parity.fuzz import check_program

DEVICE = "cpu"


def randn(*shape: int, grad: bool = True) -> torch.Tensor:
    return torch.randn(shape, device=DEVICE).requires_grad_(grad)


# ------------------------------------------------------------------------------ issue 22: wrong values


def test_where_reads_a_broadcast_operand_whose_numel_equals_the_row_count() -> None:
    x, a, b = randn(5, 10, 5, grad=False), randn(10, 5, grad=False), randn(10, 5, grad=False)
    BUGS["bcast-index"].run(lambda: check_program(lambda x, a, b: torch.where((x < a) & (a < b), x, 0.0), [x, a, b]))


def test_where_with_a_broadcast_operand_of_other_numel() -> None:
    """The issue's control: x of [4, 10, 5] is right."""
    x, a, b = randn(4, 10, 5, grad=False), randn(10, 5, grad=False), randn(10, 5, grad=False)
    assert check_program(lambda x, a, b: torch.where((x < a) & (a < b), x, 0.0), [x, a, b]) > 0


def test_clamp_gradients_of_broadcast_bounds() -> None:
    """clamp(x*1., lo, hi)*1. with lo/hi [10,5], x [5,10,5]: the gradients of lo/hi are off by up to ~3."""
    x, lo, hi = randn(5, 10, 5), randn(10, 5), randn(10, 5)
    BUGS["bcast-index"].run(lambda: check_program(lambda x, lo, hi: torch.clamp(x * 1.0, lo, hi) * 1.0, [x, lo, hi]))


def test_clamp_gradients_of_broadcast_bounds_all_scaled() -> None:
    """Every operand multiplied by 1. (the bounds computed in the region) is right today."""
    x, lo, hi = randn(5, 10, 5), randn(10, 5), randn(10, 5)
    assert check_program(lambda x, lo, hi: torch.clamp(x * 1.0, lo * 1.0, hi * 1.0) * 1.0, [x, lo, hi]) > 0


def test_slice_then_sigmoid_gradient() -> None:
    BUGS["slice-backward-unwritten"].run(lambda: check_program(lambda x: x[..., 1:].sigmoid(), [randn(2, 3, 8)]))


# ------------------------------------------------------------------------ issue 22: errors (never wrong)


@pytest.mark.parametrize("fn", [torch.softmax, torch.log_softmax, F.softmin], ids=["softmax", "log_softmax", "softmin"])
def test_softmax_over_dim_0(fn) -> None:
    BUGS["softmax-dim0"].run(lambda: check_program(lambda x: fn(x * 1.0, 0) * 1.0, [randn(4, 5)]))


def test_product_of_broadcast_operands_backward() -> None:
    BUGS["region-cycle"].run(lambda: check_program(lambda x, a, b: x * (a * b), [randn(5, 10, 5), randn(10, 5), randn(10, 5)]))


def test_normalize_p1_over_a_middle_dim() -> None:
    BUGS["region-cycle"].run(lambda: check_program(lambda x: F.normalize(x * 1.0, p=1.0, dim=2) * 1.0, [randn(2, 1, 4, 5)]))


def test_falcon_slice_flatten_sin_backward() -> None:
    BUGS["falcon-slice-flatten"].run(
        lambda: check_program(lambda x: (x[:, :, :, :-2] * 2).flatten(2, 3).sin(), [randn(2, 8, 2, 4, 16)])
    )


def test_xlogy_with_a_0d_operand() -> None:
    x = (torch.rand(3, 4, device=DEVICE) + 0.1).requires_grad_()
    y = (torch.rand((), device=DEVICE) + 0.1).requires_grad_()
    BUGS["xlogy-0d"].run(lambda: check_program(lambda x, y: torch.xlogy(x * 1.0, y * 1.0) * 1.0, [x, y]))


# ------------------------------------------------------------- found by the OpInfo sweep and the fuzzer

_FOUND = [tag for tag, b in BUGS.items() if b.source != "issue 22"]


@pytest.mark.parametrize("tag", _FOUND)
def test_found_bug_repro(tag: str) -> None:
    """The minimal repro of each bug the sweep and the fuzzer found (tests/parity/bugs.py)."""
    BUGS[tag].run_repro()


@pytest.mark.parametrize(
    "fn, shape",
    [
        (lambda x: x[:, 1:].sigmoid(), (2, 3, 8)),
        (lambda x: torch.cat((x[1:], x[:1]), 0) * 0.5 + 1.0 + x, (5, 7)),
    ],
    ids=["slice-dim1-sigmoid", "rotate-dim0-add"],
)
def test_slice_or_cat_along_a_leading_dim_backward(fn, shape) -> None:
    BUGS["nonlast-slice-codegen"].run(lambda: check_program(fn, [randn(*shape)]))


# ------------------------------------------------- data-dependent ops: a graph break, as under aot_eager

# Each case: (fn, make inputs). These ops have no static-shape graph: under torch.compile(backend="aot_eager")
# the backend's failure makes Dynamo graph-break and run the op eagerly. lightning_thunder must do the
# same, not raise CaptureError (issue 22).
_DATA_DEPENDENT = {
    "narrow-tensor-start": (lambda x, s: x.narrow(1, s, 2) * 2.0, lambda: [randn(5, 5, 5), torch.tensor(2, device=DEVICE)]),
    "tensor_split-tensor-sections": (lambda x, n: torch.tensor_split(x, n, dim=0), lambda: [randn(5, 5, 5), torch.tensor(3)]),
    "index_fill-0d": (lambda x, i, v: x.index_fill(0, i, v), lambda: [randn(), torch.tensor([0], device=DEVICE), randn()]),
    "index_put-bool-mask": (
        lambda x, m, v: x.index_put((m,), v),
        lambda: [randn(5, 5), torch.tensor([True, False, True, True, False], device=DEVICE), randn(5)],
    ),
}


def _aot_eager(fn):
    return torch.compile(fn, backend="aot_eager")


@pytest.mark.parametrize("case", list(_DATA_DEPENDENT))
def test_data_dependent_op_runs_under_aot_eager(case: str) -> None:
    """Calibration: PyTorch's own compile stack runs these (else they would be no bug of ours)."""
    fn, make = _DATA_DEPENDENT[case]
    check_program(fn, make(), compiler=_aot_eager)


@pytest.mark.parametrize("plugins", ["default", "fusion"])
@pytest.mark.parametrize("case", list(_DATA_DEPENDENT))
def test_data_dependent_op_graph_breaks(case: str, plugins: str) -> None:
    fn, make = _DATA_DEPENDENT[case]
    chosen = lt.default_plugins() if plugins == "default" else [Fusion()]
    BUGS["capture-graph-break"].run(lambda: check_program(fn, make(), plugins=chosen))
