"""OpInfo parity sweep: PyTorch's own op database (``op_db``) through ``lightning_thunder.compile``.

A *case* is one op of ``torch.testing._internal.common_methods_invocations.op_db`` in one *mode*:

- ``default``: float32 through ``lightning_thunder.compile(fn)`` with the default plugins; outputs and the
  gradients of a random-cotangent loss must match eager (fp32 tolerance of :mod:`tests.helpers`). Runs up to
  :data:`DEFAULT_SAMPLES` samples whose arguments differ in kind (``narrow``'s start as an int, then as a
  tensor).
- ``fusion``: through ``plugins=[Fusion()]`` in float32 or bfloat16, against an fp64 reference (at most
  twice eager's error plus about one ulp, :func:`tests.helpers.assert_close_to_reference`). Every float
  input and output is multiplied by 1.0 so that a lone op gets fused (a region needs two compute ops).
  Samples come from the op's reference inputs with two or more dims and at most :data:`FUSION_MAX_NUMEL`
  elements (lone 0-d/1-d samples are never fused): the first, the first that broadcasts and the first with
  a non-contiguous tensor.

Samples whose eager result has NaN/inf are passed over. New memory is NaN-filled while a sample runs
(:func:`tests.parity.fuzz.nan_filled_allocations`), so a value left unwritten fails every run. A sample that
fails is run again under ``torch.compile(backend="aot_eager")``: when that fails too, the failure belongs to
the harness (Dynamo, AOTAutograd or the sample), not to lightning_thunder (status ``"harness"``).

:func:`run_cases` runs cases in worker processes and returns one :class:`Outcome` per case id.
"""

from __future__ import annotations

import multiprocessing
import sys
import types
import unittest
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from tests.parity.checks import (
    assert_results_match,
    clone_inputs,
    describe_error,
    finite,
    init_worker,
    nan_filled_allocations,
    outputs_and_grads,
)

__all__ = [
    "FUSION_OPS",
    "Outcome",
    "case_id",
    "default_case_names",
    "fusion_case_names",
    "missing_fusion_ops",
    "run_case",
    "run_cases",
]

#: The ops of the Fusion sweep (``OpInfo.full_name``): pointwise, reductions, softmax, norms, losses.
FUSION_OPS = (
    # unary pointwise
    "abs", "neg", "exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "sqrt", "rsqrt", "reciprocal",
    "sin", "cos", "tan", "tanh", "sinh", "cosh", "asin", "atan", "asinh", "sigmoid", "erf", "erfc",
    "square", "sgn", "trunc", "floor", "ceil", "round", "frac", "nan_to_num", "logit", "deg2rad",
    "nn.functional.relu", "nn.functional.relu6", "nn.functional.gelu", "nn.functional.silu",
    "nn.functional.mish", "nn.functional.softplus", "nn.functional.elu", "nn.functional.celu",
    "nn.functional.selu", "nn.functional.leaky_relu", "nn.functional.hardtanh", "nn.functional.hardswish",
    "nn.functional.hardsigmoid", "nn.functional.logsigmoid", "nn.functional.softsign",
    "nn.functional.tanhshrink", "nn.functional.hardshrink", "nn.functional.softshrink",
    "nn.functional.threshold", "nn.functional.prelu",
    # binary / ternary pointwise
    "add", "sub", "mul", "div.no_rounding_mode", "true_divide", "pow", "float_power", "maximum",
    "minimum", "fmax", "fmin", "atan2", "hypot", "xlogy", "copysign", "lerp", "addcmul", "addcdiv",
    "where", "clamp", "clamp_min", "clamp_max", "masked_fill", "rsub", "remainder", "fmod",
    # reductions
    "sum", "mean", "amax", "amin", "prod", "var", "std", "var_mean", "std_mean", "logsumexp",
    "norm", "linalg.vector_norm", "max.reduction_with_dim", "min.reduction_with_dim", "cumsum", "nansum",
    # softmax family
    "softmax", "log_softmax", "nn.functional.softmin", "_softmax_backward_data",
    # norms
    "nn.functional.layer_norm", "nn.functional.rms_norm", "nn.functional.group_norm",
    "nn.functional.batch_norm", "nn.functional.instance_norm", "nn.functional.normalize",
    "nn.functional.local_response_norm", "nn.functional.cosine_similarity", "nn.functional.pairwise_distance",
    # losses
    "nn.functional.mse_loss", "nn.functional.l1_loss", "nn.functional.smooth_l1_loss",
    "nn.functional.huber_loss", "nn.functional.binary_cross_entropy",
    "nn.functional.binary_cross_entropy_with_logits", "nn.functional.kl_div", "nn.functional.cross_entropy",
    "nn.functional.nll_loss", "nn.functional.soft_margin_loss", "nn.functional.margin_ranking_loss",
    "nn.functional.hinge_embedding_loss", "nn.functional.poisson_nll_loss", "nn.functional.gaussian_nll_loss",
    "nn.functional.cosine_embedding_loss", "nn.functional.triplet_margin_loss",
)  # fmt: skip

#: Most elements a Fusion-sweep sample may have (Triton's interpreter runs a kernel element by element).
FUSION_MAX_NUMEL = 400
SEED = 0


@dataclass(frozen=True)
class Outcome:
    """What running one case gave.

    ``status`` is ``"pass"``, ``"fail"`` (ours: wrong values, NaN, or an error where eager runs),
    ``"harness"`` (also fails under ``torch.compile(backend="aot_eager")``), or ``"nosample"`` (the op has
    no sample this mode can use). ``fused`` counts the fusion regions of the compiled program.
    """

    status: str
    message: str = ""
    fused: int = 0
    graphs: int = 0


def case_id(mode: str, name: str, dtype: torch.dtype = torch.float32) -> str:
    """``"default:add"``, ``"fusion-float32:softmax"``, ``"fusion-bfloat16:softmax"``."""
    return f"{mode}:{name}" if mode == "default" else f"{mode}-{str(dtype).removeprefix('torch.')}:{name}"


def _parse_case(cid: str) -> tuple[str, str, torch.dtype]:
    head, name = cid.split(":", 1)
    if head == "default":
        return "default", name, torch.float32
    mode, dtype = head.split("-")
    return mode, name, getattr(torch, dtype)


def _ensure_expecttest() -> None:
    """``torch.testing._internal`` imports ``expecttest`` (a test extra of this project) only as the base of
    its ``TestCase``; where it is missing (a GPU image without it), a stand-in with that base is enough
    to load ``op_db``."""
    try:
        import expecttest  # noqa: F401
    except ImportError:
        stand_in = types.ModuleType("expecttest")
        stand_in.TestCase = unittest.TestCase  # type: ignore[attr-defined]
        stand_in.ACCEPT = False  # type: ignore[attr-defined]
        sys.modules["expecttest"] = stand_in


@cache
def _ops() -> dict[str, Any]:
    _ensure_expecttest()
    from torch.testing._internal.common_methods_invocations import op_db

    return {op.full_name: op for op in op_db}


def default_case_names() -> list[str]:
    """``full_name`` of every op of ``op_db`` with autograd and float32 on CPU, in ``op_db`` order."""
    return [n for n, op in _ops().items() if op.supports_autograd and torch.float32 in op.supported_dtypes("cpu")]


def missing_fusion_ops() -> list[str]:
    """The names of :data:`FUSION_OPS` this torch's ``op_db`` does not have (a typo, or an older torch)."""
    return [n for n in FUSION_OPS if n not in _ops()]


def fusion_case_names(dtype: torch.dtype, device: str = "cpu") -> list[str]:
    """The ops of :data:`FUSION_OPS` that ``op_db`` has and that support ``dtype`` with autograd."""
    ops = _ops()
    present = [n for n in FUSION_OPS if n in ops]
    return [n for n in present if ops[n].supports_autograd and dtype in ops[n].supported_dtypes(device)]


# ----------------------------------------------------------------------------------------------- samples


def _tensors(sample: Any) -> list[torch.Tensor]:
    leaves, _ = tree_flatten((sample.input, sample.args, sample.kwargs))
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def _usable(sample: Any) -> bool:
    tensors = _tensors(sample)
    strided = all(t.layout == torch.strided for t in tensors)  # sparse samples: not what we compile
    return strided and any(t.is_floating_point() and t.requires_grad for t in tensors)


def _fusable(sample: Any) -> bool:
    tensors = [t for t in _tensors(sample) if t.is_floating_point()]
    biggest = max((t.numel() for t in tensors), default=0)
    return _usable(sample) and 0 < biggest <= FUSION_MAX_NUMEL and max(t.dim() for t in tensors) >= 2


def _broadcasts(sample: Any) -> bool:
    return len({tuple(t.shape) for t in _tensors(sample) if t.is_floating_point()}) > 1


def _strided(sample: Any) -> bool:
    return any(not t.is_contiguous() for t in _tensors(sample))


def _candidates(op: Any, mode: str, dtype: torch.dtype, device: str) -> Iterator[Any]:
    """Samples a case may run: ``sample_inputs`` (``default``); the fusable ``reference_inputs``
    (``fusion``; ``sample_inputs`` where the op's reference generator fails)."""
    torch.manual_seed(SEED)
    if mode == "default":
        yield from (s for s in op.sample_inputs(device, dtype, requires_grad=True) if _usable(s))
        return
    try:
        yield from (s for s in op.reference_inputs(device, dtype, requires_grad=True) if _fusable(s))
    except ValueError:  # e.g. `where`: its reference generator asks for a bool tensor that requires grad
        yield from (s for s in op.sample_inputs(device, dtype, requires_grad=True) if _fusable(s))


def _signature(sample: Any) -> tuple:
    """The kinds of a sample's arguments: an op given a tensor where it usually gets an int (``narrow``'s
    start), or a 0-d input, is another path through capture than its first sample."""
    leaves, spec = tree_flatten((sample.input, sample.args, sample.kwargs))
    kinds = tuple(
        ("tensor", t.dtype.is_floating_point, t.dim() == 0) if isinstance(t, torch.Tensor) else type(t).__name__
        for t in leaves
    )
    return kinds, str(spec)


#: Samples of a ``default`` case: up to this many, with different :func:`_signature`.
DEFAULT_SAMPLES = 2
#: What a ``fusion`` case looks for among the candidates: the first fusable sample, the first that
#: broadcasts and the first with a non-contiguous tensor.
_FUSION_WANTED = (lambda s: True, _broadcasts, _strided)
#: Candidates a case looks at before it gives up on the samples it still wants.
_MAX_CANDIDATES = 40


class _Chooser:
    """Which candidates a case runs: ``wants(sample)``, then ``take(sample)`` once it ran."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.seen: set = set()  # default: signatures run
        self.wanted = list(_FUSION_WANTED)  # fusion: kinds of sample still wanted

    def wants(self, sample: Any) -> bool:
        if self.mode == "default":
            return _signature(sample) not in self.seen
        return any(w(sample) for w in self.wanted)

    def take(self, sample: Any) -> None:
        self.seen.add(_signature(sample))
        self.wanted = [w for w in self.wanted if not w(sample)]

    def done(self) -> bool:
        return len(self.seen) >= DEFAULT_SAMPLES if self.mode == "default" else not self.wanted


# --------------------------------------------------------------------------------------------- programs


def _program(op: Any, sample: Any, *, scale: bool) -> tuple[Any, list[torch.Tensor]]:
    """``fn(*tensors)`` computing ``op`` on ``sample`` with its tensors as arguments, and those tensors.

    With ``scale``, float inputs and outputs are multiplied by 1.0 (so a lone op is part of a region).
    """
    leaves, spec = tree_flatten((sample.input, sample.args, sample.kwargs))
    slots = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    fn_op = op.op

    def one(t: Any) -> Any:
        return t * 1.0 if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    def fn(*tensors: torch.Tensor) -> Any:
        values = list(leaves)
        for i, t in zip(slots, tensors):
            values[i] = one(t) if scale else t
        inp, args, kwargs = tree_unflatten(values, spec)
        out = fn_op(inp, *args, **kwargs)
        if scale:
            out = tree_unflatten([one(t) for t in tree_flatten(out)[0]], tree_flatten(out)[1])
        return out

    return fn, [leaves[i] for i in slots]


def _counts(compiled: Any) -> tuple[int, int]:
    """(fusion regions, graphs) of a compiled function."""
    import lightning_thunder as lt

    stats = lt.compile_stats(compiled)
    return stats.fusion_regions, stats.graphs


def _check_sample(op: Any, sample: Any, mode: str, dtype: torch.dtype, compiler: str) -> tuple[int, int]:
    """Compile ``op`` on ``sample`` with ``compiler`` (``"lt"`` or ``"aot_eager"``) and compare; returns
    (fusion regions, graphs). Raises Mismatch (wrong values) or the compile/run error. New memory is
    NaN-filled, so a value left unwritten fails every run."""
    with nan_filled_allocations():
        return _check_sample_unguarded(op, sample, mode, dtype, compiler)


def _check_sample_unguarded(op: Any, sample: Any, mode: str, dtype: torch.dtype, compiler: str) -> tuple[int, int]:
    import lightning_thunder as lt
    from lightning_thunder.plugins import Fusion

    fusion = mode == "fusion"
    fn, inputs = _program(op, sample, scale=fusion)
    process = sample.output_process_fn_grad
    eager = outputs_and_grads(fn, clone_inputs(inputs), process=process)
    reference = outputs_and_grads(fn, clone_inputs(inputs, torch.float64), process=process) if fusion else None
    if not finite(eager):
        raise _NonFinite("eager gives NaN/inf on this sample")
    torch._dynamo.reset()
    if compiler == "aot_eager":
        compiled = torch.compile(fn, backend="aot_eager")
    else:
        compiled = lt.compile(fn, plugins=[Fusion()] if fusion else None)
    try:
        assert_results_match(outputs_and_grads(compiled, clone_inputs(inputs), process=process), eager, reference)
        return _counts(compiled) if compiler == "lt" else (0, 0)
    finally:
        torch._dynamo.reset()


class _NonFinite(Exception):
    pass


def _describe(sample: Any) -> str:
    def show(x: Any) -> str:
        if isinstance(x, torch.Tensor):
            s = f"{str(x.dtype).removeprefix('torch.')}{list(x.shape)}"
            return s if x.is_contiguous() else s + f"(stride {x.stride()})"
        if isinstance(x, (list, tuple)):
            return "(" + ", ".join(show(v) for v in x) + ")"
        return repr(x)

    args = [show(sample.input), *(show(a) for a in sample.args)]
    args += [f"{k}={show(v)}" for k, v in sample.kwargs.items()]
    return f"({', '.join(args)})"


def run_case(cid: str, device: str = "cpu") -> Outcome:
    """Run one case (see the module docstring); never raises.

    Samples whose eager result has NaN/inf are passed over. Every chosen sample runs; a case fails when
    any sample fails under lightning_thunder and passes under ``aot_eager``.
    """
    mode, name, dtype = _parse_case(cid)
    op = _ops()[name]
    chooser = _Chooser(mode)
    fused = graphs = ran = passed = 0
    failures: list[str] = []
    harness: list[str] = []
    try:
        for k, sample in enumerate(_candidates(op, mode, dtype, device)):
            if k >= _MAX_CANDIDATES or chooser.done():
                break
            if not chooser.wants(sample):
                continue
            try:
                f, g = _check_sample(op, sample, mode, dtype, "lt")
                fused, graphs, passed = fused + f, graphs + g, passed + 1
            except _NonFinite:
                continue
            except Exception as e:  # noqa: BLE001 - reported, then calibrated against aot_eager
                ours = f"{name}{_describe(sample)}: {describe_error(e)}"
                try:
                    _check_sample(op, sample, mode, dtype, "aot_eager")
                    failures.append(ours)
                except Exception as e2:  # noqa: BLE001
                    harness.append(f"{ours}\n  aot_eager: {describe_error(e2)}")
            chooser.take(sample)
            ran += 1
    except Exception as e:  # noqa: BLE001 - a broken sample generator is the harness's problem
        harness.append(f"{name}: its sample generator raised {type(e).__name__}: {e}")
    if failures:
        return Outcome("fail", "\n".join(failures + harness), fused, graphs)
    if harness and not passed:
        return Outcome("harness", "\n".join(harness), fused, graphs)
    if not ran:
        need = f", >= 2 dims, <= {FUSION_MAX_NUMEL} elements" if mode == "fusion" else ""
        return Outcome("nosample", f"{name}: no sample with a float input that requires grad{need} and a finite eager result")
    if not graphs:
        return Outcome("harness", f"{name}: Dynamo compiled no graph (the op ran eagerly)")
    note = f"{passed} of {ran} samples passed; the others fail under aot_eager too:\n" + "\n".join(harness) if harness else ""
    return Outcome("pass", note, fused, graphs)


def run_cases(cids: list[str], device: str = "cpu", workers: int = 2) -> dict[str, Outcome]:
    """Run ``cids`` in ``workers`` spawned processes (in this process when ``workers <= 1``), handed out
    a few at a time so that the workers finish together."""
    if workers <= 1 or len(cids) < 2:
        return {cid: run_case(cid, device) for cid in cids}
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=init_worker) as pool:
        return dict(zip(cids, pool.map(run_case, cids, [device] * len(cids), chunksize=8)))
