"""The ``kernel_shapes`` pass: which kind of kernel each region becomes.

- ``flat``: no reduction. One program handles ``BLOCK`` consecutive elements of the R x N grid; the row and
  column of each element come from its flat index.
- ``persistent``: reductions over rows of at most :data:`PERSISTENT_MAX_N` columns. One program handles
  ``BLOCK_M`` whole rows held in registers; every value is computed once.
- ``grid-stride``: a persistent kernel that also sums values over all of its rows (a weight's gradient, see
  colsum.py): a fixed grid of programs, each looping over its share of the row blocks and accumulating the
  column sums in registers; it writes one row of partial sums per program.
- ``column-tiled``: a grid-stride kernel over rows wider than :data:`COLUMN_TILE_MIN_N` whose work is all per
  column (a bias gradient): a second grid axis splits the columns.
- ``looped``: reductions over longer rows (a 128k vocabulary). One program handles ``BLOCK_M`` rows and walks
  them in ``BLOCK_N`` column chunks: one pass per level of dependent reductions, then a last pass that writes
  the full-size outputs.
"""

from __future__ import annotations

import math

from lightning_thunder.executors.triton import ops as fops
from lightning_thunder.executors.triton.kinds import COL, FULL, ROW, SCALAR, dims
from lightning_thunder.executors.triton.plan import FusionPlan, RegionPlan
from lightning_thunder.trace.proxy import Proxy

__all__ = ["KERNEL_SHAPES", "PERSISTENT_MAX_N", "COLUMN_TILE_MIN_N", "kernel_shapes_pass", "choose_kernel", "storage_kind"]

KERNEL_SHAPES = ("flat", "persistent", "grid-stride", "column-tiled", "looped")
#: Rows up to this many columns are reduced in registers; longer rows are walked in chunks.
PERSISTENT_MAX_N = 16384
#: Regions with column sums and rows wider than this split the columns across programs when they can;
#: narrower ones keep whole rows in one program (RMSNorm gradients).
COLUMN_TILE_MIN_N = 2048


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def storage_kind(region: RegionPlan, p: Proxy) -> str:
    """How output ``p`` is laid over the grid when stored: its kind, or the kind its shape fits when it was
    computed with less variation than it has elements (a broadcast)."""
    value_kind = region.kinds[id(p)]
    shape = dims(p.val)
    numel = math.prod(shape)
    wide_rows = math.prod(shape[:-1]) if shape and shape[-1] else None
    fits = {
        SCALAR: numel == 1,
        ROW: numel == region.R,
        COL: region.N is not None and len(shape) > 0 and shape[-1] > 1 and wide_rows == 1,
        FULL: region.N is not None and len(shape) > 0 and shape[-1] > 1 and wide_rows == region.R,
    }
    if fits.get(value_kind):
        return value_kind
    for kind in (FULL, ROW, COL, SCALAR):
        if fits[kind]:
            return kind
    raise AssertionError(f"output {p.name} of shape {shape} does not fit the region grid ({region.R}, {region.N})")


def _column_tileable(region: RegionPlan) -> bool:
    """Rows wider than :data:`COLUMN_TILE_MIN_N`, nothing that needs whole rows (no reductions over the columns
    besides the column sums, no moves along the columns, no column index), and every output but the partial
    results stored per element or per column (a per-row value would be written by each column block)."""
    if (region.N or 0) <= COLUMN_TILE_MIN_N:
        return False
    sums = {id(op) for op in region.column_sums}
    for op in region.ops:
        if id(op) in sums:
            continue
        if op.target in fops.REDUCTIONS or op.target in fops.COLUMN_MOVES or op.target in fops.IOTA:
            return False
    return all(storage_kind(region, o.proxy) in (FULL, COL) for o in region.outputs if o.partial_of is None)


def choose_kernel(region: RegionPlan) -> str:
    """One of :data:`KERNEL_SHAPES` for ``region`` (see the module docstring)."""
    if not region.has_reduction:
        return "flat"
    if _next_pow2(region.N or 1) > PERSISTENT_MAX_N:
        return "looped"
    if not any(o.partial_of is not None and id(o.partial_of) not in region.epilogues for o in region.outputs):
        return "persistent"
    return "column-tiled" if _column_tileable(region) else "grid-stride"


def kernel_shapes_pass(plan: FusionPlan) -> FusionPlan:
    """Set ``RegionPlan.kernel`` for every region."""
    regions = [r if r.kernel is not None else r.replace(kernel=choose_kernel(r)) for r in plan.regions]
    counts: dict[str, int] = {}
    for r in regions:
        counts[r.kernel] = counts.get(r.kernel, 0) + 1
    note = "kernel_shapes: " + ", ".join(f"{n} {k}" for k, n in counts.items())
    return plan.replace(regions=regions, notes=(*plan.notes, note))
