"""A LitGPT-style Fabric loop whose compiled graph holds the loss: the model and its loss as one module.

``fabric.setup`` compiles the module's forward. A LitGPT ``GPT`` returns logits and the loop computes the loss outside,
so the loss would run eagerly on ``[tokens, vocab]`` logits. ``ModelWithLoss(model, loss_fn)`` is the same model
(same parameters and ``state_dict`` keys) whose forward returns the loss, so the loss is compiled with the model and
``FusedLinearCrossEntropy`` (a default plugin with CUDA) replaces the output head and the cross-entropy by one chunked
op: no logits in the forward or the backward. The script prints that part of the trace and the losses.

    python examples/fabric_loss_in_graph.py                                  # CPU, a tiny Llama-style model
    python examples/fabric_loss_in_graph.py --accelerator cuda --model Llama-3.2-1B --n-layer 4 --seq 2048
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from lightning.fabric import Fabric

import lightning_thunder
from lightning_thunder.plugins import FusedLinearCrossEntropy
from lightning_thunder.strategies import ModelWithLoss, ThunderStrategy


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy in fp32, as LitGPT computes it."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--model", default="Llama-3.2-1B", help="a LitGPT config name")
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    from litgpt import GPT, Config

    cuda = args.accelerator == "cuda"
    overrides = {"n_layer": args.n_layer, "block_size": args.seq}
    if not cuda:  # a tiny model of the same architecture (GQA, RMSNorm, SwiGLU), 1000 classes
        overrides.update(n_embd=64, n_head=4, n_query_groups=2, intermediate_size=128, vocab_size=1000,
                         padded_vocab_size=1000)
    config = Config.from_name(args.model, **overrides)

    # The compiler's defaults, with FusedLinearCrossEntropy also on CPU (where the defaults are empty).
    plugins = lightning_thunder.default_plugins()
    if not any(isinstance(p, FusedLinearCrossEntropy) for p in plugins):
        plugins.append(FusedLinearCrossEntropy())
    fabric = Fabric(accelerator=args.accelerator, devices=1, strategy=ThunderStrategy(plugins=plugins),
                    precision="bf16-mixed" if cuda else "32-true")
    fabric.seed_everything(0)
    with fabric.init_module():
        model = ModelWithLoss(GPT(config), lm_loss)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=cuda)
    model, optimizer = fabric.setup(model, optimizer)

    vocab = config.padded_vocab_size
    for step in range(1, args.steps + 1):
        data = torch.randint(0, vocab, (args.batch, args.seq + 1), device=fabric.device)
        loss = model(data[:, :-1], data[:, 1:])  # the model and its loss: one compiled graph
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        fabric.print(f"step {step}: loss {loss.item():.4f}")

    stage = next(t for t in lightning_thunder.last_traces(model) if t.name == "torch/FusedLinearCrossEntropy")
    fabric.print(f"\n{stage.name}: {stage.provenance}")
    fabric.print("\n".join(line for line in stage.python().splitlines() if "linear_cross_entropy(" in line))
    final = lightning_thunder.last_traces(model)[-1].python()
    fabric.print("\nin the final forward: " + "\n".join(line.strip() for line in final.splitlines()
                                                            if "lightning_thunder.linear_cross_entropy" in line))


if __name__ == "__main__":
    main()
