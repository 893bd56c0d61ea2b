"""Parity with eager on LitGPT models: pythia-14m and tiny Llama-3, Gemma, Phi and Mixtral-style configs."""

from __future__ import annotations

import pytest
import torch

import lightning_thunder as lt
from tests.helpers import check_module_parity

litgpt = pytest.importorskip("litgpt", reason="litgpt is part of the `test` extra: pip install -e '.[test]'")
from litgpt import GPT, Config  # noqa: E402

TINY = dict(n_layer=2, n_embd=32, n_head=4, intermediate_size=64, padded_vocab_size=96, vocab_size=96, block_size=64)

CONFIGS = {
    # The real pythia-14m shape (6 layers, 128 wide, 50k vocabulary).
    "pythia-14m": lambda: Config.from_name("pythia-14m"),
    # Llama-3 style: GQA (4 query heads share 2 kv heads), RMSNorm, SwiGLU MLP, RoPE.
    "llama-3": lambda: Config.from_name("Llama-3.2-1B", **TINY, n_query_groups=2),
    # Gemma style: multi-query attention, GeGLU MLP, scaled embeddings, RMSNorm with unit offset.
    "gemma": lambda: Config.from_name("gemma-2b", **{**TINY, "n_head": 4}, n_query_groups=1, head_size=8),
    # Phi style: parallel residual, partial rotary, GELU MLP, LayerNorm with bias.
    "phi-2": lambda: Config.from_name("phi-2", **TINY, n_query_groups=4),
    # Mixtral style: a top-2 router over 4 SwiGLU experts (data-dependent token routing).
    "mixtral": lambda: Config.from_name("Mixtral-8x7B-v0.1", **TINY, n_query_groups=2, n_expert=4, n_expert_per_token=2),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_litgpt_parity(name):
    config = CONFIGS[name]()
    model = GPT(config)
    vocab = config.padded_vocab_size
    cm = check_module_parity(model, lambda: [torch.randint(0, vocab, (2, 12))], steps=2)
    stats = lt.compile_stats(cm)
    assert stats.graphs >= 1 and stats.executor_counts["torch"] > 0
    if name == "mixtral":
        # torch.where(mask) in the expert loop has a data-dependent size: a graph break per expert.
        assert any("nonzero" in b or "dynamic shape" in b.lower() for b in stats.graph_breaks), stats.graph_breaks
    else:
        assert stats.graph_breaks == []


def test_litgpt_llama_bf16_and_new_sequence_length():
    config = CONFIGS["llama-3"]()
    model = GPT(config).to(torch.bfloat16)
    lengths = iter([8, 8, 16])
    cm = check_module_parity(model, lambda: [torch.randint(0, config.padded_vocab_size, (2, next(lengths)))], steps=3)
    assert lt.compile_stats(cm).recompiles, "a new sequence length must recompile (or go dynamic)"


def test_litgpt_training_loop_with_optimizer_matches_eager():
    config = CONFIGS["llama-3"]()
    ref = GPT(config)
    model = GPT(config)
    model.load_state_dict(ref.state_dict())
    cm = lt.compile(model)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt = torch.optim.AdamW(cm.parameters(), lr=1e-2)
    for _ in range(4):
        idx = torch.randint(0, config.padded_vocab_size, (2, 10))
        target = torch.randint(0, config.padded_vocab_size, (2, 10))
        losses = []
        for net, o in ((ref, opt_ref), (cm, opt)):
            loss = torch.nn.functional.cross_entropy(net(idx).flatten(0, 1), target.flatten())
            loss.backward()
            o.step()
            o.zero_grad()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) < 1e-5 * max(1.0, abs(losses[0])), losses
