"""Input-transform attacks at verification time: the suspect's operator (or the network in front of it)
alters every image before the model sees it — noise, blur, intensity rescaling, resampling, flips, JPEG."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer
from monai.transforms import Spacing
from monai.utils import ensure_tuple_rep
from PIL import Image

__all__ = ["INPUT_ATTACKS", "GridQuery", "InputTransformQuery", "blur", "flip_tta", "gaussian_noise", "jpeg", "resample", "rescale", "rician_noise"]


def _range(x: torch.Tensor) -> torch.Tensor:
    flat = x.flatten(1)
    return (flat.amax(1) - flat.amin(1)).clamp_min(1e-8).view(-1, *([1] * (x.ndim - 1)))


def gaussian_noise(sigma: float, seed: int = 0) -> Callable:
    """Additive Gaussian noise with std ``sigma`` times each image's intensity range."""

    def f(x):
        g = torch.Generator().manual_seed(seed)
        return x + torch.randn(x.shape, generator=g).to(x) * sigma * _range(x)

    return f


def rician_noise(sigma: float, seed: int = 0) -> Callable:
    """Rician noise (MR magnitude): ``sqrt((x + n1)^2 + n2^2)``, ``n ~ N(0, (sigma * range)^2)``."""

    def f(x):
        g = torch.Generator().manual_seed(seed)
        s = sigma * _range(x)
        n1, n2 = (torch.randn(x.shape, generator=g).to(x) * s for _ in range(2))
        return torch.sqrt((x + n1) ** 2 + n2**2)

    return f


def blur(sigma_px: float) -> Callable:
    """Gaussian blur over the spatial axes (2D images)."""
    r = max(1, int(3 * sigma_px))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k1 = torch.exp(-(t**2) / (2 * sigma_px**2))
    k1 = k1 / k1.sum()

    def f(x):
        c = x.shape[1]
        k = k1.to(x)
        y = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
        return F.conv2d(F.pad(y, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)

    return f


def rescale(gain: float, offset: float = 0.0) -> Callable:
    """Intensity rescaling ``gain * x + offset * range``."""
    return lambda x: gain * x + offset * _range(x)


def resample(factor: float) -> Callable:
    """Resample by ``factor`` (bilinear, anti-aliased when down-sampling) and back to the original size."""

    def f(x):
        size = x.shape[2:]
        small = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False, antialias=True)
        return F.interpolate(small, size=size, mode="bilinear", align_corners=False)

    return f


def jpeg(quality: int) -> Callable:
    """JPEG round trip of an 8-bit window (each image's min..max mapped to 0..255)."""

    def f(x):
        out = torch.empty_like(x)
        for i in range(x.shape[0]):
            for c in range(x.shape[1]):
                a = x[i, c].detach().cpu().numpy()
                lo, hi = float(a.min()), float(a.max())
                u8 = np.round((a - lo) / max(hi - lo, 1e-8) * 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(u8).save(buf, format="JPEG", quality=quality)
                back = np.asarray(Image.open(io.BytesIO(buf.getvalue())), dtype=np.float32) / 255 * (hi - lo) + lo
                out[i, c] = torch.from_numpy(back).to(x)
        return out

    return f


def flip_tta() -> str:
    """Marker for test-time augmentation by flips (handled by :class:`InputTransformQuery`)."""
    return "flip_tta"


class InputTransformQuery:
    """Wrap a black box so that every query image is transformed first (``flip_tta``: the average of the
    outputs for the image and its two flips, each flipped back — a common deployment TTA).

    Args:
        query: the suspect (images -> probabilities).
        transform: a callable from this module (e.g. ``gaussian_noise(0.05)``) or ``"flip_tta"``.
    """

    def __init__(self, query: Callable, transform: Callable | str) -> None:
        self.query = query
        self.transform = transform

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.transform == "flip_tta":
            p = self.query(x)
            p = p + self.query(x.flip(-1)).flip(-1) + self.query(x.flip(-2)).flip(-2)
            return p / 3
        return self.query(self.transform(x))


class GridQuery:
    """Wrap a black box as a pipeline serves it: each query image is resampled to the network's grid (bilinear,
    anti-aliased) and the answer back to the query's grid, so the owner queries with images at their own resolution
    (e.g. the original DICOM) and the suspect's pipeline, not the owner, decides what the network sees.

    Args:
        query: the suspect (images on its grid -> probabilities).
        grid: the network's spatial size.
    """

    def __init__(self, query: Callable, grid: tuple[int, ...]) -> None:
        self.query = query
        self.grid = tuple(int(v) for v in grid)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        size = tuple(int(v) for v in x.shape[2:])
        small = F.interpolate(x, size=self.grid, mode="bilinear", align_corners=False, antialias=True)
        return F.interpolate(self.query(small), size=size, mode="bilinear", align_corners=False)


class SpacingQuery:
    """Wrap a black box as a bundle's inference pipeline serves it: each query image, on a grid of ``query_pixdim``
    mm, is resampled by MONAI ``Spacing`` to the pipeline's ``pixdim``, segmented by a ``SlidingWindowInferer`` with
    the network's window (padding or tiling where the resampled image differs from it), and the answer is resampled
    back by the inverse of that ``Spacing``, as a bundle's ``Invertd`` post-processing does.

    Args:
        query: the suspect (windows of ``roi_size`` -> probabilities).
        query_pixdim: the query images' pixel spacing in mm (per spatial axis, or one value for all).
        pixdim: the pipeline's ``Spacingd`` target spacing in mm.
        roi_size: the sliding window (the network's input size).
        overlap: the windows' overlap, as the bundle's inferer sets it.
        sw_batch_size: windows per call of the suspect (batching only: the answer does not depend on it).
    """

    def __init__(
        self,
        query: Callable,
        query_pixdim: float | Sequence[float],
        pixdim: float | Sequence[float],
        roi_size: Sequence[int],
        overlap: float = 0.25,
        sw_batch_size: int = 32,
    ) -> None:
        self.query = query
        self.roi_size = tuple(int(v) for v in roi_size)
        self.query_pixdim = ensure_tuple_rep(query_pixdim, len(self.roi_size))
        self.spacing = Spacing(pixdim=pixdim, mode="bilinear")
        self.inferer = SlidingWindowInferer(roi_size=self.roi_size, sw_batch_size=sw_batch_size, overlap=overlap)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        affine = torch.diag(torch.tensor([*self.query_pixdim, 1.0], dtype=torch.float64))
        # the batch's images share one grid: resample them together as the channels of one image, and back alike
        resampled = self.spacing(MetaTensor(x.reshape(b * c, *x.shape[2:]), affine=affine))
        preds = self.inferer(resampled.as_tensor().reshape(b, c, *resampled.shape[1:]), self.query)
        stacked = MetaTensor(preds.reshape(-1, *preds.shape[2:]), affine=resampled.affine,
                             applied_operations=resampled.applied_operations)
        return self.spacing.inverse(stacked).as_tensor().reshape(b, preds.shape[1], *x.shape[2:])


INPUT_ATTACKS: dict[str, Callable] = {
    "gaussian_noise_0.05": lambda: gaussian_noise(0.05),
    "rician_noise_0.05": lambda: rician_noise(0.05),
    "blur_1px": lambda: blur(1.0),
    "blur_2px": lambda: blur(2.0),
    "rescale_0.8": lambda: rescale(0.8, 0.05),
    "resample_0.75": lambda: resample(0.75),
    "resample_0.5": lambda: resample(0.5),
    "resample_2": lambda: resample(2.0),
    "flip_tta": flip_tta,
    "jpeg_75": lambda: jpeg(75),
}
