"""One recipe: the classes' defaults are the recipe, and the overlay and the experiments repeat none of its numbers."""

from __future__ import annotations

import json
import unittest
from pathlib import Path

from parameterized import parameterized

from experiments.sunnybrook import ExperimentConfig, experiment_key
from monai_stealthmark.handlers import SimulatedAttacks
from monai_stealthmark.key import WatermarkKey
from monai_stealthmark.losses import UncertaintyWatermarkLoss
from monai_stealthmark.recipe import RECIPE_PARTS, recipe_defaults, resolve_recipe, split_recipe
from monai_stealthmark.transforms import RandWatermarkd, WatermarkBatch

ROOT = Path(__file__).resolve().parents[1]
RECIPE_NAMES = {n for names in RECIPE_PARTS.values() for n in names}


class TestRecipe(unittest.TestCase):
    def test_defaults_come_from_the_classes(self):
        d = recipe_defaults()
        key = WatermarkKey.generate("SM:1", seed=1)
        self.assertEqual({n: getattr(key, n) for n in RECIPE_PARTS["key"]}, d["key"])
        stage = WatermarkBatch(key)
        self.assertEqual({n: getattr(stage, n) for n in RECIPE_PARTS["transform"]}, d["transform"])
        per_sample = RandWatermarkd(key=key)  # takes the stage's settings; it sees one sample, so it keeps no batch size
        shared = [n for n in RECIPE_PARTS["transform"] if n != "keep_batch_size"]
        self.assertEqual({n: getattr(per_sample, n) for n in shared}, {n: d["transform"][n] for n in shared})
        self.assertFalse(per_sample.stage.keep_batch_size)
        loss = UncertaintyWatermarkLoss(key=key)
        self.assertEqual({n: getattr(loss, n) for n in RECIPE_PARTS["loss"]}, d["loss"])
        attacks = SimulatedAttacks()
        self.assertEqual(d["hardening"], {"simulate_attacks": attacks.prob, "simulate_attack_kinds": attacks.kinds})

    def test_experiment_uses_the_recipe(self):
        cfg = ExperimentConfig(fast=True)
        self.assertEqual(cfg.watermark(), recipe_defaults())
        key = experiment_key(cfg)
        self.assertEqual({n: getattr(key, n) for n in RECIPE_PARTS["key"]}, recipe_defaults()["key"])
        self.assertEqual(cfg.to_dict()["recipe"], json.loads(json.dumps(recipe_defaults())))  # as written to results.json

    def test_sequence_setting_from_the_command_line(self):
        """``--simulate-attack-kinds noise`` reaches the config as a string, a list from JSON: both become tuples."""
        for given in ("noise", ["noise"], ("noise",)):
            self.assertEqual(ExperimentConfig(fast=True, simulate_attack_kinds=given).watermark()["hardening"]["simulate_attack_kinds"], ("noise",))

    def test_experiment_deviation_is_named_and_recorded(self):
        cfg = ExperimentConfig(fast=True, tau=0.2, margin_consistency=0.0, steps=10)
        self.assertEqual(cfg.steps, 10)
        w = cfg.watermark()
        self.assertEqual(w["key"]["tau"], 0.2)
        self.assertEqual(w["loss"]["margin_consistency"], 0.0)
        self.assertEqual(w["transform"], recipe_defaults()["transform"])
        self.assertEqual(experiment_key(cfg).tau, 0.2)
        with self.assertRaisesRegex(ValueError, "'copy_weight' is not a setting of the watermark recipe"):
            ExperimentConfig(fast=True, copy_weight=2.0)

    @parameterized.expand([("stealthmark_overlay.json",), ("stealthmark_metrics.json",), ("stealthmark_verify.json",)])
    def test_bundle_configs_repeat_no_recipe_number(self, name):
        """The overlay instantiates the recipe's classes without recipe arguments: the defaults apply."""
        found = []

        def walk(node, path):
            if isinstance(node, dict):
                target = str(node.get("_target_", ""))
                if target.endswith(("RandWatermarkd", "WatermarkBatch", "UncertaintyWatermarkLoss", "WatermarkKey")):
                    found.extend(f"{path}#{k}" for k in node if k in RECIPE_NAMES)
                for k, v in node.items():
                    walk(v, f"{path}#{k}")
            elif isinstance(node, list):
                for i, v in enumerate(node):
                    walk(v, f"{path}#{i}")

        walk(json.loads((ROOT / "bundles" / name).read_text()), name)
        self.assertEqual(found, [], "recipe settings belong to the classes' defaults")

    def test_split_and_resolve(self):
        parts = split_recipe({"tau": 0.3, "prob": 0.1, "watermark_weight": 2.0})
        self.assertEqual(parts, {"key": {"tau": 0.3}, "transform": {"prob": 0.1}, "loss": {"watermark_weight": 2.0}, "hardening": {}})
        self.assertEqual(resolve_recipe({"prob": 0.1})["transform"]["prob"], 0.1)
        with self.assertRaisesRegex(ValueError, "not a setting of the watermark recipe"):
            split_recipe({"bogus": 1})


if __name__ == "__main__":
    unittest.main()
