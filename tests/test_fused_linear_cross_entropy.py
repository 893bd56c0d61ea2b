"""The FusedLinearCrossEntropy plugin: LitGPT models with their loss, compiled, against eager (loss and every gradient,
fp32 and bf16, GQA, soft-capping, ignored targets); no [tokens, vocab] value in the final traces; chains left alone
(with the reason in the trace) when the logits are used otherwise."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_thunder as lt
from lightning_thunder.ops import linear_cross_entropy
from lightning_thunder.plugins import FusedLinearCrossEntropy
from tests.helpers import check_module_parity

litgpt = pytest.importorskip("litgpt", reason="litgpt is part of the `test` extra: pip install -e '.[test]'")
from litgpt import GPT, Config  # noqa: E402

VOCAB = 97  # not a power of two (LitGPT would pad to 512: padded_vocab_size is set explicitly)
TINY = dict(n_layer=1, n_embd=32, n_head=4, n_query_groups=2, intermediate_size=64, padded_vocab_size=VOCAB,
            vocab_size=VOCAB, block_size=64)
B, T = 2, 12


class WithLoss(nn.Module):
    """A LitGPT model and its next-token loss, as a training step computes them."""

    def __init__(self, model: nn.Module, **loss_options) -> None:
        super().__init__()
        self.model = model
        self.loss_options = loss_options

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.model(idx)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), **self.loss_options)


def _batch() -> list[torch.Tensor]:
    idx = torch.randint(0, VOCAB, (B, T))
    targets = torch.randint(0, VOCAB, (B, T))
    targets[0, :9] = -100  # with chunks of 8 tokens: the first chunk is all ignored
    return [idx, targets]


def _token_vocab_values(trace: lt.Trace, tokens: int, vocab: int) -> list[str]:
    """Names of the tensor values of ``trace`` holding ``tokens`` rows of ``vocab`` logits."""
    values = [*trace.inputs, *(p for op in trace.ops for p in op.output_proxies())]
    found = []
    for p in values:
        if p.is_tensor and len(p.shape) >= 1 and p.shape[-1] == vocab and p.val.numel() == tokens * vocab:
            found.append(f"{p.name}: {p.describe()}")
    return found


CONFIGS = {
    "llama-gqa-fp32": (lambda: Config.from_name("Llama-3.2-1B", **TINY), torch.float32, {}),
    "llama-gqa-bf16": (lambda: Config.from_name("Llama-3.2-1B", **TINY), torch.bfloat16, {"label_smoothing": 0.1}),
    "gemma2-softcap-fp32": (
        lambda: Config.from_name("gemma-2-2b", **{**TINY, "n_query_groups": 2}, head_size=8),
        torch.float32,
        {"reduction": "sum"},
    ),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_litgpt_with_loss_matches_eager_without_logits(name):
    make_config, dtype, loss_options = CONFIGS[name]
    config = make_config()
    model = WithLoss(GPT(config).to(dtype), **loss_options)
    plugin = FusedLinearCrossEntropy(chunk_size=8)
    cm = check_module_parity(model, _batch, steps=2, plugins=[plugin])
    assert len(plugin.rewritten) == 1 and plugin.kept == [], (plugin.rewritten, plugin.kept)
    traces = lt.last_traces(cm)
    stage = next(t for t in traces if t.name == "torch/FusedLinearCrossEntropy")
    source = stage.python()
    assert [op.name for op in stage.ops if "cross_entropy" in op.name] == ["linear_cross_entropy"]
    if config.final_logit_softcapping:
        assert f"softcap={float(config.final_logit_softcapping)}" in source
    assert _token_vocab_values(traces[0], B * T, VOCAB), "the torch-level trace computes the logits"
    final_forward, final_backward = traces[-1], lt.last_backward_traces(cm)[-1]
    assert final_forward.name == "forward/final" and final_backward.name == "backward/final"
    assert "lightning_thunder.linear_cross_entropy" in final_forward.python()
    assert _token_vocab_values(final_forward, B * T, VOCAB) == []
    assert _token_vocab_values(final_backward, B * T, VOCAB) == []


class HeadAndLoss(nn.Module):
    def __init__(self, returns_logits: bool = False, accuracy: bool = False, **loss_options) -> None:
        super().__init__()
        self.head = nn.Linear(16, 37, bias=False)
        self.returns_logits, self.accuracy, self.loss_options = returns_logits, accuracy, loss_options

    def forward(self, x: torch.Tensor, target: torch.Tensor):
        logits = self.head(x)
        loss = F.cross_entropy(logits.view(-1, 37), target.view(-1), **self.loss_options)
        if self.returns_logits:
            return loss, logits
        if self.accuracy:
            return loss, (logits.argmax(-1) == target).float().mean()
        return loss


@pytest.mark.parametrize(
    "options,reason",
    [
        ({"returns_logits": True}, "are also returned by the graph"),
        ({"accuracy": True}, "are also read by .argmax"),
        ({"reduction": "none"}, "reduction='none'"),
    ],
    ids=["logits-returned", "logits-read", "reduction-none"],
)
def test_chain_left_alone_says_why(options, reason):
    plugin = FusedLinearCrossEntropy()
    model = HeadAndLoss(**options)
    x, target = torch.randn(3, 5, 16), torch.randint(0, 37, (3, 5))
    cm = lt.compile(model, plugins=[plugin])
    out = cm(x, target)
    expected = model(x, target)
    torch.testing.assert_close(out, expected)
    assert plugin.rewritten == [] and len(plugin.kept) == 1 and reason in plugin.kept[0], plugin.kept
    stage = next(t for t in lt.last_traces(cm) if t.name == "torch/FusedLinearCrossEntropy")
    assert "left alone" in stage.provenance and reason in stage.provenance
    assert not any(op.target is linear_cross_entropy for op in stage.ops)


def test_plugin_checks_chunk_size():
    with pytest.raises(ValueError, match="chunk_size=0 must be a positive int"):
        FusedLinearCrossEntropy(chunk_size=0)


def test_a_loss_not_computed_by_a_linear_is_not_reported():
    def scores_loss(q, k, target):
        return F.cross_entropy((q @ k.transpose(-1, -2)).reshape(-1, 6), target.reshape(-1))

    plugin = FusedLinearCrossEntropy()
    cf = lt.compile(scores_loss, plugins=[plugin])
    q, k, target = torch.randn(2, 6, 4), torch.randn(2, 6, 4), torch.randint(0, 6, (2, 6))
    torch.testing.assert_close(cf(q, k, target), scores_loss(q, k, target))
    assert plugin.rewritten == [] and plugin.kept == []
    assert lt.last_traces(cf)[1].provenance == "plugin FusedLinearCrossEntropy (no change)"


def test_bf16_loss_without_cast_keeps_its_dtype():
    """``cross_entropy`` on bf16 logits (no ``.float()``) returns bf16: so does the fused op (computed in fp32)."""
    plugin = FusedLinearCrossEntropy()
    model = HeadAndLoss().to(torch.bfloat16)
    x, target = torch.randn(3, 5, 16, dtype=torch.bfloat16), torch.randint(0, 37, (3, 5))
    out = lt.compile(model, plugins=[plugin])(x, target)
    reference = model.double()(x.double(), target)
    assert plugin.rewritten and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), reference.detach(), rtol=1e-2, atol=1e-2)
