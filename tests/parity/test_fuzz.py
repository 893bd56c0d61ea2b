"""The Fusion region planner against random programs (see :mod:`tests.parity.fuzz`).

CI checks the fixed seeds ``FUZZ_CI_SEEDS`` and ``FUZZ_PINNED_SEEDS`` of :mod:`tests.parity.bugs` (one test
each: its program, float32 for even seeds and bfloat16 for odd ones, forward and the gradient of every
input). A failure prints the program as runnable Python. More programs on demand: ``LT_FUZZ_PROGRAMS=2000 pytest tests/parity/test_fuzz.py -k many`` or
``python -m tests.parity.fuzz --programs 2000 --seed 1000 --workers 2 --minimize``.

Seeds that fail today because of a known lightning_thunder bug (:mod:`tests.parity.bugs`) are
``xfail(strict=True)`` with ``reason="bug: <tag>: ..."`` and must fail with that bug's error; when the fix
lands the seed passes, the strict xfail fails, and its entry of ``FUZZ_BUGS`` is removed.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.parity.bugs import BUGS, FUZZ_BUGS, FUZZ_CI_SEEDS, FUZZ_PINNED_SEEDS
from tests.parity.fuzz import HarnessLimitation, check_seed, run_seeds


def _seed_params() -> list:
    seeds = [*FUZZ_CI_SEEDS, *FUZZ_PINNED_SEEDS]
    return [pytest.param(s, marks=BUGS[FUZZ_BUGS[s]].mark()) if s in FUZZ_BUGS else s for s in seeds]


#: seed -> fusion regions of its program, filled by test_fuzz_program
_REGIONS: dict[int, int] = {}


@pytest.mark.parametrize("seed", _seed_params())
def test_fuzz_program(seed: int) -> None:
    try:
        _REGIONS[seed] = check_seed(seed)
    except HarnessLimitation as e:
        pytest.skip(f"harness limitation: {e}")
    except AssertionError as e:
        if seed in FUZZ_BUGS:
            BUGS[FUZZ_BUGS[seed]].expect(str(e))
        raise


def test_fuzz_programs_fuse() -> None:
    """The fuzzer exercises the planner: most programs that pass fuse at least one region."""
    if len(_REGIONS) < len(FUZZ_CI_SEEDS) // 2:
        pytest.skip("needs the CI seeds' tests to have run first (in this session)")
    fused = [s for s, r in _REGIONS.items() if r > 0]
    assert len(fused) >= 0.6 * len(_REGIONS), f"only {len(fused)} of {len(_REGIONS)} programs fused a region"


@pytest.mark.skipif(not os.environ.get("LT_FUZZ_PROGRAMS"), reason="on demand: set LT_FUZZ_PROGRAMS=N (and LT_FUZZ_SEED)")
def test_fuzz_many_programs() -> None:
    """``LT_FUZZ_PROGRAMS`` programs from seed ``LT_FUZZ_SEED`` (default 1000), in two worker processes."""
    n, first = int(os.environ["LT_FUZZ_PROGRAMS"]), int(os.environ.get("LT_FUZZ_SEED", "1000"))
    results = run_seeds(range(first, first + n), workers=int(os.environ.get("LT_FUZZ_WORKERS", "2")))
    failed = {s: msg for s, (msg, _) in results.items() if msg}
    assert not failed, f"{len(failed)} of {n} programs failed (seeds {sorted(failed)}):\n\n" + "\n\n".join(
        failed[s] for s in sorted(failed)[:5]
    )
