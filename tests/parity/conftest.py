"""The parity nets run on CPU under Triton's interpreter (the root conftest sets ``TRITON_INTERPRET=1`` on
machines without CUDA); with CUDA, ``tests/gpu/test_parity_sweep_cuda.py`` runs them with real kernels."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_HERE = Path(__file__).parent
_NOT_INTERPRETING = (
    "the parity nets run under Triton's interpreter (TRITON_INTERPRET=1); with CUDA run "
    "tests/gpu/test_parity_sweep_cuda.py"
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    for item in items:
        if _HERE not in Path(str(item.path)).parents:
            continue
        # Masked-off lanes of interpreted kernels compute on padding: numpy warns, the results are masked.
        item.add_marker(pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"))
        if not interpreting:
            item.add_marker(pytest.mark.skip(reason=_NOT_INTERPRETING))
