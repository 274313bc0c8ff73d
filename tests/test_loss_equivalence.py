"""The loss's value and gradient against a frozen reference implementation, on fixed seeded inputs.

``ReferenceUncertaintyWatermarkLoss`` below is a verbatim copy of ``UncertaintyWatermarkLoss`` as it stood when the
loss was rewritten with per-sample weights instead of sub-batches (renamed, nothing else changed): it selects the
clean and triggered rows with boolean indexing and branches on their counts. The package's loss must give the same
value and the same input gradient for every batch layout the watermark stage produces (2D and 3D, with and without
triggered samples, twins, decoys and occluded cells), and run under CPU autocast (bfloat16) and ``torch.compile``.
"""

from __future__ import annotations

import unittest

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, MaskedDiceLoss
from parameterized import parameterized
from torch.nn.modules.loss import _Loss

from helpers import KEY

from monai_stealthmark.key import WatermarkKey
from monai_stealthmark.key.geometry import WM_CLEAN, WM_DARK, WM_LIGHT, WM_TWIN, load_key
from monai_stealthmark.losses import UncertaintyWatermarkLoss
from monai_stealthmark.losses import watermark as watermark_module
from monai_stealthmark.transforms import WatermarkBatch
from monai_stealthmark.utils import check_activation, dilate


# ---------------------------------------------------------------------------------------------------------------
# the reference implementation (frozen copy)
# ---------------------------------------------------------------------------------------------------------------


def reference_sample_flags(wm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample code of a ``(B, 1, spatial...)`` watermark channel (its largest value) and the boolean mask of the
    samples that train as clean: clean ones (decoys included) and clean twins."""
    flag = wm.flatten(1).amax(1)
    return flag, (flag == WM_CLEAN) | (flag == WM_TWIN)


class ReferenceUncertaintyWatermarkLoss(_Loss):
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
        reduction: only ``"mean"`` is supported (the combination is a sample-weighted mean).
    """

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
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction=reduction)
        if reduction != "mean":
            raise ValueError(f"UncertaintyWatermarkLoss supports reduction='mean' only, got {reduction!r}.")
        if tau is None:
            if key is None:
                raise ValueError("give the watermark key (or tau).")
            tau = load_key(key).tau
        if not 0.0 < tau < 0.5:
            raise ValueError(f"tau must lie in (0, 0.5), got {tau}.")
        check_activation(activation)
        if not 0.0 <= hinge_margin <= 0.5 - tau + 1e-9:
            raise ValueError(f"hinge_margin must lie in [0, 0.5 - tau] = [0, {0.5 - tau:.3f}], got {hinge_margin}.")
        weights = {
            "hinge_weight": hinge_weight, "dice_weight": dice_weight, "watermark_weight": watermark_weight,
            "twin_consistency": twin_consistency, "margin_consistency": margin_consistency,
        }
        negative = [f"{k}={v}" for k, v in weights.items() if not v >= 0]  # `not >=` also catches NaN
        if negative:
            raise ValueError(f"loss weights must be >= 0, got {', '.join(negative)}.")
        self.tau = float(tau)
        self.activation = activation
        self.hinge_margin = float(hinge_margin)
        self.hinge_weight = float(hinge_weight)
        self.dice_weight = float(dice_weight)
        self.watermark_weight = float(watermark_weight)
        self.protect_radius = int(protect_radius)
        self.twin_consistency = float(twin_consistency)
        self.margin_consistency = float(margin_consistency)
        softmax = activation == "softmax"
        self.base_loss = base_loss if base_loss is not None else DiceCELoss(to_onehot_y=softmax, softmax=softmax, sigmoid=not softmax)
        self.light_dice = MaskedDiceLoss(to_onehot_y=softmax, softmax=softmax, sigmoid=not softmax)

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
        # one reduction (one device sync per step) for both checks; the messages are built only on failure
        bad_label = ((seg < 0) | (seg >= input.shape[1])).any() if self.activation == "softmax" else seg.new_zeros((), dtype=torch.bool)
        codes = torch.tensor([WM_CLEAN, WM_LIGHT, WM_DARK, WM_TWIN], device=target.device, dtype=target.dtype)
        bad_wm = ~torch.isin(wm, codes).all() if wm is not None else torch.zeros_like(bad_label)
        if bool(bad_label | bad_wm):
            if bool(bad_label):
                raise ValueError(
                    f"label values must be class indices in [0, {input.shape[1] - 1}] for {input.shape[1]} output "
                    f"channels, got [{seg.min().item():g}, {seg.max().item():g}]."
                )
            raise ValueError(
                f"the watermark channel (the target's last) holds {wm[~torch.isin(wm, codes)].unique()[:5].tolist()}, "
                f"not RandWatermarkd's codes {codes.tolist()}: was the label changed after RandWatermarkd (e.g. "
                "resized or one-hot encoded)?"
            )
        return seg, wm

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input: logits ``(B, C, spatial...)``.
            target: ``(B, n_label [+1], spatial...)``.
        """
        seg, wm = self._split(input, target)
        if wm is None:  # all clean
            return self.base_loss(input, seg)
        flag, clean = reference_sample_flags(wm)
        trig = ~clean
        n = input.shape[0]
        total = input.new_zeros(())
        if clean.any():
            total = total + self.base_loss(input[clean], seg[clean]) * (clean.sum() / n)
        if trig.any():
            idx = torch.nonzero(trig).flatten()
            prev = (idx - 1).clamp_min(0)
            has_twin = (idx > 0) & (flag[prev] == WM_TWIN)
            wm_loss = self._triggered(input[idx], seg[idx], wm[idx], input[prev], has_twin)
            total = total + self.watermark_weight * wm_loss * (trig.sum() / n)
        return total

    def _label_onehot(self, seg: torch.Tensor, c: int) -> torch.Tensor:
        """The label as a boolean one-hot ``(B, C, ...)`` map (softmax: from class indices; sigmoid: ``seg > 0``)."""
        return F.one_hot(seg[:, 0].long(), c).movedim(-1, 1).bool() if self.activation == "softmax" else seg > 0

    def _reference(self, seg: torch.Tensor, twin_logits: torch.Tensor, has_twin: torch.Tensor, c: int) -> torch.Tensor:
        """Per-pixel reference class as a one-hot (B, C) map: the clean twin's predicted class, else the label."""
        sel = has_twin.view(-1, *([1] * (twin_logits.ndim - 1)))
        return torch.where(sel, self._predicted(twin_logits) > 0, self._label_onehot(seg, c)).to(twin_logits.dtype)

    def _predicted(self, logits: torch.Tensor) -> torch.Tensor:
        """The predicted class(es) of ``logits`` as a one-hot map of the same dtype (argmax, or logit > 0 for sigmoid)."""
        if self.activation == "softmax":
            return F.one_hot(logits.argmax(1), logits.shape[1]).movedim(-1, 1).to(logits.dtype)
        return (logits > 0).to(logits.dtype)

    def _prob_of_reference(self, p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Probability given to the one-hot reference ``y``: per channel for sigmoid, summed for softmax."""
        if self.activation == "softmax":
            return (p * y).sum(1, keepdim=True)
        return y * p + (1 - y) * (1 - p)

    def _triggered(
        self, logits: torch.Tensor, seg: torch.Tensor, wm: torch.Tensor, twin_live: torch.Tensor, has_twin: torch.Tensor
    ) -> torch.Tensor:
        twin_logits = twin_live.detach()
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
        copy = (protect * has_twin.view(-1, *([1] * (protect.ndim - 1))).to(protect.dtype)) > 0
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
        ce = ce_map.mean()
        hinge = F.relu(floor - self._prob_of_reference(p, y)).pow(2).mean()
        loss = ce + self.hinge_weight * hinge
        if self.twin_consistency > 0:  # the clean twin meets the triggered output's class in the band (zero where none)
            back_q = self._predicted(logits.detach())
            if softmax:
                back = -(back_q * F.log_softmax(twin_live, dim=1)).sum(1, keepdim=True)
            else:
                back = F.binary_cross_entropy_with_logits(twin_live, back_q, reduction="none")
            loss = loss + self.twin_consistency * (back * copy.to(back.dtype)).mean()
        if self.margin_consistency > 0:  # logit-level copy in the band, towards the detached twin (zero where none)
            diff = logits - twin_logits
            if softmax:
                diff = diff - diff.mean(1, keepdim=True)
            gap = diff.pow(2).sum(1, keepdim=True) * (2.0 if softmax else 1.0)
            loss = loss + self.margin_consistency * (gap * copy.to(gap.dtype)).mean()
        no_twin = ~has_twin
        if self.dice_weight > 0 and no_twin.any() and light[no_twin].sum() > 0:
            frac = no_twin.sum() / no_twin.numel()
            loss = loss + self.dice_weight * frac * self.light_dice(logits[no_twin], seg[no_twin], mask=light[no_twin])
        return loss


# ---------------------------------------------------------------------------------------------------------------
# fixed inputs
# ---------------------------------------------------------------------------------------------------------------

TAU = 0.25


def stage_batch(spatial, channels, activation, seed, prob=0.5, paired=True):
    """A batch as the watermark stage builds it (twins, decoys, occluded cells), with seeded logits ``(B', C, ...)``."""
    g = torch.Generator().manual_seed(seed)
    n = 6
    img = torch.rand(n, 1, *spatial, generator=g) * 100.0
    organ = (slice(None), slice(None), slice(10, 22), slice(12, 26))
    if activation == "softmax":
        lab = torch.zeros(n, 1, *spatial)
        lab[organ] = 1.0
        if channels > 2:
            lab[(slice(None), slice(None), slice(14, 18), slice(16, 20))] = 2.0
    else:
        lab = torch.zeros(n, channels, *spatial)
        lab[organ] = 1.0
    lab[1] = 0.0  # one sample without organ
    stage = WatermarkBatch(KEY, prob=prob, decoy_prob=0.5, occlusion_prob=0.5, paired=paired).set_random_state(seed)
    _, target = stage(img, lab)
    logits = torch.randn(target.shape[0], channels, *spatial, generator=g) * 2.0
    return logits, target


def hand_batch(spatial, channels, activation, codes, seed):
    """A batch with one watermark code per row (``"dark"`` rows: a half-dark QR), seeded logits and an organ."""
    g = torch.Generator().manual_seed(seed)
    n, n_seg = len(codes), (1 if activation == "softmax" else channels)
    seg = torch.zeros(n, n_seg, *spatial)
    seg[(slice(None), slice(None), slice(6, 14), slice(8, 16))] = 1.0
    wm = torch.zeros(n, 1, *spatial)
    for i, code in enumerate(codes):
        if code == "dark":
            wm[i] = WM_LIGHT
            wm[i, :, :, : spatial[1] // 2] = WM_DARK
        else:
            wm[i] = code
    logits = torch.randn(n, channels, *spatial, generator=g) * 2.0
    return logits, torch.cat([seg, wm], 1)


LAYOUTS = {
    "stage_paired": lambda sp, c, act, seed: stage_batch(sp, c, act, seed),
    "stage_unpaired": lambda sp, c, act, seed: stage_batch(sp, c, act, seed, prob=0.6, paired=False),
    "no_triggered": lambda sp, c, act, seed: hand_batch(sp, c, act, [WM_CLEAN] * 4, seed),
    "all_triggered": lambda sp, c, act, seed: hand_batch(sp, c, act, ["dark"] * 3, seed),
    "first_row_triggered": lambda sp, c, act, seed: hand_batch(sp, c, act, ["dark", WM_TWIN, "dark", WM_CLEAN], seed),
    "twin_pairs": lambda sp, c, act, seed: hand_batch(sp, c, act, [WM_TWIN, "dark", WM_CLEAN, WM_TWIN, "dark"], seed),
}

CONFIGS = {
    "default": dict,
    "no_dice": lambda: {"dice_weight": 0.0},
    "no_protection": lambda: {"protect_radius": -1},
    "no_consistency": lambda: {"twin_consistency": 0.0, "margin_consistency": 0.0},
    "batch_dice_base": lambda: {"base_loss": DiceCELoss(to_onehot_y=True, softmax=True, batch=True)},
}

CASES = [
    (f"{dim}_{act}{c}_{layout}_{cfg}", spatial, act, c, layout, cfg)
    for dim, spatial in (("2d", (32, 32)), ("3d", (32, 32, 4)))
    for act, c in (("softmax", 2), ("softmax", 3), ("sigmoid", 1), ("sigmoid", 2))
    for layout, cfg in [(layout, "default") for layout in LAYOUTS] + [("stage_paired", cfg) for cfg in list(CONFIGS)[1:]]
    if not (cfg == "batch_dice_base" and act == "sigmoid")
]


def value_and_grad(loss: torch.nn.Module, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = logits.detach().clone().requires_grad_(True)
    value = loss(x, target)
    value.backward()
    return value.detach(), x.grad


def loss_pair(activation: str, cfg: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    kwargs = CONFIGS[cfg]()
    return (
        UncertaintyWatermarkLoss(tau=TAU, output_mark_weight=0.0, activation=activation, **kwargs),
        ReferenceUncertaintyWatermarkLoss(tau=TAU, activation=activation, **kwargs),
    )


# ---------------------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------------------


class TestLossEquivalence(unittest.TestCase):
    @parameterized.expand(CASES)
    def test_value_and_gradient_equal_reference(self, _, spatial, activation, channels, layout, cfg):
        """Both row selections (every row weighted, as on an accelerator; the triggered rows, as on the CPU)."""
        loss, ref = loss_pair(activation, cfg)
        for seed in (0, 1):
            logits, target = LAYOUTS[layout](spatial, channels, activation, seed)
            ref_value, ref_grad = value_and_grad(ref, logits, target)
            for host_subset in (False, True):
                loss.host_subset = host_subset
                value, grad = value_and_grad(loss, logits, target)
                self.assertTrue(bool(torch.isfinite(value)))
                torch.testing.assert_close(value, ref_value, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)

    @parameterized.expand([("softmax", 2), ("sigmoid", 2)])
    def test_float64_equal_reference(self, activation, channels):
        """In double precision the two agree to rounding: the weighted sums are the sub-batch means."""
        loss, ref = loss_pair(activation, "default")
        logits, target = stage_batch((32, 32), channels, activation, seed=5)
        ref_value, ref_grad = value_and_grad(ref, logits.double(), target.double())
        for host_subset in (False, True):
            loss.host_subset = host_subset
            value, grad = value_and_grad(loss, logits.double(), target.double())
            torch.testing.assert_close(value, ref_value, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-14)

    @parameterized.expand([("2d", (4, 1, 20, 24)), ("3d", (3, 1, 16, 12, 7)), ("thin", (2, 1, 3, 40))])
    def test_dilation_equals_max_pooling(self, _, shape):
        """:func:`monai_stealthmark.utils.dilate`'s separable shifted ORs give the max pooling's dilation (whole box
        and in plane), for float and boolean masks."""
        mask = (torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.97).float()
        pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[mask.ndim - 2]
        for radius in (0, 1, 3, 5):
            for in_plane in (False, True):
                size = [2 * radius + 1] * (mask.ndim - 2)
                if in_plane:
                    size[2:] = [1] * (mask.ndim - 4)
                expected = pool(mask, tuple(size), stride=1, padding=tuple(k // 2 for k in size))
                torch.testing.assert_close(dilate(mask, radius, in_plane), expected, rtol=0, atol=0)
                torch.testing.assert_close(dilate(mask > 0, radius, in_plane), expected > 0, rtol=0, atol=0)

    def test_argmax_onehot_ties(self):
        """Ties go to the first channel, as ``argmax`` does."""
        logits = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0], [3.0, 1.0, 3.0]]).T.reshape(1, 3, 3, 1)
        expected = torch.nn.functional.one_hot(logits.argmax(1), 3).movedim(-1, 1).bool()
        torch.testing.assert_close(watermark_module._argmax_onehot(logits), expected, rtol=0, atol=0)

    def test_layouts_cover_twins_decoys_and_occlusion(self):
        """The stage's batches hold clean rows, twins, triggered rows and occluded cells (light pixels in the QR)."""
        _, target = stage_batch((32, 32), 2, "softmax", seed=0)
        flags = target[:, -1].flatten(1).amax(1)
        self.assertTrue({WM_CLEAN, WM_TWIN, WM_DARK} <= set(flags.tolist()))


class TestLossUnderAutocastAndCompile(unittest.TestCase):
    @parameterized.expand([("softmax_2d", "softmax", 2, (32, 32)), ("sigmoid_3d", "sigmoid", 1, (32, 32, 4))])
    def test_autocast_bfloat16(self, _, activation, channels, spatial):
        """Logits of a bfloat16 autocast forward pass: finite loss and gradients, close to the float32 loss."""
        torch.manual_seed(0)
        _, target = stage_batch(spatial, channels, activation, seed=2)
        conv = (torch.nn.Conv2d if len(spatial) == 2 else torch.nn.Conv3d)(1, channels, 3, padding=1)
        x = torch.randn(target.shape[0], 1, *spatial)
        loss = UncertaintyWatermarkLoss(tau=TAU, output_mark_weight=0.0, activation=activation)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = conv(x)
            value = loss(logits, target)
        self.assertEqual(logits.dtype, torch.bfloat16)
        value.backward()
        self.assertTrue(bool(torch.isfinite(value)))
        self.assertTrue(all(bool(torch.isfinite(p.grad).all()) for p in conv.parameters()))
        with torch.no_grad():
            full = loss(conv(x), target)
        torch.testing.assert_close(value.float(), full, rtol=5e-2, atol=1e-2)

    def test_compile(self):
        """``torch.compile`` (graph breaks allowed: the wrapped base loss runs on the clean rows) gives the eager
        value and gradient."""
        loss = UncertaintyWatermarkLoss(tau=TAU, output_mark_weight=0.0)
        loss.host_subset = False  # the accelerator's path: no data-dependent shape in the triggered terms
        logits, target = stage_batch((32, 32), 2, "softmax", seed=3)
        compiled = torch.compile(loss, backend="aot_eager")
        value, grad = value_and_grad(compiled, logits, target)
        ref_value, ref_grad = value_and_grad(loss, logits, target)
        torch.testing.assert_close(value, ref_value, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)


if __name__ == "__main__":
    unittest.main()
