"""Microbenchmarks of the regions the fusion executor targets: pointwise and normalization chains,
RoPE, cross-entropy, and a matmul with an epilogue, under eager, torch.compile and lightning_thunder.

Memory-bound cases report achieved bandwidth: the bytes a perfect kernel must move (every input read
once, every output written once) divided by the forward time, against the card's measured copy
bandwidth. Two times are reported: per Python call (what a user pays, including guards and launches)
and the GPU time of the kernels alone (profiler), which is what the bandwidth target is about. The matmul case reports TFLOP/s against the measured matmul rate. Forward+backward time is
reported too (gradients of every floating input).

    python benchmarks/kernels.py                 # real sizes on CUDA (bf16)
    python benchmarks/kernels.py --device cpu    # small sizes, fp32
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import copy_gbps, environment, kernel_time_ms, matmul_tflops, time_ms  # noqa: E402

MODES = ("eager", "torch.compile", "thunder")


@dataclass
class Case:
    """One benchmark: a function, how to make its inputs, and what an ideal kernel costs."""

    name: str
    fn: Callable
    make_inputs: Callable[[], list[torch.Tensor]]
    flops: float = 0.0  # > 0 marks a compute-bound case (reported in TFLOP/s)


def rmsnorm(x, w, eps: float = 1e-5):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def add_rmsnorm(x, h, w):
    r = x + h
    return rmsnorm(r, w), r


def swiglu(a, b):
    return torch.nn.functional.silu(a) * b


def bias_gelu(x, b):
    return torch.nn.functional.gelu(x + b, approximate="tanh")


def softmax(x):
    return torch.softmax(x.float(), dim=-1).to(x.dtype)


def rope(x, cos, sin):
    half = x.size(-1) // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def cross_entropy(logits, targets):
    return torch.nn.functional.cross_entropy(logits.float(), targets)


def linear_gelu(x, w):
    return torch.nn.functional.gelu(x @ w.t(), approximate="tanh")


def cases(device: torch.device, dtype: torch.dtype, small: bool) -> list[Case]:
    # GPU sizes: 16384 tokens x 4096 hidden (128 MB per bf16 activation, beyond the L2 cache).
    n, d, i, v = (256, 128, 512, 1000) if small else (16384, 4096, 16384, 128256)
    b, t, h, hs = (2, 64, 4, 32) if small else (4, 2048, 32, 64)

    def rand(*shape, dt=dtype):
        return lambda: torch.randn(*shape, device=device, dtype=dt)

    return [
        Case("rmsnorm", rmsnorm, lambda: [rand(n, d)(), rand(d)()]),
        Case("add+rmsnorm", add_rmsnorm, lambda: [rand(n, d)(), rand(n, d)(), rand(d)()]),
        Case("swiglu", swiglu, lambda: [rand(n, i)(), rand(n, i)()]),
        Case("bias+gelu", bias_gelu, lambda: [rand(n, i)(), rand(i)()]),
        Case("softmax", softmax, lambda: [rand(n, 2048 if not small else 256)()]),
        Case("rope", rope, lambda: [rand(b, h, t, hs)(), rand(t, hs)(), rand(t, hs)()]),
        Case(
            "cross_entropy",
            cross_entropy,
            lambda: [rand(n // 8, v)(), torch.randint(0, v, (n // 8,), device=device)],
        ),
        Case("linear+gelu", linear_gelu, lambda: [rand(n, d)(), rand(i, d)()], flops=2.0 * n * d * i),
    ]


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (tuple, list)):
        return sum(_nbytes(v) for v in x)
    return 0


def _float_outputs(out) -> list[torch.Tensor]:
    outs = out if isinstance(out, (tuple, list)) else [out]
    return [o for o in outs if isinstance(o, torch.Tensor) and o.is_floating_point()]


def compile_fn(fn: Callable, mode: str) -> Callable:
    if mode == "eager":
        return fn
    if mode == "torch.compile":
        return torch.compile(fn)
    import lightning_thunder

    return lightning_thunder.compile(fn)


def bench_case(case: Case, mode: str, device: torch.device, iters: int) -> dict:
    fn = compile_fn(case.fn, mode)
    inputs = case.make_inputs()
    with torch.no_grad():
        out = fn(*inputs)
        fwd_ms = time_ms(lambda: fn(*inputs), device, iters=iters)
        fwd_kernel_ms = kernel_time_ms(lambda: fn(*inputs), device, iters=max(3, iters // 4))
    grad_inputs = [x.detach().requires_grad_(x.is_floating_point()) for x in inputs]
    outs = _float_outputs(fn(*grad_inputs))
    cotangents = [torch.randn_like(o) for o in outs]

    def fwd_bwd():
        torch.autograd.backward(_float_outputs(fn(*grad_inputs)), cotangents)

    fwd_bwd_ms = time_ms(fwd_bwd, device, iters=iters)
    result = {"case": case.name, "mode": mode, "fwd_ms": fwd_ms, "fwd_kernel_ms": fwd_kernel_ms, "fwd_bwd_ms": fwd_bwd_ms}
    if case.flops:
        result["tflops"] = case.flops / (fwd_ms * 1e-3) / 1e12
        if fwd_kernel_ms:
            result["kernel_tflops"] = case.flops / (fwd_kernel_ms * 1e-3) / 1e12
    else:
        nbytes = _nbytes(inputs) + _nbytes(out)
        result["gbps"] = nbytes / (fwd_ms * 1e-3) / 1e9
        if fwd_kernel_ms:
            result["kernel_gbps"] = nbytes / (fwd_kernel_ms * 1e-3) / 1e9
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    small = device.type != "cuda"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    iters = args.iters or (20 if device.type == "cuda" else 3)
    modes = [m for m in args.modes.split(",") if m]
    selected = cases(device, dtype, small)
    if args.cases:
        wanted = args.cases.split(",")
        unknown = sorted(set(wanted) - {c.name for c in selected})
        if unknown:
            p.error(f"unknown case(s) {unknown}; choose from {[c.name for c in selected]}")
        selected = [c for c in selected if c.name in wanted]
    bw = copy_gbps(device)
    peak = matmul_tflops(device, dtype)
    env = environment(device)
    results = []
    for case in selected:
        for mode in modes:
            try:
                results.append(bench_case(case, mode, device, iters))
            except Exception as e:  # reported, the other cases still run
                results.append({"case": case.name, "mode": mode, "error": f"{type(e).__name__}: {str(e)[:160]}"})
    print(
        f"{env['device']}; torch {env['torch']}, triton {env['triton']}; {env['date']}; {str(dtype).replace('torch.', '')}\n"
        f"measured copy bandwidth {bw:,.0f} GB/s (read + write); measured matmul {peak:.1f} TFLOP/s\n"
    )
    print("| case | mode | fwd ms (call) | fwd ms (kernels) | fwd+bwd ms (call) | achieved (call) | achieved (kernels) | kernels, % of measured peak |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        if "error" in r:
            print(f"| {r['case']} | {r['mode']} | failed: {r['error']} | | | | | |")
            continue
        kms = f"{r['fwd_kernel_ms']:.3f}" if r.get("fwd_kernel_ms") else "n/a"
        if "tflops" in r:
            k = r.get("kernel_tflops")
            print(
                f"| {r['case']} | {r['mode']} | {r['fwd_ms']:.3f} | {kms} | {r['fwd_bwd_ms']:.3f} | {r['tflops']:.1f} TFLOP/s | "
                f"{f'{k:.1f} TFLOP/s' if k else 'n/a'} | {f'{k / peak:.0%}' if k else 'n/a'} |"
            )
        else:
            k = r.get("kernel_gbps")
            print(
                f"| {r['case']} | {r['mode']} | {r['fwd_ms']:.3f} | {kms} | {r['fwd_bwd_ms']:.3f} | {r['gbps']:,.0f} GB/s | "
                f"{f'{k:,.0f} GB/s' if k else 'n/a'} | {f'{k / bw:.0%}' if k else 'n/a'} |"
            )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"environment": env, "copy_gbps": bw, "matmul_tflops": peak, "results": results}, indent=2)
        )


if __name__ == "__main__":
    main()
