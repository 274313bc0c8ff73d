from __future__ import annotations

import math
import unittest

import numpy as np
import torch
from parameterized import parameterized
from sklearn.metrics import roc_auc_score

from monai_stealthmark.metrics import pixel_auc


class TestPixelAUC(unittest.TestCase):
    @parameterized.expand([(0, None), (1, 1), (2, 2)])
    def test_matches_sklearn(self, seed, decimals):
        g = torch.Generator().manual_seed(seed)
        y = torch.rand(2, 1, 40, 40, generator=g) > 0.8
        s = torch.rand(2, 1, 40, 40, generator=g) * 0.7 + y.float() * 0.3
        if decimals is not None:  # many ties
            s = torch.round(s, decimals=decimals)
        self.assertAlmostEqual(pixel_auc(s, y), roc_auc_score(y.numpy().ravel(), s.numpy().ravel()), places=10)

    def test_edge_cases(self):
        self.assertTrue(math.isnan(pixel_auc(torch.rand(10), torch.zeros(10))))
        self.assertEqual(pixel_auc(torch.tensor([0.1, 0.9]), torch.tensor([0, 1])), 1.0)
        with self.assertRaisesRegex(ValueError, "same shape"):
            pixel_auc(torch.rand(3), torch.rand(4))
        with self.assertRaisesRegex(ValueError, "NaN"):
            pixel_auc(torch.tensor([np.nan, 0.5]), torch.tensor([0, 1]))


if __name__ == "__main__":
    unittest.main()
