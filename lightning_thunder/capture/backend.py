"""The Dynamo backend: one captured FX graph in, executable forward and backward callables out.

Pipeline for each graph Dynamo hands us (see DESIGN.md, "The pipeline")::

    Dynamo FX graph -> Trace "torch" -> pre-autograd plugins
      -> AOTAutograd (functionalization, autodiff, decomposition) with our partition function:
         joint graph -> partitioner -> Trace "forward" + Trace "backward" -> post-autograd plugins
      -> per graph: DCE, CSE, executors (plugins' first, torch last), del insertion -> final trace
      -> plugins' transform_final (e.g. CUDA graph capture of runs of ops) -> the executable trace
      -> its Python source, compiled (boxed calling convention)
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch._functorch.aot_autograd import aot_module_simplified
from torch._functorch.partitioners import default_partition, min_cut_rematerialization_partition

from lightning_thunder.capture.errors import WORKAROUND, CaptureError, locate_failure
from lightning_thunder.capture.options import CompileOptions
from lightning_thunder.capture.state import CompileState, GraphRecord, current_state
from lightning_thunder.executors.base import ClaimContext, Executor
from lightning_thunder.executors.torch_executor import TorchExecutor
from lightning_thunder.passes import (
    common_subexpression_elimination,
    dead_code_elimination,
    insert_deletions,
    protect_mutated_saved_inputs,
)
from lightning_thunder.plugins.base import FinalContext, Plugin
from lightning_thunder.trace import Trace, fx_from_trace, trace_from_fx

__all__ = ["ThunderBackend", "get_backend"]

#: Errors from a backend that Dynamo turns into a graph break (data-dependent outputs, unsupported fake-tensor ops).
_DYNAMO_FALLBACKS: tuple[type[BaseException], ...] = tuple(getattr(torch._dynamo.exc, "exceptions_allowed_to_be_fallback", ()))

_AOT_PROVENANCE = "AOTAutograd (functionalization, autodiff, decomposition) and {} partition"


def _frame_ids() -> tuple[int | None, int | None]:
    """Dynamo's id of the frame being compiled and of this compilation of it (``None`` if unknown)."""
    try:
        compile_id = torch._guards.CompileContext.current_compile_id()
    except Exception:  # noqa: BLE001 - private API; absence only means "unknown"
        return None, None
    return getattr(compile_id, "frame_id", None), getattr(compile_id, "frame_compile_id", None)


def _recompile_reason() -> str:
    """Dynamo's reason for recompiling the frame being compiled."""
    try:
        reason = torch._dynamo.utils.get_metrics_context()._metrics.get("recompile_reason")
    except Exception:  # noqa: BLE001 - private API; fall back to a generic reason
        reason = None
    return reason or "guard failure (Dynamo gave no reason)"


def _check_trace(value: Any, plugin: Plugin, hook: str) -> Trace:
    if not isinstance(value, Trace):
        raise TypeError(f"{plugin.name}.{hook} must return a Trace, got {type(value).__name__}")
    return value


class ThunderBackend:
    """A ``torch.compile`` backend running the lightning_thunder pipeline.

    One backend serves every module and function compiled with the same plugin instances and
    options (see :func:`get_backend`), so Dynamo reuses a graph across instances of the same class
    (all transformer blocks share one compiled block) instead of recompiling per instance. Each
    compiled graph is recorded in the :class:`CompileState` of the call that triggered it.

    Args:
        plugins: compiler plugins, applied in order.
        options: validated compile options.
    """

    def __init__(self, plugins: Sequence[Plugin], options: CompileOptions) -> None:
        self.plugins = list(plugins)
        self.options = options
        self.orphan_state = CompileState("<no compiled call running>")
        self.latest: dict[str, GraphRecord] = {}  # per compiled class: its most recent graph
        self.latest_training: dict[str, GraphRecord] = {}  # ... and its most recent graph with a backward
        self.executors: list[Executor] = [ex for p in self.plugins for ex in p.executors()]
        self.epilogues = tuple(e for p in self.plugins for e in p.fusion_epilogues())
        self.executors.append(TorchExecutor())
        self.decompositions: dict[Any, Callable] = {}
        self.partition_options: dict[str, Any] = {}
        for ex in self.executors:
            self.decompositions.update(ex.decompositions())
            self.partition_options.update(ex.partition_options())

    def __repr__(self) -> str:
        return f"ThunderBackend(plugins={self.plugins!r}, options={self.options!r})"

    def __deepcopy__(self, memo: dict) -> ThunderBackend:
        # A backend is a shared service (Lightning deep-copies torch.compile's kwargs); never copy it.
        return self

    # ------------------------------------------------------------------------------ entry point
    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        """Compile one Dynamo graph (the ``torch.compile`` backend protocol)."""
        t0 = time.perf_counter()
        state = current_state() or self.orphan_state
        frame_id, frame_compile_id = _frame_ids()
        recompile = state.is_recompile(frame_id, frame_compile_id)
        record = state.new_record(frame_id, frame_compile_id)
        if recompile:
            record.recompile_reason = _recompile_reason()
            state.recompiles.append(record.recompile_reason)
        known = state.tensor_names()
        trace = trace_from_fx(
            gm,
            name="torch",
            provenance="Dynamo capture (torch-level ops, before autograd)",
            input_names=[known.get(id(x)) for x in example_inputs],
            renames=state.argument_names(),
        )
        record.torch_traces.append(trace)
        changed = False
        for plugin in self.plugins:
            t1 = time.perf_counter()
            new = _check_trace(plugin.transform_torch_trace(trace), plugin, "transform_torch_trace")
            changed |= new is not trace
            trace = self._stage(new, trace, f"torch/{plugin.name}", plugin, t1)
            record.torch_traces.append(trace)
        aot_input = fx_from_trace(trace) if changed else gm
        # Counted as torch's own AOTAutograd backends count themselves: Dynamo's DDPOptimizer reads the counter to
        # know that a split subgraph went through AOTAutograd (else the compiled subgraph's first call returns the
        # fake outputs AOTAutograd made for it).
        torch._dynamo.utils.counters["aot_autograd"]["total"] += 1
        try:
            compiled = aot_module_simplified(
                aot_input,
                list(example_inputs),
                fw_compiler=self._compiler(state, record, "forward"),
                bw_compiler=self._compiler(state, record, "backward"),
                inference_compiler=self._compiler(state, record, "inference"),
                partition_fn=self._partition_fn(record),
                decompositions=self.decompositions,
                keep_inference_input_mutations=True,
            )
        except (CaptureError, torch._dynamo.exc.TorchDynamoException, *_DYNAMO_FALLBACKS) as e:
            # Dynamo's own signals (restart the analysis, skip the frame) must reach Dynamo untouched, and so must
            # the errors it answers with a graph break (an op whose output depends on tensor data, such as
            # `narrow` with a tensor start): Dynamo then splits the graph there, runs that op eagerly and warns.
            state.discard(record)
            if isinstance(e, _DYNAMO_FALLBACKS):
                where = locate_failure(e, aot_input)
                state.graph_breaks.append(
                    f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    + (f" (at {where}; handed back to Dynamo, which splits the graph there)" if where else "")
                )
            raise
        except Exception as e:
            state.discard(record)
            where = locate_failure(e, aot_input)
            at = f" at {where}" if where else ""
            raise CaptureError(
                f"lightning_thunder could not trace graph {record.index} through autograd{at}: "
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}\n{WORKAROUND}"
            ) from e
        record.compile_time_s += time.perf_counter() - t0
        self.latest[state.label] = record
        if not record.inference:
            self.latest_training[state.label] = record
        return compiled

    # ------------------------------------------------------------------------------ helpers
    @staticmethod
    def _stage(new: Trace, old: Trace, name: str, plugin: Plugin, t_start: float) -> Trace:
        """Name a plugin's output as its own stage (an unchanged trace is recorded as such)."""
        ms = (time.perf_counter() - t_start) * 1e3
        if new is old:
            return old.derive(f"plugin {plugin.name} (no change)", name=name, elapsed_ms=ms)
        provenance = new.provenance if new.provenance.startswith("plugin ") else f"plugin {plugin.name}"
        return new.derive(provenance, name=name, elapsed_ms=ms)

    def _partition_fn(self, record: GraphRecord) -> Callable:
        partitioner = (
            min_cut_rematerialization_partition if self.options.partitioner == "min_cut" else default_partition
        )
        provenance = _AOT_PROVENANCE.format(self.options.partitioner)

        import torch._functorch.config as functorch_config

        known = {k: v for k, v in self.partition_options.items() if hasattr(functorch_config, k)}

        def partition(joint: fx.GraphModule, joint_inputs: Any, **kwargs: Any) -> tuple[fx.GraphModule, fx.GraphModule]:
            with functorch_config.patch(**known):
                fw_gm, bw_gm = partitioner(joint, joint_inputs, **kwargs)
            fw = trace_from_fx(
                fw_gm, name="forward", provenance=provenance, pretty_inputs=False, input_names=_user_names(record)
            )
            bw = trace_from_fx(bw_gm, name="backward", provenance=provenance, fn_name="backward", pretty_inputs=False)
            record.forward_traces.append(fw)
            record.backward_traces.append(bw)
            record.user_outputs = kwargs["num_fwd_outputs"]
            protected = protect_mutated_saved_inputs(fw, kwargs["num_fwd_outputs"])
            changed = protected is not fw
            if changed:
                fw = protected
                record.forward_traces.append(fw)
            for plugin in self.plugins:
                t1 = time.perf_counter()
                new_fw, new_bw = plugin.transform_forward_backward(fw, bw)
                new_fw = _check_trace(new_fw, plugin, "transform_forward_backward")
                new_bw = _check_trace(new_bw, plugin, "transform_forward_backward")
                changed |= new_fw is not fw or new_bw is not bw
                fw = self._stage(new_fw, fw, f"forward/{plugin.name}", plugin, t1)
                bw = self._stage(new_bw, bw, f"backward/{plugin.name}", plugin, t1)
                record.forward_traces.append(fw)
                record.backward_traces.append(bw)
            if changed:
                return fx_from_trace(fw), fx_from_trace(bw)
            return fw_gm, bw_gm

        return partition

    def _compiler(self, state: CompileState, record: GraphRecord, kind: str) -> Callable:
        """The fw/bw/inference compiler AOTAutograd calls with each final ATen graph."""

        def compile_graph(gm: fx.GraphModule, example_inputs: Any) -> Callable:
            t0 = time.perf_counter()
            stage = "backward" if kind == "backward" else "forward"
            history = record.backward_traces if stage == "backward" else record.forward_traces
            if kind == "inference":
                record.inference = True
                trace = trace_from_fx(
                    gm,
                    name="forward",
                    provenance=_AOT_PROVENANCE.format("no (inference)"),
                    pretty_inputs=False,
                    input_names=_user_names(record),
                )
                history.append(trace)
                for plugin in self.plugins:
                    t1 = time.perf_counter()
                    new, _ = plugin.transform_forward_backward(trace, None)
                    new = _check_trace(new, plugin, "transform_forward_backward")
                    trace = self._stage(new, trace, f"forward/{plugin.name}", plugin, t1)
                    history.append(trace)
            else:
                trace = trace_from_fx(
                    gm,
                    name=stage,
                    provenance="AOTAutograd graph as compiled",
                    fn_name=stage,
                    pretty_inputs=False,
                    input_names=_user_names(record) if stage == "forward" else None,
                )
                last = history[-1] if history else None
                if last is not None and _body(last) == _body(trace):
                    trace = last
                else:
                    history.append(trace)
            finals = self.finish(trace, stage)
            n_out = len(trace.output) if isinstance(trace.output, (tuple, list)) else 1
            user = record.user_outputs if stage == "forward" and kind != "inference" else None
            context = FinalContext(stage, kind == "inference", n_out if user is None else user, record.index)
            finals += self.transform_final(finals[-1], context)
            history.extend(finals)
            fn = finals[-1].python_callable(boxed=True)
            elapsed = time.perf_counter() - t0
            record.compile_time_s += elapsed
            if kind == "backward" and not state.in_call:
                state.backward_compile_time_s += elapsed
            return fn

        return compile_graph

    def finish(self, trace: Trace, stage: str) -> list[Trace]:
        """The generic post-autograd passes for one graph; the last trace returned is executable."""
        out = [dead_code_elimination(trace, name=f"{stage}/dce")]
        if self.options.cse:
            out.append(common_subexpression_elimination(out[-1], name=f"{stage}/cse"))
        context = ClaimContext(stage=stage, epilogues=self.epilogues)
        for ex in self.executors:
            traces = ex.claim_stages(out[-1], context)
            if not traces or not all(isinstance(t, Trace) for t in traces):
                raise TypeError(f"executor {ex.name!r}.claim must return a Trace, got {traces!r}")
            out.extend(t.renamed(f"{stage}/{t.name}") for t in traces[:-1])
            out.append(traces[-1].renamed(f"{stage}/executor:{ex.name}"))
        out.append(insert_deletions(out[-1], name=f"{stage}/final"))
        return out

    def transform_final(self, trace: Trace, context: FinalContext) -> list[Trace]:
        """The stages the plugins' :meth:`~lightning_thunder.Plugin.transform_final` add after ``"<stage>/final"``
        (only changed traces); the last one, if any, is what runs."""
        out = []
        for plugin in self.plugins:
            t1 = time.perf_counter()
            new = _check_trace(plugin.transform_final(trace, context), plugin, "transform_final")
            if new is not trace:
                trace = self._stage(new, trace, f"{context.stage}/{plugin.name}", plugin, t1)
                out.append(trace)
        return out


def _user_names(record: GraphRecord) -> list[str]:
    """The torch-level input names, which AOTAutograd's forward takes in the same order."""
    return [p.name for p in record.torch_traces[-1].inputs]


def _body(trace: Trace) -> str:
    """The printed program without its header line (for comparing programs)."""
    return trace.python().split("\n", 1)[1]


# Weak values: a backend lives as long as something compiled with it (which holds it); it holds its
# plugins, so their ids cannot be reused while the entry exists.
_BACKENDS: weakref.WeakValueDictionary[tuple, ThunderBackend] = weakref.WeakValueDictionary()


def get_backend(plugins: Sequence[Plugin], options: CompileOptions) -> ThunderBackend:
    """The backend for these plugin *instances* and options, created once and then reused.

    Dynamo guards each compiled graph on the backend's identity; handing every compile with the same
    plugins the same backend lets instances of one class share their compiled graphs (and keeps them
    under Dynamo's per-function recompile limit). The backend holds the plugins, so their ids stay unique.
    """
    key = (options, tuple(id(p) for p in plugins))
    backend = _BACKENDS.get(key)
    if backend is None:
        backend = _BACKENDS[key] = ThunderBackend(plugins, options)
    return backend
