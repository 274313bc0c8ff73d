"""Quantisation attacks: half precision, int8 weights, int8 static (calibrated activations), TorchScript.

PyTorch's eager int8 kernels cover Linear layers (dynamic) and need a backend-specific graph rewrite for
convolutions, so the int8 attacks here *simulate* int8 exactly as a PTQ deployment computes it: weights
rounded per output channel to 255 symmetric levels, and (static) every convolution's output rounded per tensor
to 256 levels over the range seen on calibration data. What the verifier sees is the same rounding.
"""

from __future__ import annotations

import io

import torch

from ._common import clone, conv_layers

__all__ = ["CastQuery", "int8_weights", "int8_static", "torchscript_roundtrip"]


class CastQuery(torch.nn.Module):
    """The model run in ``dtype`` (fp16 / bf16): weights and inputs cast, outputs returned as float32."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype = torch.float16) -> None:
        super().__init__()
        self.model = clone(model).to(dtype)
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.dtype)).float()


@torch.no_grad()
def _fake_quant_weights(m: torch.nn.Module) -> None:
    for _, c in conv_layers(m):
        w = c.weight
        dims = list(range(1, w.ndim))
        s = w.abs().amax(dim=dims, keepdim=True).clamp_min(1e-12) / 127.0
        c.weight.copy_((w / s).round().clamp(-127, 127) * s)


def int8_weights(model: torch.nn.Module) -> torch.nn.Module:
    """A copy whose convolution weights are rounded to int8 (symmetric, per output channel)."""
    m = clone(model)
    _fake_quant_weights(m)
    return m


@torch.no_grad()
def int8_static(model: torch.nn.Module, calib_images: torch.Tensor) -> torch.nn.Module:
    """int8 weights plus int8 activations (per-tensor affine ranges calibrated on ``calib_images``)."""
    m = int8_weights(model)
    convs = [c for _, c in conv_layers(m)]
    ranges: dict[int, list[float]] = {}

    def observe(k):
        def hook(mod, inp, out):
            lo, hi = float(out.min()), float(out.max())
            r = ranges.setdefault(k, [lo, hi])
            r[0], r[1] = min(r[0], lo), max(r[1], hi)

        return hook

    hooks = [c.register_forward_hook(observe(k)) for k, c in enumerate(convs)]
    m(calib_images.to(next(m.parameters()).device))
    for h in hooks:
        h.remove()

    def quant(k):
        lo, hi = ranges[k]
        scale = max(hi - lo, 1e-12) / 255.0

        def hook(mod, inp, out):
            return ((out - lo) / scale).round().clamp(0, 255) * scale + lo

        return hook

    for k, c in enumerate(convs):
        c.register_forward_hook(quant(k))
    return m


def torchscript_roundtrip(model: torch.nn.Module, example: torch.Tensor) -> torch.nn.Module:
    """Trace, serialise and reload the model (what an export to a deployment format does)."""
    buf = io.BytesIO()
    torch.jit.save(torch.jit.trace(clone(model), example), buf)
    buf.seek(0)
    return torch.jit.load(buf)
