"""Train a small Llama-style LitGPT model on CPU with lightning_thunder (the README's first command).

The data is real text present on every machine: the Python standard library's source, read as bytes
(a 256-token vocabulary). A few minutes on 2 CPU cores take the loss from ~5.5 to well under 3.

    python examples/train_cpu.py --steps 200
"""

from __future__ import annotations

import argparse
import os
import sysconfig
import time
from pathlib import Path

import torch

import lightning_thunder as lt


def stdlib_bytes(limit: int = 2_000_000) -> torch.Tensor:
    """Up to ``limit`` bytes of the standard library's ``.py`` files, as a uint8 tensor."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eager", action="store_true", help="train without lightning_thunder, for comparison")
    args = parser.parse_args()

    from litgpt import GPT, Config  # the `litgpt` extra

    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    data = stdlib_bytes()
    split = int(0.95 * len(data))
    train, val = data[:split].long(), data[split:].long()
    config = Config(
        name="byte-llama", block_size=args.seq, vocab_size=256, padded_vocab_size=256, n_layer=4, n_head=4,
        n_query_groups=2, n_embd=128, intermediate_size=384, bias=False, norm_class_name="RMSNorm",
        mlp_class_name="LLaMAMLP", parallel_residual=False, rotary_percentage=1.0,
    )
    model = GPT(config)
    net = model if args.eager else lt.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)

    def batch(source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(len(source) - args.seq - 1, (args.batch,))
        x = torch.stack([source[i : i + args.seq] for i in ix])
        y = torch.stack([source[i + 1 : i + 1 + args.seq] for i in ix])
        return x, y

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(net(x).flatten(0, 1), y.flatten())

    t_start = time.perf_counter()
    t_steady, tokens = None, 0
    for step in range(1, args.steps + 1):
        x, y = batch(train)
        loss = loss_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step == 2:
            t_steady, tokens = time.perf_counter(), 0
        tokens += x.numel()
        if step % 25 == 0 or step == 1:
            print(f"step {step:4d}  loss {loss.item():.3f}", flush=True)
    elapsed = time.perf_counter() - (t_steady or t_start)
    with torch.no_grad():
        val_loss = sum(loss_fn(*batch(val)).item() for _ in range(4)) / 4
    print(f"validation loss {val_loss:.3f}; {tokens / elapsed:,.0f} tokens/s after the first step")
    if not args.eager:
        stats = lt.compile_stats(net)
        print(f"compiled {stats.graphs} graphs in {stats.compile_time_s:.1f}s; ops per executor {stats.executor_counts}")


if __name__ == "__main__":
    main()
