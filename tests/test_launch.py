"""The low-overhead kernel launcher: same results as ``kernel[grid](...)``, and a launch key that separates
every argument property Triton specializes on."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lightning_thunder.executors.launch import Launcher, _arg_key


@triton.jit
def _scale_kernel(x_ptr, out_ptr, n, factor, BLOCK: tl.constexpr, SHIFT: tl.constexpr = 0.0):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, x * factor + SHIFT, mask=mask)


def test_launcher_matches_a_plain_launch_and_fills_defaults():
    launch = Launcher(_scale_kernel)
    for n in (5, 37, 64):
        x = torch.randn(n)
        out = torch.empty_like(x)
        launch((triton.cdiv(n, 16),), x, out, n, 2.5, BLOCK=16)
        torch.testing.assert_close(out, x * 2.5, rtol=0, atol=0)
        launch((triton.cdiv(n, 16),), x, out, n, 2.5, BLOCK=16, SHIFT=1.0)
        torch.testing.assert_close(out, x * 2.5 + 1.0, rtol=0, atol=0)
    assert "Launcher(_scale_kernel" in repr(launch)


def test_launch_key_separates_what_triton_specializes_on():
    base = torch.zeros(64, dtype=torch.float32)
    # Alignment of the address (a view 1 element in is 4 bytes off 16) and dtype.
    assert _arg_key(base) != _arg_key(base[1:])
    assert _arg_key(base) == _arg_key(base[4:])
    assert _arg_key(base) != _arg_key(base.half())
    # Ints by value (1, multiples of 16, int32 range all differ by value anyway), bools and None by value.
    assert _arg_key(16) != _arg_key(32) and _arg_key(1) != _arg_key(True)
    assert _arg_key(None) != _arg_key(False)
    assert _arg_key(2**40) != _arg_key(2**40 + 16)
    assert _arg_key(1.5) == _arg_key(2.5)  # floats are runtime fp32 arguments, not specialized


def test_an_empty_hook_chain_is_not_an_installed_hook():
    from lightning_thunder.executors.launch import _hook_set

    class Chain:  # the shape of Triton's knobs.HookChain
        def __init__(self, calls):
            self.calls = calls

    assert not _hook_set(None) and not _hook_set(Chain([]))
    assert _hook_set(Chain([print])) and _hook_set(print)
