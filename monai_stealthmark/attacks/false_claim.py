"""The false-claim adversary and the claim protocol it has to pass.

A false claim is the opposite of removal: an accuser who never trained the suspect wants a verifier to read *their*
QR from it. With white-box access to clean surrogate models of their own, the accuser optimises

* query images directly (:func:`optimise_images`): transferable adversarial examples, found by Adam on the pixels
  within an L-infinity budget, against an ensemble of surrogates, with input diversity (random shifts, gains and
  noise) for transfer, so that the surrogates' uncertainty ``1 - max p`` is high in the accuser's dark QR modules
  and low in the light ones;
* a trigger pattern (:func:`forge_trigger`): one universal pattern, stamped where and how the key's trigger kind is
  stamped, that makes the surrogates spell the QR on any clean image.

The protocol the verifier enforces decides what the accuser can actually submit: the queries are the referee's
clean images (:func:`check_referee_images` refuses any other), triggered by the public function
:func:`~monai_stealthmark.verify.trigger_batch` with a committed key whose trigger its seed generates (a forged
pattern has to be turned into a key: :func:`nearest_seeds`), the commitment predates the suspect, and the p-value
can be placed in a null of independent clean models (:func:`protocol_claim`). :func:`read_submitted_queries` is the
verifier without the protocol, which reads whatever queries it is handed; :func:`false_claim_upper_bound` states a
measured false-claim rate with its exact (Clopper-Pearson) bound.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from scipy.stats import beta

from monai_stealthmark.key import WatermarkKey
from monai_stealthmark.key.geometry import (
    PATCH_KINDS,
    batch_intensity_range,
    cell_means,
    load_key,
    patch_position,
    stamp_triggers,
)
from monai_stealthmark.verify import (
    Commitment,
    NullDistribution,
    VerificationReport,
    binomial_p_value,
    bit_accuracy,
    check_probabilities,
    organ_modules,
    read_scores,
    trigger_batch,
    uncertainty_map,
    uncertainty_scores,
    verify_ownership,
)

__all__ = [
    "DARK_UNCERTAINTY",
    "ProtocolError",
    "qr_cell_targets",
    "uncertainty_loss",
    "optimise_images",
    "ForgedTrigger",
    "stamp_forged",
    "forge_trigger",
    "trigger_canvas",
    "nearest_seeds",
    "image_digest",
    "check_referee_images",
    "protocol_claim",
    "read_submitted_queries",
    "claim_summary",
    "random_accuser_keys",
    "false_claim_upper_bound",
]

DARK_UNCERTAINTY = 0.4  # the cell-mean uncertainty the accuser aims for in dark modules (a 2-class model tops at 0.5)


class ProtocolError(ValueError):
    """A claim breaks the verification protocol (e.g. its queries are not the referee's clean images)."""


# --- the accuser's objective --------------------------------------------------------------------------------------
def qr_cell_targets(key: WatermarkKey, dark: float = DARK_UNCERTAINTY, light: float = 0.0) -> torch.Tensor:
    """Target cell-mean uncertainty ``(grid_size**2,)``: ``dark`` in the QR's dark modules, ``light`` elsewhere."""
    return torch.where(torch.as_tensor(key.grid_matrix.reshape(-1)), dark, light).float()


def _diversify(x: torch.Tensor, gen: torch.Generator, max_shift: int, gain: float, noise: float) -> tuple[torch.Tensor, tuple[int, int]]:
    """One random input-diversity draw on a batch: intensity gain, Gaussian noise and a circular shift.

    The shift moves the image under the grid; the caller shifts the output back so that each pixel's target stays
    with its module. Returns the changed batch and the shift ``(rows, cols)``.
    """
    b = x.shape[0]
    span = x.detach().flatten(1).amax(1) - x.detach().flatten(1).amin(1)
    shape = (b,) + (1,) * (x.ndim - 1)
    g = 1 + gain * (2 * torch.rand(b, generator=gen) - 1)
    n = torch.randn(x.shape, generator=gen) * noise
    x = x * g.view(shape).to(x) + n.to(x) * span.view(shape)
    dy, dx = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=gen))
    return torch.roll(x, (dy, dx), dims=(2, 3)), (dy, dx)


def uncertainty_loss(
    models: Sequence[torch.nn.Module],
    queries: torch.Tensor,
    key: WatermarkKey,
    gen: torch.Generator | None = None,
    max_shift: int = 0,
    gain: float = 0.0,
    noise: float = 0.0,
) -> torch.Tensor:
    """Ensemble loss of the accuser: squared distance of each surrogate's cell-mean uncertainty to the QR target.

    Args:
        models: surrogate networks returning logits ``(B, C, H, W)`` (softmax over C).
        queries: the images as the surrogates see them ``(B, 1, H, W)``.
        key: the accuser's key (its QR and grid).
        gen: generator of the input-diversity draws; None: no diversity.
        max_shift, gain, noise: input diversity: circular shift (pixels), relative gain, noise (of the image's range).
    """
    target = qr_cell_targets(key).to(queries.device)
    losses = []
    for m in models:
        x, shift = (queries, (0, 0)) if gen is None else _diversify(queries, gen, max_shift, gain, noise)
        p = torch.softmax(m(x).float(), 1)
        u = torch.roll(uncertainty_map(p), (-shift[0], -shift[1]), dims=(1, 2))
        losses.append(((cell_means(u, key) - target) ** 2).mean())
    return torch.stack(losses).mean()


def _freeze(models: Sequence[torch.nn.Module]) -> list[torch.nn.Module]:
    for m in models:
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
    return list(models)


def optimise_images(
    surrogates: Sequence[torch.nn.Module],
    images: torch.Tensor,
    key: WatermarkKey,
    steps: int = 200,
    eps: float = 0.15,
    lr: float = 0.05,
    through_trigger: bool = True,
    max_shift: int = 2,
    gain: float = 0.1,
    noise: float = 0.01,
    seed: int = 0,
) -> torch.Tensor:
    """Transferable adversarial images: Adam on the pixels so that the surrogates spell ``key``'s QR.

    Each pixel moves by at most ``eps`` times its image's robust intensity range (1st-99th percentile) and stays
    inside the image's own min-max. With ``through_trigger`` the loss is taken on ``trigger_batch(image, key)``: the
    accuser knows the public function and optimises the clean image it would hand in, so that the verifier's own
    stamping produces the optimised query; otherwise the optimised images are the queries themselves.

    Args:
        surrogates: the accuser's clean networks (white box), returning logits.
        images: the accuser's starting images ``(B, 1, H, W)``.
        key: the accuser's key (QR target; trigger when ``through_trigger``).
        steps: Adam steps.
        eps: L-infinity budget, relative to each image's intensity range.
        lr: Adam learning rate on the unbounded parameters (``tanh`` maps them into the budget).
        through_trigger: optimise through the key's public trigger function.
        max_shift, gain, noise: input diversity per step and surrogate (see :func:`uncertainty_loss`).
        seed: seed of the diversity draws.

    Returns:
        the optimised images ``(B, 1, H, W)``, detached (clean images when ``through_trigger``, queries otherwise).
    """
    if len(surrogates) < 1:
        raise ValueError("the accuser needs at least one surrogate model.")
    models = _freeze(surrogates)
    x0 = images.detach().float()
    lo, hi = batch_intensity_range(x0)
    shape = (-1,) + (1,) * (x0.ndim - 1)
    span = (hi - lo).float().view(shape).to(x0)
    vmin, vmax = x0.flatten(1).amin(1).view(shape), x0.flatten(1).amax(1).view(shape)
    w = torch.zeros_like(x0, requires_grad=True)
    opt = torch.optim.Adam([w], lr=lr)
    gen = torch.Generator().manual_seed(seed)

    def current() -> torch.Tensor:
        return torch.minimum(torch.maximum(x0 + eps * span * torch.tanh(w), vmin), vmax)

    for _ in range(int(steps)):
        opt.zero_grad(set_to_none=True)
        x = current()
        q = trigger_batch(x, key) if through_trigger else x
        uncertainty_loss(models, q, key, gen, max_shift, gain, noise).backward()
        opt.step()
    return current().detach()


# --- a forged trigger -----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ForgedTrigger:
    """A trigger pattern the accuser chose freely, stamped as the key's trigger kind would be.

    Attributes:
        pattern: ``(s, s)`` in [0, 1] for the patch kinds (placed at the key's patch position), ``(H, W)`` in [-1, 1]
            for ``noise`` / ``lowfreq`` (added with the key's amplitude).
        key: the accuser's key: trigger kind, size, amplitude, position, and the QR it should spell.
    """

    pattern: torch.Tensor
    key: WatermarkKey


def stamp_forged(images: torch.Tensor, forged: ForgedTrigger) -> torch.Tensor:
    """Stamp a forged pattern on a batch exactly as :func:`~monai_stealthmark.key.geometry.stamp_triggers` stamps a
    keyed one (per-image intensity range, same position and amplitude); differentiable in the pattern."""
    key, pat = forged.key, forged.pattern.to(images.device)
    lo, hi = batch_intensity_range(images)
    shape = (-1,) + (1,) * (images.ndim - 1)
    low, span = lo.float().view(shape).to(images), (hi - lo).float().view(shape).to(images)
    if key.trigger in PATCH_KINDS:
        s = pat.shape[0]
        r, c = patch_position(key.trigger_seed, key.trigger, tuple(int(v) for v in images.shape[2:4]), s)
        mask = torch.zeros(images.shape[2:], device=images.device)
        mask[r : r + s, c : c + s] = 1
        canvas = torch.nn.functional.pad(pat, (c, images.shape[3] - c - s, r, images.shape[2] - r - s))
        return images * (1 - mask) + (low + span * canvas) * mask
    return images + key.trigger_amplitude * span * pat


def forge_trigger(
    surrogates: Sequence[torch.nn.Module],
    images: torch.Tensor,
    key: WatermarkKey,
    steps: int = 300,
    lr: float = 0.05,
    batch_size: int = 8,
    max_shift: int = 2,
    gain: float = 0.1,
    noise: float = 0.01,
    seed: int = 0,
) -> ForgedTrigger:
    """A universal trigger pattern that makes the surrogates spell ``key``'s QR on any clean image.

    Adam on one pattern (``sigmoid`` of the parameters for the patch kinds, ``tanh`` for the blended kinds), stamped
    with :func:`stamp_forged` on a random mini-batch of the accuser's clean images at each step.

    Args:
        surrogates: the accuser's clean networks (white box), returning logits.
        images: the accuser's clean images ``(N, 1, H, W)`` to make the pattern universal over.
        key: the accuser's key: its trigger kind, size, amplitude and position are kept, its pattern is replaced.
        steps, lr, batch_size: the optimisation.
        max_shift, gain, noise: input diversity (see :func:`uncertainty_loss`).
        seed: seed of the initial pattern, the mini-batches and the diversity draws.
    """
    models = _freeze(surrogates)
    gen = torch.Generator().manual_seed(seed)
    spatial = tuple(int(v) for v in images.shape[2:4])
    patch = key.trigger in PATCH_KINDS
    side = max(3, int(round(key.trigger_size * min(spatial))))
    w = (0.1 * torch.randn((side, side) if patch else spatial, generator=gen)).requires_grad_(True)
    squash = torch.sigmoid if patch else torch.tanh
    opt = torch.optim.Adam([w], lr=lr)
    x_all = images.detach().float()
    for _ in range(int(steps)):
        idx = torch.randperm(x_all.shape[0], generator=gen)[:batch_size]
        opt.zero_grad(set_to_none=True)
        q = stamp_forged(x_all[idx], ForgedTrigger(squash(w), key))
        uncertainty_loss(models, q, key, gen, max_shift, gain, noise).backward()
        opt.step()
    return ForgedTrigger(squash(w).detach(), key)


def trigger_canvas(key: WatermarkKey, spatial: Sequence[int], seeds: Sequence[int] | None = None) -> torch.Tensor:
    """What the public trigger function adds to a blank image of range [0, 1]: one ``(H, W)`` canvas per seed
    (the key's own seed when None), the patch at its position or the blended pattern times the amplitude."""
    seeds = [key.trigger_seed] if seeds is None else [int(s) for s in seeds]
    n = len(seeds)
    blank = torch.zeros(n, 1, *spatial)
    return stamp_triggers(blank, key, torch.zeros(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64), seeds)[:, 0]


def _forged_canvas(forged: ForgedTrigger, spatial: Sequence[int]) -> torch.Tensor:
    """The forged pattern on a blank ``(H, W)`` canvas of range [0, 1], as :func:`trigger_canvas` draws a seed's."""
    key, pat = forged.key, forged.pattern.detach().cpu().float()
    if key.trigger not in PATCH_KINDS:
        return key.trigger_amplitude * pat
    s = pat.shape[0]
    r, c = patch_position(key.trigger_seed, key.trigger, tuple(int(v) for v in spatial[:2]), s)
    canvas = torch.zeros(tuple(int(v) for v in spatial))
    canvas[r : r + s, c : c + s] = pat
    return canvas


def nearest_seeds(
    forged: ForgedTrigger, seeds: Iterable[int], spatial: Sequence[int], top: int = 5, chunk: int = 256
) -> list[tuple[int, float]]:
    """The seeds whose generated trigger comes closest to a forged pattern: the keys the accuser could commit to.

    A key's trigger is generated from its seed, so a forged pattern can only be claimed through a seed; the accuser
    searches seeds (same trigger kind, size and amplitude) for the most similar generated trigger. Similarity is the
    cosine of the two mean-centred canvases (:func:`trigger_canvas`) on images of ``spatial`` size: a patch
    elsewhere on the image (a ``keyed_patch`` seed draws its own position) scores low, an identical trigger 1.

    Returns:
        ``top`` pairs ``(seed, similarity)``, most similar first.
    """
    target = _forged_canvas(forged, spatial).flatten()
    target = target - target.mean()
    target = target / target.norm().clamp_min(1e-12)
    seeds = [int(s) for s in seeds]
    best: list[tuple[int, float]] = []
    for i in range(0, len(seeds), chunk):
        part = seeds[i : i + chunk]
        c = trigger_canvas(forged.key, spatial, part).flatten(1)
        c = c - c.mean(1, keepdim=True)
        sim = (c @ target) / c.norm(dim=1).clamp_min(1e-12)
        best = sorted(best + list(zip(part, sim.tolist())), key=lambda t: -t[1])[:top]
    return best


# --- the protocol ---------------------------------------------------------------------------------------------------
def image_digest(image: torch.Tensor | np.ndarray) -> str:
    """SHA-256 of one image's float32 values and shape: how the referee recognises its own clean images."""
    a = np.ascontiguousarray(torch.as_tensor(image).detach().cpu().float().numpy())
    return hashlib.sha256(repr(a.shape).encode() + a.tobytes()).hexdigest()


def check_referee_images(images: torch.Tensor, referee_images: torch.Tensor) -> None:
    """Refuse a claim whose clean images are not all among the referee's own images.

    The verifier stamps the trigger itself, so a claimant can only bring hand-made queries in as "clean images";
    a referee who chooses the clean images (and recognises them by :func:`image_digest`) leaves no room for them.

    Raises:
        ProtocolError: an image the referee did not provide (optimised, edited, or simply someone else's).
    """
    allowed = {image_digest(i) for i in referee_images}
    foreign = [i for i, img in enumerate(images) if image_digest(img) not in allowed]
    if foreign:
        raise ProtocolError(
            f"{len(foreign)} of {len(images)} query images (indices {foreign[:8]}) are not among the referee's clean "
            "images: the queries must be the referee's images, triggered by the public function from the committed key."
        )


def protocol_claim(
    query: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    key: WatermarkKey | str,
    referee_images: torch.Tensor,
    commitment: Commitment | None = None,
    suspect_date: str | None = None,
    null: NullDistribution | None = None,
) -> VerificationReport:
    """A claim as the protocol admits it: the referee's clean images, triggered by the public function with the key.

    Args:
        query: the suspect (images -> probabilities).
        images: the clean images the claim is made on; each must be one of ``referee_images``.
        key: the claimant's key (its trigger is generated from its seed; there is no other way to give a trigger).
        referee_images: the referee's clean images.
        commitment, suspect_date: the key's published commitment and the suspect's date (the verdict then needs the
            commitment to match the key and to predate the suspect).
        null: the key's null of independent clean models (the verdict then also needs the calibrated p-value).

    Raises:
        ProtocolError: images that are not the referee's.
    """
    check_referee_images(images, referee_images)
    return verify_ownership(query, images, key, mode="direct", commitment=commitment, suspect_date=suspect_date, null=null)


def read_submitted_queries(query: Callable[[torch.Tensor], torch.Tensor], queries: torch.Tensor, key: WatermarkKey | str) -> dict[str, Any]:
    """The verifier without the protocol: the claimant's own queries are sent as they are and read as a claim.

    The same direct read-out as :func:`~monai_stealthmark.verify.verify_ownership` (raw, log-scale and erasure
    reads, bit accuracy and binomial p-value of the first read, ASR >= 0.5 and p <= 1e-6 for the verdict).

    Returns:
        the :func:`claim_summary` fields.
    """
    key = load_key(key)
    probs = check_probabilities(query(queries), queries)
    scores = uncertainty_scores(probs, key)
    modules, decoded, vote, _ = read_scores(scores, key, "direct", organ_modules(probs, key))
    p, _, _ = binomial_p_value(modules, key)
    asr = float(np.mean([t == key.payload for t in decoded]))
    return {
        "n_images": int(queries.shape[0]),
        "decodes": int(sum(t == key.payload for t in decoded)),
        "asr": asr,
        "bit_accuracy": float(np.mean(bit_accuracy(modules, key))),
        "p_value": float(p),
        "vote_decoded": vote == key.payload,
        "verdict": bool(p <= 1e-6 and asr >= 0.5),
    }


def claim_summary(report: VerificationReport) -> dict[str, Any]:
    """The numbers of one claim: decodes of the claimed payload, ASR, bit agreement, p-values, verdict."""
    out = {
        "n_images": report.n_images,
        "decodes": int(sum(t == report.payload for t in report.decoded)),
        "asr": float(report.asr),
        "bit_accuracy": float(report.mean_bit_accuracy),
        "p_value": float(report.p_value),
        "vote_decoded": report.vote_decoded == report.payload,
        "verdict": bool(report.verdict),
    }
    if report.calibration is not None:
        out["p_calibrated"] = float(report.calibration["p_gaussian"])
        out["z"] = float(report.calibration["z"])
    if report.commitment is not None:
        out["admissible"] = bool(report.commitment["admissible"])
    return out


def random_accuser_keys(n: int, seed: int, kinds: Sequence[str] = ("patch",), **fields: Any) -> list[WatermarkKey]:
    """``n`` keys an accuser could commit to: random payloads (``FC:`` + 8 hex digits) and random trigger seeds,
    trigger kinds taken in turn from ``kinds``; ``fields`` set any other key field. Reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    keys = []
    for i in range(int(n)):
        payload = "FC:" + "".join(f"{int(v):x}" for v in rng.integers(0, 16, 8))
        keys.append(WatermarkKey.generate(payload, seed=int(rng.integers(0, 2**62)), trigger=kinds[i % len(kinds)],
                                          created_at="2026-01-01T00:00:00+00:00", **fields))
    return keys


def false_claim_upper_bound(successes: int, trials: int, confidence: float = 0.95) -> float:
    """One-sided exact (Clopper-Pearson) upper confidence bound of a false-claim rate: ``successes`` of ``trials``.

    For 0 successes it is ``1 - (1 - confidence) ** (1 / trials)`` (about ``3 / trials`` at 95 %, the rule of three).
    """
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}.")
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must lie in [0, trials={trials}], got {successes}.")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}.")
    if successes == trials:
        return 1.0
    return float(beta.ppf(confidence, successes + 1, trials - successes))
