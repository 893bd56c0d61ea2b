"""Walking the nested argument structures of ops: tuples, lists, dicts and slices holding proxies."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["map_structure", "iter_leaves"]


def map_structure(fn: Callable[[Any], Any], x: Any) -> Any:
    """Apply ``fn`` to every leaf of ``x``, rebuilding tuples, lists, dicts and slices around the results.

    Subclasses (FX's ``immutable_list``, ``torch.Size``) come back as plain lists, tuples and dicts;
    named tuples keep their type.
    """
    if isinstance(x, tuple):
        if hasattr(x, "_fields"):
            return type(x)(*(map_structure(fn, v) for v in x))
        return tuple(map_structure(fn, v) for v in x)
    if isinstance(x, list):
        return [map_structure(fn, v) for v in x]
    if isinstance(x, dict):
        return {k: map_structure(fn, v) for k, v in x.items()}
    if type(x) is slice:
        return slice(map_structure(fn, x.start), map_structure(fn, x.stop), map_structure(fn, x.step))
    return fn(x)


def iter_leaves(x: Any) -> Iterator[Any]:
    """Yield the leaves of ``x`` in the order :func:`map_structure` visits them."""
    if isinstance(x, (tuple, list)):
        for v in x:
            yield from iter_leaves(v)
    elif isinstance(x, dict):
        for v in x.values():
            yield from iter_leaves(v)
    elif type(x) is slice:
        yield from iter_leaves(x.start)
        yield from iter_leaves(x.stop)
        yield from iter_leaves(x.step)
    else:
        yield x
