"""The two bundle layouts the overlay must work on, run for one epoch on CPU (tests/bundles/):

- ``flat_2d``: model-zoo's ventricular_short_axis_3label layout (top-level ``trainer``, ``train_transforms``,
  ``evaluator``; NPZDictItemDataset; 2D UNet with 4 outputs for 3 label classes; SimpleInferer).
- ``crops_3d``: model-zoo's spleen_ct_segmentation layout (``train#trainer``, ``train#random_transforms`` ending in
  ``RandCropByPosNegLabeld`` with 4 samples per volume; SlidingWindowInferer on validation volumes larger than the
  window), also under ``torchrun`` with 2 processes (gloo) through its ``multi_gpu_train.json``.

``run_bundle`` takes extra config files (e.g. an overlay) merged after the bundle's own config. The module is also
the script that ``torchrun`` starts: ``python tests/test_bundle_layouts.py BUNDLE_DIR ROOT OUT OVERRIDES CFG...``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import unittest
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from parameterized import parameterized

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "tests" / "bundles"
OVERLAY = REPO / "bundles" / "stealthmark_overlay.json"

# bundle -> (trainer id, evaluator id)
LAYOUTS = {"flat_2d": ("trainer", "evaluator"), "crops_3d": ("train#trainer", "validate#evaluator")}


def run_bundle(
    bundle_dir: str | os.PathLike,
    bundle_root: str | os.PathLike,
    extra_configs: Sequence[str | os.PathLike] = (),
    overrides: Mapping | None = None,
    config: str | Sequence[str] = "train.json",
):
    """Run a bundle the way ``python -m monai.bundle run`` does (``initialize``, ``run``, ``finalize``), in process.

    Args:
        bundle_dir: the bundle folder (with ``configs/``).
        bundle_root: where the run writes (``bundle_root`` setting: ``models/``, ``eval/``).
        extra_configs: config files merged after the bundle's own (an overlay), model-zoo ``+``/``~`` keys allowed.
        overrides: id -> value set after merging (``max_epochs`` defaults to 1).
        config: the bundle's config file name(s) under ``configs/``.

    Returns:
        the ``ConfigParser``; its parsed objects (trainer, evaluator) are the ones that ran.
    """
    from monai.bundle import ConfigParser

    names = [config] if isinstance(config, str) else list(config)
    files = [str(Path(bundle_dir) / "configs" / n) for n in names] + [str(f) for f in extra_configs]
    parser = ConfigParser()
    parser.read_config(files)
    parser.update({"bundle_root": str(bundle_root), "max_epochs": 1, **dict(overrides or {})})
    for section in ("initialize", "run", "finalize"):
        for i in range(len(parser.get(section, []) or [])):
            parser.get_parsed_content(f"{section}#{i}")
    return parser


def _metrics(engine) -> dict:
    return {k: float(v) for k, v in engine.state.metrics.items() if isinstance(v, (int, float))}


def _finite(x) -> bool:
    return isinstance(x, float) and math.isfinite(x)


class TestBundleLayouts(unittest.TestCase):
    @parameterized.expand([(name, *ids) for name, ids in LAYOUTS.items()])
    def test_one_epoch(self, name, trainer_id, evaluator_id):
        with tempfile.TemporaryDirectory() as root:
            parser = run_bundle(BUNDLES / name, root)
            trainer = parser.get_parsed_content(trainer_id)
            evaluator = parser.get_parsed_content(evaluator_id)
            self.assertEqual(trainer.state.epoch, 1)
            self.assertGreater(trainer.state.iteration, 0)
            self.assertTrue(_finite(float(trainer.state.output[0]["loss"])))
            dice = _metrics(evaluator).get("val_mean_dice")
            self.assertTrue(_finite(dice), f"val_mean_dice {dice!r} in {evaluator.state.metrics}")
            self.assertTrue(0.0 <= dice <= 1.0)
            self.assertEqual(evaluator.state.epoch, 1)
            self.assertTrue((Path(root) / "models" / "model.pt").is_file())
            if name == "crops_3d":  # the properties the overlay tests rely on
                crop = parser.get_parsed_content("train#random_transforms")[-1]
                self.assertEqual(type(crop).__name__, "RandCropByPosNegLabeld")
                self.assertEqual(crop.cropper.num_samples, 4)
                self.assertEqual(len(trainer.state.batch), parser["batch_size"] * 4)  # decollated crops
                self.assertEqual(type(evaluator.inferer).__name__, "SlidingWindowInferer")
                roi = parser.get_parsed_content("roi_size")
                shape = evaluator.state.batch[0]["image"].shape[1:]
                self.assertTrue(all(s >= r for s, r in zip(shape, roi)) and any(s > r for s, r in zip(shape, roi)))
            else:
                self.assertEqual(parser.get_parsed_content("network_def").out_channels, 4)
                self.assertEqual(type(evaluator.inferer).__name__, "SimpleInferer")
                labels = torch.cat([b["label"].flatten() for b in parser.get_parsed_content("val_dataset")])
                self.assertEqual(sorted(labels.unique().tolist()), [0.0, 1.0, 2.0])

    @parameterized.expand([(name, *ids) for name, ids in LAYOUTS.items()])
    def test_overlay_one_epoch(self, name, trainer_id, evaluator_id):
        """The unchanged overlay on both layouts: the flat one names its engines with one override."""
        from monai_stealthmark.key import WatermarkKey
        from monai_stealthmark.transforms import WatermarkPrepareBatch

        with tempfile.TemporaryDirectory() as root:
            key_file = Path(root) / "key.json"
            WatermarkKey.generate("SM:1", seed=3).save(key_file)
            overrides = {"key_file": str(key_file)}
            if trainer_id == "trainer":
                overrides["stealthmark#engines"] = ["@trainer", "@evaluator"]
            parser = run_bundle(BUNDLES / name, root, extra_configs=[OVERLAY], overrides=overrides)
            trainer = parser.get_parsed_content(trainer_id)
            evaluator = parser.get_parsed_content(evaluator_id)
            self.assertIsInstance(trainer.prepare_batch, WatermarkPrepareBatch)
            self.assertEqual(trainer.state.epoch, 1)
            self.assertTrue(_finite(float(trainer.state.output[0]["loss"])))
            n_crops = parser["batch_size"] * (4 if name == "crops_3d" else 1)
            n_trig = int(trainer.prepare_batch.stage.draws.triggered.sum())
            self.assertLessEqual(len(trainer.state.batch), n_crops)  # the loader's (last) batch
            self.assertGreater(n_trig, 0)
            # the triggered copies trained and were stripped after the loss: the bundle's post-processing and train
            # metrics see the loaded samples the step trained on (with keep_batch_size the last ones gave way to the
            # copies), with the plain label
            kept = trainer.prepare_batch.stage.keep_batch_size
            self.assertEqual(len(trainer.state.output), len(trainer.state.batch) - (n_trig if kept else 0))
            self.assertEqual(len({tuple(o["label"].shape) for o in trainer.state.output}), 1)  # all post-processed alike
            m = _metrics(evaluator)
            for metric in ("val_mean_dice", "val_auc", "val_wm_asr", "val_wm_asr_bit_acc", "val_wm_score"):
                self.assertTrue(_finite(m.get(metric)), f"{metric} missing in {m}")
            if name == "flat_2d":  # several foreground classes: AUC per class and their mean
                per_class = [m[f"val_auc_class{c}"] for c in (1, 2)]
                self.assertAlmostEqual(m["val_auc"], sum(per_class) / 2, places=6)
            self.assertTrue((Path(root) / "models" / "model.pt").is_file())

    @unittest.skipUnless(
        torch.distributed.is_available() and torch.distributed.is_gloo_available(), "torchrun (gloo) unavailable"
    )
    @parameterized.expand([("plain", False), ("overlay", True)])
    def test_crops_3d_torchrun_two_processes(self, _, overlay):
        with tempfile.TemporaryDirectory() as root:
            out = Path(root) / "metrics"
            overrides, extra = {}, []
            if overlay:
                from monai_stealthmark.key import WatermarkKey

                WatermarkKey.generate("SM:1", seed=3).save(Path(root) / "key.json")
                overrides, extra = {"key_file": str(Path(root) / "key.json")}, [str(OVERLAY)]
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__]
            cmd += [str(BUNDLES / "crops_3d"), root, str(out), json.dumps(overrides), "train.json", "multi_gpu_train.json"]
            cmd += extra
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
            self.assertEqual(proc.returncode, 0, proc.stdout[-3000:] + proc.stderr[-3000:])
            ranks = [json.loads(Path(f"{out}_rank{r}.json").read_text()) for r in range(2)]
            for r in ranks:
                self.assertEqual(r["world_size"], 2)
                self.assertEqual(r["train_epoch"], 1)
                self.assertTrue(r["ddp"])
                self.assertTrue(_finite(r["val"].get("val_mean_dice")), r)
            # the metrics are gathered over both ranks' validation volumes: the same values on each
            names = ("val_mean_dice", "val_auc", "val_wm_asr", "val_wm_asr_bit_acc") if overlay else ("val_mean_dice",)
            for metric in names:
                self.assertAlmostEqual(ranks[0]["val"][metric], ranks[1]["val"][metric], places=6, msg=metric)
            if overlay:  # each rank draws its own triggers
                self.assertNotEqual(ranks[0]["draws"], ranks[1]["draws"])
            self.assertTrue((Path(root) / "models" / "model.pt").is_file())  # saved by rank 0 only


def _distributed_main(argv: Sequence[str]) -> None:
    """Entry point under torchrun: run the bundle on this rank, write ``OUT_rank{r}.json`` with what ran."""
    bundle_dir, root, out, overrides, *configs = argv
    rank = int(os.environ.get("RANK", "0"))
    parser = run_bundle(bundle_dir, root, overrides=json.loads(overrides), config=configs)
    trainer_id, evaluator_id = LAYOUTS[Path(bundle_dir).name]
    trainer = parser.get_parsed_content(trainer_id)
    evaluator = parser.get_parsed_content(evaluator_id)
    result = {
        "rank": rank,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "ddp": isinstance(trainer.network, torch.nn.parallel.DistributedDataParallel),
        "train_epoch": trainer.state.epoch,
        "val": _metrics(evaluator),
        "draws": getattr(getattr(trainer.prepare_batch, "stage", None), "draws", None) is not None
        and trainer.prepare_batch.stage.draws.hidden.tolist(),
    }
    Path(f"{out}_rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    _distributed_main(sys.argv[1:])
