"""Attention with the default plugins on a CUDA GPU: grouped keys/values read natively (NativeGQA), the
query and the attention gradients stored in the order they are read back (the q/k/v gradients straight
into one buffer), the norm-weight gradients summed in the regions, the embedding gradient's Triton kernel;
all held against eager. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

import lightning_thunder as lt
from lightning_thunder.plugins import Fusion, NativeGQA
from tests.helpers import check_module_parity

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run tests/gpu on an H100)")
litgpt = pytest.importorskip("litgpt", reason="litgpt is part of the `test` extra")


def test_llama_style_block_with_default_plugins_bf16():
    from litgpt import GPT, Config

    config = Config.from_name(
        "Llama-3.2-1B",
        n_layer=2,
        n_embd=512,
        n_head=8,
        n_query_groups=2,
        head_size=64,
        intermediate_size=1024,
        padded_vocab_size=4096,
        vocab_size=4096,
        block_size=512,
    )
    torch.manual_seed(0)
    model = GPT(config).to(device="cuda", dtype=torch.bfloat16)
    gqa = NativeGQA()
    cm = check_module_parity(
        model, lambda: [torch.randint(0, 4096, (2, 256), device="cuda")], steps=2, plugins=[gqa, Fusion()]
    )
    assert gqa.rewritten == config.n_layer, "SDPA should take the grouped keys/values (flash or cuDNN on this card)"
    forward, backward = lt.last_traces(cm)[-1], lt.last_backward_traces(cm)[-1]
    for trace in (forward, backward):
        assert not [op for op in trace.ops if op.name == "aten.clone.default"], trace
        assert not [op for op in trace.ops if op.name == "aten.repeat_interleave.self_int"], trace
    assert sum(1 for op in backward.ops if op.name.startswith("colsum")) == 2 * config.n_layer + 1, backward
    # the q/k/v gradients are stored straight into the input of the QKV weight's matmuls (no cat kernel)
    assert not [op for op in backward.ops if op.name == "aten.cat.default"], backward
    assert lt.compile_stats(cm).executor_counts.get("embedding") == 1
