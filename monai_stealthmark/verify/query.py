"""Black-box access to a suspect model: a callable from images to probability maps, and checks on what it returns."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from monai.transforms import ResizeWithPadOrCrop
from monai.utils import convert_to_tensor, ensure_tuple_rep

from monai_stealthmark.utils import activate, check_activation

__all__ = [
    "NotProbabilitiesError",
    "ModelQuery",
    "check_probabilities",
    "fit_window",
    "is_softmax_output",
    "uncertainty_map",
]


class NotProbabilitiesError(ValueError):
    """The suspect model's outputs are not probability maps (hard masks, logits, NaNs, wrong shape)."""


def check_probabilities(p: torch.Tensor, images: torch.Tensor, softmax: bool | None = None) -> torch.Tensor:
    """Check that ``p`` is a batch of probability maps for ``images`` and return it as float.

    Args:
        p: the model's output ``(B, C, spatial...)``.
        images: the query ``(B, C_in, spatial...)``.
        softmax: whether channels must sum to one; None = only when C > 1 and they do.

    Raises:
        NotProbabilitiesError: wrong shape, NaN/inf, values outside [0, 1], or hard masks (0/1 only).
    """
    if not isinstance(p, torch.Tensor):
        raise NotProbabilitiesError(f"cannot verify: the model returned {type(p).__name__}, not a tensor.")
    if p.ndim != images.ndim or p.shape[0] != images.shape[0] or p.shape[2:] != images.shape[2:]:
        raise NotProbabilitiesError(
            f"cannot verify: outputs of shape {tuple(p.shape)} do not match the query {tuple(images.shape)} "
            "(expected (B, C, same spatial shape))."
        )
    p = p.float()
    if not torch.isfinite(p).all():
        raise NotProbabilitiesError("cannot verify: the model returned NaN or infinite values.")
    if p.max() > 1 + 1e-4 and bool(torch.equal(p, p.round())) and p.min() >= 0:
        raise NotProbabilitiesError(
            f"cannot verify: the model returns label maps (integer values 0..{int(p.max())}), not probabilities. "
            "The watermark lives in the probability maps; a mask-only API hides it."
        )
    if p.min() < -1e-4 or p.max() > 1 + 1e-4:
        raise NotProbabilitiesError(
            f"cannot verify: outputs are not probabilities (range [{p.min().item():.3g}, {p.max().item():.3g}]); "
            "if the model returns logits, wrap it with ModelQuery(..., activation='softmax' or 'sigmoid')."
        )
    soft = ((p > 1e-3) & (p < 1 - 1e-3)).float().mean()
    if soft < 1e-4:  # a handful of soft pixels (resampled mask edges) is still a hard mask
        raise NotProbabilitiesError(
            "cannot verify: outputs are not probabilities, the model returns hard masks (only 0/1 values). "
            "The watermark lives in the probability maps; a mask-only API hides it."
        )
    if p.shape[1] > 1 and softmax is not False:
        err = (p.sum(1) - 1).abs().max()
        if softmax and err > 1e-3:
            raise NotProbabilitiesError(f"cannot verify: softmax outputs do not sum to 1 over channels (max error {err:.3g}).")
    return p.clamp(0, 1)


def is_softmax_output(p: torch.Tensor) -> bool:
    """Whether probability maps ``(B, C, spatial...)`` are one softmax over several channels (they sum to one), rather
    than one or more independent sigmoid channels."""
    return p.shape[1] > 1 and bool((p.sum(1) - 1).abs().max() <= 1e-3)


def uncertainty_map(p: torch.Tensor) -> torch.Tensor:
    """Per-pixel uncertainty ``(B, spatial...)``: ``1 - max_c p`` for several channels, ``min(p, 1 - p)`` for one."""
    if p.shape[1] == 1:
        return torch.minimum(p[:, 0], 1 - p[:, 0])
    if not is_softmax_output(p):  # independent sigmoid channels: the least certain one
        return torch.minimum(p, 1 - p).amax(1)
    return 1 - p.amax(1)


def _check_logits(y: torch.Tensor, activation: str) -> None:
    """Refuse raw outputs that an activation would turn into fake probabilities (hard masks, label maps)."""
    if y.ndim < 2:
        raise NotProbabilitiesError(f"cannot verify: the model returned shape {tuple(y.shape)}, expected (B, C, spatial...).")
    if not y.is_floating_point() or bool(torch.equal(y, y.round())):
        raise NotProbabilitiesError(
            f"cannot verify: the model returns hard masks or label maps (integer values only, dtype {y.dtype}), not "
            f"logits, so {activation} would only fake probabilities. The watermark lives in the probability maps; "
            "query an endpoint that returns logits or probabilities."
        )
    if activation == "softmax" and y.shape[1] == 1:
        raise NotProbabilitiesError(
            "cannot verify: softmax over a single output channel is always 1; use activation='sigmoid' for a "
            "one-channel model."
        )


class ModelQuery:
    """Wrap a network (module, TorchScript file, or a plain callable) as a black box returning probabilities.

    Args:
        model: a ``torch.nn.Module``, the path of a TorchScript file, or any callable ``images -> outputs``.
        activation: applied to the model's outputs: ``"softmax"``, ``"sigmoid"`` or None (already probabilities).
        device: where to run a module; default: CUDA when available, else CPU.
        batch_size: queries are sent in chunks of this size.
        inferer: an optional MONAI inferer (e.g. ``SlidingWindowInferer``) called as ``inferer(images, model)``.
        window: the spatial size of the network's input window, where the QR lives; the verifier queries with
            images of exactly this size (:func:`fit_window`), so a sliding window sees one window, aligned with the
            QR. Default: the inferer's ``roi_size`` when it has one, else None (whole images).
    """

    def __init__(
        self,
        model: torch.nn.Module | Callable | str | os.PathLike,
        activation: str | None = "softmax",
        device: str | torch.device | None = None,
        batch_size: int = 32,
        inferer: Callable | None = None,
        window: Sequence[int] | None = None,
    ) -> None:
        if isinstance(model, (str, os.PathLike)):
            path = Path(model)
            if not path.is_file():
                raise FileNotFoundError(f"model file {str(path)!r} does not exist.")
            try:
                model = torch.jit.load(str(path), map_location="cpu")
            except Exception as e:
                raise ValueError(f"{str(path)!r} is not a TorchScript model: {e}") from e
        check_activation(activation, allow_none=True)
        self.device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model
        if isinstance(model, torch.nn.Module):
            self.model = model.to(self.device).eval()
        self.activation = activation
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.batch_size = int(batch_size)
        self.inferer = inferer
        self.window = getattr(inferer, "roi_size", None) if window is None else window
        self.n_queries = 0

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        outs = []
        for i in range(0, images.shape[0], self.batch_size):
            x = images[i : i + self.batch_size].to(self.device)
            y = self.inferer(x, self.model) if self.inferer is not None else self.model(x)
            if isinstance(y, (tuple, list)):  # deep-supervision style outputs: the first one is the prediction
                y = y[0]
            y = torch.as_tensor(y)
            if self.activation is not None:
                _check_logits(y, self.activation)
            outs.append(activate(y.float(), self.activation))
            self.n_queries += x.shape[0]
        return torch.cat(outs)


def fit_window(images: torch.Tensor, window: Sequence[int] | int | None) -> torch.Tensor:
    """Centre-crop or zero-pad a ``(B, C, spatial...)`` batch to the network's input ``window`` (one size for every
    dimension, or one per dimension; entries ``<= 0`` keep that dimension), the rule by which verification queries a
    patch-trained network: the QR is laid over the window the network was trained on, and a query of that size
    reaches it as one window of the suspect's own inferer. Padding is zero, as a sliding window pads."""
    if window is None:
        return images
    spatial = images.shape[2:]
    window = ensure_tuple_rep(window, len(spatial)) if isinstance(window, int) else tuple(window)
    if len(window) != len(spatial):
        raise ValueError(f"window {tuple(window)} does not match the images' spatial shape {tuple(spatial)}.")
    size = [int(w) if int(w) > 0 else int(s) for w, s in zip(window, spatial)]
    if list(spatial) == size:
        return images
    flat = images.reshape(-1, *spatial)  # every image and channel as one channel-first image
    out = convert_to_tensor(ResizeWithPadOrCrop(size, mode="constant")(flat), track_meta=False)
    return out.reshape(*images.shape[:2], *size)
