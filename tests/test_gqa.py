"""NativeGQA: attention takes grouped keys/values (enable_gqa=True) instead of repeated copies."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_thunder as lt
from lightning_thunder.plugins import NativeGQA
from tests.helpers import check_module_parity

litgpt = pytest.importorskip("litgpt", reason="litgpt is part of the `test` extra: pip install -e '.[test]'")
from litgpt import GPT, Config  # noqa: E402

TINY = dict(n_layer=2, n_embd=32, n_head=4, intermediate_size=64, padded_vocab_size=96, vocab_size=96, block_size=64)


def _count(trace, name: str) -> int:
    return sum(1 for op in trace.ops if name in op.name)


@pytest.mark.parametrize(
    "groups,dtype",
    [(2, torch.float32), (1, torch.float32), (2, torch.bfloat16)],
    ids=["gqa-fp32", "mqa-fp32", "gqa-bf16"],
)
def test_litgpt_attention_reads_grouped_kv(groups, dtype):
    config = Config.from_name("Llama-3.2-1B", **TINY, n_query_groups=groups)
    model = GPT(config).to(dtype)
    plugin = NativeGQA()
    cm = check_module_parity(model, lambda: [torch.randint(0, 96, (2, 12))], steps=2, plugins=[plugin])
    assert plugin.rewritten == config.n_layer
    traces = lt.last_traces(cm)
    torch_trace, rewritten = traces[0], traces[1]
    assert _count(torch_trace, "repeat_interleave") == 2 * config.n_layer
    assert "NativeGQA" in rewritten.provenance
    assert _count(rewritten, "repeat_interleave") == 0
    assert rewritten.python().count("enable_gqa=True") == config.n_layer
    # The ATen forward no longer copies keys and values to the query's head count.
    plain = lt.compile(GPT(config).to(dtype), plugins=[])
    plain(torch.randint(0, 96, (2, 12))).sum().backward()
    assert _count(traces[-1], "clone") < _count(lt.last_traces(plain)[-1], "clone")
    # ... nor sums the gradients of the copies in the backward.
    ours, theirs = lt.last_backward_traces(cm)[-1], lt.last_backward_traces(plain)[-1]
    assert _count(ours, "clone") + _count(ours, "sum") < _count(theirs, "clone") + _count(theirs, "sum")


class _Attention(nn.Module):
    """SDPA over repeated keys/values, with knobs for the cases the plugin must leave alone."""

    def __init__(self, *, mask: bool = False, return_keys: bool = False, repeats_dim: int = 1) -> None:
        super().__init__()
        self.mask, self.return_keys, self.repeats_dim = mask, return_keys, repeats_dim

    def forward(self, q, k, v):
        r = q.shape[1] // k.shape[1]
        k2 = k.repeat_interleave(r, dim=self.repeats_dim)
        v2 = torch.repeat_interleave(v, r, dim=self.repeats_dim)
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril() if self.mask else None
        y = F.scaled_dot_product_attention(q, k2, v2, attn_mask=mask, is_causal=not self.mask)
        return (y, k2) if self.return_keys else y


def _qkv():
    return [
        torch.randn(2, 6, 10, 8, requires_grad=True),
        torch.randn(2, 3, 10, 8, requires_grad=True),
        torch.randn(2, 3, 10, 8, requires_grad=True),
    ]


def test_repeats_read_elsewhere_are_kept():
    plugin = NativeGQA()
    cm = check_module_parity(_Attention(return_keys=True), _qkv, plugins=[plugin])
    assert plugin.rewritten == 1
    rewritten = lt.last_traces(cm)[1]
    assert _count(rewritten, "repeat_interleave") == 1  # k2 is an output; v2's repeat is dropped


@pytest.mark.parametrize("module", [_Attention(mask=True), _Attention(repeats_dim=2)], ids=["attn-mask", "other-dim"])
def test_calls_it_cannot_rewrite_are_left_alone(module):
    if module.repeats_dim == 2:  # repeating the sequence dim is not GQA: shapes must still work

        def make():
            return [
                torch.randn(2, 3, 10, 8, requires_grad=True),
                torch.randn(2, 3, 5, 8, requires_grad=True),
                torch.randn(2, 3, 5, 8, requires_grad=True),
            ]
    else:
        make = _qkv
    plugin = NativeGQA()
    cm = check_module_parity(module, make, plugins=[plugin])
    assert plugin.rewritten == 0
    assert "enable_gqa" not in lt.last_traces(cm)[1].python()
