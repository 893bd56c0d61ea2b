"""The chunked linear + cross-entropy op against eager PyTorch: loss and every gradient, fp32 and bf16, odd vocabulary
sizes, ignored targets (a whole chunk of them too), label smoothing, logit soft-capping, autocast, no_grad; and its
Triton kernel against the PyTorch reference (Triton's interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_thunder.executors.kernels.linear_cross_entropy import chunk_loss_reference, chunk_loss_triton
from lightning_thunder.ops import default_chunk_size, linear_cross_entropy
from lightning_thunder.ops.linear_cross_entropy import linear_cross_entropy_op
from tests.helpers import assert_close, assert_close_to_reference

N, H, V, CHUNK = 23, 16, 97, 8  # 3 chunks (the last one short); 97 classes: not a power of two


def _targets(n: int = N, ignore_index: int = -100) -> torch.Tensor:
    t = torch.randint(0, V, (n,))
    t[8:16] = ignore_index  # the whole second chunk is ignored
    t[3] = ignore_index
    return t


def _eager(x, w, b, t, *, softcap=None, **kwargs) -> torch.Tensor:
    logits = F.linear(x, w, b).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t.reshape(-1), **kwargs)


def _leaves(dtype: torch.dtype, bias: bool, shape=(N, H)) -> list[torch.Tensor]:
    x = torch.randn(*shape, dtype=dtype)
    w = (torch.randn(V, H) / H**0.5).to(dtype)
    b = torch.randn(V).to(dtype) if bias else None
    return [x, w, b]


def _run(fn, leaves, t, **kwargs) -> list[torch.Tensor | None]:
    leaves = [p.detach().clone().requires_grad_() if p is not None else None for p in leaves]
    loss = fn(*leaves, t, **kwargs)
    loss.backward(torch.tensor(0.75, dtype=loss.dtype))  # an upstream gradient other than 1: the backward scales
    return [loss.detach(), *(p.grad if p is not None else None for p in leaves)]


CASES = {
    "plain": dict(),
    "bias-smoothing": dict(bias=True, label_smoothing=0.1),
    "softcap-sum": dict(softcap=2.0, reduction="sum"),
    "softcap-smoothing-bias-ignore7": dict(bias=True, softcap=3.0, label_smoothing=0.2, ignore_index=7),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_op_matches_eager(case, dtype):
    options = dict(CASES[case])
    bias = options.pop("bias", False)
    if case == "plain":  # x [batch, seq, hidden] and targets [batch, seq], as a language model has them
        leaves, t = _leaves(dtype, bias, shape=(3, 7, H)), _targets(21).reshape(3, 7)
    else:
        leaves, t = _leaves(dtype, bias), _targets(ignore_index=options.get("ignore_index", -100))
    ours = _run(linear_cross_entropy, leaves, t, chunk_size=CHUNK, **options)
    eager = _run(_eager, leaves, t, **options)
    names = ["loss", "grad x", "grad weight", "grad bias"]
    if dtype == torch.float32:
        for name, a, e in zip(names, ours, eager):
            if e is not None:
                assert_close(a, e, name)
        return
    reference = _run(_eager, [p.double() if p is not None else None for p in leaves], t, **options)
    for name, a, e, r in zip(names, ours, eager, reference):
        if e is not None:
            assert_close_to_reference(a, e, r, name)


def test_one_chunk_and_default_chunk_size():
    leaves, t = _leaves(torch.float32, True), _targets()
    for a, e in zip(_run(linear_cross_entropy, leaves, t), _run(_eager, leaves, t)):
        assert_close(a, e, "one chunk")
    assert default_chunk_size(128256, torch.bfloat16) == 2048  # Llama 3: 512 MiB of bf16 logits
    assert default_chunk_size(128256, torch.float32) == 1024
    assert default_chunk_size(10**12, torch.float32) == 1


def test_autocast_casts_like_linear():
    """Under bf16 autocast, fp32 weights are multiplied in bf16 (like ``linear``) and their gradient is fp32."""
    leaves, t = _leaves(torch.float32, True), _targets()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = _run(linear_cross_entropy, leaves, t, chunk_size=CHUNK)
        eager = _run(_eager, leaves, t)
    reference = _run(_eager, [p.double() for p in leaves], t)
    assert [g.dtype for g in ours] == [torch.float32] * 4
    for name, a, e, r in zip(["loss", "grad x", "grad weight", "grad bias"], ours, eager, reference):
        # eager's error is bf16 rounding of fp32 values: the bound is eager's, measured against fp64
        assert_close_to_reference(a.bfloat16(), e.bfloat16(), r, name)


def test_all_targets_ignored_gives_what_eager_gives():
    leaves = _leaves(torch.float32, False)
    t = torch.full((N,), -100)
    ours = _run(linear_cross_entropy, leaves, t, chunk_size=CHUNK)
    eager = _run(_eager, leaves, t)
    assert ours[0].isnan() and eager[0].isnan()  # a mean over no targets
    assert torch.equal(ours[1], torch.zeros_like(ours[1])) and torch.equal(ours[2], torch.zeros_like(ours[2]))
    summed = _run(linear_cross_entropy, leaves, t, chunk_size=CHUNK, reduction="sum")
    assert summed[0] == 0 and not summed[1].any()


def test_gradients_only_when_needed():
    x, w, _ = _leaves(torch.float32, False)
    t = _targets()
    with torch.no_grad():
        loss = linear_cross_entropy(x.requires_grad_(), w.requires_grad_(), None, t, chunk_size=CHUNK)
    assert_close(loss, _eager(x, w, None, t).detach(), "no_grad loss")
    _, gx, gw, gb = linear_cross_entropy_op(x, w, None, t, -100, 0.0, None, "mean", False, True, False, CHUNK)
    assert gx.numel() == 0 and gb.numel() == 0 and gw.shape == (V, H)


def test_bad_arguments_name_the_fix():
    x, w, _ = _leaves(torch.float32, False)
    with pytest.raises(ValueError, match="reduction='none' is not supported.*reduction='none'"):
        linear_cross_entropy(x, w, None, _targets(), reduction="none")
    with pytest.raises(ValueError, match=r"weight \[vocab, hidden\]"):
        linear_cross_entropy(x, w.t(), None, _targets())
    with pytest.raises(IndexError, match=f"target {V} is out of bounds for {V} classes"):
        linear_cross_entropy(x, w, None, torch.full((N,), V))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("softcap,smoothing", [(None, 0.0), (4.0, 0.1)], ids=["plain", "softcap-smoothing"])
def test_kernel_matches_reference(dtype, softcap, smoothing):
    """Several column blocks per row (block 32 for 97 classes), an ignored row, the gradient in place."""
    logits = (torch.randn(6, V) * 3).to(dtype)
    t = torch.randint(0, V, (6,))
    t[2] = -100
    scale = torch.tensor(0.25)
    outs = []
    for fn, kw in ((chunk_loss_triton, {"block": 32}), (chunk_loss_reference, {})):
        work, loss = logits.clone(), torch.empty(6)
        fn(work, t, loss, scale, ignore_index=-100, label_smoothing=smoothing, softcap=softcap, grad=True, **kw)
        outs.append((loss, work))
    (loss, grad), (loss_ref, grad_ref) = outs
    assert_close(loss, loss_ref, "loss")
    assert loss[2] == 0 and not grad[2].any()
    tol = {"rtol": 0, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-5}
    torch.testing.assert_close(grad.float(), grad_ref.float(), **tol)
