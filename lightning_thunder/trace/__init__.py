"""The trace IR: proxies, bound ops, traces, printing and FX conversion."""

from lightning_thunder.trace.fx import fx_from_trace, trace_from_fx
from lightning_thunder.trace.proxy import ConstRef, Proxy
from lightning_thunder.trace.trace import DELETE, BoundOp, NameGenerator, Trace, timed_pass

__all__ = [
    "DELETE",
    "BoundOp",
    "ConstRef",
    "NameGenerator",
    "Proxy",
    "Trace",
    "fx_from_trace",
    "timed_pass",
    "trace_from_fx",
]
