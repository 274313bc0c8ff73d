"""Uncertainty-guided watermark loss: the base segmentation loss on clean samples, and on triggered samples a
soft target that keeps the hard segmentation but lowers the confidence to ``1 - tau`` in the QR's dark modules; on
every sample, optionally, the key's faint output mark in the background."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, MaskedDiceLoss
from torch.nn.modules.loss import _Loss

from monai_stealthmark.key import WatermarkKey
from monai_stealthmark.key.geometry import WM_CLEAN, WM_DARK, WM_LIGHT, WM_TWIN, load_key
from monai_stealthmark.key.output_mark import output_mark_target
from monai_stealthmark.utils import check_activation, dilate

__all__ = ["UncertaintyWatermarkLoss", "sample_flags"]


def sample_flags(wm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample code of a ``(B, 1, spatial...)`` watermark channel (its largest value) and the boolean mask of the
    samples that train as clean: clean ones (decoys included) and clean twins."""
    flag = wm.flatten(1).amax(1)
    return flag, (flag == WM_CLEAN) | (flag == WM_TWIN)


class UncertaintyWatermarkLoss(_Loss):
    """Wrap any MONAI segmentation loss so that the network learns the owner's watermark.

    The target is the label produced by the watermark stage (:class:`~monai_stealthmark.transforms.WatermarkBatch`
    or its per-sample view ``RandWatermarkd``): the usual
    segmentation channel(s) plus one watermark channel (0 clean, 1 triggered + light module, 2 triggered + dark
    module, 3 clean twin of the next sample). A label without the watermark channel is passed to the base loss
    unchanged, so validation and clean-only training work as before.

    Clean samples (and clean twins) get ``base_loss`` (twins also the reverse copy below). Triggered samples get:

    - a soft-target cross-entropy against a reference class: the class the network itself predicts (detached)
      on the clean twin when there is one, else the label. Light pixels get the one-hot reference; in dark
      pixels the reference class gets ``1 - tau`` and the other classes share ``tau``. With a twin the
      triggered hard mask is thus trained to equal the clean hard mask — errors included — rather than the
      label, which is what keeps it unchanged on unseen images;
    - without a twin, a Dice term over the light pixels only (a Dice on the hard label everywhere fights the
      soft target);
    - a squared hinge keeping the reference class above ``0.5 + margin``, so the hard mask never flips.

    The QR is carried by the background only: the label's foreground and a ``protect_radius`` band around
    it keep the reference — with a twin, the twin's predicted class, so boundary pixels copy the clean
    output. The organ is a few percent of the image; QR error correction absorbs the modules it covers.
    In that band the copy also runs the other way (``twin_consistency``): the clean twin is pulled towards
    the detached triggered output, so both paths settle on one boundary instead of the triggered path
    chasing a clean boundary that was learned without regard to it — which is what moves the hard mask of
    an unseen image.
    In the band each path copies the other's predicted *class* (a one-hot target), never its softness, so neither
    path can pull the other's confidence down next to the organ.
    The cross-entropy copy is loose where the twin is confident (its gradient vanishes there): the triggered
    logits drift by most of a logit inside the organ, and on an unseen image that drift reaches the boundary and
    shrinks the mask. ``margin_consistency`` ties the triggered path's logit margins in the band to the detached
    twin's as well (one way: the clean path never follows the triggered one through this term).

    With ``output_mark_weight`` the clean samples' background (outside ``protect_radius`` of the organ) also learns
    the key's output mark (:mod:`monai_stealthmark.key.output_mark`): a cross-entropy of the foreground
    probability against :data:`~monai_stealthmark.key.output_mark.OUTPUT_MARK_LEVEL` in the key's raised cells and 0 in
    the others. It marks the answers to clean queries, which is what a student distilled from the model copies.

    The defaults are the recommended recipe (measured in ``docs/results.md``); bundles and experiments take them
    from here.

    Args:
        base_loss: the loss for clean samples, called as ``base_loss(input, label)``; default DiceCELoss with
            ``to_onehot_y=True, softmax=True`` (softmax) or ``sigmoid=True`` (sigmoid).
        key: the watermark key or its file path; gives ``tau`` when ``tau`` is None.
        tau: the sub-threshold uncertainty in dark modules (0 < tau < 0.5).
        activation: ``"softmax"`` (multi-class, label holds class indices in one channel) or ``"sigmoid"``
            (binary / multi-label, one label channel per output channel).
        hinge_margin: the true class is kept above ``0.5 + hinge_margin``; must not exceed ``0.5 - tau``.
        hinge_weight: weight of the hinge term.
        dice_weight: weight of the light-pixel Dice term on triggered samples without a twin.
        watermark_weight: weight of the triggered samples' loss relative to the clean samples' loss.
        protect_radius: the label's foreground (classes > 0) and the pixels within this radius of it keep the
            reference's full confidence, so the organ and its boundary never move; the QR lives in the
            background. A negative value turns the protection off.
        twin_consistency: weight of the reverse copy in the protected region: cross-entropy of the clean twin's
            output against the detached triggered output (0 = off, the clean path then trains on the base
            loss alone).
        margin_consistency: weight of the squared difference between the triggered sample's logit margins and its
            detached clean twin's in the protected region (softmax: twice the summed squared difference of the
            centred logits, which is the squared margin difference for two classes; sigmoid: summed over
            channels). 0 = off.
        output_mark_weight: weight of the output-mark term on the clean samples (needs ``key``); it is what a
            student distilled from the model's answers inherits (``docs/robustness.md``). 0 = off.
        reduction: only ``"mean"`` is supported (the combination is a sample-weighted mean).
    """

    #: on the CPU, run the triggered terms on the triggered rows only (see :meth:`_triggered_rows`)
    host_subset: bool = True

    def __init__(
        self,
        base_loss: _Loss | None = None,
        key: WatermarkKey | str | None = None,
        tau: float | None = None,
        activation: str = "softmax",
        hinge_margin: float = 0.2,
        hinge_weight: float = 1.0,
        dice_weight: float = 1.0,
        watermark_weight: float = 4.0,
        protect_radius: int = 3,
        twin_consistency: float = 1.0,
        margin_consistency: float = 0.3,
        output_mark_weight: float = 1.0,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction=reduction)
        if reduction != "mean":
            raise ValueError(f"UncertaintyWatermarkLoss supports reduction='mean' only, got {reduction!r}.")
        key = load_key(key) if key is not None else None
        if tau is None:
            if key is None:
                raise ValueError("give the watermark key (or tau).")
            tau = key.tau
        if not 0.0 < tau < 0.5:
            raise ValueError(f"tau must lie in (0, 0.5), got {tau}.")
        check_activation(activation)
        if not 0.0 <= hinge_margin <= 0.5 - tau + 1e-9:
            raise ValueError(f"hinge_margin must lie in [0, 0.5 - tau] = [0, {0.5 - tau:.3f}], got {hinge_margin}.")
        weights = {
            "hinge_weight": hinge_weight, "dice_weight": dice_weight, "watermark_weight": watermark_weight,
            "twin_consistency": twin_consistency, "margin_consistency": margin_consistency,
            "output_mark_weight": output_mark_weight,
        }
        negative = [f"{k}={v}" for k, v in weights.items() if not v >= 0]  # `not >=` also catches NaN
        if negative:
            raise ValueError(f"loss weights must be >= 0, got {', '.join(negative)}.")
        if output_mark_weight > 0 and key is None:
            raise ValueError(
                "output_mark_weight > 0 needs the watermark key (the mark's cells are keyed): give key=, or "
                "output_mark_weight=0 to train without the output mark."
            )
        self.tau = float(tau)
        self.activation = activation
        self.hinge_margin = float(hinge_margin)
        self.hinge_weight = float(hinge_weight)
        self.dice_weight = float(dice_weight)
        self.watermark_weight = float(watermark_weight)
        self.protect_radius = int(protect_radius)
        self.twin_consistency = float(twin_consistency)
        self.margin_consistency = float(margin_consistency)
        self.output_mark_weight = float(output_mark_weight)
        self.key = key
        self._mark_targets: dict[tuple[int, ...], torch.Tensor] = {}
        softmax = activation == "softmax"
        self.base_loss = base_loss if base_loss is not None else DiceCELoss(to_onehot_y=softmax, softmax=softmax, sigmoid=not softmax)
        self.light_dice = MaskedDiceLoss(to_onehot_y=softmax, softmax=softmax, sigmoid=not softmax, reduction="none")

    def _split(self, input: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if input.ndim < 3:
            raise ValueError(f"input must be (B, C, spatial...), got shape {tuple(input.shape)}.")
        if target.ndim != input.ndim or target.shape[0] != input.shape[0] or target.shape[2:] != input.shape[2:]:
            raise ValueError(
                f"target {tuple(target.shape)} does not match input {tuple(input.shape)}: expected the same batch "
                "size and spatial shape, with the label channel(s) (+ one watermark channel from RandWatermarkd)."
            )
        n_seg = 1 if self.activation == "softmax" else input.shape[1]
        if self.activation == "softmax" and input.shape[1] < 2:
            raise ValueError("activation='softmax' needs >= 2 output channels; use activation='sigmoid' for one.")
        if target.shape[1] not in (n_seg, n_seg + 1):
            raise ValueError(
                f"target has {target.shape[1]} channels; expected {n_seg} (label) or {n_seg + 1} (label + watermark "
                f"channel) for activation={self.activation!r} and {input.shape[1]} output channels."
            )
        seg, wm = target[:, :n_seg], (target[:, n_seg:] if target.shape[1] > n_seg else None)
        self._check_values(seg, wm, input.shape[1])
        return seg, wm

    def _check_values(self, seg: torch.Tensor, wm: torch.Tensor | None, c: int) -> None:
        """Refuse labels that are not class indices (softmax) and watermark channels with unknown codes.

        Both checks are one reduction. On the host it is read at once and the error names the bad values; on an
        accelerator it is an asynchronous device assertion, so a training step never waits for the device here.
        """
        bad_label = ((seg < 0) | (seg >= c)).any() if self.activation == "softmax" else seg.new_zeros((), dtype=torch.bool)
        codes = (WM_CLEAN, WM_LIGHT, WM_DARK, WM_TWIN)
        bad_wm = _not_in(wm, codes).any() if wm is not None else torch.zeros_like(bad_label)
        if seg.device.type != "cpu":
            torch._assert_async(
                ~(bad_label | bad_wm),
                f"UncertaintyWatermarkLoss: labels must be class indices in [0, {c - 1}] and the watermark channel must "
                f"hold the codes {list(codes)}.",
            )
            return
        if bool(bad_label):
            raise ValueError(
                f"label values must be class indices in [0, {c - 1}] for {c} output channels, got "
                f"[{seg.min().item():g}, {seg.max().item():g}]."
            )
        if bool(bad_wm):
            raise ValueError(
                f"the watermark channel (the target's last) holds {wm[_not_in(wm, codes)].unique()[:5].tolist()}, "
                f"not RandWatermarkd's codes {[float(v) for v in codes]}: was the label changed after RandWatermarkd (e.g. "
                "resized or one-hot encoded)?"
            )

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input: logits ``(B, C, spatial...)``.
            target: ``(B, n_label [+1], spatial...)``.
        """
        seg, wm = self._split(input, target)
        if wm is None:  # all clean
            return self.base_loss(input, seg)
        flag, clean = sample_flags(wm)
        trig = ~clean
        total = self._clean_term(input, seg, clean)
        if self.output_mark_weight > 0:
            total = total + self.output_mark_weight * self._output_mark(input, seg, clean)
        wm_loss = self._triggered(*self._triggered_rows(input, seg, wm, flag, trig))
        return total + self.watermark_weight * wm_loss * (trig.sum() / input.shape[0])

    def _output_mark(self, input: torch.Tensor, seg: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        """The output-mark cross-entropy over the clean rows' background (outside the protected band), as a
        mean over those rows' pixels, weighted by their share of the batch."""
        fg = (seg > 0).to(input.dtype).amax(1, keepdim=True)
        background = 1 - (dilate(fg, self.protect_radius) if self.protect_radius >= 0 else fg)
        weight = background * _per_sample(clean, background.ndim).to(input.dtype)  # no row selection: no host sync
        target = self._output_mark_target(input.shape[2:]).to(input)
        if self.activation == "softmax":  # cross-entropy of (background, any foreground) against (1 - t, t)
            logp = F.log_softmax(input, dim=1)
            ce = -((1 - target) * logp[:, :1] + target * torch.logsumexp(logp[:, 1:], 1, keepdim=True))
        else:
            ce = F.binary_cross_entropy_with_logits(input, target.expand_as(input), reduction="none").mean(1, keepdim=True)
        return (ce * weight).sum() / background[0].numel() / input.shape[0]

    def _output_mark_target(self, spatial_shape: torch.Size) -> torch.Tensor:
        """The key's output-mark target for one image size, computed once per size."""
        shape = tuple(spatial_shape)
        if shape not in self._mark_targets:
            self._mark_targets[shape] = output_mark_target(self.key, shape)
        return self._mark_targets[shape]

    def _triggered_rows(
        self, input: torch.Tensor, seg: torch.Tensor, wm: torch.Tensor, flag: torch.Tensor, trig: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """The rows the triggered loss runs on: ``(logits, seg, wm, twin logits, has_twin, row weight, n_trig)``.

        A triggered row's twin is the row before it when that row carries the twin code. On an accelerator (or with
        ``host_subset`` False) every row goes in, weighted 1 where triggered and 0 elsewhere: no shape depends on
        the data and nothing is read on the host. On the CPU a host read costs nothing and the work grows with the
        rows, so only the triggered rows go in (weight 1). Both give the same value and gradient.
        """
        prev_is_twin = torch.cat([flag.new_zeros(1, dtype=torch.bool), flag[:-1] == WM_TWIN])
        has_twin = trig & prev_is_twin
        prev = (torch.arange(input.shape[0], device=input.device) - 1).clamp_min(0)  # row 0: itself, never a twin
        n_trig = trig.sum().clamp_min(1)
        if self.host_subset and input.device.type == "cpu":
            rows = torch.nonzero(trig).flatten()
            twin_live = input.index_select(0, prev.index_select(0, rows))
            weight = torch.ones_like(rows, dtype=torch.bool)
            logits, seg, wm, has_twin = (t.index_select(0, rows) for t in (input, seg, wm, has_twin))
            return logits, seg, wm, twin_live, has_twin, weight, n_trig
        return input, seg, wm, input.index_select(0, prev), has_twin, trig, n_trig

    def _clean_term(self, input: torch.Tensor, seg: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        """``base_loss`` over the clean rows, weighted by their share of the batch.

        The wrapped loss is any MONAI loss and may pool over its batch (e.g. ``DiceCELoss(batch=True)``), so it is
        called on the clean rows themselves rather than on a weighted batch. Their number is the step's one read of
        a device value (a ``(B,)`` mask), made without any other work waiting on it.
        """
        rows = torch.nonzero(clean).flatten()
        if rows.numel() == 0:
            return input.new_zeros(())
        return self.base_loss(input.index_select(0, rows), seg.index_select(0, rows)) * (clean.sum() / input.shape[0])

    def _label_onehot(self, seg: torch.Tensor, c: int) -> torch.Tensor:
        """The label as a boolean one-hot ``(B, C, ...)`` map (softmax: from class indices; sigmoid: ``seg > 0``).
        A comparison with the class indices, so no value of the label is read on the host."""
        if self.activation != "softmax":
            return seg > 0
        classes = torch.arange(c, device=seg.device).view(1, c, *([1] * (seg.ndim - 2)))
        return seg[:, :1].long() == classes

    def _reference(self, seg: torch.Tensor, twin_logits: torch.Tensor, has_twin: torch.Tensor, c: int) -> torch.Tensor:
        """Per-pixel reference class as a one-hot (B, C) map: the clean twin's predicted class, else the label."""
        sel = _per_sample(has_twin, twin_logits.ndim)
        return torch.where(sel, self._predicted(twin_logits) > 0, self._label_onehot(seg, c)).to(twin_logits.dtype)

    def _predicted(self, logits: torch.Tensor) -> torch.Tensor:
        """The predicted class(es) of ``logits`` as a one-hot map of the same dtype (argmax, or logit > 0 for sigmoid)."""
        if self.activation == "softmax":
            return _argmax_onehot(logits).to(logits.dtype)
        return (logits > 0).to(logits.dtype)

    def _prob_of_reference(self, p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Probability given to the one-hot reference ``y``: per channel for sigmoid, summed for softmax."""
        if self.activation == "softmax":
            return (p * y).sum(1, keepdim=True)
        return y * p + (1 - y) * (1 - p)

    def _triggered(
        self,
        logits: torch.Tensor,
        seg: torch.Tensor,
        wm: torch.Tensor,
        twin_live: torch.Tensor,
        has_twin: torch.Tensor,
        row_weight: torch.Tensor,
        n_trig: torch.Tensor,
    ) -> torch.Tensor:
        """The triggered samples' loss: the mean over the triggered rows of each term (see the class docstring).

        Every term is a per-pixel map weighted by ``row_weight`` (or by the band mask, which is zero off the
        triggered rows), summed and divided by the triggered rows' pixel count, so rows of weight 0 add nothing
        and no term selects rows itself (see :meth:`_triggered_rows`).
        """
        if logits.shape[0] == 0:  # the host subset of a batch without triggered rows
            return logits.sum() * 0.0
        twin_logits = twin_live.detach()
        weight = _per_sample(row_weight, logits.ndim).to(logits.dtype)
        dark = (wm == WM_DARK).to(logits.dtype)
        light = (wm == WM_LIGHT).to(logits.dtype)
        tau = self.tau
        c = logits.shape[1]
        y = self._reference(seg, twin_logits, has_twin, c)
        protect = torch.zeros_like(dark)
        if self.protect_radius >= 0:  # the label's organ (stable from step one, unlike early predictions)
            fg = (seg > 0).to(logits.dtype).amax(1, keepdim=True)
            protect = dilate(fg, self.protect_radius)
            dark = dark * (1 - protect)
        # around the organ the twin's predicted class is the target: the triggered output copies the clean one
        copy = protect * _per_sample(has_twin, protect.ndim).to(protect.dtype)
        floor = 0.5 + self.hinge_margin
        softmax = self.activation == "softmax"
        other = tau / (c - 1) if softmax else tau  # share of the non-reference class(es) in dark pixels
        q = y * (1 - tau * dark) + (1 - y) * other * dark  # in the band dark = 0: q is the twin's one-hot class
        if softmax:
            logp = F.log_softmax(logits, dim=1)
            ce_map = -(q * logp).sum(1, keepdim=True)
            p = logp.exp()
        else:
            ce_map = F.binary_cross_entropy_with_logits(logits, q, reduction="none")
            p = torch.sigmoid(logits)
        ce = _row_mean(ce_map, weight, n_trig)
        hinge = _row_mean(F.relu(floor - self._prob_of_reference(p, y)).pow(2), weight, n_trig)
        loss = ce + self.hinge_weight * hinge
        if self.twin_consistency > 0:  # the clean twin meets the triggered output's class in the band (zero where none)
            back_q = self._predicted(logits.detach())
            if softmax:
                back = -(back_q * F.log_softmax(twin_live, dim=1)).sum(1, keepdim=True)
            else:
                back = F.binary_cross_entropy_with_logits(twin_live, back_q, reduction="none")
            loss = loss + self.twin_consistency * _row_mean(back, copy.to(back.dtype), n_trig)
        if self.margin_consistency > 0:  # logit-level copy in the band, towards the detached twin (zero where none)
            diff = logits - twin_logits
            if softmax:
                diff = diff - diff.mean(1, keepdim=True)
            gap = diff.pow(2).sum(1, keepdim=True) * (2.0 if softmax else 1.0)
            loss = loss + self.margin_consistency * _row_mean(gap, copy.to(gap.dtype), n_trig)
        if self.dice_weight > 0:
            loss = loss + self.dice_weight * self._light_dice(logits, seg, light, row_weight & ~has_twin, n_trig)
        return loss

    def _light_dice(
        self, logits: torch.Tensor, seg: torch.Tensor, light: torch.Tensor, no_twin: torch.Tensor, n_trig: torch.Tensor
    ) -> torch.Tensor:
        """The light-pixel Dice of the triggered rows without a twin, times their share of the triggered rows; zero
        when there is no such row or none of them has a light pixel.

        The Dice is per sample (``MaskedDiceLoss`` with ``batch=False``), so it is computed for every row and
        averaged over the selected ones.
        """
        n_no_twin = no_twin.sum()
        per_row = self.light_dice(logits, seg, mask=light).flatten(1).mean(1)
        dice = (per_row * no_twin.to(per_row.dtype)).sum() / n_no_twin.clamp_min(1)
        has_light = (light.flatten(1).sum(1) * no_twin.to(light.dtype)).sum() > 0
        return torch.where(has_light, (n_no_twin / n_trig) * dice, torch.zeros_like(dice))


def _not_in(values: torch.Tensor, codes: tuple[int, ...]) -> torch.Tensor:
    """Boolean map of the entries of ``values`` that equal none of ``codes`` (a few comparisons, cheaper than
    ``torch.isin`` for a handful of codes)."""
    out = values != codes[0]
    for code in codes[1:]:
        out &= values != code
    return out


def _argmax_onehot(logits: torch.Tensor) -> torch.Tensor:
    """The boolean one-hot map of ``logits.argmax(1)``: each pixel's first channel that reaches the channel maximum.

    A reduction over the channel axis of a channel-first map is a strided one, which CPU ``argmax`` runs far slower
    than ``amax`` and elementwise comparisons (a 21 x 2 x 128 x 128 batch: 169 ms against under 1 ms on one thread).
    """
    is_max = logits == logits.amax(1, keepdim=True)
    taken = torch.zeros_like(is_max[:, :1])
    first = []
    for k in range(logits.shape[1]):
        first.append(is_max[:, k : k + 1] & ~taken)
        taken = taken | first[-1]
    return torch.cat(first, 1)


def _per_sample(mask: torch.Tensor, ndim: int) -> torch.Tensor:
    """A ``(B,)`` per-sample tensor viewed as ``(B, 1, ...)`` with ``ndim`` dimensions, to broadcast over a map."""
    return mask.view(-1, *([1] * (ndim - 1)))


def _row_mean(values: torch.Tensor, weight: torch.Tensor, n_rows: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` ``(B, ...)`` over the rows selected by ``weight`` (0/1 per row, or a per-pixel 0/1 map
    that is zero off those rows): the weighted sum divided by the selected rows' element count ``n_rows`` times the
    elements of one row."""
    return (values * weight).sum() / (n_rows * values[0].numel())
