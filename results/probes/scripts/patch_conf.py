# V6: in the protected band (with a twin) the triggered logit margin must be at least the clean twin's, in the twin's
# direction (squared hinge in logit space, weight CONF_W): the triggered mode may not be less confident around the organ
import os
import torch
import torch.nn.functional as F
from monai_stealthmark.losses import watermark as _w
_W = float(os.environ.get("CONF_W", "1.0"))
_orig = _w.UncertaintyWatermarkLoss._triggered
def _triggered(self, logits, seg, wm, twin_live, has_twin):
    loss = _orig(self, logits, seg, wm, twin_live, has_twin)
    fg = (seg > 0).to(logits.dtype).amax(1, keepdim=True)
    protect = _w._dilate(fg, self.protect_radius) * has_twin.view(-1, 1, 1, 1).to(logits.dtype)
    mt = (logits[:, 1] - logits[:, 0])[:, None]
    mc = (twin_live[:, 1] - twin_live[:, 0]).detach()[:, None]
    s = torch.sign(mc)
    short = F.relu(s * mc - s * mt)
    return loss + _W * (short.pow(2) * protect).mean()
_w.UncertaintyWatermarkLoss._triggered = _triggered
