"""A tiny CPU smoke of the benchmark code through its command line (timings are not asserted: ratios live in the
JSON)."""

from __future__ import annotations

import json

import pytest

from bench.benchmarks import main, run
from experiments import cli
from monai_stealthmark.data import DEFAULT_SUNNYBROOK_ROOT
from monai_stealthmark.recipe import recipe_defaults

needs_data = pytest.mark.skipif(not DEFAULT_SUNNYBROOK_ROOT.is_dir(), reason=f"needs {DEFAULT_SUNNYBROOK_ROOT}")


@needs_data
def test_bench_smoke_writes_json(tmp_path):
    assert cli(main, ["--smoke", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "smoke.json").read_text())
    assert res["lime_one_image"]["attribution_r"] > 0.99  # the torch LIME is lime's fit, measured beside it
    for k in ("training_step", "validation"):
        assert res[k]["clean" if k == "training_step" else "off"]["median_s"] > 0
    # the ASR metric really ran during validation (MONAI attaches additional metrics only beside a key metric)
    assert set(res["validation"]["asr_value"]) == {"direct", "direct_8_images", "lime"}
    assert all(0.0 <= v <= 1.0 for v in res["validation"]["asr_value"].values())
    assert [r["batch"] for r in res["direct_throughput"]] == [1, 8, 32]
    assert [r["batch"] for r in res["lime_throughput"]] == [16, 64]
    assert all(r["images_per_s"] > 0 and r["samples"] == 50 for r in res["lime_throughput"])
    # each example bundle, trained one epoch with and without the overlay (2D: 18 slices of one training patient;
    # 3D: 2 training and 1 validation subjects)
    assert set(res["bundle"]) == {"sunnybrook_lv_2d", "hippocampus_mr_3d"}
    items = {"sunnybrook_lv_2d": (18, 22), "hippocampus_mr_3d": (2, 1)}
    for name, b in res["bundle"].items():
        assert (b["train_items"], b["val_items"]) == items[name]
        assert b["overlay_prob"] == recipe_defaults()["transform"]["prob"]
        assert b["epoch"]["clean"]["median_s"] > 0 and b["epoch_ratio"] > 0 and b["validation_ratio"] > 0
        assert 0.0 <= b["validation_metrics_watermarked"]["val_wm_asr"] <= 1.0
    # the loss beside its reference implementation: same batch, fewer host reads
    for case in ("2d", "3d"):
        row = res["loss"][case]
        assert row["loss"]["aten_ops"] > 0 and row["loss"]["median_s"] > 0
        assert row["loss_dense"]["host_reads"] < row["reference"]["host_reads"]


@needs_data
def test_bench_sections(tmp_path, capsys):
    assert cli(main, ["--smoke", "--sections", "training", "--name", "train_only", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "train_only.json").read_text())
    assert res["sections"] == ["training"] and "validation" not in res and "lime_one_image" not in res
    (row,) = res["training_step"]["by_variant"]
    assert row["prob"] == recipe_defaults()["transform"]["prob"]
    assert row["keep_batch_size"] == recipe_defaults()["transform"]["keep_batch_size"]
    assert row["images_per_step"] >= res["training_step"]["batch"]
    assert "bench section: training" in capsys.readouterr().err
    assert cli(main, ["--smoke", "--sections", "speed", "--out", str(tmp_path)]) == 2
    assert "--sections: unknown 'speed'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown bench sections"):
        run(smoke=True, sections=["speed"])
