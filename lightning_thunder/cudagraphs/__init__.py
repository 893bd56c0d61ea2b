"""CUDA graph capture for compiled programs: which ops a graph can capture (:mod:`.segments`) and the runtime that
captures and replays them (:mod:`.runner`). Users enable it with :class:`lightning_thunder.plugins.CUDAGraphs`."""

from lightning_thunder.cudagraphs.runner import (
    CapturedGraph,
    CUDAGraphsWarning,
    GraphCaptureError,
    GraphPool,
    SegmentRunner,
)
from lightning_thunder.cudagraphs.segments import Segment, SegmentPlan, capture_blocker, plan_segments

__all__ = [
    "CUDAGraphsWarning",
    "CapturedGraph",
    "GraphCaptureError",
    "GraphPool",
    "Segment",
    "SegmentPlan",
    "SegmentRunner",
    "capture_blocker",
    "plan_segments",
]
