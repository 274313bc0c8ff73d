# V5: CutMix of image + label with another training slice (prob CUTMIX_P, box 24-64 px, same location), before the watermark
import os
import numpy as np
import torch
from monai.transforms import Compose, MapTransform, RandomizableTransform
import monai_stealthmark.experiments.sunnybrook as _s
from monai_stealthmark.data import load_sunnybrook, split_by_patient
_P = float(os.environ.get("CUTMIX_P", "0.5"))

class _CutMixd(RandomizableTransform, MapTransform):
    def __init__(self, pool, prob):
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, ("image", "label"))
        self.pool = pool
    def __call__(self, d):
        self.randomize(None)
        if not self._do_transform:
            return d
        d = dict(d)
        o = self.pool[self.R.randint(len(self.pool))]
        h, w = d["image"].shape[-2:]
        bh, bw = self.R.randint(24, 65, size=2)
        y, x = self.R.randint(0, h - bh + 1), self.R.randint(0, w - bw + 1)
        for k in ("image", "label"):
            t = torch.as_tensor(d[k]).clone()
            t[..., y:y + bh, x:x + bw] = torch.as_tensor(o[k])[..., y:y + bh, x:x + bw]
            d[k] = t
        return d

_cfg0 = _s.ExperimentConfig(fast=True, **ov)
_pool = split_by_patient(load_sunnybrook(_cfg0.data_root, size=_cfg0.size), [_cfg0.test_patient])[0]
_orig_rsi = _s.RandScaleIntensityd
def _rsi(*a, **k):
    return Compose([_orig_rsi(*a, **k), _CutMixd(_pool, _P)])
_s.RandScaleIntensityd = _rsi
