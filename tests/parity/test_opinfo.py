"""PyTorch's OpInfo database through lightning_thunder (see :mod:`tests.parity.sweep` for what a case checks).

- ``test_default_plugins[<op>]``: every float32 op with autograd, default plugins (on CPU: the torch executor).
- ``test_fusion[<dtype>:<op>]``: ~120 pointwise / reduction / softmax / norm / loss ops through
  ``plugins=[Fusion()]`` (Triton's interpreter on CPU) in float32 and bfloat16, against fp64.

The cases run in two worker processes (a module fixture runs the selected ones at once); each test
reports its own case. A case that also fails under ``torch.compile(backend="aot_eager")`` is a harness
limitation and is skipped with both errors as the reason; so is an op Dynamo runs without compiling
anything (random ops wrapped in ``wrapper_set_seed``, data-dependent outputs).

Known lightning_thunder bugs (:mod:`tests.parity.bugs`) are ``xfail(strict=True)`` with
``reason="bug: <tag>: ..."`` and must fail with that bug's error: when the fix lands, the case passes, the
strict xfail fails, and its entry of ``SWEEP_BUGS`` (:mod:`tests.parity.bugs`) is removed.
Run one op alone: ``pytest tests/parity/test_opinfo.py -k "softmax"``.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.parity.bugs import BUGS, SWEEP_BUGS
from tests.parity.sweep import case_id, default_case_names, fusion_case_names, missing_fusion_ops, run_cases

#: Worker processes (the CI machine has two cores).
WORKERS = int(os.environ.get("LT_SWEEP_WORKERS", "2"))


#: case id -> reason: cases not run at all. Keep it short; prefer a known bug in SWEEP_BUGS (an xfail still runs).
SKIPS: dict[str, str] = {}

DEFAULT_CASES = [case_id("default", name) for name in default_case_names()]
FUSION_CASES = [case_id("fusion", name, d) for d in (torch.float32, torch.bfloat16) for name in fusion_case_names(d)]


def _params(cases: list[str]) -> list:
    params = []
    for case in cases:
        marks = []
        if case in SWEEP_BUGS:
            marks.append(BUGS[SWEEP_BUGS[case]].mark())
        if case in SKIPS:
            marks.append(pytest.mark.skip(reason=SKIPS[case]))
        params.append(pytest.param(case, marks=marks, id=case.split(":", 1)[1] if case.startswith("default") else case.removeprefix("fusion-")))
    return params


@pytest.fixture(scope="module")
def outcomes(request: pytest.FixtureRequest) -> dict:
    """Runs every selected case of this module at once, in :data:`WORKERS` processes."""
    selected = [
        item.callspec.params["case"]
        for item in request.session.items
        if item.module is request.module and hasattr(item, "callspec") and "case" in item.callspec.params
    ]
    return run_cases([c for c in selected if c not in SKIPS], workers=WORKERS)


def _check(case: str, outcomes: dict) -> None:
    outcome = outcomes[case]
    if outcome.status in ("harness", "nosample"):
        pytest.skip(f"{outcome.status}: {outcome.message}")
    if outcome.status == "fail" and case in SWEEP_BUGS:
        BUGS[SWEEP_BUGS[case]].expect(outcome.message)
    assert outcome.status == "pass", outcome.message


@pytest.mark.parametrize("case", _params(DEFAULT_CASES))
def test_default_plugins(case: str, outcomes: dict) -> None:
    _check(case, outcomes)


@pytest.mark.parametrize("case", _params(FUSION_CASES))
def test_fusion(case: str, outcomes: dict) -> None:
    _check(case, outcomes)
    assert outcomes[case].graphs > 0


def test_fusion_ops_are_in_op_db() -> None:
    assert not missing_fusion_ops(), "FUSION_OPS names ops this torch's op_db does not have"


def test_sweep_covers_what_it_claims(outcomes: dict) -> None:
    """The sweep cannot pass by running nothing: most default cases compile, most Fusion cases fuse."""
    ran = [c for c in outcomes if c in DEFAULT_CASES]
    fusion = [c for c in outcomes if c in FUSION_CASES]
    if len(ran) < len(DEFAULT_CASES) or len(fusion) < len(FUSION_CASES):
        pytest.skip("only part of the sweep was selected")
    compiled = [c for c in ran if outcomes[c].graphs > 0]
    fused = [c for c in fusion if outcomes[c].fused > 0]
    assert len(compiled) >= 0.9 * len(ran), f"{len(compiled)} of {len(ran)} default cases compiled a graph"
    assert len(fused) >= 0.6 * len(fusion), f"{len(fused)} of {len(fusion)} Fusion cases fused a region"
