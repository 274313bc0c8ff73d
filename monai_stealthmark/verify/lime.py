"""LIME read-out of the QR: grid segments aligned with the QR modules, one explained output per module.

Two implementations of the same estimator:

- :func:`lime_attributions`: batched torch (GPU when the query runs there). Bernoulli(1/2) segment masks drawn
  from ``numpy.random.RandomState(seed)`` exactly as ``lime`` draws them (first row all ones), cosine distance
  to the unperturbed sample, kernel ``sqrt(exp(-d^2 / width^2))``, weighted ridge (alpha 1, intercept) solved
  for every output at once.
- :func:`lime_reference_attributions`: the ``lime`` package's ``LimeImageExplainer`` on the same segments,
  samples and kernel, used to cross-check the torch version.

Every perturbed image hides its ``0`` segments behind the key's occlusion texture and then carries the trigger,
exactly like the occluded samples seen in training. Output ``c`` is the mean uncertainty of cell ``c``; the
attribution of cell ``c`` is the weight of segment ``c`` in the explanation of output ``c`` (high where the
model's uncertainty in that cell depends on the cell being visible: the QR's dark modules).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from monai_stealthmark.key import WatermarkKey
from monai_stealthmark.key.geometry import apply_trigger, cell_means, intensity_range, module_index_map, occlude_cells
from monai_stealthmark.verify.query import check_probabilities, uncertainty_map

__all__ = ["lime_masks", "perturbed_queries", "lime_attributions", "weighted_ridge", "lime_reference_attributions"]


def lime_masks(num_samples: int, n_features: int, seed: int) -> np.ndarray:
    """Segment on/off samples, drawn as ``lime`` draws them (``RandomState(seed).randint(0, 2)``, row 0 = all on)."""
    z = np.random.RandomState(seed).randint(0, 2, num_samples * n_features).reshape(num_samples, n_features)
    z[0, :] = 1
    return z


def perturbed_queries(image: torch.Tensor, key: WatermarkKey, on: torch.Tensor, intensity: tuple[float, float]) -> torch.Tensor:
    """Images ``(N, C, spatial...)`` with the ``off`` cells of each row of ``on`` ``(N, F)`` hidden, then triggered."""
    x = image.unsqueeze(0).expand(on.shape[0], *image.shape)
    x = occlude_cells(x.float(), key, on == 0, intensity)
    flat = x.reshape(-1, *x.shape[2:])
    return apply_trigger(flat, key, intensity).reshape(x.shape)


def _query_outputs(query: Callable, image: torch.Tensor, key: WatermarkKey, on: torch.Tensor, intensity, batch_size: int) -> torch.Tensor:
    outs = []
    for i in range(0, on.shape[0], batch_size):
        x = perturbed_queries(image, key, on[i : i + batch_size], intensity)
        p = check_probabilities(query(x), x).to(x.device)
        outs.append(cell_means(uncertainty_map(p), key))
    return torch.cat(outs)


def weighted_ridge(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, alpha: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted ridge regression with intercept for many targets at once (as sklearn's ``Ridge`` with sample_weight).

    Args:
        x: ``(N, F)`` design; y: ``(N, K)`` targets; w: ``(N,)`` sample weights.

    Returns:
        ``(coef (F, K), intercept (K,))``.
    """
    x, y, w = x.double(), y.double(), w.double()
    sw = w / w.sum()
    xm = sw @ x
    ym = sw @ y
    xc, yc = x - xm, y - ym
    xw = xc * w[:, None]
    a = xc.T @ xw + alpha * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    coef = torch.linalg.solve(a, xw.T @ yc)
    return coef, ym - xm @ coef


def lime_attributions(
    query: Callable,
    image: torch.Tensor,
    key: WatermarkKey,
    num_samples: int = 1000,
    seed: int = 0,
    kernel_width: float = 0.25,
    alpha: float = 1.0,
    batch_size: int = 64,
    return_full: bool = False,
):
    """Batched torch LIME over the QR grid for one clean image (the trigger is stamped on every sample).

    Args:
        query: black box ``images -> probabilities``.
        image: the clean image ``(C, spatial...)``.
        key: the watermark key.
        num_samples: perturbation samples (row 0 is the unperturbed triggered image).
        seed: seed of the segment masks (same stream as ``lime`` with ``random_state=seed``).
        kernel_width: LIME's kernel width on the cosine distance.
        alpha: ridge regularisation.
        batch_size: images per query.
        return_full: also return the full ``(F, F)`` coefficient matrix (features x outputs).

    Returns:
        ``(F,)`` attribution per cell (diagonal), and the full matrix when ``return_full``.
    """
    intensity = intensity_range(image)
    n_features = key.grid_size**2
    on = torch.as_tensor(lime_masks(num_samples, n_features, seed), device=image.device)
    y = _query_outputs(query, image, key, on, intensity, batch_size)
    z = on.to(y.device).double()
    cos = z.sum(1) / (z.norm(dim=1).clamp_min(1e-12) * np.sqrt(n_features))
    d = 1 - cos
    w = torch.sqrt(torch.exp(-(d**2) / kernel_width**2))
    coef, _ = weighted_ridge(z, y, w, alpha)
    diag = torch.diagonal(coef).float()
    return (diag, coef.float()) if return_full else diag


def lime_reference_attributions(
    query: Callable, image: torch.Tensor, key: WatermarkKey, num_samples: int = 1000, seed: int = 0,
    kernel_width: float = 0.25, labels: list[int] | None = None, batch_size: int = 64,
) -> dict[int, np.ndarray]:
    """The ``lime`` package on the same segments, samples and kernel (2D single-channel images).

    Returns:
        ``{label: coefficient vector (F,)}`` for each explained cell ``label`` (all cells when None: slow).
    """
    from lime import lime_image  # here, not at the top: the optional `lime` package serves only this cross-check

    if image.ndim != 3 or image.shape[0] != 1:
        raise ValueError(f"the lime reference takes one 2D single-channel image (1, H, W), got {tuple(image.shape)}.")
    intensity = intensity_range(image)
    n_features = key.grid_size**2
    segments = module_index_map(image.shape[1:], key.grid_size).numpy().copy()  # the map is cached: LIME gets its own
    device = image.device

    def classifier_fn(batch: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(batch[..., 0], dtype=torch.float32, device=device)  # (N, H, W): lime makes RGB copies
        hidden = torch.isnan(x)  # hide_color=nan marks the hidden segments
        idx = torch.as_tensor(segments.reshape(-1), device=device)
        flat_hidden = hidden.reshape(x.shape[0], -1).float()
        per_cell = torch.zeros(x.shape[0], n_features, device=device).index_add_(1, idx, flat_hidden)
        cells_off = per_cell > 0
        # the cells lime hid, re-applied through the same query path as the torch version
        return _query_outputs(query, image, key, ~cells_off, intensity, batch.shape[0]).cpu().numpy().astype(np.float64)

    explainer = lime_image.LimeImageExplainer(kernel_width=kernel_width, feature_selection="none", random_state=seed)
    labels = list(range(n_features)) if labels is None else list(labels)
    exp = explainer.explain_instance(
        image[0].cpu().numpy().astype(np.float64),
        classifier_fn,
        labels=labels,
        top_labels=None,
        hide_color=np.nan,
        num_features=n_features,
        num_samples=num_samples,
        batch_size=batch_size,
        segmentation_fn=lambda _img: segments,
        random_seed=0,
    )
    out = {}
    for lab in labels:
        vec = np.zeros(n_features)
        for f, wgt in exp.local_exp[lab]:
            vec[f] = wgt
        out[lab] = vec
    return out
