from __future__ import annotations

import unittest

import torch
from monai.losses import DiceCELoss
from parameterized import parameterized

from monai_stealthmark.losses import UncertaintyWatermarkLoss
from monai_stealthmark.key import WM_CLEAN, WM_DARK, WM_LIGHT, WM_TWIN

TAU = 0.2


def make_target(b=4, size=32, triggered=(2, 3)):
    seg = torch.zeros(b, 1, size, size)
    seg[:, :, 8:20, 8:20] = 1
    wm = torch.full((b, 1, size, size), float(WM_CLEAN))
    for i in triggered:
        wm[i] = WM_LIGHT
        wm[i, :, :, : size // 2] = WM_DARK
    return seg, wm


def twin_pair_target(size: int = 16):
    """A clean twin and its triggered copy (all dark) with a 4x4 organ at 6:10: ``(seg, seg + watermark channel)``."""
    seg = torch.zeros(2, 1, size, size)
    seg[:, :, 6:10, 6:10] = 1
    wm = torch.stack([torch.full((1, size, size), float(WM_TWIN)), torch.full((1, size, size), float(WM_DARK))])
    return seg, torch.cat([seg, wm], 1)


class TestUncertaintyWatermarkLoss(unittest.TestCase):
    def test_clean_only_equals_base(self):
        base = DiceCELoss(to_onehot_y=True, softmax=True)
        loss = UncertaintyWatermarkLoss(base, tau=TAU, output_mark_weight=0.0)
        x = torch.randn(4, 2, 32, 32)
        seg, wm = make_target(triggered=())
        torch.testing.assert_close(loss(x, seg), base(x, seg))
        torch.testing.assert_close(loss(x, torch.cat([seg, wm], 1)), base(x, seg))

    @parameterized.expand([("softmax", 2), ("sigmoid", 1)])
    def test_soft_target_is_the_minimum(self, activation, channels):
        """Gradient descent on free logits reaches p_true = 1 - tau in dark pixels and keeps the argmax."""
        loss = UncertaintyWatermarkLoss(tau=TAU, output_mark_weight=0.0, activation=activation, dice_weight=0.0, protect_radius=-1)
        seg, wm = make_target(b=2, triggered=(0, 1))
        target = torch.cat([seg, wm], 1)
        logits = torch.zeros(2, channels, 32, 32, requires_grad=True)
        opt = torch.optim.Adam([logits], lr=0.1)
        for _ in range(300):
            opt.zero_grad()
            val = loss(logits, target)
            val.backward()
            opt.step()
        self.assertTrue(torch.isfinite(val))
        with torch.no_grad():
            if activation == "softmax":
                p_fg = torch.softmax(logits, 1)[:, 1:]
            else:
                p_fg = torch.sigmoid(logits)
        dark = wm == WM_DARK
        p_true = torch.where(seg > 0, p_fg, 1 - p_fg)
        self.assertAlmostEqual(p_true[dark].mean().item(), 1 - TAU, delta=0.03)
        self.assertGreater(p_true[~dark].mean().item(), 0.95)
        self.assertTrue(torch.equal((p_fg > 0.5).float(), seg))  # hard segmentation unchanged

    def test_twin_target_follows_clean_prediction(self):
        """With a clean twin, the dark target keeps the twin's predicted class (not the label's)."""
        loss = UncertaintyWatermarkLoss(tau=TAU, output_mark_weight=0.0, dice_weight=0.0, hinge_weight=0.0, protect_radius=-1)
        seg = torch.ones(2, 1, 8, 8)  # label says foreground everywhere
        wm = torch.stack([torch.full((1, 8, 8), float(WM_TWIN)), torch.full((1, 8, 8), float(WM_DARK))])
        twin_logits = torch.tensor([3.0, -3.0]).view(1, 2, 1, 1).expand(1, 2, 8, 8)  # the twin predicts background
        trig = torch.zeros(1, 2, 8, 8, requires_grad=True)
        opt = torch.optim.Adam([trig], lr=0.1)
        for _ in range(200):
            opt.zero_grad()
            loss(torch.cat([twin_logits, trig]), torch.cat([seg, wm], 1)).backward()
            opt.step()
        p_bg = torch.softmax(trig, 1)[:, 0]
        self.assertAlmostEqual(p_bg.mean().item(), 1 - TAU, delta=0.03)

    def test_foreground_and_band_protected(self):
        """Foreground pixels and a band around them stay confident; the QR lives in the background."""
        loss = UncertaintyWatermarkLoss(tau=TAU, output_mark_weight=0.0, dice_weight=0.0, protect_radius=2)
        seg, wm = make_target(b=1, triggered=(0,))
        wm[:] = WM_DARK
        target = torch.cat([seg, wm], 1)
        logits = torch.zeros(1, 2, 32, 32, requires_grad=True)
        opt = torch.optim.Adam([logits], lr=0.1)
        for _ in range(300):
            opt.zero_grad()
            loss(logits, target).backward()
            opt.step()
        p_true = torch.softmax(logits, 1).gather(1, seg.long())[0, 0].detach()
        self.assertGreater(p_true[8:20, 8:20].min().item(), 0.95)  # organ
        self.assertGreater(p_true[6, 10].item(), 0.95)  # band, 2 px outside
        self.assertAlmostEqual(p_true[28, 28].item(), 1 - TAU, delta=0.03)  # background far away

    @parameterized.expand([("softmax", 2), ("sigmoid", 1)])
    def test_hard_copy_keeps_the_band_confident(self, activation, channels):
        """In the band the triggered path copies an unsure twin's (p 0.6) class with full confidence, not its softness
        (the margin tie, which pulls the logits towards the twin's own margin, is off here to isolate the copy)."""
        seg, target = twin_pair_target()
        margin = torch.log(torch.tensor(0.6 / 0.4))  # the twin gives its class (foreground in the organ) 0.6
        sign = seg[0] * 2 - 1
        twin = torch.cat([-sign * margin / 2, sign * margin / 2]) if channels == 2 else sign * margin
        trig = torch.zeros(1, channels, 16, 16, requires_grad=True)
        opt = torch.optim.Adam([trig], lr=0.1)
        loss = UncertaintyWatermarkLoss(tau=TAU, output_mark_weight=0.0, activation=activation, protect_radius=2, margin_consistency=0.0)
        for _ in range(300):
            opt.zero_grad()
            loss(torch.cat([twin[None], trig]), target).backward()
            opt.step()
        p = torch.softmax(trig, 1)[:, 1:] if channels == 2 else torch.sigmoid(trig)
        self.assertGreater(torch.where(seg[:1] > 0, p, 1 - p)[0, 0, 7, 7].item(), 0.95)  # inside the organ

    @parameterized.expand([("softmax", 2), ("sigmoid", 1)])
    def test_twin_consistency_pulls_the_clean_twin_in_the_band_only(self, activation, channels):
        """The reverse copy adds a gradient on the clean twin inside the protected band, towards the triggered output."""
        seg, target = twin_pair_target()
        logits = torch.randn(2, channels, 16, 16, generator=torch.Generator().manual_seed(0))
        grads = {}
        for w in (0.0, 1.0):
            x = logits.clone().requires_grad_()
            UncertaintyWatermarkLoss(tau=TAU, output_mark_weight=0.0, activation=activation, protect_radius=2, twin_consistency=w)(x, target).backward()
            grads[w] = x.grad
        extra = grads[1.0] - grads[0.0]
        band = torch.zeros(16, 16, dtype=torch.bool)
        band[4:12, 4:12] = True
        torch.testing.assert_close(extra[1], torch.zeros_like(extra[1]))  # the triggered sample's gradient is unchanged
        torch.testing.assert_close(extra[0][:, ~band], torch.zeros_like(extra[0][:, ~band]))
        self.assertGreater(extra[0][:, band].abs().min().item(), 0.0)
        prob = (lambda z: torch.softmax(z, 0)) if activation == "softmax" else torch.sigmoid
        gap = lambda z: (prob(z)[:, band] - prob(logits[1])[:, band]).abs().sum().item()
        self.assertLess(gap(logits[0] - 50.0 * extra[0]), gap(logits[0]))  # a step moves the twin towards it

    @parameterized.expand([("softmax", 2), ("softmax", 3), ("sigmoid", 1)])
    def test_margin_consistency_ties_the_logits_in_the_band_only(self, activation, channels):
        """The logit-level copy: zero when the two paths agree up to the softmax's shift, else a gradient on the
        triggered sample only (the twin is detached), inside the protected band only, towards the twin's margins
        (the squared margin gap for 2 classes)."""
        seg, target = twin_pair_target()
        twin = torch.randn(1, channels, 16, 16, generator=torch.Generator().manual_seed(0))
        band = torch.zeros(16, 16, dtype=torch.bool)
        band[4:12, 4:12] = True
        shift = 0.0 if activation == "sigmoid" else 5.0  # a shift of every logit leaves the softmax unchanged

        def extra(trig):
            x = torch.cat([twin, trig]).requires_grad_()
            vals = []
            for w in (0.0, 1.0):
                x.grad = None
                v = UncertaintyWatermarkLoss(tau=TAU, output_mark_weight=0.0, activation=activation, protect_radius=2, margin_consistency=w)(x, target)
                v.backward()
                vals.append((v.item(), x.grad.clone()))
            return vals[1][0] - vals[0][0], vals[1][1] - vals[0][1]

        if activation == "softmax":
            dv, dg = extra(twin + shift)
            self.assertAlmostEqual(dv, 0.0, places=5)
            torch.testing.assert_close(dg, torch.zeros_like(dg))
        trig = twin.clone()
        trig[:, -1] += 1.0  # the last class's logit one higher everywhere
        dv, dg = extra(trig)
        self.assertGreater(dv, 0.0)
        torch.testing.assert_close(dg[0], torch.zeros_like(dg[0]))  # the clean twin never follows through this term
        torch.testing.assert_close(dg[1][:, ~band], torch.zeros_like(dg[1][:, ~band]))
        self.assertGreater(dg[1][-1, band].abs().min().item(), 0.0)
        self.assertTrue(bool((dg[1][-1, band] > 0).all()))  # the raised logit is pushed back down
        if activation == "softmax" and channels == 2:  # margin gap 1 on the band's pixels of the triggered image,
            # times the watermark weight and the triggered share 1/2 of the batch
            w = UncertaintyWatermarkLoss(tau=TAU, output_mark_weight=0.0).watermark_weight
            self.assertAlmostEqual(dv, w * 0.5 * band.sum().item() / 256, places=4)

    def test_gradients_flow_to_triggered_and_clean(self):
        loss = UncertaintyWatermarkLoss(tau=TAU, output_mark_weight=0.0)
        seg, wm = make_target()
        x = torch.randn(4, 2, 32, 32, requires_grad=True)
        loss(x, torch.cat([seg, wm], 1)).backward()
        g = x.grad.abs().flatten(1).sum(1)
        self.assertTrue(torch.all(g > 0))
        self.assertTrue(torch.isfinite(x.grad).all())

    def test_hinge_penalises_flips(self):
        loss = UncertaintyWatermarkLoss(tau=TAU, output_mark_weight=0.0, hinge_weight=10.0, dice_weight=0.0)
        seg, wm = make_target(b=1, triggered=(0,))
        t = torch.cat([seg, wm], 1)
        good = torch.where(seg > 0, 2.0, -2.0).repeat(1, 2, 1, 1) * torch.tensor([-1.0, 1.0]).view(1, 2, 1, 1)
        self.assertLess(loss(good, t).item(), loss(-good, t).item())

    def test_shape_errors(self):
        loss = UncertaintyWatermarkLoss(tau=TAU, output_mark_weight=0.0)
        with self.assertRaisesRegex(ValueError, "does not match input"):
            loss(torch.randn(2, 2, 32, 32), torch.zeros(2, 2, 16, 16))
        with self.assertRaisesRegex(ValueError, "channels"):
            loss(torch.randn(2, 2, 32, 32), torch.zeros(2, 3, 32, 32))
        with self.assertRaisesRegex(ValueError, "tau"):
            UncertaintyWatermarkLoss(tau=0.7)
        with self.assertRaisesRegex(ValueError, "hinge_margin"):
            UncertaintyWatermarkLoss(tau=0.4, hinge_margin=0.2)
        with self.assertRaisesRegex(ValueError, r"weights must be >= 0, got twin_consistency=-1.0"):
            UncertaintyWatermarkLoss(tau=TAU, output_mark_weight=0.0, twin_consistency=-1.0)
        with self.assertRaisesRegex(ValueError, r"twin_consistency=nan"):
            UncertaintyWatermarkLoss(tau=TAU, output_mark_weight=0.0, twin_consistency=float("nan"))
        with self.assertRaisesRegex(ValueError, r"class indices in \[0, 1\].*got \[0, 5\]"):
            loss(torch.randn(2, 2, 32, 32), torch.full((2, 1, 32, 32), 5.0).index_fill_(0, torch.tensor([0]), 0.0))
        bad_wm = torch.cat([torch.zeros(2, 1, 32, 32), torch.full((2, 1, 32, 32), 7.0)], 1)
        with self.assertRaisesRegex(ValueError, r"watermark channel .* holds \[7.0\]"):
            loss(torch.randn(2, 2, 32, 32), bad_wm)


if __name__ == "__main__":
    unittest.main()
