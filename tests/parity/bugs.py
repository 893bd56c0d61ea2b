"""The lightning_thunder bugs the parity tests found, one entry per root cause (as far as known). Every one below
is fixed; its repro runs as a regression test (tests/parity/test_regressions.py).

The tables at the end name the OpInfo-sweep cases and fuzz seeds that fail today, by tag (none now). A test that
fails because of a bug not yet fixed is marked with :meth:`Bug.mark` (``xfail(strict=True)``,
reason ``"bug: <tag>: ..."``): when the fix lands the test passes, the strict xfail fails, and the mark is
removed. :meth:`Bug.expect` checks that a failure is this bug and
not another one hiding behind the xfail. Each ``repro`` runs as is (CPU: ``TRITON_INTERPRET=1``) after
``import torch, torch.nn.functional as F; from tests.parity.fuzz import check_program``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

__all__ = ["BUGS", "FUZZ_BUGS", "FUZZ_CI_SEEDS", "FUZZ_PINNED_SEEDS", "SWEEP_BUGS", "Bug"]


@dataclass(frozen=True)
class Bug:
    """A known bug: ``match`` is text its failure message contains; ``repro`` is a minimal program."""

    tag: str
    what: str
    match: str
    repro: str
    source: str = "issue 22"

    def mark(self, raises: type[BaseException] | tuple[type[BaseException], ...] = AssertionError) -> pytest.MarkDecorator:
        """``xfail(strict=True)`` for a test failing with ``raises`` because of this bug."""
        return pytest.mark.xfail(strict=True, raises=raises, reason=f"bug: {self.tag}: {self.what}")

    def expect(self, message: str) -> None:
        """Fail the test outright (not as an xfail) when ``message`` is not this bug's failure."""
        if self.match not in message:
            pytest.fail(f"expected bug {self.tag!r} ({self.match!r}) but the failure is another one:\n{message}")

    def run(self, check: Callable[[], Any]) -> None:
        """Run ``check``; an exception it raises must be this bug's (see :meth:`expect`) and is re-raised."""
        try:
            check()
        except Exception as e:
            chain, inner = [], e
            while inner is not None:
                chain.append(f"{type(inner).__name__}: {inner}")
                inner = inner.__cause__
            self.expect("\n".join(chain))
            raise

    def run_repro(self) -> None:
        """Run :attr:`repro` under :meth:`run`."""
        import torch
        import torch.nn.functional as F  # noqa: N812

        from tests.parity.fuzz import check_program

        namespace = {"torch": torch, "F": F, "check_program": check_program}
        self.run(lambda: exec(self.repro, namespace))  # noqa: S102 - our own source


_BUGS = [
    # ------------------------------------------------------------------------------- from issue 22
    Bug(
        "bcast-index",
        "a broadcast operand whose numel equals the region's row count is read with the row index (wrong values)",
        "error vs fp64",
        "x,a,b=torch.randn(5,10,5),torch.randn(10,5),torch.randn(10,5); "
        "check_program(lambda x,a,b: torch.where((x<a)&(a<b),x,0.), [x,a,b])",
    ),
    Bug(
        "slice-backward-unwritten",
        "the backward of a slice leaves gradient columns unwritten (NaN with NaN-filled allocations, garbage otherwise)",
        "compiled result has NaN/inf",
        "check_program(lambda x: x[..., 1:].sigmoid(), [torch.randn(2,3,8).requires_grad_()])",
    ),
    Bug(
        "softmax-dim0",
        "softmax / log_softmax / softmin over dim 0: ValueError '<Proxy ...> is not in list' compiling the backward",
        "is not in list",
        "check_program(lambda x: torch.softmax(x*1., 0)*1., [torch.randn(4,5).requires_grad_()])",
    ),
    Bug(
        "region-cycle",
        "AssertionError 'fusion created a cycle between regions'",
        "fusion created a cycle between regions",
        "check_program(lambda x,a,b: x*(a*b), [torch.randn(5,10,5).requires_grad_(), "
        "torch.randn(10,5).requires_grad_(), torch.randn(10,5).requires_grad_()])",
    ),
    Bug(
        "falcon-slice-flatten",
        "Falcon's (x[:,:,:,:-2]*2).flatten(2,3).sin() backward: TypeError in codegen (same site as nonlast-slice-codegen)",
        "cannot unpack non-iterable NoneType",
        "check_program(lambda x: (x[:,:,:,:-2]*2).flatten(2,3).sin(), [torch.randn(2,8,2,4,16).requires_grad_()])",
    ),
    Bug(
        "xlogy-0d",
        "xlogy(x*1., y*1.)*1. with a 0-d y: type error in the backward kernel ('bitwise_and' in the interpreter)",
        "bitwise_and",
        "check_program(lambda x,y: torch.xlogy(x*1.,y*1.)*1., [(torch.rand(3,4)+.1).requires_grad_(), "
        "(torch.rand(())+.1).requires_grad_()])",
    ),
    Bug(
        "capture-graph-break",
        "data-dependent ops raise CaptureError where aot_eager graph-breaks (capture/backend.py re-wraps Dynamo's error)",
        "could not trace graph",
        "check_program(lambda x,s: x.narrow(1,s,2)*2., [torch.randn(5,5,5).requires_grad_(), torch.tensor(2)], plugins=[])",
    ),
    # ------------------------------------------------------------ found by the OpInfo sweep and the fuzzer
    Bug(
        "row-operand-pre-reduction",
        "an [M] operand used before a last-dim reduction of [M,N] (y > 0 in where(y > 0, a.sum(-1), 0)) is loaded "
        "along the columns; the store fails (F.cosine_embedding_loss)",
        "Expected pointer argument to have shape",
        "check_program(lambda a,y: torch.where(y>0, (a*1.).sum(-1), 0.), [torch.randn(6,5), torch.randn(6)])",
        "OpInfo sweep (nn.functional.cosine_embedding_loss)",
    ),
    Bug(
        "nonlast-slice-codegen",
        "a slice / cat along a dim other than the last in a backward region: TypeError at codegen column_move",
        "cannot unpack non-iterable NoneType",
        "check_program(lambda x: (x*x)[3:5], [torch.randn(10,3).requires_grad_()])",
        "fuzzer",
    ),
    Bug(
        "width1-slice-grid",
        "a last-dim slice of width 1 (x[..., 4:5]): AssertionError 'output ... does not fit the region grid' in the backward",
        "does not fit the region grid",
        "check_program(lambda x: x[:, :, 4:5].tanh(), [torch.randn(8,4,8).requires_grad_()])",
        "fuzzer",
    ),
    Bug(
        "colsum-count",
        "x * x.sum(0, keepdim=True) backward: AssertionError 'colsum0: N column sums for an output of shape ...'",
        "column sums for an output",
        "check_program(lambda x: x * x.sum(0, keepdim=True), [torch.randn(7,2).requires_grad_()])",
        "fuzzer",
    ),
    Bug(
        "rotation-slice-grad",
        "a last-dim rotation (cat of two slices) followed by a slice or a second rotation: wrong gradient (no NaN)",
        "error vs fp64",
        "check_program(lambda x: (torch.cat((x[:,1:], x[:,:1]),1)*2.)[:, 2:], [torch.randn(5,8).requires_grad_()])",
        "fuzzer",
    ),
    Bug(
        "vector-to-column-view",
        "a [N] value viewed as [N, 1] (reshape / flatten between them) in a region: wrong gradient",
        "error vs fp64",
        "check_program(lambda x: torch.sigmoid(torch.sin(x).reshape(5,1)), [torch.randn(5).requires_grad_()])",
        "fuzzer",
    ),
]

#: tag -> bug
BUGS: dict[str, Bug] = {b.tag: b for b in _BUGS}


#: OpInfo sweep case id (tests/parity/sweep.py) -> tag of the bug it fails with today (none: the sweep's failures
#: softmax-dim0, region-cycle, row-operand-pre-reduction and capture-graph-break are fixed).
SWEEP_BUGS: dict[str, str] = {}

#: The fuzzer's seeds in CI, and seeds of longer runs that found a bug the CI seeds do not show.
FUZZ_CI_SEEDS = range(60)
FUZZ_PINNED_SEEDS = (1055, 1106, 1151, 1173, 1198)

#: fuzz seed -> tag of the bug its program fails with today (none: the seeds that failed, 4 11 18 27 31 33 35 43 45
#: 57 59 1055 1106 1151 1173 1198, pass since the fixes; they stay in the CI and pinned seeds).
FUZZ_BUGS: dict[int, str] = {}
