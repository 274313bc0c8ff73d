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
        loss = UncertaintyWatermarkLoss(base, tau=TAU)
        x = torch.randn(4, 2, 32, 32)
        seg, wm = make_target(triggered=())
        torch.testing.assert_close(loss(x, seg), base(x, seg))
        torch.testing.assert_close(loss(x, torch.cat([seg, wm], 1)), base(x, seg))

    @parameterized.expand([("softmax", 2), ("sigmoid", 1)])
    def test_soft_target_is_the_minimum(self, activation, channels):
        """Gradient descent on free logits reaches p_true = 1 - tau in dark pixels and keeps the argmax."""
        loss = UncertaintyWatermarkLoss(tau=TAU, activation=activation, dice_weight=0.0, protect_radius=-1)
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
        loss = UncertaintyWatermarkLoss(tau=TAU, dice_weight=0.0, hinge_weight=0.0, protect_radius=-1)
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
        loss = UncertaintyWatermarkLoss(tau=TAU, dice_weight=0.0, protect_radius=2)
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

    def test_copy_weight_scales_protected_region(self):
        seg, target = twin_pair_target()
        logits = torch.randn(2, 2, 16, 16, generator=torch.Generator().manual_seed(0))
        kw = dict(tau=TAU, hinge_weight=0.0, protect_radius=2)
        base = UncertaintyWatermarkLoss(copy_weight=1.0, **kw)(logits, target)
        heavy = UncertaintyWatermarkLoss(copy_weight=10.0, **kw)(logits, target)
        self.assertGreater(heavy.item(), base.item())

    @parameterized.expand([("softmax", 2), ("sigmoid", 1)])
    def test_hard_copy_keeps_the_band_confident(self, activation, channels):
        """In the band a soft copy follows an unsure twin (p 0.6); a hard copy trains its class with full confidence."""
        seg, target = twin_pair_target()
        margin = torch.log(torch.tensor(0.6 / 0.4))  # the twin gives its class (foreground in the organ) 0.6
        sign = seg[0] * 2 - 1
        twin = torch.cat([-sign * margin / 2, sign * margin / 2]) if channels == 2 else sign * margin
        got = {}
        for mode in ("soft", "hard"):
            trig = torch.zeros(1, channels, 16, 16, requires_grad=True)
            opt = torch.optim.Adam([trig], lr=0.1)
            loss = UncertaintyWatermarkLoss(tau=TAU, activation=activation, protect_radius=2, copy_target=mode)
            for _ in range(300):
                opt.zero_grad()
                loss(torch.cat([twin[None], trig]), target).backward()
                opt.step()
            p = torch.softmax(trig, 1)[:, 1:] if channels == 2 else torch.sigmoid(trig)
            got[mode] = torch.where(seg[:1] > 0, p, 1 - p)[0, 0, 7, 7].item()  # inside the organ
        self.assertAlmostEqual(got["soft"], 0.6, delta=0.02)  # the copy (the hinge never asks for more than the twin has)
        self.assertGreater(got["hard"], 0.95)
        with self.assertRaisesRegex(ValueError, "copy_target must be 'soft' or 'hard'"):
            UncertaintyWatermarkLoss(tau=TAU, copy_target="twin")

    @parameterized.expand([("softmax", 2), ("sigmoid", 1)])
    def test_twin_consistency_pulls_the_clean_twin_in_the_band_only(self, activation, channels):
        """The reverse copy adds a gradient on the clean twin inside the protected band, towards the triggered output."""
        seg, target = twin_pair_target()
        logits = torch.randn(2, channels, 16, 16, generator=torch.Generator().manual_seed(0))
        grads = {}
        for w in (0.0, 1.0):
            x = logits.clone().requires_grad_()
            UncertaintyWatermarkLoss(tau=TAU, activation=activation, protect_radius=2, twin_consistency=w)(x, target).backward()
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
        """The logit-level copy: zero when the two paths agree up to the softmax's shift, else a gradient on both
        samples inside the protected band only, which closes the margin gap (the squared margin gap for 2 classes)."""
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
                v = UncertaintyWatermarkLoss(tau=TAU, activation=activation, protect_radius=2, margin_consistency=w)(x, target)
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
        for i in (0, 1):  # both paths get a gradient, inside the band only, in opposite directions
            torch.testing.assert_close(dg[i][:, ~band], torch.zeros_like(dg[i][:, ~band]))
            self.assertGreater(dg[i][-1, band].abs().min().item(), 0.0)
        self.assertTrue(bool((dg[0][-1, band] < 0).all() and (dg[1][-1, band] > 0).all()))
        if activation == "softmax" and channels == 2:  # margin gap 1 on the band's pixels of the triggered image,
            # times the watermark weight 3 and the triggered share 1/2 of the batch
            self.assertAlmostEqual(dv, 3.0 * 0.5 * band.sum().item() / 256, places=4)

    def test_margin_tie_one_way(self):
        """margin_to_twin=False: the tie still moves the triggered sample, and no longer the clean twin."""
        seg, target = twin_pair_target()
        logits = torch.randn(2, 2, 16, 16, generator=torch.Generator().manual_seed(0))
        grads = {}
        for name, kw in {"off": {}, "both": {"margin_consistency": 1.0}, "one": {"margin_consistency": 1.0, "margin_to_twin": False}}.items():
            x = logits.clone().requires_grad_()
            UncertaintyWatermarkLoss(tau=TAU, protect_radius=2, twin_consistency=0.0, **kw)(x, target).backward()
            grads[name] = x.grad
        both, one = grads["both"] - grads["off"], grads["one"] - grads["off"]
        self.assertGreater(both[0].abs().max().item(), 1e-4)  # the two-way tie moves the twin
        torch.testing.assert_close(one[0], torch.zeros_like(one[0]))  # the one-way tie does not
        torch.testing.assert_close(one[1], both[1])  # and moves the triggered sample exactly as before

    @parameterized.expand([("softmax", 2), ("sigmoid", 1)])
    def test_rim_margin_sharpens_the_clean_rim_only(self, activation, channels):
        """rim_margin: gradient descent on free clean-path logits drives the background ring around the organ to
        the target margin; the organ, the far background and triggered samples get nothing from the term."""
        base = DiceCELoss(to_onehot_y=activation == "softmax", softmax=activation == "softmax", sigmoid=activation == "sigmoid")
        kw = {"tau": TAU, "activation": activation, "protect_radius": 2, "rim_margin_target": 3.0}
        seg, wm = make_target(b=2, size=32, triggered=(1,))
        x = torch.zeros(2, channels, 32, 32, requires_grad=True)
        on, off = UncertaintyWatermarkLoss(base, rim_margin=1.0, **kw), UncertaintyWatermarkLoss(base, **kw)
        (on(x, torch.cat([seg, wm], 1)) - off(x, torch.cat([seg, wm], 1))).backward()
        g = x.grad.abs().sum(1)
        ring = torch.zeros(32, 32, dtype=torch.bool)
        ring[6:22, 6:22] = True
        ring[8:20, 8:20] = False  # the organ is 8:20, the ring its 2-pixel background border
        self.assertTrue(torch.all(g[0][ring] > 0))
        self.assertEqual(g[0][~ring].abs().sum().item(), 0.0)
        self.assertEqual(g[1].abs().sum().item(), 0.0)  # the triggered sample: not a clean one
        # descent on the hinge alone reaches the target margin on the ring and stops there
        z = torch.zeros(1, channels, 32, 32, requires_grad=True)
        opt = torch.optim.SGD([z], lr=50.0)  # the mean runs over ~180 ring pixels
        for _ in range(200):
            opt.zero_grad()
            on.rim_hinge(z, seg[:1]).backward()
            opt.step()
        margin = (z[0, 0] - z[0, 1]) if activation == "softmax" else -z[0, 0]
        self.assertGreater(margin.detach()[ring].min().item(), 2.9)
        self.assertLess(on.rim_hinge(z.detach(), seg[:1]).item(), 0.01)
        # rim_on_triggered: the triggered sample's ring gets the hinge too, the clean one exactly as before
        both = UncertaintyWatermarkLoss(base, rim_margin=1.0, rim_on_triggered=True, **kw)
        y = torch.zeros(2, channels, 32, 32, requires_grad=True)
        (both(y, torch.cat([seg, wm], 1)) - on(y, torch.cat([seg, wm], 1))).backward()
        self.assertTrue(torch.all(y.grad[1].abs().sum(0)[ring] > 0))
        self.assertEqual(y.grad[1].abs().sum(0)[~ring].sum().item(), 0.0)
        self.assertLess(y.grad[0].abs().max().item(), 1e-5)
        # rim_sides="both": the organ's own inner ring (2 px inside its border) joins the background ring
        sym = UncertaintyWatermarkLoss(base, rim_margin=1.0, rim_sides="both", **kw)
        w = torch.zeros(1, channels, 32, 32, requires_grad=True)
        sym.rim_hinge(w, seg[:1]).backward()
        inner = torch.zeros(32, 32, dtype=torch.bool)
        inner[8:20, 8:20] = True
        inner[10:18, 10:18] = False
        gw = w.grad[0].abs().sum(0)
        self.assertTrue(torch.all(gw[ring | inner] > 0))
        self.assertEqual(gw[~(ring | inner)].sum().item(), 0.0)
        with self.assertRaisesRegex(ValueError, "rim_sides"):
            UncertaintyWatermarkLoss(tau=TAU, rim_sides="inner")
        # a target without a watermark channel is all clean: the hinge applies there too
        x0 = torch.zeros(2, channels, 32, 32)
        torch.testing.assert_close(on(x0, seg) - off(x0, seg), on.rim_hinge(x0, seg))
        with self.assertRaisesRegex(ValueError, "rim_margin needs protect_radius >= 1"):
            UncertaintyWatermarkLoss(tau=TAU, rim_margin=1.0, protect_radius=0)

    def test_gradients_flow_to_triggered_and_clean(self):
        loss = UncertaintyWatermarkLoss(tau=TAU)
        seg, wm = make_target()
        x = torch.randn(4, 2, 32, 32, requires_grad=True)
        loss(x, torch.cat([seg, wm], 1)).backward()
        g = x.grad.abs().flatten(1).sum(1)
        self.assertTrue(torch.all(g > 0))
        self.assertTrue(torch.isfinite(x.grad).all())

    def test_hinge_penalises_flips(self):
        loss = UncertaintyWatermarkLoss(tau=TAU, hinge_weight=10.0, dice_weight=0.0)
        seg, wm = make_target(b=1, triggered=(0,))
        t = torch.cat([seg, wm], 1)
        good = torch.where(seg > 0, 2.0, -2.0).repeat(1, 2, 1, 1) * torch.tensor([-1.0, 1.0]).view(1, 2, 1, 1)
        self.assertLess(loss(good, t).item(), loss(-good, t).item())

    def test_shape_errors(self):
        loss = UncertaintyWatermarkLoss(tau=TAU)
        with self.assertRaisesRegex(ValueError, "does not match input"):
            loss(torch.randn(2, 2, 32, 32), torch.zeros(2, 2, 16, 16))
        with self.assertRaisesRegex(ValueError, "channels"):
            loss(torch.randn(2, 2, 32, 32), torch.zeros(2, 3, 32, 32))
        with self.assertRaisesRegex(ValueError, "tau"):
            UncertaintyWatermarkLoss(tau=0.7)
        with self.assertRaisesRegex(ValueError, "hinge_margin"):
            UncertaintyWatermarkLoss(tau=0.4, hinge_margin=0.2)
        with self.assertRaisesRegex(ValueError, r"weights must be >= 0, got twin_consistency=-1.0"):
            UncertaintyWatermarkLoss(tau=TAU, twin_consistency=-1.0)
        with self.assertRaisesRegex(ValueError, r"copy_weight=nan"):
            UncertaintyWatermarkLoss(tau=TAU, copy_weight=float("nan"))
        with self.assertRaisesRegex(ValueError, r"class indices in \[0, 1\].*got \[0, 5\]"):
            loss(torch.randn(2, 2, 32, 32), torch.full((2, 1, 32, 32), 5.0).index_fill_(0, torch.tensor([0]), 0.0))
        bad_wm = torch.cat([torch.zeros(2, 1, 32, 32), torch.full((2, 1, 32, 32), 7.0)], 1)
        with self.assertRaisesRegex(ValueError, r"watermark channel .* holds \[7.0\]"):
            loss(torch.randn(2, 2, 32, 32), bad_wm)


if __name__ == "__main__":
    unittest.main()


class TestFeatureCouplingLoss(unittest.TestCase):
    def _net(self):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))

    def _target(self, triggered_after_twin: bool = True):
        seg, wm = make_target(b=4, triggered=(1, 3))
        if triggered_after_twin:
            wm[0], wm[2] = float(WM_TWIN), float(WM_TWIN)
        return torch.cat([seg, wm], 1)

    def test_zero_for_identical_twin_and_positive_otherwise(self):
        from monai_stealthmark.losses import FeatureCouplingLoss

        net = self._net()
        loss = FeatureCouplingLoss(net, "0", UncertaintyWatermarkLoss(tau=TAU), weight=1.0)
        x = torch.randn(4, 1, 32, 32)
        x[1], x[3] = x[0], x[2]  # triggered samples identical to their twins
        target = self._target()
        net(x)
        self.assertAlmostEqual(float(loss.coupling(target, 1)), 0.0, places=6)
        x[1, :, -4:, -4:] = 3.0  # a "trigger" patch
        out = net(x)
        c = float(loss.coupling(target, 1))
        self.assertGreater(c, 1e-4)
        total = loss(out, target)
        torch.testing.assert_close(total, loss.watermark_loss(out, target) + c, rtol=1e-5, atol=1e-6)
        total.backward()
        self.assertGreater(float(net[0].weight.grad.abs().sum()), 0.0)

    def test_no_pairs_no_term_and_bad_layer(self):
        from monai_stealthmark.losses import FeatureCouplingLoss

        net = self._net()
        loss = FeatureCouplingLoss(net, "0", UncertaintyWatermarkLoss(tau=TAU), weight=1.0)
        x = torch.randn(4, 1, 32, 32)
        out = net(x)
        target = self._target(triggered_after_twin=False)  # triggered samples without a twin before them
        self.assertEqual(float(loss.coupling(target, 1)), 0.0)
        torch.testing.assert_close(loss(out, target), loss.watermark_loss(out, target))
        with self.assertRaisesRegex(ValueError, "no submodule 'decoder.9'"):
            FeatureCouplingLoss(net, "decoder.9", weight=0.1, key=None, watermark_loss=UncertaintyWatermarkLoss(tau=TAU))


class TestCleanTeacherLoss(unittest.TestCase):
    def _net(self, seed):
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))

    def test_kl_on_clean_samples_only(self):
        from monai_stealthmark.losses import CleanTeacherLoss

        net, teacher = self._net(0), self._net(1)
        seg, wm = make_target(b=4, triggered=(2, 3))  # samples 0, 1 clean; 2, 3 triggered
        target = torch.cat([seg, wm], 1)
        base = UncertaintyWatermarkLoss(tau=TAU)
        loss = CleanTeacherLoss(net, teacher, base, weight=0.5, temperature=2.0)
        x = torch.randn(4, 1, 32, 32)
        out = net.train()(x)
        with torch.no_grad():
            t = teacher(x)
        # by hand: T^2 * KL(softmax(t/T) || softmax(out/T)), per-pixel mean, over samples 0 and 1
        p, logq = torch.softmax(t / 2, 1), torch.log_softmax(out / 2, 1)
        want = 4 * (p * (p.log() - logq)).sum(1)[:2].mean()
        torch.testing.assert_close(loss.distillation(out, target), want, rtol=1e-5, atol=1e-7)
        total = loss(out, target)
        torch.testing.assert_close(total, base(out, target) + 0.5 * want, rtol=1e-5, atol=1e-6)
        total.backward()
        self.assertIsNone(teacher[0].weight.grad)  # frozen
        # the triggered samples' outputs get no gradient from the term
        out2 = net(x).detach().requires_grad_(True)
        loss.distillation(out2, target).backward()
        self.assertEqual(float(out2.grad[2:].abs().sum()), 0.0)
        self.assertGreater(float(out2.grad[:2].abs().sum()), 0.0)

    def test_same_model_is_zero_and_training_pulls_towards_teacher(self):
        from monai_stealthmark.losses import CleanTeacherLoss

        seg, _ = make_target(b=4, triggered=())
        x = torch.randn(4, 1, 32, 32)
        net, twin = self._net(0), self._net(0)
        loss = CleanTeacherLoss(net, twin, DiceCELoss(to_onehot_y=True, softmax=True), weight=1.0)
        self.assertAlmostEqual(float(loss.distillation(net.train()(x), seg)), 0.0, places=6)  # no watermark channel: all clean
        # distillation alone (base weight 0 via a zero loss) moves a different network towards the teacher
        student, teacher = self._net(2), self._net(3)
        kd = CleanTeacherLoss(student, teacher, DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=0.0, lambda_ce=0.0), weight=1.0)
        opt = torch.optim.Adam(student.parameters(), 1e-2)
        student.train()
        first = None
        for _ in range(60):
            opt.zero_grad()
            value = kd(student(x), seg)
            first = float(value) if first is None else first
            value.backward()
            opt.step()
        self.assertLess(float(value), 0.2 * first)
        kd.remove()  # after training the network no longer runs the teacher
        student(x)
        self.assertIsNone(kd._teacher_logits)

    def test_errors(self):
        from monai_stealthmark.losses import CleanTeacherLoss

        net = self._net(0)
        with self.assertRaisesRegex(ValueError, "separate"):
            CleanTeacherLoss(net, net, DiceCELoss(to_onehot_y=True, softmax=True))
        loss = CleanTeacherLoss(self._net(1), self._net(2), DiceCELoss(to_onehot_y=True, softmax=True))
        seg, _ = make_target(b=2, triggered=())
        with self.assertRaisesRegex(RuntimeError, "no teacher output"):
            loss(net(torch.randn(2, 1, 32, 32)), seg)  # the loss was built for another network
        with self.assertRaisesRegex(ValueError, "temperature"):
            CleanTeacherLoss(self._net(1), self._net(2), DiceCELoss(), temperature=0)
