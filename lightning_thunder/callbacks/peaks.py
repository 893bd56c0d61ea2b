"""Peak FLOP/s per device and precision: what MFU (model FLOPs utilization) is measured against.

The table holds the vendors' published *dense* Tensor Core figures (NVIDIA datasheets print the
figures "with sparsity" and note that dense is half; those are halved here) and the plain FP32
(CUDA core) figure. Cards are matched from ``torch.cuda.get_device_name()``; cards not in the table
fall back to Lightning's :func:`~lightning.fabric.utilities.throughput.get_available_flops`.

The precision comes from the active precision plugin (:func:`precision_of`): FP8 when
:func:`fp8_active` says so, else bf16 / fp16 / fp32, and fp32 counts as TF32 when
``torch.get_float32_matmul_precision()`` lets matmuls use TF32 (every card here has TF32).
"""

from __future__ import annotations

import re
import warnings

import torch

__all__ = ["PEAK_TFLOPS", "PRECISIONS", "card_of", "fp8_active", "peak_flops", "precision_of"]

#: Precision names accepted everywhere in this package.
PRECISIONS = ("fp32", "tf32", "bf16", "fp16", "fp8")

_T = 1e12  # the table is in TFLOP/s

#: card -> precision -> dense peak TFLOP/s. A precision missing for a card means the card has no
#: such Tensor Core mode (A100: no FP8) or that no published figure was at hand (see the comments).
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    # NVIDIA A100 datasheet (SXM4 and PCIe, 40 and 80 GB, share the figures): FP32 19.5; TF32 156,
    # BF16/FP16 312 (dense; 312/624 with sparsity). No FP8 Tensor Cores.
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0},
    # NVIDIA H100 datasheet, "H100 SXM" column: FP32 67; TF32 989*, BF16/FP16 1,979*, FP8 3,958*
    # (* with sparsity; dense is half).
    "H100 SXM": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.9},
    # NVIDIA H100 datasheet, "H100 PCIe" column: FP32 51; TF32 756*, BF16/FP16 1,513*, FP8 3,026*.
    "H100 PCIe": {"fp32": 51.0, "tf32": 378.0, "bf16": 756.5, "fp16": 756.5, "fp8": 1513.0},
    # NVIDIA H100 datasheet, "H100 NVL" column (one 94 GB GPU; the first 2023 datasheet listed the
    # NVLink-bridged pair, twice these): FP32 60; TF32 835*, BF16/FP16 1,671*, FP8 3,341*.
    "H100 NVL": {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5, "fp8": 1670.5},
    # NVIDIA H200 datasheet, "H200 SXM" column: same compute as H100 SXM: FP32 67; TF32 989*,
    # BF16/FP16 1,979*, FP8 3,958*. (H200 NVL is left out: no figure checked.)
    "H200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.9},
    # NVIDIA HGX B200 specifications, per GPU (preliminary): FP32 75; TF32 2.2 P*, FP16/BF16 4.5 P*,
    # FP8 9 P* (* with sparsity; dense is half).
    "B200": {"fp32": 75.0, "tf32": 1100.0, "bf16": 2250.0, "fp16": 2250.0, "fp8": 4500.0},
    # NVIDIA GB200 NVL72 specifications, per Blackwell GPU (preliminary): FP32 80; TF32 2.5 P*,
    # FP16/BF16 5 P*, FP8 10 P*.
    "GB200": {"fp32": 80.0, "tf32": 1250.0, "bf16": 2500.0, "fp16": 2500.0, "fp8": 5000.0},
    # NVIDIA L4 datasheet: FP32 30.3; TF32 120*, BF16/FP16 242*, FP8 485*.
    "L4": {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0, "fp16": 121.0, "fp8": 242.5},
}


def card_of(device_name: str) -> str | None:
    """The :data:`PEAK_TFLOPS` key for a CUDA device name, ``None`` if the card is not in the table.

    ``"NVIDIA H100 80GB HBM3"`` -> ``"H100 SXM"``, ``"NVIDIA H100 PCIe"`` -> ``"H100 PCIe"``,
    ``"NVIDIA A100-SXM4-40GB"`` -> ``"A100"``, ``"NVIDIA GB200"`` -> ``"GB200"``. Variants that share a
    chip but not its clocks (GH200, H200 NVL, an H100 name that names no form factor) give ``None``
    rather than a guess.
    """
    name = device_name.lower()
    if "gh200" in name or "gb300" in name or "b300" in name:
        return None
    if "gb200" in name:
        return "GB200"
    if re.search(r"\bb200\b", name):
        return "B200"
    if "h200" in name:
        return None if "nvl" in name else "H200"
    if "h100" in name:
        if "nvl" in name:
            return "H100 NVL"
        if "pcie" in name or "hbm2e" in name:
            return "H100 PCIe"
        if "hbm3" in name or "sxm" in name:
            return "H100 SXM"
        return None
    if "a100" in name:
        return "A100"
    if re.search(r"\bl4\b", name):
        return "L4"
    return None


def fp8_active(precision_plugin: object) -> bool:
    """Whether ``precision_plugin`` runs matmuls in FP8 (so MFU is measured against the FP8 peak).

    This is the one place that decides. An object says so itself with an attribute
    ``fp8_active = True`` (``False`` turns it off); otherwise a plugin class named ``ThunderFP8``
    (lightning_thunder's FP8 precision plugin) or Lightning's ``TransformerEnginePrecision`` counts
    as FP8.
    """
    flag = getattr(precision_plugin, "fp8_active", None)
    if flag is not None:
        return bool(flag)
    names = {cls.__name__ for cls in type(precision_plugin).__mro__}
    return bool(names & {"ThunderFP8", "TransformerEnginePrecision"})


def precision_of(precision_plugin: object) -> str:
    """The precision name (one of :data:`PRECISIONS`, or ``"fp64"``) matmuls run in under a Lightning
    precision plugin: ``"fp8"`` if :func:`fp8_active`, else read from the plugin's ``precision``
    string (``"bf16-mixed"`` -> ``"bf16"``, ``"16-true"`` -> ``"fp16"``, ``"32-true"`` -> ``"fp32"`` or
    ``"tf32"`` when ``torch.get_float32_matmul_precision()`` is not ``"highest"``)."""
    if fp8_active(precision_plugin):
        return "fp8"
    text = str(getattr(precision_plugin, "precision", "32-true"))
    if "bf16" in text:
        return "bf16"
    if text.startswith("16"):
        return "fp16"
    if text.startswith("64"):
        return "fp64"
    return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"


_LIGHTNING_DTYPES: dict[str, torch.dtype | str] = {
    "fp32": torch.float32,
    "tf32": torch.float32,  # Lightning turns fp32 into TF32 itself when the card and the setting allow
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp64": torch.float64,
}


def peak_flops(device: torch.device | str, precision: str, *, device_name: str | None = None) -> float | None:
    """The dense peak FLOP/s of one ``device`` at ``precision``; ``None`` when unknown (CPU, a card
    or precision without a published figure).

    Args:
        device: the device (only ``cuda`` devices have peaks).
        precision: one of :data:`PRECISIONS` (or ``"fp64"``, looked up in Lightning's table only).
        device_name: the CUDA device name; by default ``torch.cuda.get_device_name(device)``. Only the
            default consults Lightning's table for cards missing from :data:`PEAK_TFLOPS`.
    """
    if precision not in (*PRECISIONS, "fp64"):
        raise ValueError(f"precision={precision!r} is not one of {PRECISIONS + ('fp64',)}")
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = device_name if device_name is not None else torch.cuda.get_device_name(device)
    card = card_of(name)
    if card is not None:
        tflops = PEAK_TFLOPS[card].get(precision)
        return None if tflops is None else tflops * _T
    if precision == "fp8" or device_name is not None:
        return None  # Lightning's table has no FP8 figures, and it reads the device's own name
    from lightning.fabric.utilities.throughput import get_available_flops

    # Lightning's table, for the cards ours leaves out (V100, T4, L40, RTX ...).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "FLOPs not found for ...": our caller reports "unavailable"
        flops = get_available_flops(device, _LIGHTNING_DTYPES[precision])
    return float(flops) if flops else None
