"""The metric maths: the exact pixel AUC and the cumulative PixelAUCMetric against sklearn, and the watermark ASR
metric on a fixed test-double network."""

from __future__ import annotations

import math
import unittest

import numpy as np
import torch
from parameterized import parameterized
from sklearn.metrics import roc_auc_score

from monai_stealthmark.metrics import PixelAUCMetric, WatermarkASRMetric, pixel_auc
from monai_stealthmark.metrics.watermark_asr import reachable_reads
from monai_stealthmark.verify import ModelQuery, direct_scores, read_scores, verify_ownership

from helpers import KEY, TriggerOracle, images


def _batches(n_classes: int, n_iter: int = 3, seed: int = 0, size: int = 12):
    """``n_iter`` batches of random logits ``(2, C, size, size)`` and index labels, shifted toward the true class."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_iter):
        label = torch.randint(0, n_classes, (2, 1, size, size), generator=g)
        logits = torch.randn(2, n_classes, size, size, generator=g)
        logits += torch.nn.functional.one_hot(label[:, 0], n_classes).permute(0, 3, 1, 2) * 0.8
        out.append((logits, label))
    return out


def _sklearn_auc(batches, c: int) -> float:
    """Reference AUC of class ``c`` over the pooled pixels of softmax outputs."""
    probs = torch.cat([torch.softmax(p, 1)[:, c].reshape(-1) for p, _ in batches])
    target = torch.cat([(y[:, 0] == c).reshape(-1) for _, y in batches])
    return roc_auc_score(target.numpy(), probs.numpy())


class TestPixelAUC(unittest.TestCase):
    @parameterized.expand([(0, None), (1, 1), (2, 2)])
    def test_matches_sklearn(self, seed, decimals):
        g = torch.Generator().manual_seed(seed)
        y = torch.rand(2, 1, 40, 40, generator=g) > 0.8
        s = torch.rand(2, 1, 40, 40, generator=g) * 0.7 + y.float() * 0.3
        if decimals is not None:  # many ties
            s = torch.round(s, decimals=decimals)
        self.assertAlmostEqual(pixel_auc(s, y), roc_auc_score(y.numpy().ravel(), s.numpy().ravel()), places=10)

    @parameterized.expand([
        ("probabilities", lambda x: torch.sigmoid(x)),
        ("float16", lambda x: torch.sigmoid(x).half()),
        ("logits, wide range of float64", lambda x: x.double() * 1e290),
        ("integers with ties", lambda x: (x * 3).round().long()),
        ("every bucket mixed", lambda x: torch.rand(x.shape, generator=torch.Generator().manual_seed(5))),
    ])
    def test_bucketed_count_matches_sklearn(self, _, scores):
        """The bucket counts plus the sort inside mixed buckets give sklearn's AUC on scores of any range and type."""
        g = torch.Generator().manual_seed(3)
        y = torch.rand(20000, generator=g) < 0.1
        logits = torch.where(y, torch.randn(20000, generator=g) * 3 + 5, torch.randn(20000, generator=g) * 3 - 5)
        s = scores(logits)
        self.assertAlmostEqual(pixel_auc(s, y), roc_auc_score(y.numpy(), s.double().numpy()), places=12)

    def test_edge_cases(self):
        self.assertTrue(math.isnan(pixel_auc(torch.rand(10), torch.zeros(10))))
        self.assertEqual(pixel_auc(torch.tensor([0.1, 0.9]), torch.tensor([0, 1])), 1.0)
        with self.assertRaisesRegex(ValueError, "same shape"):
            pixel_auc(torch.rand(3), torch.rand(4))
        with self.assertRaisesRegex(ValueError, "NaN"):
            pixel_auc(torch.tensor([np.nan, 0.5]), torch.tensor([0, 1]))


class TestPixelAUCMetric(unittest.TestCase):
    @parameterized.expand([("index", False), ("onehot", False), ("index", True), ("onehot", True)])
    def test_cumulative_matches_sklearn(self, label_form, decollated):
        batches = _batches(2)
        metric = PixelAUCMetric(activation="softmax")
        for logits, label in batches:
            if label_form == "onehot":
                label = torch.nn.functional.one_hot(label[:, 0], 2).permute(0, 3, 1, 2)
            metric(list(logits), list(label)) if decollated else metric(logits, label)
        self.assertAlmostEqual(metric.aggregate(), _sklearn_auc(batches, 1), places=10)

    def test_one_channel_sigmoid(self):
        g = torch.Generator().manual_seed(1)
        logits, label = torch.randn(3, 1, 10, 10, generator=g), torch.rand(3, 1, 10, 10, generator=g) > 0.6
        metric = PixelAUCMetric(activation="sigmoid")
        metric(logits[:2], label[:2])
        metric(logits[2:], label[2:])
        expected = roc_auc_score(label.numpy().ravel(), torch.sigmoid(logits).numpy().ravel())
        self.assertAlmostEqual(metric.aggregate(), expected, places=10)

    @parameterized.expand([(None, (1, 2, 3)), ((2, 3), (2, 3)), (3, (3,))])
    def test_multi_class_per_class_and_mean(self, label_index, classes):
        batches = _batches(4, seed=2)
        metric = PixelAUCMetric(label_index=label_index, activation="softmax", average="none")
        for logits, label in batches:
            metric(logits, label)
        expected = [_sklearn_auc(batches, c) for c in classes]
        self.assertEqual(metric.classes, classes)
        np.testing.assert_allclose(metric.aggregate().numpy(), expected, rtol=0, atol=1e-10)
        self.assertAlmostEqual(metric.aggregate(average="mean"), float(np.mean(expected)), places=10)

    def test_mean_skips_absent_class(self):
        label = torch.zeros(1, 1, 4, 4, dtype=torch.long)
        label[0, 0, :2] = 1  # class 2 never occurs: its AUC is undefined
        metric = PixelAUCMetric(label_index=None, average="none")
        metric(torch.softmax(torch.randn(1, 3, 4, 4), 1), label)
        values = metric.aggregate()
        self.assertTrue(math.isnan(values[1]))
        self.assertEqual(metric.aggregate(average="mean"), float(values[0]))

    def test_images_of_different_sizes(self):
        big, small = _batches(2, 1, seed=3, size=16)[0], _batches(2, 1, seed=4, size=8)[0]
        metric = PixelAUCMetric(activation="softmax")
        metric([big[0][0], small[0][0]], [big[1][0], small[1][0]])  # decollated volumes of two sizes
        expected = _sklearn_auc([(big[0][:1], big[1][:1]), (small[0][:1], small[1][:1])], 1)
        self.assertAlmostEqual(metric.aggregate(), expected, places=10)

    def test_reset(self):
        first, second = _batches(2, 2, seed=5), _batches(2, 1, seed=6)
        metric = PixelAUCMetric(activation="softmax")
        for logits, label in first:
            metric(logits, label)
        metric.reset()
        with self.assertRaisesRegex(RuntimeError, "at least one update"):
            metric.aggregate()
        metric(*second[0])
        self.assertAlmostEqual(metric.aggregate(), _sklearn_auc(second, 1), places=10)

    def test_invalid_arguments(self):
        with self.assertRaisesRegex(ValueError, "average"):
            PixelAUCMetric(average="macro")
        with self.assertRaisesRegex(ValueError, "activation"):
            PixelAUCMetric(activation="relu")
        with self.assertRaisesRegex(ValueError, "label_index"):
            PixelAUCMetric(label_index=-1)
        with self.assertRaisesRegex(ValueError, "out of range"):
            PixelAUCMetric(label_index=2)(torch.rand(1, 2, 4, 4), torch.zeros(1, 1, 4, 4))
        with self.assertRaisesRegex(ValueError, "label y"):
            PixelAUCMetric()(torch.rand(1, 2, 4, 4))


class TestWatermarkASRMetric(unittest.TestCase):
    """The ASR of a test double that carries the key's QR (every read decodes) or does not (none does)."""

    marked = ModelQuery(TriggerOracle(KEY), device="cpu")
    unmarked = ModelQuery(TriggerOracle(KEY.replace(trigger_seed=99)), device="cpu")

    def test_marked_and_unmarked(self):
        for query, asr in ((self.marked, 1.0), (self.unmarked, 0.0)):
            metric = WatermarkASRMetric(KEY, query=query)
            metric(images(3))
            self.assertEqual(metric.aggregate(), asr)
        self.assertEqual(WatermarkASRMetric(KEY, query=self.marked)(images(2))[1].tolist(), [1.0, 1.0])

    def test_cumulative_with_query_per_call(self):
        metric = WatermarkASRMetric(KEY)
        metric(images(3), query=self.marked)
        metric(images(1), query=self.unmarked)
        self.assertEqual(metric.aggregate(), 0.75)
        self.assertTrue(0.75 < metric.mean_bit_accuracy() < 1.0)
        metric.reset()
        with self.assertRaisesRegex(RuntimeError, "no images"):
            metric.aggregate()

    def test_max_images_reads_the_first_ones(self):
        query = ModelQuery(TriggerOracle(KEY), device="cpu")
        metric = WatermarkASRMetric(KEY, query=query, max_images=3)
        metric(images(2))
        metric(images(2), query=self.unmarked)  # only its first image is read
        metric(images(2), query=self.unmarked)  # nothing left: not queried at all
        self.assertEqual((metric.room, len(metric.get_buffer()[0]), query.n_queries), (0, 3, 2))
        self.assertAlmostEqual(metric.aggregate(), 2 / 3)

    def test_decollated_images(self):
        metric = WatermarkASRMetric(KEY, query=self.marked)
        metric(list(images(2)))  # one shape: one batched query
        metric([images(1)[0], images(1, size=128)[0]])  # two shapes: one query each
        self.assertEqual((len(metric.get_buffer()[0]), metric.aggregate()), (4, 1.0))

    def test_invalid_arguments(self):
        with self.assertRaisesRegex(ValueError, "mode"):
            WatermarkASRMetric(KEY, mode="fast")
        with self.assertRaisesRegex(ValueError, "max_images"):
            WatermarkASRMetric(KEY, max_images=0)
        with self.assertRaisesRegex(ValueError, "query"):
            WatermarkASRMetric(KEY)(images(1))


class NoisyOracle(TriggerOracle):
    """:class:`TriggerOracle` with seeded Gaussian noise on its logits: reads from clean to unreadable."""

    def __init__(self, key, noise: float, seed: int = 0):
        super().__init__(key)
        self.noise, self.seed = float(noise), int(seed)

    def forward(self, x):
        logits = super().forward(x)
        return logits + self.noise * torch.randn(logits.shape, generator=torch.Generator().manual_seed(self.seed))


class TestDirectReadEqualsVerification(unittest.TestCase):
    """The metric's direct read (one query, decoders only on reachable reads) gives what ``verify_ownership`` gives."""

    @parameterized.expand([(f"noise_{n}", n) for n in (0.0, 1.0, 2.0, 3.0, 6.0)])
    def test_same_decodes_and_bit_accuracy(self, _, noise):
        x = images(6)
        for key in (KEY, KEY.replace(trigger_seed=99)):
            query = ModelQuery(NoisyOracle(KEY, noise, seed=1), device="cpu")
            out = WatermarkASRMetric(key, query=query)(x)
            report = verify_ownership(query, x, key)
            self.assertEqual(out[0].tolist(), [float(t == key.payload) for t in report.decoded])
            np.testing.assert_allclose(out[1].numpy(), report.bit_accuracy, rtol=0, atol=0)

    @parameterized.expand([(f"noise_{n}", n) for n in (0.0, 2.0, 4.0, 8.0)])
    def test_unreachable_reads_never_decode(self, _, noise):
        """What :func:`reachable_reads` drops, the full read (raw, log, erasure) never decodes to the payload."""
        x = images(6)
        query = ModelQuery(NoisyOracle(KEY, noise, seed=2), device="cpu")
        scores = direct_scores(query, x, KEY)
        _, texts, _, _ = read_scores(scores, KEY, "direct")
        for ok, text in zip(reachable_reads(scores, KEY), texts):
            self.assertTrue(ok or text != KEY.payload)
        if noise == 0.0:
            self.assertTrue(reachable_reads(scores, KEY).all())


if __name__ == "__main__":
    unittest.main()
