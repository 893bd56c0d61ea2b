"""Peak table lookups from CUDA device names (mocked: no GPU needed) and precision detection."""

from __future__ import annotations

from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from lightning.fabric.plugins import HalfPrecision, MixedPrecision, Precision

from lightning_thunder.callbacks import PEAK_TFLOPS, ThroughputMonitor, card_of, fp8_active, peak_flops, precision_of
from lightning_thunder.callbacks.context import RunContext


@pytest.mark.parametrize(
    ("name", "card"),
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H100 NVL", "H100 NVL"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA B200", "B200"),
        ("NVIDIA GB200", "GB200"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA A100-PCIE-40GB", "A100"),
        ("NVIDIA A100 80GB PCIe", "A100"),
        ("NVIDIA L4", "L4"),
        # Same chip, other clocks or form factor unknown: no guess.
        ("NVIDIA H200 NVL", None),
        ("NVIDIA GH200 480GB", None),
        ("NVIDIA H100", None),
        ("NVIDIA L40S", None),
        ("Tesla T4", None),
    ],
)
def test_card_of_device_names(name, card):
    assert card_of(name) == card


def test_every_card_has_the_issue_precisions_except_fp8_on_a100():
    for card, peaks in PEAK_TFLOPS.items():
        expected = {"fp32", "tf32", "bf16", "fp16"} | (set() if card == "A100" else {"fp8"})
        assert set(peaks) == expected, card
        # Dense Tensor Core figures: each halving of the bits doubles the rate (fp16 == bf16).
        assert peaks["bf16"] == peaks["fp16"] == pytest.approx(2 * peaks["tf32"], rel=0.03), card
        if "fp8" in peaks:
            assert peaks["fp8"] == pytest.approx(2 * peaks["bf16"], rel=0.01), card


@pytest.mark.parametrize(
    ("name", "precision", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.4),
        ("NVIDIA H100 80GB HBM3", "fp8", 1978.9),
        ("NVIDIA H100 PCIe", "bf16", 756.5),
        ("NVIDIA H100 NVL", "fp8", 1670.5),
        ("NVIDIA H200", "tf32", 494.7),
        ("NVIDIA B200", "bf16", 2250.0),
        ("NVIDIA GB200", "fp8", 5000.0),
        ("NVIDIA A100-SXM4-40GB", "bf16", 312.0),
        ("NVIDIA L4", "fp16", 121.0),
        ("NVIDIA L4", "fp32", 30.3),
    ],
)
def test_peak_flops_from_mocked_device_name(name, precision, tflops):
    with mock.patch("torch.cuda.get_device_name", return_value=name):
        assert peak_flops(torch.device("cuda", 0), precision) == pytest.approx(tflops * 1e12)
    assert peak_flops("cuda:0", precision, device_name=name) == pytest.approx(tflops * 1e12)


def test_peak_flops_unknown_cases_are_none_and_bad_precision_raises():
    assert peak_flops("cuda:0", "fp8", device_name="NVIDIA A100-SXM4-80GB") is None  # no FP8 on A100
    assert peak_flops("cuda:0", "bf16", device_name="NVIDIA GH200 480GB") is None
    assert peak_flops("cpu", "bf16") is None
    with pytest.raises(ValueError, match="precision='int4' is not one of"):
        peak_flops("cuda:0", "int4", device_name="NVIDIA L4")


class ThunderFP8(Precision):
    """Stand-in for the FP8 precision plugin that does not exist yet (detected by its class name)."""


def test_precision_of_lightning_plugins_and_fp8_stand_ins():
    assert precision_of(MixedPrecision("bf16-mixed", "cpu")) == "bf16"
    assert precision_of(HalfPrecision("16-true")) == "fp16"
    assert precision_of(HalfPrecision("bf16-true")) == "bf16"
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert precision_of(Precision()) == "fp32"
        torch.set_float32_matmul_precision("high")
        assert precision_of(Precision()) == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)
    assert fp8_active(ThunderFP8()) and precision_of(ThunderFP8()) == "fp8"
    flagged = SimpleNamespace(precision="bf16-mixed", fp8_active=True)
    assert precision_of(flagged) == "fp8"
    off = ThunderFP8()
    off.fp8_active = False  # the attribute wins over the class name
    assert precision_of(off) == ("fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32")
    assert not fp8_active(MixedPrecision("bf16-mixed", "cpu"))


class _FakeContext(RunContext):
    """A RunContext on a (mocked) CUDA device with a given precision plugin, for the peak selection."""

    def __init__(self, plugin: object) -> None:
        self._plugin = plugin

    device = torch.device("cuda", 0)

    @property
    def precision_plugin(self) -> object:
        return self._plugin


@pytest.mark.parametrize(
    ("plugin", "forced", "expected"),
    [
        (MixedPrecision("bf16-mixed", "cpu"), None, 989.4e12),
        (ThunderFP8(), None, 1978.9e12),  # FP8 active -> the FP8 peak
        (MixedPrecision("bf16-mixed", "cpu"), "fp8", 1978.9e12),  # forced by the user
    ],
)
def test_monitor_chooses_the_peak_of_the_active_precision(plugin, forced, expected):
    monitor = ThroughputMonitor(precision=forced)
    with mock.patch("torch.cuda.get_device_name", return_value="NVIDIA H100 80GB HBM3"):
        monitor._start(_FakeContext(plugin))
    assert monitor.device_peak_flops == pytest.approx(expected)
    assert "H100 SXM" in monitor.peak_source


def test_monitor_options_are_checked():
    with pytest.raises(ValueError, match="precision='int8' is not one of"):
        ThroughputMonitor(precision="int8")
    with pytest.raises(ValueError, match="window_size=1 must be at least 2"):
        ThroughputMonitor(window_size=1)
    with pytest.raises(ValueError, match="peak_flops=0 must be a positive"):
        ThroughputMonitor(peak_flops=0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'windw_size'"):
        ThroughputMonitor(windw_size=3)
