"""FP8 all-gather under ``thunder_fsdp`` on 2 CPU processes (Gloo, emulated FP8): the Trainer with
``ThunderFP8(all_gather="fp8")`` trains as with ``all_gather="bf16"``, the all-gather moves FP8 bytes, the blocks'
traces take the gathered FP8 weights as inputs, and a sharded checkpoint is plain and resumes the run."""

from __future__ import annotations

import pytest
import torch

from tests.fp8.trainer_helpers import lit_module, loss_recorder
from tests.strategies.helpers import WORLD_SIZE, spawn, tiny_gpt, token_batches

pytest.importorskip("litgpt", reason="litgpt is part of the `test` extra")

STEPS_PER_EPOCH = 2
EPOCHS = 2
STEPS = STEPS_PER_EPOCH * EPOCHS


def _loader(steps: int):
    from torch.utils.data import DataLoader, TensorDataset

    rows = token_batches(steps, batch=2)
    x, y = torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
    return DataLoader(TensorDataset(x, y), batch_size=2, shuffle=False)


class _GatherSpy:
    """Records ``(dtype, bytes)`` of each all-gather input FSDP2 sends (through ``torch.distributed``'s Python API,
    whichever function this torch version's FSDP2 calls)."""

    NAMES = ("all_gather_into_tensor", "all_gather_single")

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self._saved: dict[str, object] = {}

    def __enter__(self) -> _GatherSpy:
        import torch.distributed as dist

        for name in self.NAMES:
            if hasattr(dist, name):
                original = self._saved[name] = getattr(dist, name)

                def spy(output, input, *args, _original=original, **kwargs):  # noqa: A002 - torch's name
                    self.calls.append((str(input.dtype), input.numel() * input.element_size()))
                    return _original(output, input, *args, **kwargs)

                setattr(dist, name, spy)
        return self

    def __exit__(self, *exc: object) -> None:
        import torch.distributed as dist

        for name, original in self._saved.items():
            setattr(dist, name, original)


def _fit(all_gather: str, callbacks: list, ckpt_path: str | None = None) -> tuple:
    import lightning as L

    import lightning_thunder as lt

    torch._dynamo.reset()
    losses = loss_recorder(reduce=True)
    trainer = L.Trainer(
        accelerator="cpu", devices=WORLD_SIZE, strategy="thunder_fsdp",
        plugins=[lt.ThunderFP8(emulate=True, all_gather=all_gather)], max_epochs=EPOCHS, gradient_clip_val=1.0,
        logger=False, enable_checkpointing=bool(callbacks), enable_progress_bar=False, enable_model_summary=False,
        callbacks=[losses, *callbacks],
    )
    module = lit_module(tiny_gpt)
    with _GatherSpy() as spy:
        trainer.fit(module, _loader(STEPS_PER_EPOCH), ckpt_path=ckpt_path)
    return trainer, module, losses.values, spy.calls


def _train_and_resume(rank: int, root: str) -> dict:
    import warnings
    from pathlib import Path

    from lightning.pytorch.callbacks import ModelCheckpoint

    import lightning_thunder as lt
    from lightning_thunder.fp8.fsdp import FP8AllGather
    from lightning_thunder.fp8.weights import FP8ShardedWeight

    out: dict = {}
    for all_gather in ("bf16", "fp8"):
        callbacks = []
        if all_gather == "fp8":  # a sharded checkpoint after each epoch, to resume from the first
            callbacks = [ModelCheckpoint(dirpath=root, filename="{epoch}", save_top_k=-1)]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer, module, losses, calls = _fit(all_gather, callbacks)
        block = module.model.transformer.h[0]
        forward = lt.last_traces(block)[-1]
        groups = {p._local_tensor._group for p in module.parameters() if isinstance(p._local_tensor, FP8ShardedWeight)}
        state_dict = module.state_dict()
        out[all_gather] = {
            "losses": losses,
            "calls": calls,
            "fp8_warnings": [str(w.message) for w in caught if "FP8" in str(w.message)],
            "forward": str(forward),
            "fp8_inputs": sum(str(p.val.dtype) == "torch.float8_e4m3fn" for p in forward.inputs),
            "groups": [(len(g.names), g.refreshes) for g in groups if isinstance(g, FP8AllGather)],
            "state_dict_locals": sorted({type(v._local_tensor).__name__ for v in state_dict.values()}),
            "state_dict_dtypes": sorted({str(v.dtype) for v in state_dict.values()}),
            "block_weights": {
                n: (p.numel(), p.dtype.itemsize) for n, p in block.named_parameters()
            },
        }
    _, module, losses, _ = _fit("fp8", [], ckpt_path=str(Path(root) / "epoch=0.ckpt"))
    out["resumed"] = losses
    return out


@pytest.mark.slow
def test_trainer_fp8_all_gather_trains_like_bf16_gathers_fp8_bytes_and_checkpoints_plain(tmp_path):
    res = spawn(_train_and_resume, str(tmp_path), timeout=280)[0]
    fp8, bf16 = res["fp8"], res["bf16"]
    # Same scales (the whole weight's maximum) and the same casts, applied before instead of after the all-gather:
    # the emulated runs agree to the last bit, and they learn.
    assert len(fp8["losses"]) == STEPS and all(torch.isfinite(torch.tensor(fp8["losses"])))
    assert fp8["losses"] == bf16["losses"], (fp8["losses"], bf16["losses"])
    assert fp8["fp8_warnings"] == bf16["fp8_warnings"] == []  # no dequantized fallback, no bf16 fallback
    # One FP8AllGather with the blocks' 10 FP8 weights, refreshed once per optimizer step (the forward's first
    # all-gather after the step; the backward's all-gather reuses the FP8 shards).
    assert fp8["groups"] == [(10, STEPS)] and bf16["groups"] == []
    # The block unit's all-gather: 5 FP8 weights (1 byte per value) and 2 bf16 norms, sent as bytes; with bf16,
    # 2 bytes per value. Per rank: half of each.
    weights = fp8["block_weights"]
    fp8_bytes = sum(n * (1 if n_name.endswith("weight") and "norm" not in n_name else size)
                    for n_name, (n, size) in weights.items()) // WORLD_SIZE
    bf16_bytes = sum(n * size for n, size in weights.values()) // WORLD_SIZE
    assert fp8_bytes < 0.55 * bf16_bytes
    assert ("torch.uint8", fp8_bytes) in fp8["calls"] and ("torch.bfloat16", bf16_bytes) not in fp8["calls"]
    assert ("torch.bfloat16", bf16_bytes) in bf16["calls"] and ("torch.uint8", fp8_bytes) not in bf16["calls"]
    # The block's forward takes the 5 weights as FP8 tensors with their scales and quantizes only activations;
    # with the bf16 all-gather it quantizes the bf16 weights itself (grouped).
    assert fp8["fp8_inputs"] == 5 and "fp8_quantize_group_kernel" not in fp8["forward"]
    assert bf16["fp8_inputs"] == 0 and "fp8_quantize_group_kernel" in bf16["forward"]
    # The activations: the inputs of qkv, attn.proj, fc_1 and fc_2 (one value, quantized once), mlp.proj.
    assert fp8["forward"].count("fp8_amax_kernel(") == 4
    # Checkpoints stay plain: DTensors of plain bf16 shards in the state dict, plain bf16 tensors in the files.
    assert fp8["state_dict_locals"] == ["Tensor"] and fp8["state_dict_dtypes"] == ["torch.bfloat16"]
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(tmp_path / "epoch=0.ckpt", tmp_path / "full.pt")
    saved = torch.load(tmp_path / "full.pt", weights_only=True)  # no FP8 subclass to unpickle
    assert {(type(v).__name__, v.dtype) for v in saved["state_dict"].values()} == {("Tensor", torch.bfloat16)}
    assert set(saved["state_dict"]) == {f"model.{k}" for k in tiny_gpt().state_dict()}
    # Resuming from the first epoch's checkpoint in a fresh Trainer reproduces the second epoch (the loaded shards
    # are requantized).
    assert res["resumed"] == fp8["losses"][STEPS_PER_EPOCH:], (res["resumed"], fp8["losses"])
