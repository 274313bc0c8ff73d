"""The output mark: the key's cells, the loss term that teaches it, the detector, and a small network that
learns it (and a student distilled from that network that inherits it) against a clean one."""

from __future__ import annotations

import io
import json
import tempfile
import unittest
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import torch
from helpers import KEY
from monai.networks.nets import UNet
from parameterized import parameterized
from scipy import stats

from monai_stealthmark.__main__ import main
from monai_stealthmark.attacks import distill
from monai_stealthmark.key import WatermarkKey
from monai_stealthmark.key.output_mark import (
    OUTPUT_MARK_CELLS,
    OUTPUT_MARK_LEVEL,
    output_mark_cells,
    output_mark_target,
)
from monai_stealthmark.losses import UncertaintyWatermarkLoss
from monai_stealthmark.verify import ModelQuery, NotProbabilitiesError, detect_output_mark

SIZE = 64


def disc_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy images with one bright disc each and its label."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, SIZE, SIZE, generator=g) * 0.2
    y = torch.zeros(n, 1, SIZE, SIZE)
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    for i in range(n):
        c = torch.randint(16, 48, (2,), generator=g)
        disc = (yy - c[0]) ** 2 + (xx - c[1]) ** 2 < 64
        y[i, 0][disc] = 1
        x[i, 0][disc] += 0.7
    return x, y


def marked_answers(key: WatermarkKey, level: float = OUTPUT_MARK_LEVEL / 2):
    """A black box whose background carries the key's output mark (softmax, two classes)."""

    def query(x):
        fg = (x[:, 0] > 0.6).float() * 0.98 + 0.01
        fg = torch.maximum(fg, level * output_mark_target(key, x.shape[2:]) / OUTPUT_MARK_LEVEL + 0.001)
        return torch.stack([1 - fg, fg], 1)

    return query


def plain_answers(x):
    fg = torch.nn.functional.avg_pool2d(x, 5, 1, 2)[:, 0].clamp(0.001, 0.999) * 0.4
    return torch.stack([1 - fg, fg], 1)


def train(weight: float, steps: int = 300) -> torch.nn.Module:
    torch.manual_seed(0)
    net = UNet(2, 1, 2, (8, 16, 32, 64), (2, 2, 2), num_res_units=2)
    loss = UncertaintyWatermarkLoss(key=KEY, output_mark_weight=weight)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for step in range(steps):
        x, y = disc_data(8, seed=step)
        target = torch.cat([y, torch.zeros_like(y)], 1)  # every row clean (watermark code 0)
        opt.zero_grad()
        loss(net(x), target).backward()
        opt.step()
    return net.eval()


class TestOutputMarkCells(unittest.TestCase):
    def test_keyed_reproducible_and_balanced(self):
        cells = output_mark_cells(KEY)
        self.assertEqual(cells.shape, (OUTPUT_MARK_CELLS**2,))
        self.assertEqual(int(cells.sum()), OUTPUT_MARK_CELLS**2 // 2)
        self.assertTrue(torch.equal(cells, output_mark_cells(WatermarkKey.from_dict(KEY.to_dict()))))
        other = output_mark_cells(KEY.replace(trigger_seed=KEY.trigger_seed + 1))
        self.assertLess((cells == other).float().mean().item(), 0.65)  # another key: about half the cells agree

    @parameterized.expand([("2d", (64, 48)), ("3d", (32, 32, 5))])
    def test_target_map(self, _, shape):
        t = output_mark_target(KEY, shape)
        self.assertEqual(tuple(t.shape), shape)
        np.testing.assert_allclose(sorted(t.unique().tolist()), [0.0, OUTPUT_MARK_LEVEL], rtol=1e-6)
        if len(shape) == 3:  # the grid repeats along the third axis
            self.assertTrue(all(torch.equal(t[..., 0], t[..., k]) for k in range(shape[2])))


class TestOutputMarkLoss(unittest.TestCase):
    def test_needs_the_key(self):
        with self.assertRaisesRegex(ValueError, "output_mark_weight > 0 needs the watermark key"):
            UncertaintyWatermarkLoss(tau=0.2, output_mark_weight=1.0)

    def test_term_is_lowest_at_the_target(self):
        _, y = disc_data(2, seed=0)
        target = torch.cat([y, torch.zeros_like(y)], 1)
        plain = UncertaintyWatermarkLoss(key=KEY, output_mark_weight=0.0)
        marked = UncertaintyWatermarkLoss(key=KEY, output_mark_weight=1.0)

        def logits(fg):
            return torch.log(torch.stack([1 - fg, fg], 1))

        confident = y[:, 0] * 0.98 + 0.01
        carrying = torch.maximum(confident, output_mark_target(KEY, (SIZE, SIZE)).expand_as(confident))
        self.assertLess(marked(logits(carrying), target).item() - plain(logits(carrying), target).item(),
                        marked(logits(confident), target).item() - plain(logits(confident), target).item())
        # a batch without the watermark channel (validation, plain training) gets the base loss only
        self.assertAlmostEqual(marked(logits(confident), y).item(), plain(logits(confident), y).item(), places=6)


class TestDetectOutputMark(unittest.TestCase):
    def test_marked_plain_and_wrong_key(self):
        x, _ = disc_data(4, seed=1)
        shown = detect_output_mark(marked_answers(KEY), x, KEY)
        self.assertTrue(shown.verdict)
        self.assertLess(shown.p_value, 1e-20)
        self.assertGreater(shown.effect, 0)
        self.assertFalse(detect_output_mark(plain_answers, x, KEY).verdict)
        self.assertFalse(detect_output_mark(marked_answers(KEY), x, KEY.replace(trigger_seed=KEY.trigger_seed + 1)).verdict)

    def test_sigmoid_output(self):
        x, _ = disc_data(3, seed=2)
        one_channel = lambda z: marked_answers(KEY)(z)[:, 1:]
        self.assertTrue(detect_output_mark(one_channel, x, KEY).verdict)

    def test_refuses_hard_masks(self):
        x, _ = disc_data(2, seed=3)
        with self.assertRaises(NotProbabilitiesError):
            detect_output_mark(lambda z: (marked_answers(KEY)(z) > 0.5).float(), x, KEY)

    def test_t_test_matches_the_randomisation_test(self):
        # the key's split is a fair draw of half the cells: the t-test approximates the exact randomisation test
        rng = np.random.default_rng(0)
        means = rng.normal(size=OUTPUT_MARK_CELLS**2) + np.linspace(0, 2, OUTPUT_MARK_CELLS**2)  # spatial trend
        raised = output_mark_cells(KEY).numpy()
        means[raised] += 0.25
        t = stats.ttest_ind(means[raised], means[~raised], equal_var=False, alternative="greater").pvalue
        perm = stats.permutation_test((means[raised], means[~raised]), lambda a, b: a.mean() - b.mean(),
                                      alternative="greater", n_resamples=20000, random_state=0).pvalue
        self.assertLess(abs(np.log10(t) - np.log10(perm)), 0.3, (t, perm))


class TestLearnedOutputMark(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.marked, cls.plain = train(1.0), train(0.0)
        cls.x, cls.y = disc_data(6, seed=10_000)

    def test_a_trained_network_carries_it_and_a_clean_one_does_not(self):
        marked = detect_output_mark(ModelQuery(self.marked, device="cpu"), self.x, KEY)
        self.assertTrue(marked.verdict, marked)
        plain = detect_output_mark(ModelQuery(self.plain, device="cpu"), self.x, KEY)
        self.assertFalse(plain.verdict, plain)
        self.assertGreater(plain.p_value, 1e-3)
        # the hard masks are the clean network's: the output mark stays below the decision threshold
        with torch.no_grad():
            agree = (self.marked(self.x).argmax(1) == self.plain(self.x).argmax(1)).float().mean().item()
        self.assertGreater(agree, 0.99)

    def test_a_student_inherits_it(self):
        queries, _ = disc_data(24, seed=20_000)
        for teacher, expected in ((self.marked, True), (self.plain, False)):
            torch.manual_seed(1)
            student = distill(ModelQuery(teacher, device="cpu"), UNet(2, 1, 2, (8, 16, 32, 64), (2, 2, 2), num_res_units=2),
                              queries, steps=600, lr=3e-3, batch_size=8)
            report = detect_output_mark(ModelQuery(student, device="cpu"), self.x, KEY)
            self.assertEqual(report.verdict, expected, report)

    def test_cli_claims_by_the_output_mark(self):
        # `verify --output-mark`: the trigger test fails on both networks (neither learned a trigger); the output mark
        # shows the marked one (exit 0, output_mark.json) and not the clean one (exit 1)
        with tempfile.TemporaryDirectory() as d:
            KEY.save(f"{d}/key.json")
            Path(f"{d}/images").mkdir()
            for i, image in enumerate(self.x):
                np.save(f"{d}/images/{i}.npy", image[0].numpy())
            for name, net, expected in (("marked", self.marked, 0), ("plain", self.plain, 1)):
                torch.jit.trace(net, self.x[:1]).save(f"{d}/{name}.ts")
                with redirect_stdout(io.StringIO()) as out, redirect_stderr(io.StringIO()):
                    code = main(["verify", "--key", f"{d}/key.json", "--images", f"{d}/images", "--size", "0", "--model",
                                 f"{d}/{name}.ts", "--output-mark", "--out", f"{d}/{name}", "--quiet"])
                self.assertEqual(code, expected, out.getvalue())
                report = json.loads(Path(f"{d}/{name}/output_mark.json").read_text())
                self.assertEqual(report["verdict"], expected == 0)
                self.assertIn("output mark on 6 clean images", out.getvalue())
            with redirect_stderr(io.StringIO()) as err:
                code = main(["verify", "--key", f"{d}/key.json", "--images", f"{d}/images", "--answers", d, "--manifest",
                             f"{d}/m.json", "--output-mark", "--out", f"{d}/offline"])
            self.assertEqual(code, 2)
            self.assertIn("--output-mark reads answers to clean images", err.getvalue())
