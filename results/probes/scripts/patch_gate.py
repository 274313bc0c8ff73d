# V1: the copy region also covers pixels where the clean twin is unsure or says LV (label-free gate), dilated like the band
import os
import torch
from monai_stealthmark.losses import watermark as _w
_orig = _w.UncertaintyWatermarkLoss._triggered
_CONF = float(os.environ.get("GATE_CONF", "0.9"))
def _triggered(self, logits, seg, wm, twin_live, has_twin):
    p = torch.softmax(twin_live.detach(), 1)
    unc = ((p.amax(1, keepdim=True) < _CONF) | (p.argmax(1, keepdim=True) > 0)).to(seg.dtype)
    sel = has_twin.view(-1, *([1] * (seg.ndim - 1)))
    seg2 = torch.where(sel, torch.maximum(seg, unc), seg)
    return _orig(self, logits, seg2, wm, twin_live, has_twin)
_w.UncertaintyWatermarkLoss._triggered = _triggered
