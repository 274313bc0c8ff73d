"""The tutorials run top to bottom (CPU smoke settings) so they cannot rot."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from monai_stealthmark.data import DEFAULT_SUNNYBROOK_ROOT

TUT = Path(__file__).resolve().parents[1] / "tutorials"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, TUT / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not DEFAULT_SUNNYBROOK_ROOT.is_dir(), reason=f"needs {DEFAULT_SUNNYBROOK_ROOT}")
def test_tutorials_in_order(tmp_path, capsys):
    assert _load("01_watermark_a_bundle").main(["--out", str(tmp_path), "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "val_mean_dice" in out and "val_auc" in out and "val_wm_asr" in out
    assert _load("02_verify_a_suspect").main(["--out", str(tmp_path)]) == 0
    assert (tmp_path / "report_http" / "direct_summary.png").is_file()
    assert "exit codes: bundle folder 1, HTTP 1" in capsys.readouterr().out  # one epoch: no watermark yet
    assert _load("03_attack_your_model").main(["--out", str(tmp_path), "--epochs", "1"]) == 0
    table = capsys.readouterr().out
    for name in ("finetune_all", "global_prune", "fp16", "int8_static", "weight_noise", "input_gaussian_noise_0.05"):
        assert f"| {name} |" in table
