# V7: logit-margin L2 between the triggered sample and its live clean twin in the protected band (both get gradients)
import os
import torch
from monai_stealthmark.losses import watermark as _w
_W2 = float(os.environ.get("L2_W", "0.3"))
_orig_l2 = _w.UncertaintyWatermarkLoss._triggered
def _triggered_l2(self, logits, seg, wm, twin_live, has_twin):
    loss = _orig_l2(self, logits, seg, wm, twin_live, has_twin)
    fg = (seg > 0).to(logits.dtype).amax(1, keepdim=True)
    protect = _w._dilate(fg, self.protect_radius) * has_twin.view(-1, 1, 1, 1).to(logits.dtype)
    mt = (logits[:, 1] - logits[:, 0])[:, None]
    mc = (twin_live[:, 1] - twin_live[:, 0])[:, None]
    return loss + _W2 * ((mt - mc).pow(2) * protect).mean()
_w.UncertaintyWatermarkLoss._triggered = _triggered_l2
