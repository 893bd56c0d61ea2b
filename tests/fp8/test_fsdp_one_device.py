"""``thunder_fsdp`` on one device (a Gloo group of one rank, emulated FP8): the whole model is one FSDP unit used in
place and compiled whole, so the Trainer trains exactly as with ``strategy="thunder"`` (bf16 and ``ThunderFP8``), in
one graph; its sharded checkpoint is plain and resumes."""

from __future__ import annotations

import pytest
import torch

from tests.fp8.trainer_helpers import lit_module, loss_recorder
from tests.strategies.helpers import spawn, tiny_gpt, token_batches

pytest.importorskip("litgpt", reason="litgpt is part of the `test` extra")

STEPS_PER_EPOCH = 2


def _fit(strategy: str, fp8: str | None, root: str | None = None, resume: str | None = None) -> tuple:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    import lightning_thunder as lt

    torch._dynamo.reset()
    rows = token_batches(STEPS_PER_EPOCH, batch=1)
    data = torch.utils.data.TensorDataset(torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows]))
    losses = loss_recorder()
    callbacks = [losses] + ([ModelCheckpoint(dirpath=root, filename="{epoch}", save_top_k=-1)] if root else [])
    precision = {"plugins": [lt.ThunderFP8(emulate=True, all_gather=fp8)]} if fp8 else {"precision": "bf16-true"}
    trainer = L.Trainer(
        accelerator="cpu", devices=1, strategy=strategy, max_epochs=2, gradient_clip_val=1.0, logger=False,
        enable_checkpointing=bool(root), enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False, callbacks=callbacks, **precision,
    )
    module = lit_module(tiny_gpt)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2), ckpt_path=resume)
    return module, losses.values


def _one_device(rank: int, root: str) -> dict:
    from pathlib import Path

    import lightning_thunder as lt

    out: dict = {}
    params: dict = {}
    for strategy, fp8 in (("thunder", None), ("thunder_fsdp", None), ("thunder", "fp8"), ("thunder_fsdp", "fp8")):
        module, losses = _fit(strategy, fp8, root=str(Path(root) / f"{strategy}-{fp8}"))
        params[strategy, fp8] = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().float() for n, p in
                                 module.named_parameters()}
        stats = lt.compile_stats(module)
        out[strategy, fp8] = {
            "losses": losses,
            "graphs": stats.graphs,
            "breaks": stats.graph_breaks,
            "locals": sorted({type(getattr(p, "_local_tensor", p)).__name__ for p in module.parameters()}),
            "state_dict_locals": sorted({type(getattr(v, "_local_tensor", v)).__name__ for v in
                                         module.state_dict().values()}),
        }
    for fp8 in (None, "fp8"):  # (compared here: tensors do not travel back from a spawned process)
        ref, got = params["thunder", fp8], params["thunder_fsdp", fp8]
        out["thunder_fsdp", fp8]["same_params"] = sorted(ref) == sorted(got) and all(
            torch.equal(got[n], p) for n, p in ref.items()
        )
    _, resumed = _fit("thunder_fsdp", "fp8", resume=str(Path(root) / "thunder_fsdp-fp8" / "epoch=0.ckpt"))
    out["resumed"] = resumed
    return out


@pytest.mark.slow
def test_thunder_fsdp_on_one_device_trains_exactly_as_thunder_in_one_graph(tmp_path):
    res = spawn(_one_device, str(tmp_path), world_size=1, timeout=280)[0]
    for fp8 in (None, "fp8"):
        ref, got = res[("thunder", fp8)], res[("thunder_fsdp", fp8)]
        # The same graph over the same values: the same losses and weights to the last bit.
        assert got["losses"] == ref["losses"] and len(got["losses"]) == 2 * STEPS_PER_EPOCH
        assert got["same_params"], fp8
        # One FSDP unit, compiled whole: training_step is one graph, as with strategy="thunder".
        assert got["graphs"] == ref["graphs"] == 1 and got["breaks"] == [], got["breaks"]
        assert got["state_dict_locals"] == ["Tensor"]
    assert res[("thunder_fsdp", None)]["locals"] == ["OneRankShard"]  # used in place, nothing gathered
    assert res[("thunder_fsdp", "fp8")]["locals"] == ["FP8ShardedWeight", "OneRankShard"]
    # The sharded checkpoint of the first epoch resumes the run: the second epoch again, to the last bit.
    assert res["resumed"] == res[("thunder_fsdp", "fp8")]["losses"][STEPS_PER_EPOCH:]
