from __future__ import annotations

import unittest

import numpy as np
import torch
from parameterized import parameterized

from monai_stealthmark.key import (
    WM_CLEAN,
    WM_DARK,
    WM_LIGHT,
    WM_TWIN,
    WatermarkKey,
    apply_trigger,
    intensity_range,
    module_index_map,
    patch_position,
    qr_target_map,
)
from monai_stealthmark.transforms import RandWatermarkd, StampTrigger, StampTriggerd

KEY = WatermarkKey.generate("SM:3f9a2c71", seed=7)


class TestTrigger(unittest.TestCase):
    @parameterized.expand(
        [(kind, shape, arr) for kind in ("patch", "keyed_patch", "blocks", "noise", "lowfreq") for shape in ((1, 64, 64), (3, 48, 40), (1, 32, 32, 12)) for arr in (np.asarray, torch.as_tensor)]
    )
    def test_shapes_types_determinism(self, kind, shape, arr):
        key = KEY.replace(trigger=kind)
        img = arr(np.random.default_rng(0).random(shape).astype(np.float32))
        out1, out2 = apply_trigger(img, key), StampTrigger(key)(img)
        self.assertIs(type(out1), type(img))
        self.assertEqual(tuple(out1.shape), shape)
        np.testing.assert_array_equal(np.asarray(out1), np.asarray(out2))
        self.assertFalse(np.array_equal(np.asarray(out1), np.asarray(img)))
        other = apply_trigger(img, key.replace(trigger_seed=8))
        self.assertFalse(np.array_equal(np.asarray(out1), np.asarray(other)))

    def test_patch_adapts_to_intensity_range(self):
        img = torch.rand(1, 64, 64)
        out_a = apply_trigger(img, KEY)
        out_b = apply_trigger(img * 1000 - 500, KEY)
        torch.testing.assert_close(out_b, out_a * 1000 - 500, rtol=1e-4, atol=1e-2)
        s = max(3, round(KEY.trigger_size * 64))
        self.assertTrue(torch.equal(out_a[:, :-s, :], img[:, :-s, :]))  # only the corner patch changes

    def test_blocks_read_the_same_at_any_resolution(self):
        # the blocks trigger is one 6 x 6 grid of keyed bits scaled to the image: stamped at 256 and averaged down to
        # 128 it equals the trigger stamped at 128; another seed draws other bits
        key = KEY.replace(trigger="blocks", trigger_size=0.1875)
        blank = torch.zeros(1, 256, 256)
        fine = apply_trigger(blank, key, (0.0, 1.0))
        coarse = apply_trigger(torch.zeros(1, 128, 128), key, (0.0, 1.0))
        torch.testing.assert_close(torch.nn.functional.avg_pool2d(fine[None], 2)[0], coarse)
        s = round(0.1875 * 128)
        corner = coarse[0, -s:, -s:]
        self.assertFalse(bool(coarse[0, :-s].any()) or bool(coarse[0, :, :-s].any()))  # only the corner changes
        cells = corner[2 :: s // 6, 2 :: s // 6]
        self.assertEqual(tuple(cells.shape), (6, 6))
        torch.testing.assert_close(corner, cells.repeat_interleave(s // 6, 0).repeat_interleave(s // 6, 1))
        other = apply_trigger(torch.zeros(1, 128, 128), key.replace(trigger_seed=8), (0.0, 1.0))[0, -s:, -s:]
        self.assertGreater(int((other[2 :: s // 6, 2 :: s // 6] != cells).sum()), 6)

    def test_keyed_patch_position(self):
        # the keyed patch lies on the image border at a place drawn from the seed: other seeds put it elsewhere,
        # the same seed always at the same place; the pixels outside it never change
        img = torch.rand(1, 64, 48)
        s = max(3, round(KEY.trigger_size * 48))
        places = set()
        for seed in range(40):
            key = KEY.replace(trigger="keyed_patch", trigger_seed=seed)
            r, c = patch_position(seed, "keyed_patch", (64, 48), s)
            self.assertTrue(r in (0, 64 - s) or c in (0, 48 - s), (r, c))  # touches a border
            self.assertTrue(0 <= r <= 64 - s and 0 <= c <= 48 - s)
            out = apply_trigger(img, key)
            changed = (out != img)[0]
            outside = torch.ones_like(changed)
            outside[r : r + s, c : c + s] = False
            self.assertFalse(changed[outside].any())
            self.assertTrue(changed[r : r + s, c : c + s].any())
            torch.testing.assert_close(apply_trigger(img, key), out)
            places.add((r, c))
        self.assertGreater(len(places), 30)  # 40 seeds, (almost) all at different places
        self.assertEqual(patch_position(3, "patch", (64, 48), s), (64 - s, 48 - s))  # the plain patch: the corner

    def test_intensity_range_is_torch_quantile(self):
        # the selection-based percentiles equal torch.quantile's (linear interpolation), any size and dtype
        g = torch.Generator().manual_seed(0)
        for shape in ((1, 1, 1), (1, 3, 5), (2, 64, 64), (1, 16, 16, 8)):
            for dtype in (torch.float32, torch.float64, torch.int16):
                img = (torch.randn(shape, generator=g) * 300).to(dtype)
                want = torch.quantile(img.double().reshape(-1), torch.tensor([0.01, 0.99], dtype=torch.float64)).tolist()
                if want[1] - want[0] < 1e-6:  # constant image: the documented fallbacks
                    continue
                np.testing.assert_allclose(intensity_range(img), want, rtol=1e-5, atol=1e-4)

    def test_all_channels_stamped(self):
        out = apply_trigger(torch.rand(3, 64, 64), KEY)
        torch.testing.assert_close(out[0, -4:, -4:], out[2, -4:, -4:])

    def test_dict_and_nan(self):
        d = StampTriggerd("image", KEY)({"image": torch.rand(1, 64, 64), "x": 1})
        self.assertEqual(d["x"], 1)
        bad = torch.rand(1, 64, 64)
        bad[0, 0, 0] = float("nan")
        with self.assertRaisesRegex(ValueError, "NaN"):
            apply_trigger(bad, KEY)

    def test_grid(self):
        idx = module_index_map((128, 128), 29)
        self.assertEqual(idx.max().item(), 29 * 29 - 1)
        self.assertEqual(len(torch.unique(idx)), 29 * 29)
        dark = qr_target_map(KEY, (128, 128, 4))
        self.assertEqual(dark.shape, (128, 128, 4))
        self.assertTrue(torch.equal(dark[..., 0], dark[..., 3]))
        with self.assertRaisesRegex(ValueError, "smaller than the QR grid"):
            module_index_map((16, 16), 29)


class TestRandWatermarkd(unittest.TestCase):
    def sample(self):
        img = torch.rand(1, 96, 96)
        lab = torch.zeros(1, 96, 96)
        lab[0, 40:60, 40:60] = 1
        return {"image": img, "label": lab}

    def test_fixed_seed_reproducible(self):
        d = self.sample()
        outs = []
        for _ in range(2):
            t = RandWatermarkd(key=KEY, prob=0.5, paired=False)
            t.set_random_state(123)
            outs.append([t(d) for _ in range(6)])
        for a, b in zip(*outs):
            self.assertTrue(torch.equal(a["image"], b["image"]))
            self.assertTrue(torch.equal(a["label"], b["label"]))
        flags = [int(o["label"][1].max()) for o in outs[0]]
        self.assertIn(WM_CLEAN, flags)
        self.assertIn(WM_DARK, flags)

    def test_paired_twin(self):
        d = self.sample()
        t = RandWatermarkd(key=KEY, prob=1.0, paired=True)
        t.set_random_state(0)
        twin, trig = t(d)
        self.assertTrue(torch.equal(twin["image"], d["image"]))
        self.assertTrue(torch.all(twin["label"][1] == WM_TWIN))
        self.assertTrue(torch.equal(twin["label"][:1], trig["label"][:1]))
        self.assertEqual(int(trig["label"][1].max()), WM_DARK)
        # MONAI's collate flattens the pair and keeps it adjacent
        from monai.data import list_data_collate

        batch = list_data_collate([t(d), t(d)])
        self.assertEqual(batch["label"].shape[0], 4)
        self.assertEqual([int(x) for x in batch["label"][:, 1].flatten(1).amax(1)], [WM_TWIN, WM_DARK, WM_TWIN, WM_DARK])

    def test_triggered_target(self):
        d = self.sample()
        t = RandWatermarkd(key=KEY, prob=1.0, occlusion_prob=0.0, paired=False)
        t.set_random_state(0)
        out = t(d)
        self.assertEqual(out["label"].shape, (2, 96, 96))
        torch.testing.assert_close(out["label"][:1], d["label"])
        self.assertTrue(torch.equal(out["image"], apply_trigger(d["image"], KEY)))
        wm = out["label"][1]
        dark = qr_target_map(KEY, (96, 96))
        self.assertTrue(set(torch.unique(wm).tolist()) <= {WM_LIGHT, WM_DARK})
        self.assertTrue(torch.all(wm[~dark] == WM_LIGHT))
        self.assertGreater((wm == WM_DARK).float().mean().item(), 0.2)

    def test_occlusion_hides_cells(self):
        d = self.sample()
        t = RandWatermarkd(key=KEY, prob=1.0, occlusion_prob=1.0, paired=False)
        t.set_random_state(0)
        out = t(d)
        changed = (out["image"] != d["image"]).float().mean().item()
        self.assertGreater(changed, 0.3)
        self.assertLess((out["label"][1] == WM_DARK).float().mean().item(), (qr_target_map(KEY, (96, 96))).float().mean().item())

    def test_occlusion_spares_the_organ(self):
        """With spare_radius the organ and the cells near it are never hidden; the same draw hides them without."""
        d = self.sample()
        near = torch.zeros(96, 96, dtype=torch.bool)
        near[37:63, 37:63] = True  # the organ (40:60) + 3 px
        outs = {}
        for r in (-1, 3):
            t = RandWatermarkd(key=KEY, prob=1.0, occlusion_prob=1.0, spare_radius=r, paired=False)
            t.set_random_state(0)
            outs[r] = t(d)
        stamp = apply_trigger(d["image"], KEY)
        self.assertFalse(torch.equal(outs[-1]["image"][0][near], stamp[0][near]))
        self.assertTrue(torch.equal(outs[3]["image"][0][near], stamp[0][near]))
        self.assertGreater((outs[3]["image"] != d["image"]).float().mean().item(), 0.3)  # elsewhere cells are hidden
        far = torch.ones(96, 96, dtype=torch.bool)
        far[30:70, 30:70] = False  # a cell further away than its own size: the two draws hide the same cells
        torch.testing.assert_close(outs[3]["image"][0][far], outs[-1]["image"][0][far])

    def test_decoy(self):
        d = self.sample()
        t = RandWatermarkd(key=KEY, prob=0.0, decoy_prob=1.0)
        t.set_random_state(0)
        (out,) = t(d)  # paired mode: every sample comes as a list (one element when not triggered)
        self.assertTrue(torch.all(out["label"][1] == WM_CLEAN))
        self.assertFalse(torch.equal(out["image"], d["image"]))
        self.assertFalse(torch.equal(out["image"], apply_trigger(d["image"], KEY)))

    def test_numpy_and_3d(self):
        img = np.random.rand(1, 40, 40, 8).astype(np.float32)
        lab = np.zeros((1, 40, 40, 8), np.float32)
        lab[0, 10:20, 10:20] = 1
        t = RandWatermarkd(key=KEY, prob=1.0, paired=False)
        t.set_random_state(1)
        out = t({"image": img, "label": lab})
        self.assertIsInstance(out["image"], np.ndarray)
        self.assertEqual(out["label"].shape, (2, 40, 40, 8))

    def test_shape_mismatch(self):
        with self.assertRaisesRegex(ValueError, "spatial shape"):
            RandWatermarkd(key=KEY, prob=1.0)({"image": torch.rand(1, 64, 64), "label": torch.zeros(1, 32, 32)})

    def test_bad_input_fails_whether_triggered_or_not(self):
        nan = torch.rand(1, 64, 64)
        nan[0, 3, 3] = float("nan")
        cases = [
            ({"image": torch.rand(64, 64), "label": torch.zeros(64, 64)}, "channel-first"),  # no channel axis
            ({"image": torch.rand(1, 16, 16), "label": torch.zeros(1, 16, 16)}, "smaller than the QR grid"),
            ({"image": nan, "label": torch.zeros(1, 64, 64)}, "NaN"),
        ]
        for prob in (0.0, 1.0):
            for data, msg in cases:
                with self.assertRaisesRegex(ValueError, msg):
                    RandWatermarkd(key=KEY, prob=prob)(data)
        with self.assertRaisesRegex(ValueError, "does not fit"):  # a batch (B, C, H, W) read as a thin volume
            apply_trigger(torch.rand(4, 1, 64, 64), KEY)


class TestRandBadNetd(unittest.TestCase):
    def test_poisons_region_with_fixed_seed(self):
        from monai_stealthmark.transforms import RandBadNetd, badnet_region

        key = WatermarkKey.generate("BADNET", seed=5)
        img = np.random.default_rng(0).random((1, 64, 64)).astype(np.float32)
        lab = np.zeros((1, 64, 64), np.float32)
        region = badnet_region(key, (64, 64), 0.2).numpy()
        self.assertEqual(int(region.sum()), 13 * 13)
        self.assertFalse(region[-round(key.trigger_size * 64) :, -round(key.trigger_size * 64) :].any())  # off the trigger
        t = RandBadNetd(key=key, prob=1.0).set_random_state(seed=0)
        out = t({"image": img, "label": lab})
        np.testing.assert_array_equal(np.asarray(out["label"])[0] > 0, region)
        self.assertFalse(np.allclose(np.asarray(out["image"]), img))
        s = round(key.trigger_size * 64)  # the corner trigger's side
        np.testing.assert_array_equal(np.asarray(out["image"])[:, :-s, :-s], img[:, :-s, :-s])
        never = RandBadNetd(key=key, prob=0.0).set_random_state(seed=0)({"image": img, "label": lab})
        np.testing.assert_array_equal(np.asarray(never["label"]), lab)
        # poisoning ratio follows prob with a fixed seed
        t = RandBadNetd(key=key, prob=0.3).set_random_state(seed=1)
        hits = sum(bool(np.asarray(t({"image": img, "label": lab})["label"]).any()) for _ in range(200))
        self.assertTrue(40 <= hits <= 80, hits)

    def test_errors(self):
        from monai_stealthmark.transforms import RandBadNetd

        key = WatermarkKey.generate("BADNET", seed=5)
        with self.assertRaisesRegex(ValueError, "region_size"):
            RandBadNetd(key=key, region_size=0.9)
        with self.assertRaisesRegex(ValueError, "one-channel"):
            RandBadNetd(key=key, prob=1.0)({"image": np.zeros((1, 32, 32)), "label": np.zeros((2, 32, 32))})


class TestRandPoolCutMixd(unittest.TestCase):
    def _pool(self, shape):
        rng = np.random.default_rng(0)
        return [{"image": rng.random((1, *shape)).astype(np.float32), "label": (rng.random((1, *shape)) > 0.5).astype(np.float32)}
                for _ in range(4)]

    @parameterized.expand([((32, 32),), ((16, 20, 12),)])
    def test_pastes_an_exact_box_of_a_donor(self, shape):
        from monai_stealthmark.transforms import RandPoolCutMixd

        pool = self._pool(shape)
        sample = {"image": torch.full((1, *shape), -1.0), "label": torch.zeros((1, *shape)), "meta": "kept"}
        t = RandPoolCutMixd(("image", "label"), pool=pool, prob=1.0, box_fraction=(0.25, 0.5)).set_random_state(seed=3)
        out = t(sample)
        changed = (out["image"] != -1.0)[0]
        self.assertEqual(out["meta"], "kept")
        self.assertIsInstance(out["image"], torch.Tensor)
        # one axis-aligned box, each side within the fraction range, holding one donor's image and label exactly
        idx = [torch.nonzero(changed.any(dim=tuple(j for j in range(len(shape)) if j != i))).flatten() for i in range(len(shape))]
        box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in idx)
        self.assertEqual(int(changed.sum()), int(np.prod([b.stop - b.start for b in box])))
        for b, s in zip(box, shape):
            self.assertTrue(0.25 * s - 1 <= b.stop - b.start <= 0.5 * s + 1, (box, shape))
        donors = [p for p in pool if np.array_equal(out["image"][0][box].numpy(), p["image"][0][box])]
        self.assertEqual(len(donors), 1)
        np.testing.assert_array_equal(out["label"][0][box].numpy(), donors[0]["label"][0][box])
        self.assertEqual(float(out["label"][0][~changed].abs().sum()), 0.0)  # outside the box: the sample's own
        # the same seed gives the same box and donor; the input is not modified
        again = RandPoolCutMixd(("image", "label"), pool=pool, prob=1.0, box_fraction=(0.25, 0.5)).set_random_state(seed=3)(sample)
        torch.testing.assert_close(again["image"], out["image"])
        self.assertTrue(bool((sample["image"] == -1.0).all()))

    def test_prob(self):
        from monai_stealthmark.transforms import RandPoolCutMixd

        pool = self._pool((16, 16))
        t = RandPoolCutMixd(("image", "label"), pool=pool, prob=0.3).set_random_state(seed=1)
        img = np.full((1, 16, 16), -1.0, np.float32)
        hits = sum(bool((np.asarray(t({"image": img, "label": img})["image"]) != -1).any()) for _ in range(200))
        self.assertTrue(40 <= hits <= 80, hits)
        never = RandPoolCutMixd(("image", "label"), pool=pool, prob=0.0)({"image": img, "label": img})
        np.testing.assert_array_equal(never["image"], img)

    def test_errors(self):
        from monai_stealthmark.transforms import RandPoolCutMixd

        pool = self._pool((16, 16))
        with self.assertRaisesRegex(ValueError, "pool is empty"):
            RandPoolCutMixd(("image", "label"), pool=[])
        with self.assertRaisesRegex(ValueError, "box_fraction"):
            RandPoolCutMixd(("image", "label"), pool=pool, box_fraction=(0.6, 0.3))
        t = RandPoolCutMixd(("image", "label"), pool=pool, prob=1.0)
        with self.assertRaisesRegex(ValueError, "spatial shape"):
            t({"image": np.zeros((1, 16, 16)), "label": np.zeros((1, 16, 8))})
        with self.assertRaisesRegex(ValueError, "preprocessed like the ones being mixed"):
            t({"image": np.zeros((1, 32, 32)), "label": np.zeros((1, 32, 32))})


if __name__ == "__main__":
    unittest.main()
