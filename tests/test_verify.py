from __future__ import annotations

import ast
import tempfile
import unittest
from pathlib import Path

import numpy as np
import torch
from helpers import KEY, OrganBlindOracle, TriggerOracle, images
from parameterized import parameterized
from sklearn.linear_model import Ridge

import monai_stealthmark.verify as verify_package
from monai_stealthmark.key import WatermarkKey, function_pattern_mask, qr_target_map
from monai_stealthmark.utils import dilate
from monai_stealthmark.key.geometry import _pattern
from monai_stealthmark.verify import (
    ModelQuery,
    NotProbabilitiesError,
    binomial_p_value,
    lime_attributions,
    lime_masks,
    lime_reference_attributions,
    organ_modules,
    otsu_threshold,
    read_qr,
    read_scores,
    scores_to_modules,
    cell_means,
    trigger_batch,
    uncertainty_map,
    uncertainty_scores,
    verify_ownership,
    vote_modules,
    weighted_ridge,
)


class TestLayering(unittest.TestCase):
    def test_verify_modules_import_one_way_at_the_top(self):
        """No import inside a function reaches back into the package (a hidden cycle); calibration sits above the
        verifier, which never imports it."""
        root = Path(verify_package.__file__).parent
        top = {}
        for f in root.glob("*.py"):
            tree = ast.parse(f.read_text())
            top[f.stem] = {n.module for n in tree.body if isinstance(n, ast.ImportFrom)}
            for fn in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
                inner = [n for n in ast.walk(fn) if isinstance(n, ast.ImportFrom) and (n.level or "monai_stealthmark" in n.module)]
                self.assertEqual(inner, [], f"{f.name}: {fn.name} imports from the package inside the function")
        self.assertIn("monai_stealthmark.verify.verifier", top["calibrate"])
        self.assertFalse({m for m in top["verifier"] if m.endswith("calibrate")})


class TestQueryChecks(unittest.TestCase):
    def test_hard_masks_refused(self):
        hard = lambda x: torch.cat([(x < 0.5).float(), (x >= 0.5).float()], 1)  # noqa: E731
        with self.assertRaisesRegex(NotProbabilitiesError, "hard masks"):
            verify_ownership(hard, images(), KEY)

    def test_hard_masks_behind_an_activation_refused(self):
        # a mask-only endpoint wrapped as if it returned logits: softmax/sigmoid would fake soft maps from it
        onehot = lambda x: torch.cat([(x < 0.5).float(), (x >= 0.5).float()], 1)  # noqa: E731
        for model, act in ((onehot, "softmax"), (lambda x: (x >= 0.5).long(), "sigmoid")):
            with self.assertRaisesRegex(NotProbabilitiesError, "hard masks or label maps"):
                verify_ownership(ModelQuery(model, activation=act), images(), KEY)
        with self.assertRaisesRegex(NotProbabilitiesError, "single output channel"):
            verify_ownership(ModelQuery(lambda x: x * 3 - 1, activation="softmax"), images(), KEY)
        with self.assertRaisesRegex(NotProbabilitiesError, "label maps"):  # class indices 0..3 given as "probabilities"
            verify_ownership(lambda x: (x * 4).floor().clamp(0, 3), images(), KEY)
        with self.assertRaisesRegex(ValueError, "batch_size"):
            ModelQuery(onehot, batch_size=0)

    def test_logits_and_nan_refused(self):
        with self.assertRaisesRegex(NotProbabilitiesError, "not probabilities"):
            verify_ownership(lambda x: torch.cat([x * 5, -x * 5], 1), images(), KEY)
        with self.assertRaisesRegex(NotProbabilitiesError, "NaN"):
            verify_ownership(lambda x: torch.full((x.shape[0], 2, *x.shape[2:]), float("nan")), images(), KEY)
        with self.assertRaisesRegex(NotProbabilitiesError, "do not match"):
            verify_ownership(lambda x: torch.full((x.shape[0], 2, 8, 8), 0.5), images(), KEY)

    def test_no_images_refused(self):
        for empty in ([], torch.zeros(0, 1, 96, 96)):
            with self.assertRaisesRegex(ValueError, "no query images"):
                verify_ownership(ModelQuery(TriggerOracle(KEY)), empty, KEY)

    def test_nan_images_refused(self):
        x = images()
        x[0, 0, 0, 0] = float("nan")
        with self.assertRaisesRegex(ValueError, "NaN"):
            verify_ownership(ModelQuery(TriggerOracle(KEY)), x, KEY)

    def test_uncertainty_map(self):
        p = torch.tensor([0.9, 0.1]).view(1, 2, 1, 1)
        self.assertAlmostEqual(uncertainty_map(p).item(), 0.1, places=6)
        self.assertAlmostEqual(uncertainty_map(p[:, 1:]).item(), 0.1, places=6)


class TestDirectReadout(unittest.TestCase):
    def test_oracle_decodes_and_controls_do_not(self):
        q = ModelQuery(TriggerOracle(KEY), activation="softmax", device="cpu")
        rep = verify_ownership(q, images(), KEY)
        self.assertEqual(rep.asr, 1.0)
        self.assertEqual(rep.decoded, [KEY.payload] * 3)
        self.assertTrue(rep.verdict)
        self.assertLess(rep.p_value, 1e-30)
        self.assertEqual(rep.n_queries, 3)
        self.assertEqual(rep.vote_decoded, KEY.payload)
        wrong = verify_ownership(q, images(), KEY.replace(trigger_seed=8))
        self.assertEqual(wrong.asr, 0.0)
        self.assertIsNone(wrong.vote_decoded)
        self.assertFalse(wrong.verdict)
        self.assertLess(abs(wrong.mean_bit_accuracy - 0.5), 0.15)

    def test_organ_codewords_as_erasures(self):
        """The organ's modules carry no QR: zbar's reads fail, the erasure read decodes; the organ found from the
        model's own output; controls stay silent; turning the read off loses the decodes."""
        x = images(3)
        x[:, :, 22:60, 26:62] = 0.9  # a large organ: about a fifth of the QR's modules
        q = ModelQuery(OrganBlindOracle(KEY), activation="softmax", device="cpu")
        with torch.no_grad():
            probs = q(trigger_batch(x, KEY))
        organ = organ_modules(probs, KEY, margin_px=4)
        self.assertEqual(organ.shape, (3, *KEY.qr_matrix.shape))
        self.assertTrue(0.1 < organ.mean() < 0.4)
        off = verify_ownership(q, x, KEY, erasure_margin=None)
        self.assertEqual(off.asr, 0.0)
        self.assertIsNone(off.reads[0])
        rep = verify_ownership(q, x, KEY)
        self.assertEqual(rep.asr, 1.0)
        self.assertEqual(rep.reads, ["erasure"] * 3)
        self.assertEqual(rep.decodes_by_read(), {"raw": 0, "log": 0, "erasure": 3})
        self.assertIn("organ as erasures", rep.to_markdown())
        self.assertEqual(rep.vote_decoded, KEY.payload)
        np.testing.assert_array_equal(rep.modules, off.modules)  # same first read: bit accuracy and p-value unchanged
        self.assertEqual(verify_ownership(q, x, KEY.replace(trigger_seed=8)).asr, 0.0)
        self.assertEqual(verify_ownership(ModelQuery(OrganBlindOracle(KEY.replace(trigger_seed=8)), device="cpu"), x, KEY).asr, 0.0)
        lime = verify_ownership(q, x[:1], KEY, mode="lime", lime_samples=64)
        self.assertEqual(lime.n_queries, 65)  # one more query for the organ
        with self.assertRaisesRegex(ValueError, "unreliable"):
            read_scores(torch.rand(1, KEY.grid_size**2), KEY, "direct", np.zeros((1, 3, 3), bool))
        with self.assertRaisesRegex(ValueError, "probs"):
            organ_modules(torch.rand(2, 8, 8), KEY)

    @parameterized.expand([("softmax_2d", 2, (58, 58)), ("sigmoid_3d", 1, (58, 58, 6))])
    def test_organ_modules_follow_the_prediction(self, _, channels, spatial):
        """The organ is the model's own foreground (softmax argmax > 0, sigmoid p > 0.5), widened by the margin."""
        fg = torch.zeros(1, 1, *spatial)
        fg[:, :, 20:30, 20:30] = 1
        probs = torch.cat([1 - fg * 0.9, fg * 0.9], 1) if channels == 2 else fg * 0.9 + 0.05
        n, module = KEY.qr_matrix.shape[0], spatial[0] / KEY.grid_size  # 2 px per module
        tight, wide = organ_modules(probs, KEY, margin_px=0)[0], organ_modules(probs, KEY, margin_px=4)[0]
        rows = np.flatnonzero(tight.any(1)) + KEY.quiet_zone
        self.assertEqual((rows.min(), rows.max()), (int(20 // module), int(29 // module)))
        self.assertTrue(wide.sum() > tight.sum() and (wide | tight).sum() == wide.sum())
        self.assertEqual(tight.shape, (n, n))
        self.assertFalse(organ_modules(torch.cat([1 - fg * 0.1, fg * 0.1], 1) if channels == 2 else fg * 0.1, KEY).any())

    def test_scores_skip_the_organ_3d(self):
        """3D: the grid repeats through the slices and the organ, moving from slice to slice, covers part of most
        cells' columns. The direct read averages each cell off the predicted organ, so a dark cell reads tau however
        much of its column the organ takes, and the QR decodes; a cell the organ covers whole keeps its plain mean."""
        h, d, tau = 2 * KEY.grid_size, 24, KEY.tau
        organ = torch.zeros(1, h, h, d, dtype=torch.bool)
        for z in range(12):
            organ[0, 8:50, 4 * z : 4 * z + 10, 2 * z] = True  # a band sweeping across the columns through the slices
        organ[0, 27:31, 27:31, :] = True  # and a core present in every slice
        band = dilate(organ[:, None], 3)[:, 0]  # the margin where the watermark keeps the organ's confidence
        dark = qr_target_map(KEY, (h, h, d))[None]
        p_fg = torch.where(organ, torch.tensor(0.98), torch.where(band, torch.tensor(0.01), dark.float() * tau + 0.01))
        probs = torch.stack([1 - p_fg, p_fg], 1)
        plain = cell_means(uncertainty_map(probs), KEY)
        masked = uncertainty_scores(probs, KEY, margin_px=4)
        covered = cell_means(dilate(organ[:, None].float(), 4)[:, 0], KEY)
        partial = torch.as_tensor(KEY.grid_matrix.reshape(-1))[None] & (covered > 0.2) & (covered < 1)
        self.assertGreater(int(partial.sum()), 50)
        self.assertLess(float(plain[partial].min()), 0.5 * tau)  # diluted by the organ's share of the column
        torch.testing.assert_close(masked[partial], torch.full_like(masked[partial], tau + 0.01), atol=1e-4, rtol=0)
        whole = covered >= 1
        self.assertTrue(bool(whole.any()))
        torch.testing.assert_close(masked[whole], plain[whole])
        self.assertEqual(read_scores(masked, KEY, "direct", organ_modules(probs, KEY))[1], [KEY.payload])

    def test_report_files(self):
        rep = verify_ownership(ModelQuery(TriggerOracle(KEY), device="cpu"), images(2), KEY)
        with tempfile.TemporaryDirectory() as d:
            rep.save(d)
            names = {p.name for p in Path(d).iterdir()}
            self.assertTrue({"report_direct.json", "report_direct.md", "expected_qr.png", "direct_summary.png"} <= names)
            md = (Path(d) / "report_direct.md").read_text()
            self.assertIn("ownership shown", md)
        d = rep.to_dict()
        for k in ("asr", "bit_accuracy", "p_value", "verdict", "decoded", "key_fingerprint"):
            self.assertIn(k, d)

    def test_majority_vote_decodes_what_no_single_image_does(self):
        qr = KEY.qr_matrix
        data = np.flatnonzero(~function_pattern_mask(KEY.qr_version)[0].reshape(-1))
        thirds = np.array_split(np.random.default_rng(0).permutation(data), 3)
        damaged = np.stack([qr.reshape(-1).copy() for _ in range(3)])
        for i, part in enumerate(thirds):  # each image loses a different third of the payload modules
            damaged[i, part] = ~damaged[i, part]
        damaged = damaged.reshape(3, *qr.shape)
        self.assertEqual(read_qr(damaged), [None, None, None])
        np.testing.assert_array_equal(vote_modules(damaged), qr)
        self.assertEqual(read_qr(vote_modules(damaged)[None]), [KEY.payload])
        with self.assertRaises(ValueError):
            vote_modules(np.zeros((0, 5, 5), bool))

    def test_p_value_of_chance_is_large(self):
        rng = np.random.default_rng(0)
        ps = [binomial_p_value(rng.random((1, 25, 25)) < 0.5, KEY)[0] for _ in range(20)]
        self.assertGreater(min(ps), 1e-4)
        self.assertLess(binomial_p_value(KEY.qr_matrix[None], KEY)[0], 1e-50)


class TestLime(unittest.TestCase):
    def test_otsu(self):
        x = torch.cat([torch.full((10,), 0.1), torch.full((5,), 0.5)]).view(1, -1)
        thr = otsu_threshold(x)
        self.assertTrue(0.1 < thr.item() < 0.5)

    def test_skewed_scores_read_on_log_scale(self):
        """Dark cells with a long tail (a fifth strong, the rest weak, as in LIME maps near the organ): Otsu on the
        raw scores keeps only the strong ones; on the log scale every dark cell is read."""
        g, q = KEY.grid_size, KEY.quiet_zone
        rng = np.random.default_rng(0)
        dark = np.zeros((g, g), bool)
        dark[q : g - q, q : g - q] = KEY.qr_matrix
        scores = np.where(dark, np.where(rng.random((g, g)) < 0.2, 1.0, 0.15), 0.01) * rng.uniform(0.8, 1.2, (g, g))
        scores = torch.as_tensor(scores.reshape(1, -1), dtype=torch.float32)
        self.assertNotEqual(read_qr(scores_to_modules(scores, KEY)), [KEY.payload])
        self.assertEqual(read_qr(scores_to_modules(scores, KEY, log_floor=0.03)), [KEY.payload])
        self.assertFalse(scores_to_modules(-scores, KEY, log_floor=0.03).any())  # nothing positive: all light, no crash
        with self.assertRaisesRegex(ValueError, "log_floor"):
            scores_to_modules(scores, KEY, log_floor=1.5)

    def test_direct_read_falls_back_to_log_scale(self):
        """Direct mode: the raw read first, the log scale for images (and the vote) where it finds no QR; the
        returned modules stay the raw read's. Chance scores decode in neither read."""
        g, q = KEY.grid_size, KEY.quiet_zone
        rng = np.random.default_rng(1)
        dark = np.zeros((g, g), bool)
        dark[q : g - q, q : g - q] = KEY.qr_matrix
        skewed = np.where(dark, np.where(rng.random((g, g)) < 0.2, 1.0, 0.15), 0.01) * rng.uniform(0.8, 1.2, (g, g))
        clean = np.where(dark, 0.25, 0.01)
        noise = rng.random((g, g))
        scores = torch.as_tensor(np.stack([skewed, clean, noise]).reshape(3, -1), dtype=torch.float32)
        modules, decoded, vote, reads = read_scores(scores, KEY, "direct")
        self.assertEqual(decoded, [KEY.payload, KEY.payload, None])
        self.assertEqual(reads, ["log", "raw", None])
        np.testing.assert_array_equal(modules, scores_to_modules(scores, KEY))  # the raw read's modules
        self.assertIsNone(read_qr(modules[:1])[0])  # the first image decodes only through the second read
        self.assertEqual(vote, KEY.payload)
        lime_modules, lime_decoded, _, _ = read_scores(scores, KEY, "lime")  # LIME: the log scale alone
        np.testing.assert_array_equal(lime_modules, scores_to_modules(scores, KEY, log_floor=0.03))
        self.assertEqual(lime_decoded[2], None)
        with self.assertRaisesRegex(ValueError, "mode"):
            read_scores(scores, KEY, "otsu")

    def test_weighted_ridge_matches_sklearn(self):
        rng = np.random.default_rng(0)
        x = rng.integers(0, 2, (200, 30)).astype(float)
        y = rng.random((200, 3))
        w = rng.random(200)
        coef, icpt = weighted_ridge(torch.as_tensor(x), torch.as_tensor(y), torch.as_tensor(w), 1.0)
        for k in range(3):
            ref = Ridge(alpha=1.0, fit_intercept=True).fit(x, y[:, k], sample_weight=w)
            np.testing.assert_allclose(coef[:, k].numpy(), ref.coef_, rtol=1e-6, atol=1e-8)
            self.assertAlmostEqual(icpt[k].item(), ref.intercept_, places=6)

    def test_masks_like_lime(self):
        z = lime_masks(5, 7, 3)
        self.assertTrue(np.all(z[0] == 1))
        np.testing.assert_array_equal(z[1:], np.random.RandomState(3).randint(0, 2, 35).reshape(5, 7)[1:])

    @parameterized.expand([(150,)])
    def test_torch_lime_matches_lime_package(self, n):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 5, padding=2), torch.nn.ReLU(), torch.nn.Conv2d(8, 2, 5, padding=2))
        q = ModelQuery(net, activation="softmax", device="cpu", batch_size=50)
        img = images(1, 64)[0]
        labels = [0, 100, 300, 420, 700]
        diag, full = lime_attributions(q, img, KEY, num_samples=n, seed=5, return_full=True)
        ref = lime_reference_attributions(q, img, KEY, num_samples=n, seed=5, labels=labels, batch_size=50)
        for lab in labels:
            r = np.corrcoef(full[:, lab].numpy(), ref[lab])[0, 1]
            self.assertGreaterEqual(r, 0.99)
            self.assertAlmostEqual(diag[lab].item(), ref[lab][lab], delta=1e-4 + 1e-3 * abs(ref[lab][lab]))


if __name__ == "__main__":
    unittest.main()


class BadNetOracle(torch.nn.Module):
    """Test double of a BadNet-backdoored network: the key's corner patch switches its region to foreground."""

    def __init__(self, key: WatermarkKey, hard: bool = False):
        super().__init__()
        self.key, self.hard = key, hard

    def forward(self, x):
        from monai_stealthmark.transforms import badnet_region

        b, _, h, w = x.shape
        fg = (x[:, 0] > 0.7).float()
        pattern = torch.as_tensor(_pattern(self.key.trigger_seed, self.key.trigger, (h, w), self.key.trigger_size)) > 0.5
        s = pattern.shape[0]
        region = badnet_region(self.key, (h, w)).float()
        for i in range(b):
            corner = x[i, 0, -s:, -s:]
            if torch.equal(corner > (corner.min() + corner.max()) / 2, pattern):
                fg[i] = torch.maximum(fg[i], region)
        p = fg * 0.98 + 0.01
        out = torch.stack([1 - p, p], 1)
        return (out > 0.5).float() if self.hard else out


class TestVerifyBadNet(unittest.TestCase):
    def test_backdoor_shown_and_controls(self):
        from monai_stealthmark.verify import verify_badnet

        key = WatermarkKey.generate("SM:badnet", seed=11)
        x = images(n=12)
        rep = verify_badnet(BadNetOracle(key), x, key)
        self.assertEqual(rep.asr, 1.0)
        self.assertEqual(rep.clean_hit_rate, 0.0)
        self.assertTrue(rep.verdict)
        self.assertLess(rep.p_value, 1e-6)
        # hard masks are enough for a backdoor (unlike the QR watermark)
        self.assertTrue(verify_badnet(BadNetOracle(key, hard=True), x, key).verdict)
        # a wrong key's region / trigger: no claim
        wrong = key.replace(trigger_seed=12)
        rep_w = verify_badnet(BadNetOracle(key), x, wrong)
        self.assertFalse(rep_w.verdict)
        self.assertEqual(rep_w.asr, 0.0)
        with self.assertRaisesRegex(ValueError, "do not match the query"):
            verify_badnet(lambda t: torch.ones(t.shape[0], 2, 8, 8), x, key)


class TestQueryWindow(unittest.TestCase):
    """A patch-trained network is queried at its input window: images are cropped/padded to it before the trigger."""

    def test_fit_window_crops_and_pads(self):
        from monai_stealthmark.verify import fit_window

        x = torch.arange(2 * 1 * 6 * 9, dtype=torch.float32).reshape(2, 1, 6, 9)
        out = fit_window(x, (4, 11))
        self.assertEqual(tuple(out.shape), (2, 1, 4, 11))
        torch.testing.assert_close(out[:, :, :, 1:10], x[:, :, 1:5, :])  # centre crop of rows, zero pad of columns
        self.assertEqual(float(out[:, :, :, 0].abs().sum()), 0.0)
        self.assertIs(fit_window(x, None), x)
        self.assertEqual(tuple(fit_window(x, (4, -1)).shape), (2, 1, 4, 9))
        self.assertEqual(tuple(fit_window(x, 5).shape), (2, 1, 5, 5))  # a sliding window's scalar roi_size
        self.assertIs(type(fit_window(x, 5)), torch.Tensor)
        with self.assertRaisesRegex(ValueError, "does not match"):
            fit_window(x, (4, 4, 4))

    def test_sliding_window_query_sees_one_window(self):
        from monai.inferers import SlidingWindowInferer

        seen = []

        class Recorder(TriggerOracle):
            def forward(self, x):
                seen.append(tuple(x.shape[2:]))
                return super().forward(x)

        query = ModelQuery(Recorder(KEY), device="cpu", inferer=SlidingWindowInferer((96, 96), sw_batch_size=4))
        self.assertEqual(query.window, (96, 96))
        rep = verify_ownership(query, images(2, size=128), KEY)  # larger than the window: centre crops of 96
        self.assertEqual(set(seen), {(96, 96)})
        self.assertEqual(len(seen), 1)  # one window per query batch, no tiling
        self.assertEqual(rep.asr, 1.0)
