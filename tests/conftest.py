"""Test setup: a clean Dynamo cache and a fixed seed for every test."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_dynamo_and_seed():
    """Reset Dynamo (so one test's compiled graphs never serve another) and seed the RNG."""
    torch._dynamo.reset()
    torch.manual_seed(1234)
    yield
    torch._dynamo.reset()


def pytest_report_header(config):
    return f"torch {torch.__version__}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"
