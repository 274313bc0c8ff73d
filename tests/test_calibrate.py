"""Calibrated claims: empirical null of clean models, commitment dates, and a bounded forgery search."""

from __future__ import annotations

import json
import unittest
from pathlib import Path
from tempfile import TemporaryDirectory
from unittest import mock

import numpy as np
import torch
from monai.networks.nets import BasicUNet, UNet

from experiments import null_models
from monai_stealthmark.__main__ import main
from monai_stealthmark.key import WatermarkKey
from monai_stealthmark.verify import Commitment, ModelQuery, NullDistribution, calibrate_null, verify_ownership

from helpers import TriggerOracle, images

KEY = WatermarkKey.generate("SM:calib", seed=21)


def clean_net(seed: int, arch: str = "unet") -> torch.nn.Module:
    torch.manual_seed(seed)
    if arch == "unet":
        return UNet(2, 1, 2, channels=(8, 16, 32), strides=(2, 2), num_res_units=1).eval()
    return BasicUNet(2, 1, 2, features=(8, 8, 16, 16, 32, 8)).eval()


class TestCalibration(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.x = images(4)
        nets = [clean_net(s) for s in range(4)] + [clean_net(9, "basic"), clean_net(10, "basic")]
        cls.null = calibrate_null([ModelQuery(n, device="cpu") for n in nets], cls.x, KEY, [f"m{i}" for i in range(6)])

    def test_null_is_near_chance_and_round_trips(self):
        self.assertEqual(len(self.null.agreements), 6)
        self.assertTrue(0.3 < self.null.mean < 0.7, self.null.agreements)
        with TemporaryDirectory() as tmp:
            self.null.save(Path(tmp) / "null.json")
            again = NullDistribution.load(Path(tmp) / "null.json")
        self.assertEqual(again.agreements, self.null.agreements)
        with self.assertRaisesRegex(ValueError, "at least 2"):
            NullDistribution("x", [0.5], ["a"], 1)

    def test_watermarked_passes_clean_fails_with_null(self):
        rep = verify_ownership(ModelQuery(TriggerOracle(KEY), device="cpu"), self.x, KEY, null=self.null)
        self.assertTrue(rep.verdict)
        self.assertLess(rep.calibration["p_gaussian"], 1e-6)
        self.assertAlmostEqual(rep.calibration["p_empirical"], 1 / 7)
        clean = verify_ownership(ModelQuery(clean_net(77), device="cpu"), self.x, KEY, null=self.null)
        self.assertFalse(clean.verdict)
        self.assertGreater(clean.calibration["p_gaussian"], 1e-6)
        with self.assertRaisesRegex(ValueError, "another key"):
            verify_ownership(ModelQuery(clean_net(1), device="cpu"), self.x, KEY.replace(trigger_seed=3), null=self.null)

    def test_commitment_dates(self):
        q = ModelQuery(TriggerOracle(KEY), device="cpu")
        early = Commitment.for_key(KEY, "2026-01-01T00:00:00+00:00")
        ok = verify_ownership(q, self.x, KEY, commitment=early, suspect_date="2026-06-01")
        self.assertTrue(ok.verdict and ok.commitment["admissible"])
        late = verify_ownership(q, self.x, KEY, commitment=early, suspect_date="2025-12-01")
        self.assertFalse(late.verdict)  # a key committed after the suspect appeared is flagged, whatever the statistics
        self.assertIn("after the suspect model's date", " ".join(late.commitment["flags"]))
        other = Commitment.for_key(KEY.replace(trigger_seed=99), "2026-01-01")
        forged = verify_ownership(q, self.x, KEY, commitment=other, suspect_date="2026-06-01")
        self.assertFalse(forged.verdict)
        self.assertIn("fingerprint differs", " ".join(forged.commitment["flags"]))
        self.assertIn("FLAGGED", forged.to_markdown())

    def test_bounded_forgery_search_never_reaches_the_threshold(self):
        """An adversary searches 200 trigger seeds for one under which a clean model 'decodes' or looks
        watermarked: none may decode, and the best p-value must stay far above alpha."""
        q = ModelQuery(clean_net(123), device="cpu")
        x = self.x[:2]
        best_p, decodes = 1.0, 0
        for seed in range(200):
            k = KEY.replace(trigger_seed=10_000 + seed)
            rep = verify_ownership(q, x, k)
            best_p = min(best_p, rep.p_value)
            decodes += sum(t == k.payload for t in rep.decoded)
            self.assertFalse(rep.verdict)
        self.assertEqual(decodes, 0)
        self.assertGreater(best_p, 1e-6)


def clean_models_on_disk(tmp: Path, seeds) -> list[str]:
    """TorchScript files of clean nets (what `calibrate --models` reads)."""
    models = []
    for s in seeds:
        path = tmp / f"clean{s}.ts"
        torch.jit.trace(clean_net(s), torch.rand(1, 1, 128, 128)).save(str(path))
        models.append(str(path))
    return models


def images_on_disk(tmp: Path, n: int = 3) -> Path:
    (tmp / "imgs").mkdir()
    for i, img in enumerate(images(n, size=128)):
        np.save(tmp / "imgs" / f"{i}.npy", img[0].numpy())
    return tmp / "imgs"


class TestCalibrateCLI(unittest.TestCase):
    def test_calibrate_then_verify(self):
        with TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            assert main(["keygen", "--payload", "SM:cli", "--seed", "4", "--out", str(tmp / "key.json")]) == 0
            commitment = json.loads((tmp / "key.commitment.json").read_text())
            key = WatermarkKey.load(tmp / "key.json")
            self.assertEqual(commitment["fingerprint"], key.fingerprint)
            images_on_disk(tmp)
            models = clean_models_on_disk(tmp, range(3))
            code = main(["calibrate", "--key", str(tmp / "key.json"), "--images", str(tmp / "imgs"), "--models", *models, "--out", str(tmp / "null.json")])
            self.assertEqual(code, 0)
            self.assertEqual(len(json.loads((tmp / "null.json").read_text())["agreements"]), 3)
            code = main([
                "verify", "--key", str(tmp / "key.json"), "--images", str(tmp / "imgs"), "--model", models[0], "--null", str(tmp / "null.json"),
                "--commitment", str(tmp / "key.commitment.json"), "--suspect-date", "2099-01-01", "--out", str(tmp / "rep"), "--quiet",
            ])
            self.assertEqual(code, 1)
            rep = json.loads((tmp / "rep" / "report.json").read_text())
            self.assertTrue(rep["commitment"]["admissible"])
            self.assertEqual(rep["calibration"]["n_models"], 3)


class TestNullModelsScript(unittest.TestCase):
    """``python -m experiments.null_models``: trained clean models (training stubbed here) plus model files."""

    def test_trains_then_writes_the_null(self):
        samples = [{"patient": p} for p in ("SCD0000501", "SCD0000101", "SCD0000201")]
        trained = []

        def fake_train(train, cfg, key, device):
            trained.append((len(train), cfg.arch, cfg.seed, cfg.steps, key))
            return clean_net(cfg.seed)

        with TemporaryDirectory() as tmp, mock.patch.object(null_models, "load_sunnybrook", return_value=samples), \
                mock.patch.object(null_models, "train_model", side_effect=fake_train):
            tmp = Path(tmp)
            KEY.save(tmp / "key.json")
            imgs = images_on_disk(tmp, 2)
            model = clean_models_on_disk(tmp, [5])[0]
            argv = ["--key", str(tmp / "key.json"), "--images", str(imgs), "--train", "2", "--steps", "7", "--models", model]
            self.assertEqual(null_models.main([*argv, "--out", str(tmp / "null.json")]), 0)
            null = NullDistribution.load(tmp / "null.json")
        self.assertEqual(trained, [(2, "unet", 1000, 7, None), (2, "basicunet", 1001, 7, None)])  # held-out patient left out
        self.assertEqual(null.models, [model, "unet seed 1000 (7 steps)", "basicunet seed 1001 (7 steps)"])
        self.assertEqual((null.key_fingerprint, null.n_images, len(null.agreements)), (KEY.fingerprint, 2, 3))

    def test_fewer_than_two_models_refused(self):
        with self.assertRaisesRegex(SystemExit, "at least 2 clean models"):
            null_models.main(["--key", "k.json", "--images", "d", "--train", "1", "--out", "n.json"])


if __name__ == "__main__":
    unittest.main()
