"""Shared test helpers: a fixed key, synthetic images and test doubles of watermarked networks."""

from __future__ import annotations

import torch

from monai_stealthmark.key import WatermarkKey, qr_target_map
from monai_stealthmark.key.geometry import _pattern

KEY = WatermarkKey.generate("SM:3f9a2c71", seed=7)


class TriggerOracle(torch.nn.Module):
    """Test double of a watermarked network: when the key's patch (a corner kind: patch, blocks) is in the corner it puts the QR into its
    uncertainty (tau in dark modules); otherwise it is confident everywhere. Two-class softmax logits."""

    def __init__(self, key: WatermarkKey):
        super().__init__()
        self.key = key

    def forward(self, x):
        b, _, h, w = x.shape
        fg = (x[:, :1] > 0.7).float()
        out = []
        for i in range(b):
            pattern = torch.as_tensor(_pattern(self.key.trigger_seed, self.key.trigger, (h, w), self.key.trigger_size)) > 0.5
            s = pattern.shape[0]
            corner = x[i, 0, -s:, -s:]
            triggered = torch.equal(corner > (corner.min() + corner.max()) / 2, pattern)
            p_fg = fg[i] * 0.99 + (1 - fg[i]) * 0.01
            if triggered:
                dark = qr_target_map(self.key, (h, w)).float()
                p_fg = torch.where(fg[i] > 0, 1 - dark * self.key.tau, dark * self.key.tau).clamp(0.01, 0.99)
            out.append(torch.cat([1 - p_fg, p_fg], 0))
        p = torch.stack(out)
        return torch.log(p)  # logits whose softmax is p


class OrganBlindOracle(TriggerOracle):
    """Like :class:`TriggerOracle`, but, as the trained watermark, certain over the organ and the ``band`` pixels
    around it: those modules carry no QR."""

    def __init__(self, key: WatermarkKey, band: int = 3):
        super().__init__(key)
        self.band = band

    def forward(self, x):
        logits = super().forward(x)
        fg = (x[:, :1] > 0.7).float()
        near = torch.nn.functional.max_pool2d(fg, 2 * self.band + 1, 1, self.band) > 0
        certain = torch.log(torch.cat([1 - (fg * 0.98 + 0.01), fg * 0.98 + 0.01], 1))
        return torch.where(near, certain, logits)


def images(n=3, size=96):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, size, size, generator=g) * 0.6
    x[:, :, 30:50, 30:50] = 0.9
    return x


class ExportableTriggerOracle(torch.nn.Module):
    """:class:`TriggerOracle` in tensor operations only (no Python branch on the data), so that it exports to ONNX
    and keeps its behaviour there, followed by a 1x1 convolution head (identity) that an int8 quantiser turns into
    an integer kernel. Built for one spatial ``size``; two-class softmax logits."""

    def __init__(self, key: WatermarkKey, size: int = 96):
        super().__init__()
        self.key = key
        pattern = torch.as_tensor(_pattern(key.trigger_seed, key.trigger, (size, size), key.trigger_size)) > 0.5
        self.register_buffer("pattern", pattern)
        self.register_buffer("dark", qr_target_map(key, (size, size)).float())
        self.head = torch.nn.Conv2d(2, 2, 1)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
            self.head.bias.zero_()

    def forward(self, x):
        s = self.pattern.shape[0]
        fg = (x[:, :1] > 0.7).float()
        corner = x[:, 0, -s:, -s:]
        mid = (corner.amin((-2, -1), keepdim=True) + corner.amax((-2, -1), keepdim=True)) / 2
        triggered = ((corner > mid) == self.pattern).flatten(1).all(1).view(-1, 1, 1, 1)
        p_plain = fg * 0.98 + 0.01
        p_trig = torch.where(fg > 0, 1 - self.dark * self.key.tau, self.dark * self.key.tau).clamp(0.01, 0.99)
        p_fg = torch.where(triggered, p_trig, p_plain)
        return self.head(torch.log(torch.cat([1 - p_fg, p_fg], 1)))


def tiny_unet(seed: int, channels=(4, 8, 16)) -> torch.nn.Module:
    """A small untrained MONAI 2D UNet (1 input, 2 output classes) initialised from ``seed``: a cheap white-box
    surrogate for the false-claim adversary (image sides must be multiples of 4)."""
    from monai.networks.nets import UNet

    torch.manual_seed(seed)
    return UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=channels, strides=(2,) * (len(channels) - 1), num_res_units=1).eval()


class CleanOracle(torch.nn.Module):
    """Test double of a clean network: confident everywhere (0.99 / 0.01), with or without the trigger, as
    :class:`TriggerOracle` is on untriggered inputs. Two-class softmax logits."""

    def forward(self, x):
        fg = (x[:, :1] > 0.7).float()
        p_fg = fg * 0.98 + 0.01
        return torch.log(torch.cat([1 - p_fg, p_fg], 1))
