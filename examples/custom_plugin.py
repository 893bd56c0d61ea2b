"""A user-written lightning_thunder plugin in ~30 lines: count ops and swap one for another.

Run: python examples/custom_plugin.py
"""

from collections import Counter

import torch
from torch import nn

import lightning_thunder as lt


class SwapAndCount(lt.Plugin):
    """Replaces ``old`` by ``new`` before autograd, and counts the ATen ops of forward and backward."""

    def __init__(self, old, new):
        self.old, self.new = old, new
        self.counts = Counter()

    def transform_torch_trace(self, trace):
        ops = [op.replace(target=self.new) if op.target is self.old else op for op in trace.ops]
        return trace.derive(f"plugin SwapAndCount: {self.old.__name__} -> {self.new.__name__}", ops=ops)

    def transform_forward_backward(self, fw, bw):
        for trace in (fw, bw) if bw is not None else (fw,):
            self.counts.update(op.name for op in trace.ops)
        return fw, bw


def relu_via_clamp(x, inplace=False):
    return torch.clamp(x, min=0.0)


def main() -> None:
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    plugin = SwapAndCount(nn.functional.relu, relu_via_clamp)  # nn.ReLU calls F.relu
    cm = lt.compile(model, plugins=[plugin])
    x = torch.randn(4, 8)
    out = cm(x)
    out.sum().backward()
    torch.testing.assert_close(out, model(x))  # same math, different op
    print(lt.last_traces(cm)[1])  # the torch-level trace after the plugin
    print("ops after autograd:", dict(plugin.counts))
    assert plugin.counts["aten.clamp.default"] == 1 and "aten.relu.default" not in plugin.counts


if __name__ == "__main__":
    main()
