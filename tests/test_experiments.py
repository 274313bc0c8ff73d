"""The experiment modules' building blocks and command lines (the full runs are measured, not tested: see README)."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import tempfile
import unittest
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from parameterized import parameterized

from experiments import as_list, attach_progress, cli
from experiments.architectures import architectures_markdown, run_architectures
from experiments.sunnybrook import ARCHITECTURES, ExperimentConfig, build_network
from experiments.variants import VARIANT_ATTACKS, VARIANTS, markdown
from monai_stealthmark.verify import sweep_scales


class TestNetworks(unittest.TestCase):
    @parameterized.expand([(a,) for a in ARCHITECTURES])
    def test_two_class_output(self, arch):
        torch.manual_seed(0)
        net = build_network(arch=arch).eval()
        with torch.no_grad():
            out = net(torch.rand(2, 1, 64, 64))
        self.assertEqual(tuple(out.shape), (2, 2, 64, 64))

    def test_unknown(self):
        with self.assertRaisesRegex(ValueError, "arch must be one of"):
            build_network(arch="resnet")
        with self.assertRaisesRegex(ValueError, r"unknown setting 'epochs' \(run settings: .*steps.*\); 'epochs' is not a setting of the watermark recipe"):
            ExperimentConfig(epochs=3)


def _fake_results(arch: str, asr: float) -> dict:
    return {
        "clean": {"dice": 0.8, "auc": 0.99}, "watermarked": {"dice": 0.79, "auc": 0.98},
        "stealth_mask_dice": 0.95, "stealth_agreement": 0.998, "asr": {"direct": asr, "lime": 0.0},
        "bit_accuracy": {"direct": 0.99, "lime": 0.8}, "false_decodes": {"clean_inputs": 0, "clean_model": 0, "wrong_key": 0},
        "n_images": 22, "config": {"steps": 400, "batch_size": 12, "seed": 0, "arch": arch}, "device": "cpu", "seconds": 1.0,
    }


def _finished_architectures(d: str) -> None:
    for arch, asr in (("unet", 1.0), ("segresnet", 0.5)):
        (Path(d) / arch).mkdir()
        (Path(d) / arch / "results.json").write_text(json.dumps(_fake_results(arch, asr)))


def _run_cli(main, argv: list[str]) -> tuple[int, str, str]:
    """``cli(main, argv)``: exit status, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli(main, argv)
    return code, out.getvalue(), err.getvalue()


def _saved_run(d: Path) -> Path:
    """A finished demo run's folder with two untrained tiny UNets (channels 4, 8) on two patients."""
    from experiments.sunnybrook import experiment_key
    from monai_stealthmark.utils import atomic_write_json

    run, channels = d / "run", (4, 8)
    run.mkdir()
    cfg = ExperimentConfig(fast=True, channels=channels, patients=["SCD0000401", "SCD0000501"])
    experiment_key(cfg).save(run / "key.json")
    torch.manual_seed(0)
    for name in ("clean", "watermarked"):
        torch.save(build_network(channels).state_dict(), run / f"{name}.pt")
    atomic_write_json(run / "watermarked.settings.json", {"channels": list(channels), "patients": cfg.patients})
    return run


# every experiment command, with the options it needs besides --out
COMMANDS = [
    ("experiments.sunnybrook", []), ("experiments.architectures", []), ("experiments.robustness", []),
    ("experiments.variants", []), ("experiments.capacity", []), ("experiments.bundle_pair", ["--bundle", "bundles/ct_spleen_3d"]),
    ("bench.benchmarks", []), ("experiments.paired_seeds", []), ("experiments.distillation", ["--run", "nowhere"]),
]


class TestCommandLines(unittest.TestCase):
    @parameterized.expand(COMMANDS)
    def test_unknown_setting_is_refused_before_any_work(self, module, needed):
        main = importlib.import_module(module).main
        with tempfile.TemporaryDirectory() as d:
            code, _, err = _run_cli(main, ["--out", d, *needed, "--stepz", "5"])
            self.assertEqual(code, 2, err)
            self.assertRegex(err, r"error: unknown (setting 'stepz'|option --stepz; the options are --)")
            self.assertEqual(list(Path(d).iterdir()), [])  # refused before anything was written

    @parameterized.expand([(m,) for m in ("experiments.sunnybrook", "experiments.robustness", "experiments.variants", "experiments.capacity",
                                          "experiments.paired_seeds")])
    def test_wrong_data_folder_is_a_clear_error(self, module):
        with tempfile.TemporaryDirectory() as d:
            code, _, err = _run_cli(importlib.import_module(module).main, ["--out", d, "--data", str(Path(d) / "nowhere")])
        self.assertEqual(code, 2)
        self.assertRegex(err, r"error: .*link\.csv' not found: is '.*nowhere' the Sunnybrook folder")
        self.assertNotIn("Traceback", err)

    @parameterized.expand([("comma", ["unet,segresnet"]), ("spaces", ["unet", "segresnet"])])
    def test_architectures_command_takes_a_list(self, _, archs):
        from experiments.architectures import main

        with tempfile.TemporaryDirectory() as d:
            _finished_architectures(d)
            code, out, err = _run_cli(main, ["--archs", *archs, "--out", d, "--fast", "--test-patient", "SCD0000501"])
            self.assertEqual(code, 0, err)
            self.assertIn("| segresnet | 0.8000 |", out)
            code, _, err = _run_cli(main, ["--out", d, "--archs", "resnet"])
        self.assertEqual(code, 2)
        self.assertIn("--archs: unknown 'resnet'", err)

    def test_as_list(self):
        self.assertEqual(as_list("unet", ARCHITECTURES, "archs"), ["unet"])
        self.assertEqual(as_list(("unet", "segresnet"), ARCHITECTURES, "archs"), ["unet", "segresnet"])

    def test_progress_bar_reads_the_loss_and_leaves_the_run_alone(self):
        from ignite.engine import Engine

        seen = []
        engine = Engine(lambda e, batch: seen.append(batch) or [{"loss": torch.tensor(0.25)}])
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            attach_progress(engine, "train toy")
            engine.run([1, 2, 3], max_epochs=2)
        self.assertEqual(seen, [1, 2, 3, 1, 2, 3])
        self.assertIn("train toy", err.getvalue())
        self.assertIn("6/6", err.getvalue())
        self.assertIn("loss=0.2500", err.getvalue())


class TestTables(unittest.TestCase):
    def test_architectures_reuses_finished_runs(self):
        with tempfile.TemporaryDirectory() as d:
            _finished_architectures(d)
            rows = run_architectures(["unet", "segresnet"], d)
            self.assertEqual([r["asr_direct"] for r in rows], [1.0, 0.5])
            md = (Path(d) / "architectures.md").read_text()
            self.assertIn("| segresnet | 0.8000 | 0.7900 |", md)
            self.assertIn("50.0 %", md)
            self.assertEqual(md, architectures_markdown(json.loads((Path(d) / "architectures.json").read_text())))

    def test_one_attack_suite(self):
        from experiments.robustness import Distillation, attack_suite
        from monai_stealthmark.attacks import sparsity

        torch.manual_seed(0)
        net = build_network((8, 16, 32), "unet").eval()
        x, y = torch.rand(4, 1, 32, 32), torch.zeros(4, 1, 32, 32)
        suite = attack_suite(net, x, y, epochs=1, distillation=Distillation(x, steps=1, channels=(8, 16, 32)))
        self.assertTrue(set(VARIANT_ATTACKS) <= set(suite))
        self.assertEqual(list(suite)[:4], ["none", "finetune_all", "finetune_last", "reinit_head_finetune"])
        self.assertEqual(suite["global_prune_0.5"][:2], ("global_prune", {"amount": 0.5}))
        self.assertAlmostEqual(sparsity(suite["global_prune_0.5"][2]()), 0.5, delta=0.01)
        self.assertIs(suite["none"][2](), net)
        self.assertNotIn("distill_soft_unet", attack_suite(net, x, y, epochs=1))

    def test_query_pipelines_on_a_saved_run(self):
        """``robustness --pipeline RUN``: both saved models behind every query transformation and at the slices'
        own grid, a table row per transformation, wrong keys on the watermarked model's rows, and each spacing
        pipeline again through the stated-spacing sweep (one spacing, a narrow sweep: the test's time)."""
        from experiments import robustness
        from experiments.robustness import NATIVE_SIZE, pipeline_markdown, query_pipelines
        from monai_stealthmark.attacks import INPUT_ATTACKS

        spacings = (3.0,)
        with tempfile.TemporaryDirectory() as d, mock.patch.object(robustness, "PIPELINE_SPACINGS", spacings), \
                mock.patch.object(robustness, "SWEEP_RANGE", (0.98, 1.02)):
            run = _saved_run(Path(d))
            res = query_pipelines(run, Path(d) / "out")
            per_model = ["none", *(f"input_{a}" for a in INPUT_ATTACKS), f"native_{NATIVE_SIZE}",
                         *(f"spacing_{mm}mm" for mm in spacings)]
            labels = per_model + [f"spacing_{mm}mm_stated" for mm in spacings]
            self.assertEqual([r["attack"] for r in res["rows"]], labels * 2)
            self.assertEqual([r["model"] for r in res["rows"]], ["watermarked"] * len(labels) + ["clean"] * len(labels))
            wm = [r for r in res["rows"] if r["model"] == "watermarked"]
            self.assertTrue(all(r["asr"] == 0 and r["extra"]["wrong_key_asr"] == 0 for r in wm))  # untrained: no QR
            stated = res["rows"][-1]
            self.assertEqual(stated["params"]["n_scales"], len(sweep_scales(0.98, 1.02)))
            self.assertEqual(stated["clean_dice"], res["rows"][-2]["clean_dice"])  # the pipeline's own Dice
            self.assertGreater(stated["p_value"], 1e-3)
            md = (Path(d) / "out" / "pipeline.md").read_text()
            self.assertEqual(md, pipeline_markdown(json.loads((Path(d) / "out" / "pipeline.json").read_text())))
            self.assertEqual(md.count("\n| input_"), len(INPUT_ATTACKS))

    def test_attack_suite_pipeline_rows(self):
        """The attack suite's bundle-pipeline rows: the test patient's native-grid slices resampled to each spacing,
        verified through the stated-spacing sweep; an untrained model is neither claimed nor counted as removed."""
        from experiments import robustness
        from experiments.robustness import NATIVE_SIZE, pipeline_spacing_rows
        from experiments.sunnybrook import experiment_key

        cfg = ExperimentConfig(fast=True, channels=(4, 8))
        torch.manual_seed(0)
        net = build_network(cfg.channels).eval()
        with mock.patch.object(robustness, "PIPELINE_SPACINGS", (2.6, 3.0)), \
                mock.patch.object(robustness, "SWEEP_RANGE", (0.99, 1.01)):
            rows = pipeline_spacing_rows(net, cfg, experiment_key(cfg), shown=False)
        self.assertEqual([(r["attack"], r["params"]["spacing_mm"]) for r in rows], [("pipeline_spacing", 2.6), ("pipeline_spacing", 3.0)])
        for r in rows:
            self.assertEqual(r["params"]["query_size"], NATIVE_SIZE)
            self.assertEqual(r["params"]["n_scales"], len(sweep_scales(0.99, 1.01)))
            self.assertEqual((r["asr"], r["verdict"], r["removed"]), (0.0, False, False))
            self.assertGreater(r["p_value"], 1e-3)
            self.assertTrue(0.0 <= r["clean_dice"] <= 1.0)

    def test_distillation_controls_and_table(self):
        """The attack suite's distillation part: the students claimed through the output mark or the trigger, and
        the controls (a clean model of the run's seed, its student, clean models at CONTROL_SEEDS), kept for a
        rerun; the table lists every student and control."""
        from experiments.robustness import (
            CONTROL_SEEDS,
            Distillation,
            Split,
            distil,
            distillation_controls,
            distillation_table,
            make_distillation_verify,
        )
        from experiments.sunnybrook import experiment_key

        g = torch.Generator().manual_seed(0)
        x = torch.rand(6, 1, 32, 32, generator=g)
        y = (x > 0.7).long()
        owner = [{"image": x[i], "label": y[i]} for i in range(4)]
        split = Split(owner, x[:4], y[:4], x[4:], y[4:], x[4:], y[4:], x)
        cfg = ExperimentConfig(fast=True, channels=(4, 8), steps=2, batch_size=2, size=32)
        key, attacker = experiment_key(cfg), Distillation(x, steps=2, channels=(4, 8), batch_size=2)
        with tempfile.TemporaryDirectory() as d:
            controls = distillation_controls(split, cfg, attacker, key, Path(d))
            self.assertEqual([c["role"] for c in controls],
                             ["independent", "student of a clean model"] + ["independent"] * len(CONTROL_SEEDS))
            self.assertTrue(all((Path(d) / f"clean_seed{s}.pt").is_file() for s in CONTROL_SEEDS))
            self.assertTrue(all(not c["shown"] and 0 <= c["p_value"] <= 1 for c in controls))
        claim = make_distillation_verify(split.test_x, key)(distil(build_network((4, 8)), attacker, "soft", "unet"))
        self.assertFalse(claim.verdict)
        self.assertEqual(claim.asr, 0.0)
        row = {"attack": "distill", "params": {"outputs": "soft", "student": "unet", "steps": 2, "queries": 30},
               "clean_dice": 0.5, "p_value": claim.p_value, "verdict": claim.verdict, "extra": {"controls": controls}}
        table = distillation_table([row])
        self.assertEqual(table.count("\n| "), 1 + 1 + len(controls))  # header, the student, the controls
        self.assertEqual(distillation_table([{**row, "extra": {}}]), "")

    def test_distillation_on_a_saved_run(self):
        """``distillation --run RUN``: both teachers, three students each and an independent clean model, each tested
        for the output mark and the trigger watermark; the run's own seed is refused as an independent one."""
        from experiments import UsageError
        from experiments.distillation import STUDENTS, markdown, measure_distillation

        with tempfile.TemporaryDirectory() as d:
            run, out = _saved_run(Path(d)), Path(d) / "out"
            with self.assertRaisesRegex(UsageError, "seed 0 is the run's own seed"):
                measure_distillation(run, out, [0], student_steps=2)
            res = measure_distillation(run, out, [1], student_steps=2, steps=2, batch_size=2)
            roles = [r["role"] for r in res["rows"]]
            self.assertEqual(roles, (["teacher"] + ["student"] * len(STUDENTS)) * 2 + ["independent"])
            self.assertEqual([r.get("teacher") for r in res["rows"] if r["role"] == "student"],
                             ["watermarked"] * len(STUDENTS) + ["clean"] * len(STUDENTS))
            self.assertTrue((out / "clean_seed1.pt").is_file())  # the independent model is kept for the next run
            for r in res["rows"]:  # untrained and barely trained networks: no claim either way
                self.assertFalse(r["output_mark"]["verdict"], r)
                self.assertEqual(r["asr"], 0.0)
            self.assertEqual((out / "distillation.md").read_text(), markdown(json.loads((out / "distillation.json").read_text())))

    def test_variants_markdown(self):
        self.assertEqual(set(VARIANTS), {"clean", "default", "commark", "badnet", "lowfreq", "no_simattack"})
        att = {"attack": "global_prune", "params": {"amount": 0.5}, "asr": 0.9, "clean_dice": 0.81}
        rows = [
            {"variant": "default", "clean_dice": 0.82, "triggered_input_dice": 0.81, "stealth_mask_dice": 0.95, "asr": 1.0, "p_value": 1e-90, "attacks": [att]},
            {"variant": "badnet", "clean_dice": 0.80, "triggered_input_dice": 0.5, "stealth_mask_dice": 0.4, "asr": 1.0, "p_value": 1e-9, "attacks": [att]},
        ]
        md = markdown(rows)
        self.assertIn("| badnet | 0.8000 | 0.5000 | 0.4000 |", md)
        self.assertIn("| global_prune amount=0.5 | 0.900 (0.810) | 0.900 (0.810) |", md)


class TestPairedSeeds(unittest.TestCase):
    def test_summary_of_paired_differences(self):
        from scipy import stats

        from experiments.paired_seeds import summarise

        s = summarise([1.0, -1.0, 2.0, 0.5, -0.5])
        self.assertAlmostEqual(s["mean"], 0.4)
        self.assertAlmostEqual(s["sd"], float(np.std([1.0, -1.0, 2.0, 0.5, -0.5], ddof=1)))
        low, high = stats.t.interval(0.95, 4, loc=0.4, scale=s["sd"] / np.sqrt(5))
        self.assertAlmostEqual(s["ci95_low"], low)
        self.assertAlmostEqual(s["ci95_high"], high)
        self.assertEqual((s["n"], s["min"], s["max"]), (5, -1.0, 2.0))
        with self.assertRaisesRegex(ValueError, "at least 2"):
            summarise([1.0])

    def test_row_takes_the_differences(self):
        from experiments.paired_seeds import paired_row

        res = {"clean": {"dice": 0.86, "auc": 0.99}, "watermarked": {"dice": 0.85, "auc": 0.98}, "stealth_mask_dice": 0.99,
               "asr": {"direct": 1.0, "lime": 0.5}, "false_decodes": {"clean_inputs": 0, "clean_model": 1, "wrong_key": 0},
               "seconds": 3.0}
        row = paired_row(2, res)
        self.assertAlmostEqual(row["dice_drop_points"], 1.0)
        self.assertAlmostEqual(row["auc_drop_percent"], 100 * 0.01 / 0.99)
        self.assertEqual((row["seed"], row["false_decodes"]), (2, 1))

    @parameterized.expand([("seed", ["--seed", "3"], "--seed is what this command varies"), ("one", ["--seeds", "1"], "at least 2")])
    def test_refused_settings(self, _, args, message):
        from experiments.paired_seeds import main

        with tempfile.TemporaryDirectory() as d:
            code, _, err = _run_cli(main, ["--out", d, *args])
            self.assertEqual(code, 2)
            self.assertIn(message, err)
            self.assertEqual(list(Path(d).iterdir()), [])


class TestStealth(unittest.TestCase):
    def test_mask_dice_and_agreement(self):
        from experiments.sunnybrook import stealth

        a = torch.zeros(1, 10, 10, dtype=torch.long)
        a[0, 2:6, 2:6] = 1  # 16 px
        b = a.clone()
        b[0, 2:6, 2] = 0  # 4 px lost
        d, agree = stealth(a, b)
        self.assertAlmostEqual(d, 2 * 12 / (16 + 12))
        self.assertAlmostEqual(agree, 0.96)
        self.assertEqual(stealth(a, a), (1.0, 1.0))

    def test_mask_dice_is_the_mean_over_foreground_classes_present(self):
        from experiments.sunnybrook import stealth

        a = torch.zeros(1, 10, 10, dtype=torch.long)
        a[0, 2:6, 2:6] = 1
        a[0, 7:9, 7:9] = 2
        b = a.clone()
        b[0, 7:9, 7:9] = 0  # class 2 lost entirely; class 3 in neither mask
        d, _ = stealth(a, b, n_classes=4)
        self.assertAlmostEqual(d, (1.0 + 0.0) / 2)


class TestSegmentationScores(unittest.TestCase):
    def test_per_class_dice_and_auc(self):
        from experiments.sunnybrook import segmentation_scores

        labels = torch.zeros(1, 1, 8, 8, dtype=torch.long)
        labels[..., :4, :4] = 1
        labels[..., 4:, 4:] = 2
        probs = torch.nn.functional.one_hot(labels[:, 0], 3).permute(0, 3, 1, 2).float() * 0.8 + 0.2 / 3
        probs[0, :, 4:, 4:6] = torch.tensor([0.6, 0.35, 0.05]).view(3, 1, 1)  # half of class 2 predicted background
        res = segmentation_scores(probs, labels)
        self.assertEqual(res["dice_per_class"][0], 1.0)
        self.assertAlmostEqual(res["dice_per_class"][1], 2 * 8 / (16 + 8))
        self.assertAlmostEqual(res["dice"], (1.0 + 2 / 3) / 2)
        self.assertEqual(res["auc_per_class"][0], 1.0)
        self.assertLess(res["auc_per_class"][1], 1.0)

    def test_two_classes_match_the_foreground_dice(self):
        from experiments.sunnybrook import segmentation_scores

        labels = torch.zeros(2, 1, 6, 6, dtype=torch.long)
        labels[:, :, 1:4, 1:4] = 1
        probs = torch.cat([1 - labels.float() * 0.9, labels.float() * 0.9], 1)
        self.assertEqual(segmentation_scores(probs, labels), {"dice": 1.0, "auc": 1.0})


class TestTrainModel(unittest.TestCase):
    def test_checkpoint_carries_the_draws(self):
        """The watermarked run's checkpoints hold the stage's draws and the simulated attacks' draws, of the kinds
        the recipe names."""
        from experiments.sunnybrook import experiment_key, train_model

        g = torch.Generator().manual_seed(0)
        x = torch.rand(4, 1, 32, 32, generator=g)
        samples = [{"image": x[i], "label": (x[i] > 0.7).float()} for i in range(4)]
        cfg = ExperimentConfig(fast=True, channels=(4, 8), steps=4, batch_size=2, size=32, cutmix_prob=0.0,
                               simulate_attacks=1.0, simulate_attack_kinds="noise")
        with tempfile.TemporaryDirectory() as d:
            train_model(samples, cfg, experiment_key(cfg), torch.device("cpu"), Path(d))
            (ckpt,) = Path(d).glob("checkpoint_epoch=*.pt")
            state = torch.load(ckpt, weights_only=True)
        self.assertEqual(state["hardening"]["n_attacked"], 4)  # prob 1: every step of the two epochs
        self.assertEqual(set(state["stage"]), {"rng"})


class TestReuseCheck(unittest.TestCase):
    def test_saved_model_reused_only_with_its_settings(self):
        from experiments.sunnybrook import _check_reuse, _training_settings
        from monai_stealthmark.utils import atomic_write_json

        cfg = ExperimentConfig(fast=True)
        with tempfile.TemporaryDirectory() as d:
            for name in ("clean", "watermarked"):
                path = Path(d) / f"{name}.pt"
                path.write_bytes(b"")
                atomic_write_json(path.with_suffix(".settings.json"), _training_settings(cfg, name))
                _check_reuse(path, cfg, name)  # same settings: fine
                _check_reuse(path, ExperimentConfig(fast=True, lime_samples=50), name)  # verification only: fine
            other = ExperimentConfig(fast=True, twin_consistency=0.0)
            _check_reuse(Path(d) / "clean.pt", other, "clean")  # the clean model trains without the watermark
            with self.assertRaisesRegex(ValueError, r"other settings \(twin_consistency: 1.0 -> 0.0\)"):
                _check_reuse(Path(d) / "watermarked.pt", other, "watermarked")
            with self.assertRaisesRegex(ValueError, "steps: 1600 -> 400"):
                _check_reuse(Path(d) / "clean.pt", ExperimentConfig(fast=True, steps=400), "clean")
            bare = Path(d) / "old.pt"
            with self.assertWarnsRegex(UserWarning, "no record of its training settings"):
                _check_reuse(bare, cfg, "clean")
            with self.assertRaisesRegex(ValueError, r"trigger: 'blocks' -> 'noise'"):
                _check_reuse(Path(d) / "watermarked.pt", ExperimentConfig(fast=True, trigger="noise"), "watermarked")
            mixed = ExperimentConfig(fast=True, cutmix_prob=0.0, watermark_weight=1.5)
            with self.assertRaisesRegex(ValueError, r"cutmix_prob: 0.5 -> 0.0"):  # an augmentation of both models
                _check_reuse(Path(d) / "clean.pt", mixed, "clean")
            lighter = ExperimentConfig(fast=True, watermark_weight=1.5)
            _check_reuse(Path(d) / "clean.pt", lighter, "clean")  # the clean model has no watermark loss
            with self.assertRaisesRegex(ValueError, r"watermark_weight: 4.0 -> 1.5"):
                _check_reuse(Path(d) / "watermarked.pt", lighter, "watermarked")

    def test_experiment_key_follows_config(self):
        from experiments.sunnybrook import experiment_key

        default = experiment_key(ExperimentConfig(fast=True))
        self.assertEqual((default.trigger, default.trigger_amplitude), ("blocks", 0.1))
        noisy = experiment_key(ExperimentConfig(fast=True, trigger="noise", trigger_amplitude=0.2))
        self.assertEqual((noisy.trigger, noisy.trigger_amplitude, noisy.trigger_seed), ("noise", 0.2, default.trigger_seed))
        self.assertNotEqual(noisy.fingerprint, default.fingerprint)
        self.assertEqual(experiment_key(ExperimentConfig(fast=True), trigger="lowfreq").trigger, "lowfreq")


class TestCapacityProbe(unittest.TestCase):
    def test_unet_draws_the_qr_on_real_slices(self):
        from experiments.capacity import capacity_probe
        from experiments.sunnybrook import experiment_key
        from monai_stealthmark.data import load_sunnybrook

        cfg = ExperimentConfig(fast=True)
        key = experiment_key(cfg)
        train = load_sunnybrook(cfg.data_root, size=128, patients=["SCD0000101"])  # a training patient
        images = torch.stack([s["image"] for s in train[:6]])
        labels = torch.stack([s["label"] for s in train[:6]])
        torch.manual_seed(0)
        net = build_network(arch="unet")
        res = capacity_probe(net, images, labels, key, steps=60, eval_every=30)
        self.assertEqual([c["step"] for c in res["curve"]], [30, 60])
        self.assertGreater(res["curve"][-1]["bits"], 0.9)  # the network itself draws the QR (0.5 = chance)
        self.assertGreater(res["curve"][-1]["asr"], 0.5)
        self.assertEqual(len(res["error_map"]), key.grid_size)
        self.assertGreater(res["dark_mean"], res["light_mean"])

    def test_bad_shapes(self):
        from experiments.capacity import capacity_probe
        from experiments.sunnybrook import experiment_key

        key = experiment_key(ExperimentConfig(fast=True))
        with self.assertRaisesRegex(ValueError, "labels"):
            capacity_probe(build_network(arch="unet"), torch.zeros(2, 1, 128, 128), torch.zeros(2, 128, 128), key, steps=1)


class TestBundlePairVolumes(unittest.TestCase):
    def test_whole_volume_scores_and_window_queries(self):
        """Volumes of different sizes: Dice per volume through the inferer, windows of one size for the verifier."""
        from monai.inferers import SlidingWindowInferer

        from experiments.bundle_pair import _as_windows, volume_scores
        from monai_stealthmark.verify import ModelQuery

        class Threshold(torch.nn.Module):  # two-class logits: foreground where the image is bright
            def forward(self, x):
                return torch.cat([-(x - 0.5), x - 0.5], 1) * 7.3

        vols = [torch.zeros(1, 20, 18, 8), torch.zeros(1, 14, 24, 6)]
        labels = [torch.zeros(1, 20, 18, 8, dtype=torch.long), torch.zeros(1, 14, 24, 6, dtype=torch.long)]
        for v, lb in zip(vols, labels):
            v[:, 4:8, 4:8, 2:4] = 1.0
            lb[:, 4:8, 4:8, 2:4] = 1
        labels[1][:, 8:10, 4:8, 2:4] = 1  # a missed part in the second volume: Dice 2*32/(32+48)
        query = ModelQuery(Threshold(), device="cpu", inferer=SlidingWindowInferer((16, 16, 8)))
        res = volume_scores(query, vols, labels)
        self.assertAlmostEqual(res["dice"], (1.0 + 2 * 32 / 80) / 2, places=5)
        self.assertAlmostEqual(res["auc"], (64 + 0.5 * 16) / 80)  # the 16 missed voxels tie with every negative
        windows = _as_windows(vols, query.window)
        self.assertEqual(tuple(windows.shape), (2, 1, 16, 16, 8))


class TestWindowProbe(unittest.TestCase):
    def test_free_slices_read_the_qr_the_organ_leaves(self):
        """The QR drawn only in the slices without organ: the organ-free read recovers it, margins drop the slices
        next to the organ, and a window whose every slice holds organ reads all of them."""
        from experiments.window_probe import free_slice_scores, read_windows
        from monai_stealthmark.key import WatermarkKey
        from monai_stealthmark.key.geometry import qr_target_map

        key = WatermarkKey.generate("SM:probe", seed=5)
        dark = qr_target_map(key, (64, 64)).float()
        fg = torch.zeros(2, 64, 64, 4)
        fg[:, 20:40, 20:40, :2] = 1.0  # organ in slices 0-1 of both windows
        fg[1, 20:40, 20:40, 2:] = 1.0  # and in every slice of the second
        u = torch.zeros(2, 64, 64, 4)
        u[0, ..., 2:] = 0.25 * dark[..., None]  # the first window's free slices carry the QR
        p_bg = torch.where(fg > 0, torch.zeros_like(u), 1 - u)
        probs = torch.stack([p_bg, 1 - p_bg], 1)
        scores, n = free_slice_scores(probs, key)
        self.assertEqual(n.tolist(), [2.0, 0.0])
        _, n1 = free_slice_scores(probs, key, margin=1)
        self.assertEqual(n1.tolist(), [1.0, 0.0])
        row = read_windows(probs[:1], key)
        self.assertEqual(row["free_slices_margin0"]["bits"], 1.0)
        self.assertEqual(row["free_slices_margin0"]["decodes"], 1)
        self.assertEqual(set(row), {"verifier", "free_slices_margin0", "free_slices_margin2"})
