"""The Fabric strategies on 2 CUDA GPUs (NCCL) against Lightning's own ``fsdp`` (FSDP1) and ``ddp``.

The CPU suite (tests/strategies) compares against Lightning's FSDP2 because Lightning's ``fsdp`` refuses CPUs;
here the reference is ``fsdp`` itself. Runs on a 2-GPU machine: ``pytest tests/gpu/test_strategies_gpu.py``.
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason=f"needs 2 CUDA GPUs, found {torch.cuda.device_count()}"
)


def _train_fp32(rank: int, runs: list[str]) -> dict:
    from tests.strategies.test_fabric import _train

    # fp32 without TF32, so the strategies differ by reduction order only.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return {name: _train(rank, name, clip=0.3, accumulate=2, accelerator="cuda") for name in runs}


def test_fabric_strategies_match_lightning_fsdp_and_ddp_on_two_gpus(monkeypatch):
    pytest.importorskip("litgpt")
    from tests.strategies.helpers import spawn

    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")
    monkeypatch.setenv("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    assert os.environ["NCCL_NVLS_ENABLE"] == "0"
    res = spawn(_train_fp32, ["fsdp", "thunder_fsdp", "ddp", "thunder_ddp"], timeout=600)[0]
    for ours, ref in (("thunder_fsdp", "fsdp"), ("thunder_ddp", "ddp"), ("thunder_fsdp", "ddp")):
        for key in ("losses", "norms"):
            torch.testing.assert_close(
                torch.tensor(res[ours][key]), torch.tensor(res[ref][key]), rtol=1e-4, atol=1e-5, msg=f"{ours} vs {ref}"
            )
    assert res["thunder_fsdp"]["graphs"] == 1 and res["thunder_fsdp"]["graph_breaks"] == []
