"""The batch-level watermark stage equals the per-sample transform on the same draws, and runs as a trainer's
prepare_batch."""

from __future__ import annotations

import unittest

import numpy as np
import torch
from helpers import KEY
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from parameterized import parameterized

from monai_stealthmark.key import (
    WM_CLEAN,
    WM_DARK,
    WM_LIGHT,
    WM_TWIN,
    apply_trigger,
    intensity_range,
    module_index_map,
    occlude_cells,
    qr_target_map,
)
from monai_stealthmark.losses import UncertaintyWatermarkLoss
from monai_stealthmark.transforms import WatermarkBatch, WatermarkPrepareBatch
from monai_stealthmark.transforms.batch import PIPELINE_DEGRADATIONS, degrade
from monai_stealthmark.utils import dilate


def batch(n=6, spatial=(64, 64), channels=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(n, channels, *spatial, generator=g) * torch.linspace(0.5, 300, n).view(-1, *([1] * (len(spatial) + 1)))
    lab = torch.zeros(n, 1, *spatial)
    lab[:, :, 20:34, 22:38] = 1
    lab[1:2] = 0  # one sample without organ (when there are two)
    return img, lab


def per_sample_reference(stage: WatermarkBatch, img, lab):
    """The same draws applied one image at a time with the per-image trigger, occlusion, QR target and pipeline
    degradation."""
    key, d = stage.key, stage.draws
    cell_of = module_index_map(img.shape[2:], key.grid_size)
    images, labels = [], []
    for i in range(img.shape[0]):
        x, y = img[i], lab[i]
        code = -1 if d.degradations is None else int(d.degradations[i])
        pipeline = (lambda t: degrade(t[None].float(), *PIPELINE_DEGRADATIONS[code])[0]) if code >= 0 else (lambda t: t)
        lo_hi = intensity_range(x)
        if d.triggered[i]:
            hidden = torch.as_tensor(d.hidden[i]).clone()
            near = dilate((y > 0).any(0)[None, None], stage.spare_radius, in_plane=True)[0, 0]
            hidden[cell_of[near].unique()] = False
            stamped = apply_trigger(occlude_cells(x.float(), key, hidden, lo_hi), key, lo_hi)
            dark = qr_target_map(key, x.shape[1:]) & ~hidden[cell_of]
            codes = torch.where(dark, WM_DARK, WM_LIGHT).float()[None]
            images += [pipeline(x), pipeline(stamped)]
            labels += [torch.cat([y, torch.full_like(codes, WM_TWIN)]), torch.cat([y, codes])]
            continue
        if d.decoy_seeds[i] >= 0:
            x = pipeline(apply_trigger(x, key, lo_hi, seed=int(d.decoy_seeds[i])))
        images.append(x)
        labels.append(torch.cat([y, torch.full_like(y[:1], WM_CLEAN)]))
    return torch.stack(images), torch.stack(labels)


class TestWatermarkBatch(unittest.TestCase):
    @parameterized.expand([
        ("patch_2d", "patch", (64, 64), 1),
        ("keyed_patch_2d", "keyed_patch", (64, 64), 2),
        ("noise_3d", "noise", (40, 36, 6), 1),
        ("patch_3d", "patch", (48, 48, 8), 1),
        ("blocks_2d_degraded", "blocks", (64, 64), 1, 1.0),
        ("blocks_3d_degraded", "blocks", (40, 36, 6), 2, 0.7),
    ])
    def test_equals_per_sample_reference(self, _, kind, spatial, channels, degrade_prob=0.0):
        stage = WatermarkBatch(KEY.replace(trigger=kind), prob=0.5, decoy_prob=0.5, keep_batch_size=False,
                               degrade_prob=degrade_prob)
        stage.set_random_state(3)
        img, lab = batch(8, spatial, channels)
        exact = degrade_prob == 0  # a degraded row goes through the blur with the rows that share its degradation
        for _ in range(3):  # several batches of one stream
            out_img, out_lab = stage(img, lab)
            ref_img, ref_lab = per_sample_reference(stage, img, lab)
            torch.testing.assert_close(out_img, ref_img, rtol=0 if exact else 1e-5, atol=0 if exact else 1e-4)
            torch.testing.assert_close(out_lab, ref_lab, rtol=0, atol=0)
        self.assertTrue(stage.draws.triggered.any() and (stage.draws.decoy_seeds >= 0).any())
        if degrade_prob:
            codes = stage.draws.degradations
            self.assertTrue((codes >= 0).any())
            self.assertTrue(bool((codes[~stage.draws.triggered & (stage.draws.decoy_seeds < 0)] == -1).all()))

    def test_degradation_off_keeps_the_draws(self):
        """degrade_prob 0 draws nothing more: the other draws of a stream do not depend on the option."""
        img, lab = batch(10)
        plain = WatermarkBatch(KEY, degrade_prob=0.0).set_random_state(4)
        degraded = WatermarkBatch(KEY, degrade_prob=0.5).set_random_state(4)
        plain(img, lab)
        degraded(img, lab)
        self.assertIsNone(plain.draws.degradations)
        np.testing.assert_array_equal(plain.draws.triggered, degraded.draws.triggered)
        np.testing.assert_array_equal(plain.draws.decoy_seeds, degraded.draws.decoy_seeds)

    @parameterized.expand([((64, 64),), ((32, 30, 8),)])
    def test_degrade(self, spatial):
        x = torch.rand(3, 2, *spatial)
        torch.testing.assert_close(degrade(x, 0.0, 1.0), x)
        for sigma, factor in PIPELINE_DEGRADATIONS[1:]:
            y = degrade(x, sigma, factor)
            self.assertEqual(y.shape, x.shape)
            self.assertLess(float(y.std()), float(x.std()))  # both smooth white noise
        self.assertEqual(degrade(x.double(), 1.0, 0.5).dtype, torch.float64)

    def test_fixed_seed_reproducible_and_pairs(self):
        img, lab = batch(10)
        a = WatermarkBatch(KEY).set_random_state(1)(img, lab)
        b = WatermarkBatch(KEY).set_random_state(1)(img, lab)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        flags = a[1][:, 1].flatten(1).amax(1)
        trig = flags == WM_DARK
        self.assertEqual(int(trig.sum()) * 2 + int((flags == WM_CLEAN).sum()), a[0].shape[0])
        self.assertTrue(bool((flags[torch.nonzero(trig).flatten() - 1] == WM_TWIN).all()))  # each follows its twin
        c = WatermarkBatch(KEY).set_random_state(2)(img, lab)
        self.assertFalse(a[0].shape == c[0].shape and torch.equal(a[0], c[0]))

    @parameterized.expand([(1,), (5,), (8,), (13,)])
    def test_keep_batch_size_is_the_grown_batch_cut(self, n):
        """With keep_batch_size the batch is the grown one cut to the loaded size; a triggered sample whose copy
        would not fit stays clean; about prob / (1 + prob) of the rows are triggered."""
        img, lab = batch(n)
        # without degradation: a sample that stays clean in the kept batch is not degraded there, while the grown
        # batch degrades it with its copy
        kept = WatermarkBatch(KEY, keep_batch_size=True, degrade_prob=0.0).set_random_state(4)
        grown = WatermarkBatch(KEY, keep_batch_size=False, degrade_prob=0.0).set_random_state(4)
        shares = []
        for _ in range(20):
            (ki, kl), (gi, gl) = kept(img, lab), grown(img, lab)
            self.assertEqual(ki.shape[0], n)
            torch.testing.assert_close(ki, gi[:n], rtol=0, atol=0)
            torch.testing.assert_close(kl[:-1], gl[: n - 1], rtol=0, atol=0)
            last_k, last_g = kl[-1, -1].amax(), gl[n - 1, -1].amax()
            self.assertTrue(last_k == last_g or (last_k == WM_CLEAN and last_g == WM_TWIN))
            shares.append(float((kl[:, -1].flatten(1).amax(1) == WM_DARK).float().mean()))
        if n >= 8:
            self.assertAlmostEqual(float(np.mean(shares)), 0.5 / 1.5, delta=0.08)

    def test_unpaired_keeps_batch_size(self):
        img, lab = batch(8)
        out_img, out_lab = WatermarkBatch(KEY, prob=1.0, paired=False).set_random_state(0)(img, lab)
        self.assertEqual(out_img.shape[0], 8)
        self.assertTrue(bool((out_lab[:, 1].flatten(1).amax(1) == WM_DARK).all()))

    def test_errors(self):
        stage = WatermarkBatch(KEY)
        with self.assertRaisesRegex(ValueError, "smaller than the QR grid"):
            stage(torch.rand(2, 1, 16, 16), torch.zeros(2, 1, 16, 16))
        with self.assertRaisesRegex(ValueError, "do not match"):
            stage(torch.rand(2, 1, 64, 64), torch.zeros(3, 1, 64, 64))
        with self.assertRaisesRegex(ValueError, "same number of dimensions"):
            stage(torch.rand(1, 64, 64), torch.zeros(1, 64, 64))
        bad = torch.rand(2, 1, 64, 64)
        bad[0, 0, 3, 3] = float("nan")
        with self.assertRaisesRegex(RuntimeError, "NaN"):
            stage(bad, torch.zeros(2, 1, 64, 64))
        with self.assertRaisesRegex(ValueError, "prob must lie in"):
            WatermarkBatch(KEY, prob=1.5)

    def test_trains_as_prepare_batch(self):
        """A stock SupervisedTrainer trains with the stage as prepare_batch and the watermark loss."""
        img, lab = batch(4)
        data = [{"image": img[i], "label": lab[i]} for i in range(4)]
        net = UNet(2, 1, 2, (8, 16, 32), (2, 2), num_res_units=0)
        seen = []
        stage = WatermarkBatch(KEY, prob=1.0, keep_batch_size=False).set_random_state(0)
        prepare = WatermarkPrepareBatch(stage)
        trainer = SupervisedTrainer(
            device=torch.device("cpu"), max_epochs=1, train_data_loader=torch.utils.data.DataLoader(data, batch_size=4),
            network=net, optimizer=torch.optim.Adam(net.parameters(), 1e-3), prepare_batch=prepare,
            loss_function=UncertaintyWatermarkLoss(DiceCELoss(to_onehot_y=True, softmax=True), key=KEY),
        )
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(len(e.state.output)))
        trainer.run()
        self.assertEqual(seen, [8])  # 4 samples, all triggered: 4 clean twins + 4 triggered, decollated
        self.assertTrue(np.isfinite(float(trainer.state.output[0]["loss"])))


if __name__ == "__main__":
    unittest.main()
