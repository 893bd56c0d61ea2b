"""The kernel shapes of the code generator (see shapes.py): how a region's tile is laid out, and in what order
its values are computed and stored.

- :class:`FlatKernel`: ``[BLOCK]`` consecutive elements of the grid per program.
- :class:`RowKernel`: ``[BLOCK_M, BLOCK_N]`` tiles of whole rows (``persistent``); with column sums a fixed grid
  of programs loops over the row blocks (``grid-stride``), the columns split over a second grid axis when nothing
  needs whole rows (``column-tiled``).
- :class:`LoopedKernel`: rows longer than a tile, walked in column chunks, one pass per level of dependent
  reductions (online softmax pairs share one), then a pass that writes the full-size outputs.
"""

from __future__ import annotations

import math

from lightning_thunder.executors.triton import ops as fops
from lightning_thunder.executors.triton.kinds import COL, FULL, ROW, SCALAR, WIDE, is_static
from lightning_thunder.executors.triton.plan import OnlineSoftmax, RegionPlan
from lightning_thunder.executors.triton.shapes import storage_kind
from lightning_thunder.executors.triton.writer import KernelWriter, TensorArg
from lightning_thunder.trace.printing import source_comment
from lightning_thunder.trace.trace import BoundOp

__all__ = ["FlatKernel", "RowKernel", "LoopedKernel", "writer_for"]


def _pid(region: RegionPlan) -> tuple[bool, str]:
    """Whether indices need 64 bits (always for a symbolic row count: its size is not known), and the program id."""
    wide = not is_static(region.R) or region.R * (region.N or 1) >= 2**30
    return wide, "tl.program_id(0).to(tl.int64)" if wide else "tl.program_id(0)"


class _Base(KernelWriter):
    def op_comments(self) -> None:
        for op in self.region.ops:
            src = source_comment(op.meta)
            outs = ", ".join(q.name for q in op.output_proxies())
            self.emit(f"# {outs} = {op.name}" + (f"  ({src})" if src else ""))


class FlatKernel(_Base):
    """No reduction: one program handles ``BLOCK`` consecutive elements of the ``R x N`` grid."""

    mode = "flat"
    row_mask, full_width_mask, col_mask = "fmask", None, "fmask"

    def contiguous_address(self, shape, has_col, tile, shift, col):
        if has_col and isinstance(shift, int) and shift == 0 and self.region.N is not None and math.prod(shape) == self.R * self.N:
            return "i"
        return super().contiguous_address(shape, has_col, tile, shift, col)

    def tile_padding(self, tile, uses_row, uses_col, empty):
        terms = ["rows * 0"] if tile in (ROW, FULL) and not uses_row else []
        if tile is not None and empty and not terms:
            terms.append("i * 0")
        return terms

    def tile(self, kind):
        return "[BLOCK]"

    def tile_reduce(self, expr, fn):
        return f"tl.{fn}({expr}, axis=0)"

    def store_mask(self, kind, width):
        mask = self.mask(kind, width)
        if self.region.N is not None:
            if kind == ROW:
                return "fmask & (cols == 0)"
            if kind == COL:
                return f"{mask} & (rows == 0)"
        return mask

    def header(self, params: list[str]) -> None:
        r, n = self.R, self.N
        _, pid = _pid(self.region)
        self.lines.append(f"def KERNEL({', '.join(params)}):")
        self.op_comments()
        self.emit(f"pid = {pid}")
        self.emit("i = pid * BLOCK + tl.arange(0, BLOCK)")
        self.emit(f"fmask = i < {self.render(r * n)}")
        if self.region.N is None:
            self.emit("rows = i")
        else:
            self.emit(f"rows = i // {n}")
            self.emit(f"cols = i % {n}")
        self.header_end = len(self.lines)

    def body(self) -> None:
        self.emit_ops({})
        self.store_outputs()


class RowKernel(_Base):
    """Whole rows per program: ``persistent``, ``grid-stride`` (column sums) or ``column-tiled``."""

    mode = "persistent"

    def __init__(self, region: RegionPlan, args: dict[str, TensorArg]) -> None:
        super().__init__(region, args)
        self.grid_stride = region.kernel in ("grid-stride", "column-tiled")
        self.column_tiled = region.kernel == "column-tiled"
        if self.grid_stride:
            self.base_indent = 2
            self.first = "(rb == 0)"

    def header(self, params: list[str]) -> None:
        r, n = self.R, self.N
        wide, pid = _pid(self.region)
        self.lines.append(f"def KERNEL({', '.join(params)}):")
        self.op_comments()
        self.emit(f"pid = {pid}")
        if self.grid_stride:
            if self.column_tiled:  # axis 1 picks the columns; every op is per column (see shapes.py)
                self.emit("cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]")
            else:
                self.emit("cols = tl.arange(0, BLOCK_N)[None, :]")
            self.emit(f"cmask = cols < {n}")
            for k, op in enumerate(self.region.column_sums):
                self.emit(f"csum{k} = tl.zeros([1, BLOCK_N], tl.float32)  # {op.name}: this program's rows")
            self.emit(f"for rb in range(pid, tl.cdiv({self.render(r)}, BLOCK_M), {self.region.programs}):")
            self.indent += 1
            # rb counts from pid, 64-bit when pid is (its type follows range's bounds)
            self.emit("rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]")
            self.emit(f"rmask = rows < {self.render(r)}")
            self.emit("fmask = rmask & cmask")
        else:
            self.emit("rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]")
            self.emit(f"rmask = rows < {self.render(r)}")
            self.emit("cols = tl.arange(0, BLOCK_N)[None, :]")
            self.emit(f"cmask = cols < {n}")
            self.emit("fmask = rmask & cmask")
        self.header_end = len(self.lines)

    def body(self) -> None:
        sums = {id(op): k for k, op in enumerate(self.region.column_sums)}
        self.emit_ops(sums)
        self.store_outputs()
        partials = [(k, sums[id(o.partial_of)]) for k, o in enumerate(self.region.outputs) if id(o.partial_of) in sums]
        if partials:
            self.indent = 1
            for k, j in partials:
                self.emit(f"tl.store(out{k} + pid * {self.N} + cols, csum{j}, mask=cmask)")


class LoopedKernel(_Base):
    """Rows walked in ``BLOCK_N`` column chunks (see the module docstring)."""

    mode = "looped"

    def header(self, params: list[str]) -> None:
        _, pid = _pid(self.region)
        self.lines.append(f"def KERNEL({', '.join(params)}):")
        self.op_comments()
        self.emit(f"pid = {pid}")
        self.emit("rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]")
        self.emit(f"rmask = rows < {self.render(self.R)}")
        self.header_end = len(self.lines)

    def reduction_levels(self) -> dict[int, int]:
        """op id -> pass number for each reduction: 1 + the highest pass of the reductions it reads (the ``sum`` of
        an online-softmax pair shares its ``amax``'s pass)."""
        self.pairs = {id(p.sum_op): p for p in self.region.patterns if isinstance(p, OnlineSoftmax)}
        depth: dict[int, int] = {}  # proxy id -> reductions that must finish before it is known
        levels: dict[int, int] = {}
        for op in self.region.ops:
            d = max((depth.get(id(p), 0) for p in op.input_proxies()), default=0)
            if op.target in fops.REDUCTIONS and id(op) not in self.onehots:
                d = levels[id(self.pairs[id(op)].max_op)] if id(op) in self.pairs else d + 1
                levels[id(op)] = d
            depth[id(op.outputs[0])] = d
        self.depth = depth
        return levels

    def emit_row_values(self, below: int | None, emitted: set[int]) -> None:
        """Emit at the top level the row and scalar values whose reductions are done."""
        self.scope = self.top
        for op in self.region.ops:
            out = op.outputs[0]
            onehot = id(op) in self.onehots
            if id(op) in emitted or op.target in fops.VIEWS or (op.target in fops.REDUCTIONS and not onehot):
                continue
            if self.kind(out) not in (ROW, SCALAR):
                continue
            if below is not None and self.depth[id(out)] >= below:
                continue
            emitted.add(id(op))
            if onehot:
                self.top[(id(out), 0)] = self.onehot_value(op)
            else:
                self.value(out)
        self.scope = {}

    def reduce_pass(self, reductions: list[BoundOp]) -> None:
        """One chunked pass over the columns accumulating every reduction in ``reductions``.

        An online-softmax pair (``m = amax(f)``, ``s = sum(exp(f - m))``) keeps a running maximum and a running sum
        rescaled whenever the maximum grows, so ``s`` needs no second pass over ``f``."""
        pairs = [(op, self.pairs[id(op)].max_op) for op in reductions if id(op) in self.pairs]
        paired = {id(o) for pair in pairs for o in pair}
        online = []
        for sum_op, max_op in pairs:
            m_acc, s_acc = self.new("m"), self.new("s")
            self.emit(f'{m_acc} = tl.full([BLOCK_M, BLOCK_N], float("-inf"), tl.float32)')
            self.emit(f"{s_acc} = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)")
            online.append((sum_op, max_op, m_acc, s_acc))
        accs = []
        for op in reductions:
            if id(op) in paired:
                continue
            combine, _ = fops.REDUCTIONS[op.target]
            fill = {"sum": "0.0", "max": 'float("-inf")', "min": 'float("inf")'}[combine]
            acc = self.new("acc")
            self.emit(f"{acc} = tl.full([BLOCK_M, BLOCK_N], {fill}, tl.float32)")
            accs.append((op, acc, combine, fill))
        self.open_loop()
        for sum_op, max_op, m_acc, s_acc in online:
            mask = self.reduction_mask(max_op)
            f = self.new("f")
            self.emit(f'{f} = tl.where({mask}, {self.operand(max_op, max_op.args[0])}, float("-inf"))')
            m_new = self.new("m")
            self.emit(f"{m_new} = _max_nan({m_acc}, {f})")
            live = f'({m_new} != float("-inf"))'
            self.emit(
                f"{s_acc} = {s_acc} * tl.where({live}, tl.exp({m_acc} - {m_new}), 0.0)"
                f" + tl.where({mask} & {live}, tl.exp({f} - {m_new}), 0.0)"
            )
            self.emit(f"{m_acc} = {m_new}")
        for op, acc, combine, fill in accs:
            x = self.operand(op, op.args[0])
            masked = f"tl.where({self.reduction_mask(op)}, {x}, {fill})"
            if combine == "sum":
                self.emit(f"{acc} += {masked}")
            else:
                self.emit(f"{acc} = _{combine}_nan({acc}, {masked})")
        self.close_loop()
        for sum_op, max_op, m_acc, s_acc in online:
            m_row = self.emit_reduced(max_op, f"tl.reduce({m_acc}, 1, _max_nan)[:, None]", " (online)")
            live = f'({m_acc} != float("-inf"))'
            total = f"tl.sum({s_acc} * tl.where({live}, tl.exp({m_acc} - {m_row}), 0.0), axis=1)[:, None]"
            s_row = self.emit_reduced(sum_op, total, " (online)")
            self.top[(id(max_op.outputs[0]), 0)] = m_row
            self.top[(id(sum_op.outputs[0]), 0)] = s_row
        for op, acc, combine, _ in accs:
            total = f"tl.sum({acc}, axis=1)[:, None]" if combine == "sum" else f"tl.reduce({acc}, 1, _{combine}_nan)[:, None]"
            self.top[(id(op.outputs[0]), 0)] = self.emit_reduced(op, total)

    def open_loop(self) -> None:
        self.emit(f"for c0 in range(0, {self.N}, BLOCK_N):")
        self.indent += 1
        self.emit("cols = c0 + tl.arange(0, BLOCK_N)[None, :]")
        self.emit(f"cmask = cols < {self.N}")
        self.emit("fmask = rmask & cmask")
        self.scope = {}

    def close_loop(self) -> None:
        self.indent -= 1
        self.scope = {}

    def body(self) -> None:
        region = self.region
        if region.epilogues:
            raise AssertionError("an epilogue in a looped kernel: region formation keeps them to rows of <= 16384 columns")
        levels = self.reduction_levels()
        emitted: set[int] = set()
        for level in sorted(set(levels.values())):
            self.emit_row_values(below=level, emitted=emitted)
            self.reduce_pass([op for op in region.ops if levels.get(id(op)) == level])
        self.emit_row_values(below=None, emitted=emitted)
        wide = [(k, o.proxy) for k, o in enumerate(region.outputs) if storage_kind(region, o.proxy) in WIDE]
        narrow = [(k, o.proxy) for k, o in enumerate(region.outputs) if storage_kind(region, o.proxy) in (ROW, SCALAR)]
        if wide:
            self.open_loop()
            for k, p in wide:
                self.store(k, p)
            self.close_loop()
        self.scope = self.top
        for k, p in narrow:
            self.store(k, p)


def writer_for(region: RegionPlan, args: dict[str, TensorArg]) -> KernelWriter:
    """The writer of ``region``'s kernel shape."""
    if region.kernel == "flat":
        return FlatKernel(region, args)
    if region.kernel == "looped":
        return LoopedKernel(region, args)
    return RowKernel(region, args)
