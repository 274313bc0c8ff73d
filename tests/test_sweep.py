"""The stated-spacing sweep: its grid, its search, and its corrected claim."""

from __future__ import annotations

import math
import unittest

import numpy as np
import torch
from helpers import KEY, CleanOracle, TriggerOracle, images
from parameterized import parameterized

from monai_stealthmark.verify import COARSE_EVERY, SCALE_STEP, ModelQuery, sweep_scales, verify_ownership, verify_over_scales


class ScaleTunedOracle(torch.nn.Module):
    """A watermarked network behind a pipeline that resamples by the stated spacing: the QR comes out whole only
    when the stated scale is within 0.2 % of ``scale``; within ``near`` of it a faded QR, the more of it the closer
    the scale (as a network's bits rise towards its training scale), raises the bits without decoding; elsewhere the
    answer is clean."""

    def __init__(self, scale: float, stated: float, near: float = 0.05):
        super().__init__()
        self.trigger, self.clean = TriggerOracle(KEY), CleanOracle()
        self.off = abs(math.log(stated / scale))
        self.near = near

    def forward(self, x):
        if self.off < 0.002:
            return self.trigger(x)
        if self.off < self.near:
            t, c = self.trigger(x), self.clean(x)
            keep = torch.rand(x.shape[-2:], generator=torch.Generator().manual_seed(0)) < 0.6 * (1 - self.off / self.near)
            return torch.where(keep, t, c)
        return self.clean(x)


def stamped_sweep(scale: float, **kwargs):
    return verify_over_scales(lambda s: ModelQuery(ScaleTunedOracle(scale, s)), images(4), KEY, **kwargs)


class TestSweepScales(unittest.TestCase):
    def test_geometric_grid_with_one(self):
        s = sweep_scales(0.5, 2.0)
        self.assertIn(1.0, s.tolist())
        np.testing.assert_allclose(s[1:] / s[:-1], 1 + SCALE_STEP)
        self.assertTrue(s[0] >= 0.5 and s[-1] <= 2.0)
        self.assertEqual(sweep_scales(1.0, 1.0).tolist(), [1.0])

    @parameterized.expand([((1.2, 2.0),), ((0.5, 0.9),), ((0.0, 2.0),)])
    def test_range_must_hold_one(self, bounds):
        with self.assertRaisesRegex(ValueError, "scale range must contain 1"):
            sweep_scales(*bounds)


class TestVerifyOverScales(unittest.TestCase):
    @parameterized.expand([
        ("on_the_coarse_grid", (1 + SCALE_STEP) ** (2 * COARSE_EVERY)),
        ("between_coarse_points", (1 + SCALE_STEP) ** (-3 * COARSE_EVERY + 3)),
    ])
    def test_finds_the_stated_scale(self, _, scale):
        r = stamped_sweep(scale, low=0.9, high=1.12)
        self.assertAlmostEqual(r.scale, scale, delta=scale * 0.002)
        self.assertEqual(r.asr, 1.0)
        self.assertTrue(r.verdict)
        self.assertAlmostEqual(r.p_value, min(1.0, r.report.p_value * r.n_scales))  # Bonferroni over the grid
        self.assertEqual(r.n_scales, len(sweep_scales(0.9, 1.12)))
        self.assertLess(r.probes, r.n_scales / 2)  # the search probes a fraction of the grid

    def test_scale_outside_the_range_is_not_found(self):
        r = stamped_sweep(1.6, low=0.9, high=1.12)
        self.assertEqual(r.asr, 0.0)
        self.assertFalse(r.verdict)

    def test_clean_model_never_claimed(self):
        r = verify_over_scales(lambda s: ModelQuery(CleanOracle()), images(4), KEY, low=0.9, high=1.12)
        self.assertFalse(r.verdict)
        self.assertEqual(r.asr, 0.0)
        self.assertGreater(r.p_value, 1e-3)

    def test_corrected_claim_is_weaker_than_the_single_check(self):
        scale = 1.0
        single = verify_ownership(ModelQuery(ScaleTunedOracle(scale, scale)), images(4), KEY)
        swept = stamped_sweep(scale, low=0.9, high=1.12)
        self.assertGreaterEqual(swept.p_value, single.p_value)
        self.assertIn("report", swept.to_dict())


if __name__ == "__main__":
    unittest.main()
