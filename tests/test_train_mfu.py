"""MFU's peak: from the device's name (as CUDA reports it), or the config's override; unknown says so.

No GPU here: the names are the strings torch.cuda.get_device_name returns on those machines, and
the end-to-end check is a CPU training run, whose device has no known peak.
"""

from __future__ import annotations

import json
import logging

import pytest

from asclepius_r.config import load
from asclepius_r.train.run import TrainRun, mfu_peak
from asclepius_r.train.throughput import FlopModel, Window, peak_tflops_of
from support.default_settings import train_run
from support.train_fixtures import REPO, build_fixture_data, run_launch, write_run


@pytest.mark.parametrize(
    "name,peak",
    [
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100-SXM4-40GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("NVIDIA A100-PCIE-40GB", 312.0),
        ("NVIDIA H100 80GB HBM3", 989.5),
        ("NVIDIA H100 PCIe", 756.5),
        ("NVIDIA H100 NVL", 835.5),
        ("NVIDIA H200", 989.5),
        ("NVIDIA H200 NVL", 835.5),
        ("NVIDIA GH200 480GB", None),
        ("NVIDIA H800", None),
        ("NVIDIA H20", None),
        ("NVIDIA GeForce RTX 4090", None),
        ("cpu", None),
    ],
)
def test_peak_from_device_name(name, peak):
    assert peak_tflops_of(name) == peak


def run_with_peak(peak: float | None) -> TrainRun:
    return train_run(peak_tflops_per_device=peak)


def test_config_override_wins_and_unknown_device_is_logged(caplog):
    assert mfu_peak(run_with_peak(400.0), "NVIDIA H100 80GB HBM3") == 400.0
    assert mfu_peak(run_with_peak(None), "NVIDIA H100 PCIe") == 756.5
    with caplog.at_level(logging.WARNING):
        assert mfu_peak(run_with_peak(None), "NVIDIA L40S") is None
    assert "MFU unknown" in caplog.text and "NVIDIA L40S" in caplog.text and "peak_tflops_per_device" in caplog.text


def test_window_records_no_mfu_without_a_peak():
    window = Window(real_tokens=1000, positions=1000, attended_pairs=1000 * 100, seconds=2.0, devices=2)
    flops = FlopModel(matmul_params=10**6, num_layers=2, hidden_size=64)
    assert window.record(flops, None)["mfu"] is None
    achieved = flops.flops(1000, 1000 * 100) / 2.0
    assert window.record(flops, 312.0)["mfu"] == pytest.approx(achieved / (312e12 * 2))


def test_paper_config_takes_the_peak_from_the_device():
    config = load(REPO / "config.yaml", require_data=False)
    assert config["pretrain"]["peak_tflops_per_device"] is None
    assert config["finetune"]["peak_tflops_per_device"] is None


def test_training_on_an_unknown_device_records_mfu_as_unknown(tmp_path):
    data = build_fixture_data(tmp_path)
    run_file = write_run(tmp_path / "run", "pretrain", data, max_steps=2, max_length=128, peak_tflops_per_device=None)
    result = run_launch("pretrain", run_file)
    assert "MFU unknown" in result.stderr and "'cpu'" in result.stderr
    records = [json.loads(line) for line in (tmp_path / "run/metrics/pretrain.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for record in records:
        assert record["mfu"] is None and record["peak_tflops_per_device"] is None and record["device"] == "cpu"
        assert record["tokens_per_s"] > 0 and record["tflops_per_device"] > 0
