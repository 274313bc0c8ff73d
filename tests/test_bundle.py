"""The bundle overlay merged onto both example bundles, run in-process with MONAI's ConfigParser."""

from __future__ import annotations

import json
import unittest
from pathlib import Path

import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser

from monai_stealthmark.bundle import (
    BundleConfigError,
    attach_watermark,
    bundle_parser,
    find_engine_ids,
    run_ownership_check,
)
from monai_stealthmark.data import DEFAULT_SUNNYBROOK_ROOT
from monai_stealthmark.handlers import SimulatedAttacks
from monai_stealthmark.key import KeyFileError, WatermarkKey
from monai_stealthmark.losses import UncertaintyWatermarkLoss
from monai_stealthmark.transforms import WatermarkPrepareBatch

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = ROOT / "bundles"
OVERLAY = BUNDLES / "stealthmark_overlay.json"
METRICS = BUNDLES / "stealthmark_metrics.json"
VERIFY = BUNDLES / "stealthmark_verify.json"
HAVE_DATA = DEFAULT_SUNNYBROOK_ROOT.is_dir() and (DEFAULT_SUNNYBROOK_ROOT.parent / "totalseg-ct").is_dir()


def _parser(bundle: str, files: list, tmp: Path, key_file: str | None, **overrides) -> ConfigParser:
    return bundle_parser(BUNDLES / bundle, files, tmp, key_file, overrides)


def _train(parser: ConfigParser):
    parser.get_parsed_content("initialize")
    trainer = parser.get_parsed_content("train#trainer")
    trainer.run()
    return trainer, parser.get_parsed_content("validate#evaluator")


@pytest.fixture(scope="module")
def key_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("key") / "key.json"
    WatermarkKey.generate("SM:bundle", seed=11).save(path)
    return str(path)


@pytest.mark.skipif(not HAVE_DATA, reason="needs ../shared/data")
@pytest.mark.parametrize("bundle", ["sunnybrook_lv_2d", "ct_spleen_3d"])
def test_overlay_trains_and_reports_dice_auc_asr(bundle, tmp_path, key_file):
    parser = _parser(bundle, ["train.json", str(OVERLAY)], tmp_path, key_file, max_epochs=1, val_interval=1)
    trainer, evaluator = _train(parser)
    assert isinstance(trainer.loss_function, UncertaintyWatermarkLoss)
    assert isinstance(trainer.loss_function.base_loss, type(parser.get_parsed_content("loss")))
    assert isinstance(trainer.prepare_batch, WatermarkPrepareBatch)  # the stage runs on collated batches
    m = evaluator.state.metrics
    for name in ("val_mean_dice", "val_auc", "val_wm_asr", "val_wm_asr_bit_acc", "val_wm_score"):
        assert name in m, name
    # the checkpoint rule: an epoch without the QR scores its Dice minus 1, and the bundle's saver keeps the best score
    assert evaluator.state.key_metric_name == "val_wm_score"
    assert m["val_wm_score"] == pytest.approx(m["val_mean_dice"] - 1.0)
    assert 0.0 <= m["val_auc"] <= 1.0 and 0.0 <= m["val_wm_asr"] <= 1.0
    assert 0.2 < m["val_wm_asr_bit_acc"] < 0.8  # one epoch: no watermark yet, bits at chance
    # the bundle's own train metric saw the plain label (the watermark channel was stripped after the loss)
    assert "train_mean_dice" in trainer.state.metrics
    assert trainer.state.output[0]["label"].shape[0] == 2  # one-hot of the plain label, not 2 + 1 channels
    assert (tmp_path / "models" / "model.pt").is_file()
    # the overlay left the bundle's own files as they were: the plain bundle still trains without the key
    clean = _parser(bundle, ["train.json"], tmp_path / "clean", None, max_epochs=1, val_interval=1)
    trainer_c, ev_c = _train(clean)
    assert not isinstance(trainer_c.loss_function, UncertaintyWatermarkLoss)
    assert "val_mean_dice" in ev_c.state.metrics and "val_wm_asr" not in ev_c.state.metrics


@pytest.mark.skipif(not HAVE_DATA, reason="needs ../shared/data")
def test_metrics_overlay_and_verify_config(tmp_path, key_file):
    bundle = "sunnybrook_lv_2d"
    parser = _parser(bundle, ["train.json", str(METRICS)], tmp_path, key_file, max_epochs=1, val_interval=1)
    trainer, evaluator = _train(parser)
    assert not isinstance(trainer.loss_function, UncertaintyWatermarkLoss)  # a clean model, monitored
    assert evaluator.state.metrics["val_wm_asr"] == 0.0
    # the verification entry on the trained checkpoint: writes the report, no training code
    v = _parser(bundle, ["inference.json", str(VERIFY)], tmp_path, key_file)
    v.get_parsed_content("run")
    rep = json.loads((tmp_path / "eval" / "ownership" / "report_direct.json").read_text())
    assert rep["n_images"] == 22 and rep["asr"] == 0.0 and rep["verdict"] == "not shown"


@pytest.mark.skipif(not HAVE_DATA, reason="needs ../shared/data")
def test_overlay_errors_name_the_problem(tmp_path, key_file):
    p = _parser("sunnybrook_lv_2d", ["train.json", str(OVERLAY)], tmp_path, None)
    with pytest.raises(RuntimeError) as err:  # MONAI wraps the error of a config expression
        p.get_parsed_content("stealthmark#key")
    assert isinstance(err.value.__cause__, KeyFileError) and "--key_file" in str(err.value.__cause__)
    # the engines the overlay needs: a clear message naming them
    with pytest.raises(BundleConfigError, match="trainer"):
        attach_watermark(None, None, key_file)
    with pytest.raises(BundleConfigError, match="evaluator"):
        attach_watermark(p.get_parsed_content("train#trainer"), object(), key_file)
    bare = ConfigParser({"network": 1})
    with pytest.raises(BundleConfigError, match="train#trainer"):
        find_engine_ids(bare)
    assert find_engine_ids(ConfigParser({"trainer": 1, "evaluator": 2})) == ("trainer", "evaluator")


@pytest.mark.skipif(not HAVE_DATA, reason="needs ../shared/data")
def test_attach_passes_the_output_mark_weight(tmp_path, key_file):
    for weight, expected in ((None, UncertaintyWatermarkLoss(key=key_file).output_mark_weight), (0.0, 0.0)):
        trainer = _parser("sunnybrook_lv_2d", ["train.json"], tmp_path, None).get_parsed_content("train#trainer")
        attach_watermark(trainer, None, key_file, output_mark_weight=weight)
        assert trainer.loss_function.output_mark_weight == expected


@pytest.mark.skipif(not HAVE_DATA, reason="needs ../shared/data")
def test_attach_trains_at_simulated_attacks(tmp_path, key_file):
    """The recipe's hardening comes with the overlay (SimulatedAttacks at its default share); 0 turns it off."""
    for share, expected in ((None, [SimulatedAttacks().prob]), (0.5, [0.5]), (0.0, [])):
        trainer = _parser("sunnybrook_lv_2d", ["train.json"], tmp_path, None).get_parsed_content("train#trainer")
        attach_watermark(trainer, None, key_file, simulate_attacks=share)
        handlers = [h for h, *_ in trainer._event_handlers[Events.ITERATION_STARTED]]
        assert [h.__self__.prob for h in handlers if isinstance(getattr(h, "__self__", None), SimulatedAttacks)] == expected


def _tiny_trainer(epochs: int, handlers=()):
    """A SupervisedTrainer on synthetic 2D batches (image, class-index label), as a bundle builds one."""
    from monai.engines import SupervisedTrainer
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 2, 3, padding=1)
    data = [{"image": torch.rand(2, 1, 32, 32), "label": (torch.rand(2, 1, 32, 32) > 0.8).float()} for _ in range(2)]
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=epochs, train_data_loader=data, network=net,
        optimizer=torch.optim.SGD(net.parameters(), 0.0), loss_function=DiceCELoss(to_onehot_y=True, softmax=True),
    )
    for make in handlers:
        make(trainer, net).attach(trainer)
    return trainer


def test_draw_states_join_the_training_checkpoints(tmp_path, key_file):
    """The stage's and the simulated attacks' draws are saved with a checkpoint that holds the trainer (not in a
    model-only file) and restored by the bundle's CheckpointLoader: the resumed run continues the draws."""
    from monai.handlers import CheckpointLoader, CheckpointSaver

    def savers(trainer, net):
        return _Both(CheckpointSaver(str(tmp_path / "train"), {"trainer": trainer, "model": net}, save_interval=1,
                                     n_saved=1, file_prefix="ckpt"),
                     CheckpointSaver(str(tmp_path / "model"), {"model": net}, save_final=True, final_filename="model.pt"))

    whole = _tiny_trainer(2)
    attach_watermark(whole, None, key_file, seed=3)
    whole.run()
    first = _tiny_trainer(1, [savers])
    attach_watermark(first, None, key_file, seed=3)
    first.run()
    ckpt = torch.load(next((tmp_path / "train").glob("ckpt*.pt")), weights_only=False)
    assert {"stealthmark_stage", "stealthmark_attacks", "trainer", "model"} <= set(ckpt)
    shipped = torch.load(tmp_path / "model" / "model.pt", weights_only=True)
    assert not any(k.startswith("stealthmark") for k in shipped)  # the model file reveals nothing of the watermark
    path = str(next((tmp_path / "train").glob("ckpt*.pt")))
    resumed = _tiny_trainer(2, [lambda t, n: CheckpointLoader(path, {"trainer": t, "model": n})])
    attach_watermark(resumed, None, key_file, seed=99)  # another seed: the checkpoint decides the draws
    resumed.run()
    assert resumed.state.epoch == 2
    for name in ("stage", "attacks"):
        got, want = _draw_object(resumed, name), _draw_object(whole, name)
        assert got.R.rand() == want.R.rand(), name
    # a checkpoint written without the draws: the run resumes from its seed and says so
    torch.save({"trainer": ckpt["trainer"], "model": ckpt["model"]}, tmp_path / "old.pt")
    old = _tiny_trainer(2, [lambda t, n: CheckpointLoader(str(tmp_path / "old.pt"), {"trainer": t, "model": n})])
    attach_watermark(old, None, key_file, seed=99)
    with pytest.warns(UserWarning, match="stealthmark_stage, stealthmark_attacks"):
        old.run()


class _Both:
    def __init__(self, *handlers):
        self.handlers = handlers

    def attach(self, engine):
        for h in self.handlers:
            h.attach(engine)


def _draw_object(trainer, name: str):
    if name == "stage":
        return trainer.prepare_batch.stage
    return next(h.__self__ for h, *_ in trainer._event_handlers[Events.ITERATION_STARTED]
                if isinstance(getattr(h, "__self__", None), SimulatedAttacks))


def test_run_ownership_check_errors(tmp_path, key_file):
    net = torch.nn.Conv2d(1, 2, 1)
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        run_ownership_check(net, [{"image": torch.zeros(1, 8, 8)}], key_file, tmp_path, checkpoint=tmp_path / "none.pt")
    with pytest.raises(ValueError, match="empty"):
        run_ownership_check(net, [], key_file, tmp_path)


if __name__ == "__main__":
    unittest.main()
