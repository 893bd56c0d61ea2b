"""Test setup: a clean Dynamo cache and a fixed seed for every test; Triton's interpreter on CPU."""

from __future__ import annotations

import os

import torch

# Without a GPU, generated Triton kernels run in Triton's interpreter (must be set before kernels are made).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# A fusion pass that produces an invalid plan, or a region whose kernel cannot be generated, raises in the tests
# (users get a FusionWarning and the unfused program).
os.environ.setdefault("LIGHTNING_THUNDER_STRICT_FUSION", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _kernel_cache(tmp_path_factory):
    """Generated kernels and autotuning results go to a fresh directory for the session."""
    previous = os.environ.get("LIGHTNING_THUNDER_CACHE")
    os.environ["LIGHTNING_THUNDER_CACHE"] = str(tmp_path_factory.mktemp("lightning_thunder_cache"))
    yield
    if previous is None:
        os.environ.pop("LIGHTNING_THUNDER_CACHE", None)
    else:
        os.environ["LIGHTNING_THUNDER_CACHE"] = previous


@pytest.fixture(autouse=True)
def _restore_environment():
    """Undo environment changes a test makes. Lightning's in-process setups export LOCAL_RANK, WORLD_SIZE,
    MASTER_ADDR... which would make a later test's launched script believe it is already one rank of a
    job (and wait forever for the others)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def _fresh_dynamo_and_seed():
    """Reset Dynamo (so one test's compiled graphs never serve another) and seed the RNG."""
    torch._dynamo.reset()
    torch.manual_seed(1234)
    yield
    torch._dynamo.reset()


def pytest_report_header(config):
    return f"torch {torch.__version__}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"
