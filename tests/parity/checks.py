"""What the parity nets share: running a program for its outputs and input gradients, and comparing a
compiled run with eager and an fp64 reference."""

from __future__ import annotations

import contextlib
import os
import tempfile
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from tests.helpers import LOW_PRECISION, assert_close, assert_close_to_reference

__all__ = [
    "Mismatch",
    "Results",
    "assert_results_match",
    "clone_inputs",
    "describe_error",
    "finite",
    "init_worker",
    "nan_filled_allocations",
    "outputs_and_grads",
]

#: (outputs, gradients of the inputs that require grad)
Results = tuple[list, list]


def init_worker() -> None:
    """Set up a worker process of the sweep or the fuzzer: one thread, and its own kernel cache directory
    (a kernel's file is named by a hash of its code without the comments but holds them, so processes
    generating it from different source lines would rewrite each other's file while Triton reads it)."""
    torch.set_num_threads(1)
    base = os.environ.get("LIGHTNING_THUNDER_CACHE") or tempfile.mkdtemp(prefix="lt-parity-")
    os.environ["LIGHTNING_THUNDER_CACHE"] = os.path.join(base, f"worker-{os.getpid()}")


class Mismatch(AssertionError):
    """The compiled program ran and computed other values than eager (an error raised inside
    lightning_thunder, even an AssertionError, is not one)."""


@contextlib.contextmanager
def nan_filled_allocations() -> Iterator[None]:
    """``torch.empty`` fills floats with NaN (PyTorch's deterministic mode, warnings only): a value left
    unwritten then fails the comparison every run instead of by the luck of what the memory held."""
    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*deterministic", category=UserWarning)
            yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def clone_inputs(inputs: Sequence[Any], dtype: torch.dtype | None = None) -> list[Any]:
    """Copies with the same strides (expanded inputs stay expanded) and ``requires_grad``; float ones
    converted to ``dtype`` if given. Non-tensors are passed through."""
    out = []
    for t in inputs:
        if not isinstance(t, torch.Tensor):
            out.append(t)
            continue
        # an expanded input (stride 0) is copied once per distinct element and expanded again
        distinct = t.detach()[tuple(slice(0, 1) if st == 0 else slice(None) for st in t.stride())]
        to = dtype if dtype is not None and t.is_floating_point() else t.dtype
        c = torch.empty_strided(distinct.shape, distinct.stride(), dtype=to, device=t.device)
        c.copy_(distinct)
        out.append(c.expand(t.shape).requires_grad_(t.requires_grad))
    return out


def outputs_and_grads(
    fn: Callable[..., Any], inputs: Sequence[Any], *, process: Callable[[Any], Any] | None = None, seed: int = 1
) -> Results:
    """The output leaves of ``fn(*inputs)`` (after ``process``) and the gradients, for each input that
    requires grad, of the float outputs that require grad against random cotangents drawn from ``seed``."""
    out = fn(*inputs)
    leaves = tree_flatten(process(out) if process is not None else out)[0]
    diff = [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]
    wrt = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grads: list = [None] * len(wrt)
    if diff and wrt:
        gen = torch.Generator().manual_seed(seed)
        cots = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t) for t in diff]
        grads = list(torch.autograd.grad(diff, wrt, cots, allow_unused=True))
    return [t.detach() if isinstance(t, torch.Tensor) else t for t in leaves], grads


def finite(results: Results) -> bool:
    """Whether every float tensor of ``results`` is finite."""
    values = [*results[0], *results[1]]
    return all(torch.isfinite(t).all() for t in values if isinstance(t, torch.Tensor) and t.is_floating_point())


def assert_results_match(actual: Results, eager: Results, reference: Results | None = None) -> None:
    """Outputs and gradients of a compiled run against eager's within the dtype's tolerance. With an fp64
    ``reference``: fp16/bf16 results are held against it only (at most twice eager's error plus about an
    ulp), and an fp32 result outside the tolerance passes within the same bound (a fused sum rounds in
    another order). A gradient eager has as ``None`` may be zeros. Raises :class:`Mismatch`."""
    reference = reference or ([None] * len(eager[0]), [None] * len(eager[1]))
    try:
        for kind, got, want, ref in zip(("output", "grad of input"), actual, eager, reference):
            assert len(got) == len(want), f"{len(got)} {kind}s, eager has {len(want)}"
            for k, (a, e, r) in enumerate(zip(got, want, ref)):
                _assert_matches(a, e, r, f"{kind} {k}")
    except AssertionError as e:
        raise Mismatch(str(e)) from e


def describe_error(e: BaseException) -> str:
    """``wrong result: <what differs>`` for a :class:`Mismatch`; else each exception of the cause chain
    (type and first line), outermost first (Dynamo wraps a backend's error in ``BackendCompilerFailed``).
    With ``LT_PARITY_TRACEBACK=1``, the traceback too."""
    if isinstance(e, Mismatch):
        return f"wrong result: {str(e).strip()}"
    chain: list[str] = []
    inner: BaseException | None = e
    while inner is not None and len(chain) < 4:
        lines = [ln.strip() for ln in str(inner).strip().splitlines() if ln.strip()]
        chain.append(f"{type(inner).__name__}: {lines[0][:300] if lines else ''}")
        inner = getattr(inner, "inner_exception", None) or inner.__cause__
    text = " <- ".join(chain)[:3000]
    if os.environ.get("LT_PARITY_TRACEBACK") == "1":
        text += "\n" + "".join(traceback.format_exception(e))
    return text


def _assert_matches(a: Any, e: Any, r: Any, what: str) -> None:
    if e is None or a is None:
        assert a is None or not a.abs().any(), f"{what}: eager has none, compiled is nonzero"
        assert e is None or not e.abs().any(), f"{what}: compiled has none, eager is nonzero"
        return
    if isinstance(e, torch.Tensor) and e.numel() == 0:
        assert a.shape == e.shape and a.dtype == e.dtype, f"{what}: {a.dtype}{list(a.shape)} vs {e.dtype}{list(e.shape)}"
        return
    if r is not None and isinstance(e, torch.Tensor) and e.dtype in LOW_PRECISION:
        assert_close_to_reference(a, e, r, what)
        return
    try:
        assert_close(a, e, what)
    except AssertionError:  # a fused sum rounds in another order: hold both against fp64
        if r is None or not isinstance(e, torch.Tensor) or not e.is_floating_point():
            raise
        assert_close_to_reference(a, e, r, what)
