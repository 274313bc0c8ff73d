"""Trainer handler :class:`SimulatedAttacks`: robust embedding (ComMark's idea) by simulating removal attacks
(weight noise, magnitude pruning) on the weights inside the training loop."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents

from monai_stealthmark.utils import load_random_state, random_state_dict

__all__ = ["SimulatedAttacks"]

_KINDS = ("noise", "prune")


class SimulatedAttacks:
    """Train at attacked weights: before an iteration's forward pass the network's weights are perturbed (weight
    noise or global magnitude pruning, drawn at random), and right after the backward pass they are restored,
    so the optimiser updates the clean weights with the gradient taken at the attacked point. The watermark
    (and the task) are thereby learned to hold in a neighbourhood of the weights that pruning and noise reach.

    Attach to a MONAI ``SupervisedTrainer`` (it fires ``IterationEvents.BACKWARD_COMPLETED`` between backward
    and optimiser step)::

        SimulatedAttacks().attach(trainer)

    Part of the recommended recipe: ``attach_watermark`` (the bundle overlay) attaches it with these defaults.

    Its draws are part of a training run's state: ``state_dict()`` / ``load_state_dict()`` let an ignite
    ``Checkpoint`` save and restore them, so a resumed run draws the attacks an uninterrupted one would.

    Args:
        kinds: attacks to draw from: ``"noise"`` (Gaussian, ``noise_scale`` times each tensor's std) and
            ``"prune"`` (zero the smallest ``prune_amount`` share of all conv/linear weights by magnitude;
            the share is drawn uniformly from the given range).
        prob: share of iterations that train at attacked weights.
        noise_scale: relative weight-noise level.
        prune_amount: ``(low, high)`` range of the pruning share.
        seed: seed of the draws.
    """

    def __init__(
        self,
        kinds: Sequence[str] = _KINDS,
        prob: float = 0.3,
        noise_scale: float = 0.05,
        prune_amount: Sequence[float] = (0.3, 0.7),
        seed: int = 0,
    ) -> None:
        kinds = tuple(kinds)
        bad = [k for k in kinds if k not in _KINDS]
        if not kinds or bad:
            raise ValueError(f"kinds must be a non-empty subset of {_KINDS}, got {kinds}.")
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must lie in [0, 1], got {prob}.")
        lo, hi = (float(a) for a in prune_amount)
        if not 0.0 <= lo <= hi < 1.0:
            raise ValueError(f"prune_amount must be (low, high) with 0 <= low <= high < 1, got {prune_amount}.")
        self.kinds, self.prob, self.noise_scale, self.prune_amount = kinds, float(prob), float(noise_scale), (lo, hi)
        self.R = np.random.RandomState(seed)
        self._saved: list[torch.Tensor] | None = None
        self.n_attacked = 0

    def attach(self, engine: Engine) -> None:
        """Perturb at each iteration's start and restore after its backward pass, before the optimiser step."""
        engine.add_event_handler(Events.ITERATION_STARTED, self.perturb)
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self.restore)

    def state_dict(self) -> dict:
        """The draw state (the random generator and the count of attacked steps), for checkpoints."""
        return {"rng": random_state_dict(self.R), "n_attacked": self.n_attacked}

    def load_state_dict(self, state: dict) -> None:
        """Restore the draw state saved by :meth:`state_dict`."""
        load_random_state(self.R, state["rng"])
        self.n_attacked = int(state["n_attacked"])

    @staticmethod
    def _weights(net: torch.nn.Module) -> list[torch.nn.Parameter]:
        """The convolution and linear weights that the attacks reach (biases and norms are left alone)."""
        kinds = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d, torch.nn.Linear)
        return [m.weight for m in net.modules() if isinstance(m, kinds)]

    @torch.no_grad()
    def perturb(self, engine: Engine) -> None:
        """With probability ``prob``, save the weights and apply one attack drawn from ``kinds`` in place."""
        if self.R.rand() >= self.prob:
            return
        ws = self._weights(engine.network)
        if not ws:
            raise ValueError("SimulatedAttacks found no convolution or linear weights in engine.network.")
        self._saved = [w.detach().clone() for w in ws]
        kind = self.kinds[self.R.randint(len(self.kinds))]
        if kind == "noise":
            for w in ws:
                g = torch.from_numpy(self.R.standard_normal(tuple(w.shape)).astype(np.float32)).to(w.device, w.dtype)
                w.add_(g * self.noise_scale * w.std().clamp_min(1e-12))
        else:
            amount = self.R.uniform(*self.prune_amount)
            mags = torch.cat([w.abs().flatten() for w in ws])
            k = int(amount * mags.numel())
            if k > 0:
                thr = mags.kthvalue(k).values
                for w in ws:
                    w.mul_((w.abs() > thr).to(w.dtype))
        self.n_attacked += 1

    @torch.no_grad()
    def restore(self, engine: Engine) -> None:
        """Put the saved clean weights back, so the optimiser steps from them with the attacked gradient."""
        if self._saved is None:
            return
        for w, s in zip(self._weights(engine.network), self._saved):
            w.copy_(s)
        self._saved = None
