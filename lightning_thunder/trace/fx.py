"""Converting ``torch.fx`` graphs to :class:`Trace` and back.

FX is what Dynamo hands a backend and what AOTAutograd consumes and produces; ``Trace`` is what our
passes and printing work on. The conversion keeps each node's metadata (``stack_trace``, example
values) so source lines survive the round trip, and it unpacks tuple-returning ops whose results
are only indexed (``native_layer_norm``'s three outputs become ``t1, t2, t3 = ...``).
"""

from __future__ import annotations

import keyword
import operator
import re
from typing import Any

import torch
import torch.fx as fx

from lightning_thunder.trace.proxy import ConstRef, Proxy
from lightning_thunder.trace.trace import DELETE, BoundOp, NameGenerator, Trace
from lightning_thunder.trace.tree import map_structure

__all__ = ["trace_from_fx", "fx_from_trace", "RESERVED_NAMES", "value_prefix"]

#: Names the printed program uses for itself; proxies never take them.
RESERVED_NAMES = frozenset({"torch", "aten", "operator", "math", "args", "builtins"})


def value_prefix(val: Any) -> str:
    """The name prefix for a value: ``t`` tensors, ``i`` ints, ``f`` floats, ``b`` bools, ``o`` others."""
    if isinstance(val, torch.Tensor):
        return "t"
    if isinstance(val, (bool, torch.SymBool)):
        return "b"
    if isinstance(val, (int, torch.SymInt)):
        return "i"
    if isinstance(val, (float, torch.SymFloat)):
        return "f"
    return "o"


def _pretty_input_name(name: str) -> str:
    """``l_self_modules_fc1_parameters_weight_`` (Dynamo's spelling) -> ``fc1_weight``."""
    n = name
    if n[:2] in ("l_", "L_"):
        n = n[2:]
    n = n.strip("_")
    n = re.sub(r"^self_", "", n)
    n = re.sub(r"(^|_)(modules|parameters|buffers)_", r"\1", n)
    n = re.sub(r"\W", "_", n) or "x"
    if n[0].isdigit():
        n = "x" + n
    if keyword.iskeyword(n) or n in RESERVED_NAMES:
        n = n + "_"
    return n


def _safe_name(name: str) -> str:
    if keyword.iskeyword(name) or name in RESERVED_NAMES:
        return name + "_"
    return name


def _node_val(node: fx.Node) -> Any:
    if "val" in node.meta:
        return node.meta["val"]
    return node.meta.get("example_value")


def _fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _unpackable(node: fx.Node) -> bool:
    val = _node_val(node)
    if not isinstance(val, (tuple, list)) or not node.users:
        return False
    return all(
        u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int) for u in node.users
    )


def trace_from_fx(
    gm: fx.GraphModule,
    *,
    name: str,
    provenance: str,
    fn_name: str = "forward",
    pretty_inputs: bool = True,
    input_names: list[str | None] | None = None,
    renames: dict[str, str] | None = None,
) -> Trace:
    """Build a :class:`Trace` from an FX graph module.

    Args:
        gm: the graph module (placeholders become the trace's inputs, in order).
        name: the stage name of the new trace.
        provenance: what produced the graph, for the trace header.
        fn_name: name of the printed function.
        pretty_inputs: shorten Dynamo's input names (``l_self_modules_fc1_parameters_weight_`` ->
            ``fc1_weight``).
        input_names: names for the placeholders, in order (used when their number matches; ``None``
            entries keep the default), e.g. to call AOTAutograd's ``primals_1...`` by the names the
            torch-level trace gave them, or parameters by their names in the module.
        renames: pretty input name -> preferred name (``args_0`` -> ``x``), applied to the rest.
    """
    namer = NameGenerator(RESERVED_NAMES)
    env: dict[fx.Node, Any] = {}
    inputs: list[Proxy] = []
    ops: list[BoundOp] = []
    constants: dict[str, Any] = {}
    input_meta: dict[str, dict] = {}

    def lookup(x: Any) -> Any:
        return env[x] if isinstance(x, fx.Node) else x

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    given = dict(zip(placeholders, input_names)) if input_names and len(input_names) == len(placeholders) else {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if given.get(node):
                pname = namer.reserve(given[node])
            elif pretty_inputs:
                pretty = _pretty_input_name(node.name)
                pname = namer.reserve(_safe_name((renames or {}).get(pretty, pretty)))
            else:
                pname = namer.reserve(node.name)
            proxy = Proxy(pname, _node_val(node))
            env[node] = proxy
            inputs.append(proxy)
            input_meta[pname] = dict(node.meta)
        elif node.op == "get_attr":
            value = _fetch_attr(gm, node.target)
            cname = namer.reserve(_pretty_input_name(node.target.replace(".", "_")))
            constants[cname] = value
            env[node] = ConstRef(cname)
        elif node.op in ("call_function", "call_method", "call_module"):
            if (
                node.op == "call_function"
                and node.target is operator.getitem
                and isinstance(node.args[0], fx.Node)
                and isinstance(env.get(node.args[0]), tuple)
            ):
                env[node] = env[node.args[0]][node.args[1]]
                if env[node] is None and node.users:  # pragma: no cover - guarded by `used` above
                    raise AssertionError(f"unpacked output {node.name} is read but was dropped")
                continue
            target: Any = node.target
            if node.op == "call_module":
                target = gm.get_submodule(node.target)
            args = map_structure(lookup, tuple(node.args))
            kwargs = map_structure(lookup, dict(node.kwargs))
            val = _node_val(node)
            meta = dict(node.meta)
            if _unpackable(node):
                used = {u.args[1] for u in node.users if u.users}  # a getitem nobody reads is dropped
                outs = tuple(
                    Proxy(namer(value_prefix(v)), v) if i in used else None for i, v in enumerate(val)
                )
                ops.append(BoundOp(target, args, kwargs, outs, unpack=True, meta=meta))
                env[node] = outs
            else:
                out = Proxy(namer(value_prefix(val)), val) if node.users else None
                ops.append(BoundOp(target, args, kwargs, (out,), meta=meta))
                env[node] = out
        elif node.op == "output":
            output = map_structure(lookup, node.args[0])
        else:  # pragma: no cover - FX has no other node kinds
            raise ValueError(f"unsupported FX node kind {node.op!r}")
    return Trace(
        name, inputs, ops, output, provenance=provenance, fn_name=fn_name, constants=constants, input_meta=input_meta
    )


def fx_from_trace(trace: Trace) -> fx.GraphModule:
    """Build an FX graph module that computes what ``trace`` computes.

    Proxies become nodes of the same name (FX may suffix them), tuple-unpacking ops become one node
    plus ``getitem`` nodes, ``del`` statements are dropped, and constants become attributes read by
    ``get_attr``. Node metadata (``val``, ``stack_trace``...) is carried over.
    """
    graph = fx.Graph()
    root = torch.nn.Module()
    env: dict[int, fx.Node] = {}
    const_nodes: dict[str, fx.Node] = {}
    input_meta = trace.input_meta

    def lookup(x: Any) -> Any:
        if isinstance(x, Proxy):
            try:
                return env[id(x)]
            except KeyError:
                raise ValueError(f"trace {trace.name!r} uses {x.name} before defining it") from None
        if isinstance(x, ConstRef):
            node = const_nodes.get(x.name)
            if node is None:
                value = trace.constants[x.name]
                if isinstance(value, torch.nn.Module):
                    root.add_module(x.name, value)
                else:
                    setattr(root, x.name, value)
                node = const_nodes[x.name] = graph.get_attr(x.name)
                if isinstance(value, torch.Tensor):
                    node.meta["val"] = value
            return node
        return x

    for p in trace.inputs:
        node = graph.placeholder(p.name)
        node.meta.update(input_meta.get(p.name, {}))
        node.meta["val"] = p.val
        env[id(p)] = node
    for op in trace.ops:
        if op.target is DELETE:
            continue
        args = map_structure(lookup, op.args)
        kwargs = map_structure(lookup, op.kwargs)
        first = op.outputs[0]
        node_name = first.name if (first is not None and not op.unpack) else None
        if op.is_method:
            node = graph.create_node("call_method", op.target, args, kwargs, name=node_name)
        elif isinstance(op.target, torch.nn.Module):
            mod_name = f"_submodule_{len(root._modules)}"
            root.add_module(mod_name, op.target)
            node = graph.create_node("call_module", mod_name, args, kwargs, name=node_name)
        else:
            node = graph.create_node("call_function", op.target, args, kwargs, name=node_name)
        node.meta.update(op.meta)
        if op.unpack:
            if "val" not in node.meta:
                node.meta["val"] = tuple(p.val if p is not None else None for p in op.outputs)
            for i, p in enumerate(op.outputs):
                if p is None:
                    continue
                item = graph.create_node("call_function", operator.getitem, (node, i), name=p.name)
                item.meta["val"] = p.val
                env[id(p)] = item
        elif first is not None:
            node.meta["val"] = first.val
            env[id(first)] = node
    graph.output(map_structure(lookup, trace.output))
    return fx.GraphModule(root, graph)
