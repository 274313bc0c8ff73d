# V8: light modules copy the clean twin's soft output (like the band) instead of a one-hot target: the triggered
# path is asked for no more confidence than the twin anywhere outside the dark modules
import torch
from monai_stealthmark.losses import watermark as _w
from monai_stealthmark.transforms.trigger import WM_DARK
_orig_lc = _w.UncertaintyWatermarkLoss._triggered
_orig_dilate = _w._dilate
def _triggered_lc(self, logits, seg, wm, twin_live, has_twin):
    notdark = (wm != WM_DARK).to(logits.dtype)
    _w._dilate = lambda m, r: torch.maximum(_orig_dilate(m, r), notdark)
    try:
        return _orig_lc(self, logits, seg, wm, twin_live, has_twin)
    finally:
        _w._dilate = _orig_dilate
_w.UncertaintyWatermarkLoss._triggered = _triggered_lc
