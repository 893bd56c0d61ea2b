"""Proxies: the named values a :class:`~lightning_thunder.trace.Trace` computes with.

A proxy stands for one value of the program: a tensor, a (possibly symbolic) number, or an opaque
Python object (an autocast handle, say). It carries an *example value* (``val``): for tensors a fake
tensor with the shape, dtype, device and ``requires_grad`` the real value will have, for numbers a
Python number or a ``torch.SymInt``. Proxies are compared by identity; a name is unique in a trace.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["Proxy", "ConstRef", "short_dtype", "describe_value", "empty_example"]

_DTYPE_SHORT = {
    torch.float32: "f32",
    torch.float64: "f64",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "b8",
    torch.complex64: "c64",
    torch.complex128: "c128",
}
for _name, _short in (
    ("float8_e4m3fn", "f8e4m3"),
    ("float8_e5m2", "f8e5m2"),
    ("float8_e4m3fnuz", "f8e4m3fnuz"),
    ("float8_e5m2fnuz", "f8e5m2fnuz"),
    ("float8_e8m0fnu", "f8e8m0"),
):
    if hasattr(torch, _name):
        _DTYPE_SHORT[getattr(torch, _name)] = _short


def short_dtype(dtype: torch.dtype) -> str:
    """Return the compact spelling of ``dtype`` used in printed traces (``torch.bfloat16`` -> ``bf16``)."""
    return _DTYPE_SHORT.get(dtype, str(dtype).replace("torch.", ""))


def _short_device(device: torch.device) -> str:
    return str(device)


def describe_value(val: Any) -> str:
    """Describe an example value the way printed traces annotate it: ``cpu f32[4, 8]``, ``int 3``."""
    if isinstance(val, torch.Tensor):
        dims = ", ".join(str(s) for s in val.shape)
        return f"{_short_device(val.device)} {short_dtype(val.dtype)}[{dims}]"
    if isinstance(val, (bool, torch.SymBool)):
        return f"bool {val}"
    if isinstance(val, (int, torch.SymInt)):
        return f"int {val}"
    if isinstance(val, (float, torch.SymFloat)):
        return f"float {val}"
    if val is None:
        return "None"
    return type(val).__name__


class Proxy:
    """A named value of a trace.

    Args:
        name: a valid Python identifier, unique within the trace that defines it.
        val: the example value (fake tensor, number, ``SymInt`` or opaque object); ``None`` if unknown.
    """

    __slots__ = ("name", "val")

    def __init__(self, name: str, val: Any = None) -> None:
        if not name.isidentifier():
            raise ValueError(f"Proxy name {name!r} is not a valid Python identifier")
        self.name = name
        self.val = val

    @property
    def is_tensor(self) -> bool:
        """Whether the proxy stands for a tensor."""
        return isinstance(self.val, torch.Tensor)

    @property
    def shape(self) -> tuple:
        """The tensor's shape (entries may be ``SymInt``); raises for non-tensors."""
        return tuple(self._tensor().shape)

    @property
    def dtype(self) -> torch.dtype:
        """The tensor's dtype; raises for non-tensors."""
        return self._tensor().dtype

    @property
    def device(self) -> torch.device:
        """The tensor's device; raises for non-tensors."""
        return self._tensor().device

    @property
    def requires_grad(self) -> bool:
        """Whether the tensor requires grad (always ``False`` in post-autograd traces)."""
        return bool(self._tensor().requires_grad)

    def _tensor(self) -> torch.Tensor:
        if not isinstance(self.val, torch.Tensor):
            raise TypeError(f"Proxy {self.name} is not a tensor (it describes {describe_value(self.val)!r})")
        return self.val

    def describe(self) -> str:
        """``cpu f32[4, 8]`` for a tensor, ``int 3`` for a number."""
        return describe_value(self.val)

    def __repr__(self) -> str:
        return f"<Proxy {self.name}: {self.describe()}>"


class ConstRef:
    """A reference, inside op arguments, to a constant the trace holds by name (a captured tensor, say).

    The value lives in :attr:`Trace.constants` under ``name``; the printed program refers to it by name.
    """

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<ConstRef {self.name}>"


def empty_example(like: Any, shape: tuple[int, ...], dtype: torch.dtype) -> Any:
    """An example value of ``shape`` and ``dtype`` on ``like``'s device, for a proxy a pass creates: a fake
    tensor of ``like``'s fake mode when ``like`` is one, else a meta tensor."""
    mode = getattr(like, "fake_mode", None)
    if mode is not None:
        with mode:
            return torch.empty(shape, dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device="meta")
