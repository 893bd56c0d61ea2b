"""A randomized fuzzer for the Fusion region planner.

Each seed makes one program: a random chain (3 to 8 steps) of pointwise, reduction (sum / amax / mean /
softmax over the last or another dim), view (reshape, flatten, unsqueeze, expand, transpose, permute),
slice, cat and broadcasting ops over 1 to 3 inputs of random shapes (size-1 dims, coincident element
counts such as [5, 10, 5] with [10, 5], transposed, strided and expanded inputs), in float32 or bfloat16.
:func:`check_program` compiles it with ``plugins=[Fusion()]`` and compares the outputs and the gradient of
every input (random cotangents) with eager (float32) or against an fp64 reference (bfloat16).

A program is Python source (:attr:`Program.source`): a failure prints it whole, runnable, so it becomes a
regression test by copy-paste. Run many programs::

    python -m tests.parity.fuzz --programs 2000 --seed 0 [--workers 2] [--device cuda]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - programs are written with `F.`

from tests.parity.checks import (
    Mismatch,
    assert_results_match,
    clone_inputs,
    describe_error,
    init_worker,
    nan_filled_allocations,
    outputs_and_grads,
)

__all__ = ["HarnessLimitation", "Program", "check_program", "check_seed", "main", "make_program", "minimize", "run_seeds"]

#: Largest element count of any value of a program (Triton's interpreter is slow).
MAX_NUMEL = 1024
_DIMS = (1, 2, 3, 4, 5, 7, 8, 10, 16)

_UNARY = (
    "torch.sin({a})",
    "torch.tanh({a})",
    "torch.sigmoid({a})",
    "torch.relu({a})",
    "-{a}",
    "{a} * {a}",
    "torch.exp(-{a} * {a})",
    "{a}.abs()",
    "F.gelu({a})",
    "F.silu({a})",
    "{a}.clamp(-0.5, 0.5)",
    "{a} * 0.5 + 1.0",
)
_BINARY = (
    "{a} + {b}",
    "{a} - {b}",
    "{a} * {b}",
    "torch.maximum({a}, {b})",
    "torch.where({a} > {b}, {a}, {b} * 0.5)",
    "{a} / ({b} * {b} + 1)",
    "torch.clamp({a}, {b} - 0.5, {b} + 0.5)",
)
_REDUCE = (
    "{a}.sum({d}{k})",
    "{a}.amax({d}{k})",
    "{a}.mean({d}{k})",
    "torch.softmax({a}, {d})",
    "torch.log_softmax({a}, {d})",
    "{a} * torch.rsqrt({a}.pow(2).mean({d}, keepdim=True) + 1e-5)",
)


@dataclass(frozen=True)
class Program:
    """A generated program: ``source`` defines ``program(*inputs)`` and ``make_inputs(dtype, device)``."""

    seed: int
    dtype: torch.dtype
    source: str

    def build(self) -> tuple[Callable[..., Any], Callable[..., list[torch.Tensor]]]:
        """``(program, make_inputs)`` from :attr:`source` (each call makes new function objects)."""
        namespace: dict[str, Any] = {"torch": torch, "F": F}
        exec(compile(self.source, f"<fuzz program {self.seed}>", "exec"), namespace)  # noqa: S102 - our own source
        return namespace["program"], namespace["make_inputs"]

    def repro(self) -> str:
        """Runnable Python: the program and a call of :func:`check_program` on it."""
        dtype = str(self.dtype).removeprefix("torch.")
        return (
            f"# fuzz seed {self.seed} ({dtype})\n"
            "import torch\nimport torch.nn.functional as F\n"
            "from tests.parity.fuzz import check_program\n\n"
            f"{self.source}\n"
            f"check_program(program, make_inputs(torch.{dtype}))\n"
        )


# ------------------------------------------------------------------------------------------- generation


def _input_shapes(rng: random.Random) -> list[tuple[int, ...]]:
    """A base shape and up to two broadcasting partners (suffixes with some dims set to 1). A quarter of
    the programs get coincident element counts: a base [a, b, a] with a [b, a] partner (its numel is the
    base's row count a * b)."""
    coincident = rng.random() < 0.25
    while True:
        if coincident:
            a, b = rng.choice(_DIMS[2:]), rng.choice(_DIMS[2:])
            base = (a, b, a)
        else:
            base = tuple(rng.choice(_DIMS) for _ in range(rng.randint(1, 4)))
        if 2 <= math.prod(base) <= MAX_NUMEL // 2:
            break
    shapes = [base, base[1:]] if coincident else [base]
    for _ in range(rng.randint(0, 3 - len(shapes))):
        suffix = list(base[rng.randrange(len(base)) :])
        for i in range(len(suffix)):
            if rng.random() < 0.25:
                suffix[i] = 1
        shapes.append(tuple(suffix))
    return shapes


def _input_line(rng: random.Random, name: str, shape: tuple[int, ...]) -> str:
    """``x = <make a tensor of shape>``: contiguous, transposed, strided (every other column) or expanded."""
    make = "torch.randn({}, generator=g).to(device, dtype)"
    layout = rng.random()
    if len(shape) >= 2 and layout < 0.15:
        return f"{name} = {make.format((*shape[:-2], shape[-1], shape[-2]))}.transpose(-1, -2)"
    if shape and layout < 0.3:
        return f"{name} = {make.format((*shape[:-1], 2 * shape[-1]))}[..., ::2]"
    big = [i for i, s in enumerate(shape) if s > 1]
    if big and layout < 0.4:
        d = rng.choice(big)
        return f"{name} = {make.format(tuple(1 if i == d else s for i, s in enumerate(shape)))}.expand{shape}"
    return f"{name} = {make.format(shape)}"


class _Builder:
    """Grows a program one line at a time, keeping only lines that run (eagerly, in fp64)."""

    def __init__(self, rng: random.Random, inputs: dict[str, torch.Tensor]) -> None:
        self.rng = rng
        self.values = dict(inputs)  # name -> example value (fp64)
        self.lines: list[str] = []

    def add(self, expr: str) -> bool:
        try:
            value = eval(expr, {"torch": torch, "F": F}, dict(self.values))  # noqa: S307 - our own source
        except (RuntimeError, IndexError, ValueError):
            return False
        if not isinstance(value, torch.Tensor) or not 0 < value.numel() <= MAX_NUMEL or value.dim() > 5:
            return False
        if not torch.isfinite(value).all() or value.abs().max() > 1e4:
            return False
        name = f"v{len(self.values)}"
        self.values[name] = value
        self.lines.append(f"{name} = {expr}")
        return True

    def pick(self, recent: bool = True) -> str:
        names = list(self.values)
        if recent and self.rng.random() < 0.7:
            return names[-1 - self.rng.randrange(min(3, len(names)))]
        return self.rng.choice(names)

    def step(self) -> bool:
        rng = self.rng
        a = self.pick()
        x = self.values[a]
        kind = rng.choices(["unary", "binary", "reduce", "view", "slice", "cat"], [3, 4, 2, 2, 2, 1])[0]
        nd = x.dim()
        if kind == "unary":
            return self.add(rng.choice(_UNARY).format(a=a))
        if kind == "binary":
            partners = [n for n, v in self.values.items() if _broadcastable(x.shape, v.shape)]
            b = rng.choice(partners)
            if rng.random() < 0.5:
                a, b = b, a
            return self.add(rng.choice(_BINARY).format(a=a, b=b))
        if nd == 0:
            return False
        d = -1 if rng.random() < 0.5 else rng.randrange(nd)
        if kind == "reduce":
            template = rng.choice(_REDUCE)
            keep = ", keepdim=True" if rng.random() < 0.5 else ""
            return self.add(template.format(a=a, d=d, k=keep))
        if kind == "view":
            return self.add(_view(rng, a, x))
        if kind == "slice":
            size = x.shape[d]
            if size < 2:
                return False
            start = rng.randrange(size - 1)
            stop = rng.randrange(start + 1, size + 1)
            step = 2 if rng.random() < 0.2 else 1
            index = ", ".join([":"] * (d % nd) + [f"{start}:{stop}" + (":2" if step == 2 else "")])
            return self.add(f"{a}[{index}]")
        # cat: with a slice of itself (a rotation, as RoPE does) or with a value of the same shape
        size = x.shape[d]
        same = [n for n, v in self.values.items() if v.shape == x.shape and n != a]
        if same and rng.random() < 0.4:
            return self.add(f"torch.cat(({a}, {rng.choice(same)}), dim={d})")
        k = rng.randint(1, size - 1) if size > 1 else 1
        head = ", ".join([":"] * (d % nd) + [f":{k}"])
        tail = ", ".join([":"] * (d % nd) + [f"{k}:"])
        return self.add(f"torch.cat(({a}[{tail}], {a}[{head}]), dim={d})")


def _broadcastable(s: torch.Size, t: torch.Size) -> bool:
    try:
        torch.broadcast_shapes(s, t)
    except RuntimeError:
        return False
    return True


def _view(rng: random.Random, a: str, x: torch.Tensor) -> str:
    nd, shape = x.dim(), list(x.shape)
    choice = rng.choice(["reshape", "flatten", "unsqueeze", "expand", "transpose", "permute"])
    if choice == "reshape":
        if nd >= 2 and rng.random() < 0.5:  # merge two adjacent dims
            i = rng.randrange(nd - 1)
            new = shape[:i] + [shape[i] * shape[i + 1]] + shape[i + 2 :]
        else:  # split a dim into two factors
            i = rng.randrange(nd)
            factors = [f for f in range(2, shape[i]) if shape[i] % f == 0]
            if not factors:
                return f"{a}.reshape({', '.join(map(str, shape + [1]))})"
            f = rng.choice(factors)
            new = shape[:i] + [f, shape[i] // f] + shape[i + 1 :]
        return f"{a}.reshape({', '.join(map(str, new))})"
    if choice == "flatten":
        return f"{a}.flatten({rng.randrange(nd)})"
    if choice == "unsqueeze":
        return f"{a}.unsqueeze({rng.randrange(-nd - 1, nd + 1)})"
    if choice == "expand":
        ones = [i for i, s in enumerate(shape) if s == 1]
        if not ones:
            return f"{a}.unsqueeze(0).expand({rng.randint(2, 3)}, {', '.join(['-1'] * nd)})"
        i = rng.choice(ones)
        new = ["-1"] * nd
        new[i] = str(rng.randint(2, 5))
        return f"{a}.expand({', '.join(new)})"
    if choice == "transpose" and nd >= 2:
        i, j = rng.sample(range(nd), 2)
        return f"{a}.transpose({i}, {j})"
    perm = list(range(nd))
    rng.shuffle(perm)
    return f"{a}.permute({', '.join(map(str, perm))})"


def make_program(seed: int, dtype: torch.dtype | None = None) -> Program:
    """The program of ``seed``; its dtype alternates float32 (even seeds) and bfloat16 (odd seeds)."""
    rng = random.Random(seed)
    if dtype is None:
        dtype = torch.float32 if seed % 2 == 0 else torch.bfloat16
    shapes = _input_shapes(rng)
    names = [f"x{i}" for i in range(len(shapes))]
    make_inputs = (
        f"def make_inputs(dtype=torch.float32, device='cpu'):\n"
        f"    g = torch.Generator().manual_seed({seed})\n"
        + "".join(f"    {_input_line(rng, n, s)}\n" for n, s in zip(names, shapes))
        + f"    return [t.requires_grad_() for t in ({', '.join(names)},)]\n"
    )
    namespace: dict[str, Any] = {"torch": torch}
    exec(make_inputs, namespace)  # noqa: S102 - our own source
    examples = [t.detach() for t in namespace["make_inputs"](torch.float64)]
    builder = _Builder(rng, dict(zip(names, examples)))
    depth, tries = rng.randint(3, 8), 0
    while len(builder.lines) < depth and tries < 200:
        builder.step()
        tries += 1
    if not builder.lines:
        builder.add(f"torch.sin({names[0]}) * 1.0")
    outputs = [list(builder.values)[-1]]
    extra = [n for n in list(builder.values)[len(names) : -1]]
    if extra and rng.random() < 0.5:
        outputs.append(rng.choice(extra))
    body = "\n".join(f"    {line}" for line in builder.lines)
    source = f"def program({', '.join(names)}):\n{body}\n    return {', '.join(outputs)},\n\n\n{make_inputs}"
    return Program(seed, dtype, source)


# --------------------------------------------------------------------------------------------- checking


def check_program(
    program: Callable[..., Any],
    inputs: Sequence[torch.Tensor],
    *,
    plugins: Sequence[Any] | None = None,
    compiler: Callable[[Callable[..., Any]], Callable[..., Any]] | None = None,
) -> int:
    """Compile ``program`` (``plugins=[Fusion()]`` unless given; or with ``compiler``, e.g.
    ``lambda f: torch.compile(f, backend="aot_eager")``) and compare outputs and the gradient of every
    input with eager: float32 within the fp32 tolerance (or, where a fused sum rounds in another order, at
    most twice eager's error against fp64 plus slack); bfloat16 against fp64 only.
    Returns the number of fusion regions (0 with ``compiler``). Raises :class:`Mismatch` with what
    differs, or the error compiling or running raised. Runs under :func:`nan_filled_allocations`."""
    with nan_filled_allocations():
        return _check_program(program, inputs, plugins, compiler)


def _check_program(program: Callable[..., Any], inputs: Sequence[torch.Tensor], plugins: Any, compiler: Any) -> int:
    import lightning_thunder as lt
    from lightning_thunder.plugins import Fusion

    eager = outputs_and_grads(program, clone_inputs(inputs))
    reference = outputs_and_grads(program, clone_inputs(inputs, torch.float64))
    torch._dynamo.reset()
    if compiler is not None:
        compiled_fn = compiler(program)
    else:
        compiled_fn = lt.compile(program, plugins=[Fusion()] if plugins is None else plugins)
    try:
        assert_results_match(outputs_and_grads(compiled_fn, clone_inputs(inputs)), eager, reference)
        return 0 if compiler is not None else lt.compile_stats(compiled_fn).fusion_regions
    finally:
        torch._dynamo.reset()


class HarnessLimitation(Exception):
    """The program fails under ``torch.compile(backend="aot_eager")`` too: not lightning_thunder's failure."""


def check_seed(seed: int, device: str = "cpu") -> int:
    """Check the program of ``seed``; returns its number of fusion regions. Raises AssertionError holding
    the runnable program on failure, or :class:`HarnessLimitation` when ``aot_eager`` fails as well."""
    prog = make_program(seed)
    program, make_inputs = prog.build()
    try:
        return check_program(program, make_inputs(prog.dtype, device))
    except Exception as e:
        ours = describe_error(e)
        try:
            check_program(prog.build()[0], make_inputs(prog.dtype, device), compiler=_aot_eager)
        except Exception as e2:  # noqa: BLE001 - calibration: the failure is Dynamo's / AOTAutograd's
            raise HarnessLimitation(f"fuzz seed {seed}: {ours}; aot_eager: {describe_error(e2)}") from e
        raise AssertionError(f"fuzz seed {seed}: {ours}\n\n{prog.repro()}") from e


def _aot_eager(fn: Callable[..., Any]) -> Callable[..., Any]:
    return torch.compile(fn, backend="aot_eager")


def _failure_kind(prog: Program, device: str = "cpu") -> str | None:
    """``"wrong result"``, the name of the error raised, or None when ``prog`` passes."""
    program, make_inputs = prog.build()
    try:
        check_program(program, make_inputs(prog.dtype, device))
    except Mismatch:
        return "wrong result"
    except Exception as e:  # noqa: BLE001 - the kind of failure is what we compare
        return type(e).__name__
    return None


def minimize(prog: Program, device: str = "cpu") -> Program:
    """A smaller program failing the same way: drops outputs, then program lines, one at a time, while
    the failure (wrong result, or the same error type) stays."""
    kind = _failure_kind(prog, device)
    if kind is None:
        return prog
    head, rest = prog.source.split("\n", 1)
    body, tail = rest.split("\n    return ", 1)
    lines = body.split("\n")
    returned, tail = tail.split(",\n", 1)
    outputs = [o.strip() for o in returned.split(",") if o.strip()]

    def build(lines: list[str], outputs: list[str]) -> Program:
        source = f"{head}\n" + "\n".join(lines) + f"\n    return {', '.join(outputs)},\n{tail}"
        return Program(prog.seed, prog.dtype, source)

    for out in list(outputs):
        if len(outputs) > 1 and _failure_kind(build(lines, [o for o in outputs if o != out]), device) == kind:
            outputs.remove(out)
    for line in reversed(list(lines)):
        fewer = [ln for ln in lines if ln is not line]
        if fewer and _failure_kind(build(fewer, outputs), device) == kind:
            lines = fewer
    return build(lines, outputs)


# ----------------------------------------------------------------------------------------------- runner


def _check_quietly(seed: int, device: str) -> tuple[int, str | None, int]:
    try:
        return seed, None, check_seed(seed, device)
    except AssertionError as e:
        return seed, str(e), 0
    except HarnessLimitation as e:
        return seed, None, -1


def run_seeds(seeds: Sequence[int], device: str = "cpu", workers: int = 1) -> dict[int, tuple[str | None, int]]:
    """``seed -> (failure message or None, fusion regions; -1 for a harness limitation)`` for each seed,
    in ``workers`` processes."""
    if workers <= 1:
        return {s: (msg, fused) for s, msg, fused in map(_check_quietly, seeds, [device] * len(seeds))}
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=init_worker) as pool:
        results = pool.map(_check_quietly, seeds, [device] * len(seeds), chunksize=4)
        return {s: (msg, fused) for s, msg, fused in results}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tests.parity.fuzz --programs N --seed S``: check N programs from seed S; print each failure."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--programs", type=int, default=200, help="how many programs (seeds S .. S+N-1)")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--show", type=int, help="print the program of this seed and exit")
    parser.add_argument("--minimize", action="store_true", help="print each failing program minimized too")
    args = parser.parse_args(argv)
    if args.show is not None:
        print(make_program(args.show).repro())
        return 0
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton reads TRITON_INTERPRET when it is first imported (it is, by now): start again with it set
        os.environ["TRITON_INTERPRET"] = "1"
        os.execv(sys.executable, [sys.executable, "-m", "tests.parity.fuzz", *(sys.argv[1:] if argv is None else argv)])
    # a kernel cache of its own: processes sharing one race on kernel files (see checks.init_worker)
    os.environ.setdefault("LIGHTNING_THUNDER_CACHE", tempfile.mkdtemp(prefix="lt-fuzz-"))
    start = time.perf_counter()
    results = run_seeds(range(args.seed, args.seed + args.programs), args.device, args.workers)
    failed = {s: msg for s, (msg, _) in results.items() if msg}
    for seed, msg in sorted(failed.items()):
        print(f"=== FAIL {msg}\n")
        if args.minimize:
            print(f"--- minimized:\n{minimize(make_program(seed), args.device).repro()}")
    fused = sum(1 for _, f in results.values() if f > 0)
    harness = sum(1 for _, f in results.values() if f < 0)
    print(
        f"{len(results) - len(failed) - harness} passed, {len(failed)} failed, {harness} harness limitations "
        f"(fail under aot_eager too); {fused} programs fused a region; {time.perf_counter() - start:.0f} s"
    )
    if failed:
        print("failed seeds:", sorted(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
