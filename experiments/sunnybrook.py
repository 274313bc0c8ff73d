"""Clean vs watermarked MONAI 2D UNet on the real Sunnybrook cardiac MR slices, then black-box verification.

    python -m experiments.sunnybrook --fast --out runs/sunnybrook

Writes ``DIR/results.json``, ``DIR/results.md``, the two models (``clean.pt``, ``watermarked.pt``), the key
(``key.json``) and the verification reports with their pictures (``DIR/report/``).

Options: ``--fast`` (the CPU setting), ``--device``, ``--data DIR`` (the Sunnybrook folder) and any setting of
:class:`ExperimentConfig` or recipe deviation by its argument name (``--steps 800``, ``--test-patient SCD0000101``,
``--lime-samples 100``, ``--margin-consistency 0``); an unknown name is refused before anything runs.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Events
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedTrainer
from monai.engines.utils import PrepareBatch, PrepareBatchDefault
from monai.handlers import CheckpointLoader, CheckpointSaver
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks import one_hot
from monai.networks.nets import AttentionUnet, BasicUNet, SegResNet, SwinUNETR, UNet
from monai.transforms import Compose, RandomizableTransform, RandScaleIntensityd
from monai.utils import set_determinism

from experiments import CountingQuery, UsageError, attach_progress, cli, phase
from monai_stealthmark.data import DEFAULT_SUNNYBROOK_ROOT, load_sunnybrook, split_by_patient
from monai_stealthmark.handlers import SimulatedAttacks
from monai_stealthmark.key import WatermarkKey
from monai_stealthmark.losses import UncertaintyWatermarkLoss
from monai_stealthmark.metrics import pixel_auc
from monai_stealthmark.recipe import RECIPE_PARTS, recipe_defaults, resolve_recipe, split_recipe
from monai_stealthmark.transforms import RandBadNetd, RandPoolCutMixd, WatermarkBatch, WatermarkPrepareBatch
from monai_stealthmark.utils import atomic_write_json, atomic_write_text
from monai_stealthmark.verify import (
    ModelQuery,
    VerificationReport,
    organ_modules,
    read_scores,
    trigger_batch,
    uncertainty_scores,
    verify_ownership,
)

__all__ = [
    "ExperimentConfig",
    "build_network",
    "evaluate",
    "experiment_key",
    "load_or_train",
    "main",
    "make_config",
    "run",
    "stealth",
    "train_model",
]

PAYLOAD = "SM:3f9a2c71"
KEY_SEED = 20261123
WRONG_KEY_SEED = 987654321


class ExperimentConfig:
    """Settings of one run. ``fast`` is the CPU setting; the full setting trains longer on GPU when there is one.

    The watermark recipe is not set here: it is the defaults of :class:`~monai_stealthmark.key.WatermarkKey`,
    :class:`~monai_stealthmark.transforms.WatermarkBatch`, :class:`~monai_stealthmark.losses.UncertaintyWatermarkLoss`
    and :class:`~monai_stealthmark.handlers.SimulatedAttacks` (:mod:`monai_stealthmark.recipe`). A run that deviates
    from it passes the settings it changes by their class argument names (e.g. ``ExperimentConfig(tau=0.2,
    margin_consistency=0)``; ``simulate_attacks`` and ``simulate_attack_kinds`` for ``SimulatedAttacks``' ``prob`` and
    ``kinds``); they are kept in ``recipe``.

    Args:
        fast: CPU setting.
        steps: optimiser steps per model (1600 in the CPU setting).
        batch_size: samples per step (about half of them triggered for the watermarked model).
        lr: Adam learning rate (cosine decay to 0).
        size: image side in pixels.
        channels: UNet channels.
        test_patient: the held-out patient.
        seed: seed of everything (data order, augmentation, triggers, initialisation).
        lime_samples: LIME perturbation samples per image.
        lime_images: LIME reads the first this many held-out images (all when None); the direct read always reads
            every image. LIME costs ``lime_samples`` queries per image, which on 3D windows is most of a run.
        arch: the network (see :func:`build_network`).
        cutmix_prob: share of training samples (both models) that get a box of another training slice pasted in,
            image and label (:class:`~monai_stealthmark.transforms.RandPoolCutMixd`), before the watermark transform;
            0 = off. Part of both models' training, so the comparison stays paired.
        badnet: train the BadNet baseline instead (:class:`~monai_stealthmark.transforms.RandBadNetd`, plain
            DiceCE) — the key's trigger switches a keyed square to foreground.
        patients: restrict the data to these patients (all when None).
        data_root: the Sunnybrook folder.
        **recipe: deviations from the watermark recipe, by class argument name.

    Raises:
        UsageError: a name that is neither a run setting nor a recipe setting.
    """

    def __init__(self, fast: bool = True, **overrides: Any) -> None:
        self.fast = fast
        self.steps = 1600 if fast else 3000
        self.batch_size = 24
        self.lr = 1e-3
        self.size = 128
        self.channels = (16, 32, 64, 128, 256)
        self.test_patient = "SCD0000501"
        self.seed = 0
        self.lime_samples = 300 if fast else 1000
        self.lime_images: int | None = None
        self.cutmix_prob = 0.5
        self.arch = "unet"
        self.badnet = False
        self.patients: list[str] | None = None
        self.data_root = str(DEFAULT_SUNNYBROOK_ROOT)
        recipe = {k: v for k, v in overrides.items() if k not in vars(self) and v is not None}
        try:
            split_recipe(recipe)
        except ValueError as e:
            bad = next(k for k in recipe if all(k not in names for names in RECIPE_PARTS.values()))
            raise UsageError(f"unknown setting {bad!r} (run settings: {', '.join(sorted(vars(self)))}); {e}") from None
        defaults = {name: value for part in recipe_defaults().values() for name, value in part.items()}
        self.recipe: dict[str, Any] = {k: _as_default_type(defaults[k], v) for k, v in recipe.items()}
        for k, v in overrides.items():
            if k in vars(self) and v is not None:
                setattr(self, k, v)

    def watermark(self) -> dict[str, dict[str, Any]]:
        """The watermark settings of this run, per part (``key``, ``transform``, ``loss``, ``hardening``): recipe +
        deviations."""
        return resolve_recipe(self.recipe)

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON values (tuples as lists), with the resolved recipe."""
        d = {k: v for k, v in vars(self).items() if k != "recipe"}
        return json.loads(json.dumps({**d, "recipe": self.watermark()}))


def _as_default_type(default: Any, value: Any) -> Any:
    """A recipe setting from the command line in its default's type: a sequence setting given one name (``--kinds
    noise``, a string to the parser) or a list becomes a tuple."""
    if isinstance(default, tuple) and not isinstance(value, tuple):
        return (value,) if isinstance(value, str) else tuple(value)
    return value


def make_config(fast: bool = True, **settings: Any) -> ExperimentConfig:
    """An :class:`ExperimentConfig` from command-line settings, where ``data`` names the Sunnybrook folder."""
    if "data" in settings:
        settings["data_root"] = str(settings.pop("data"))
    return ExperimentConfig(fast=fast, **settings)


def experiment_key(cfg: ExperimentConfig, **fields: Any) -> WatermarkKey:
    """The experiments' fixed key (payload, seed from ``cfg.seed``, the run's key settings; ``fields`` override)."""
    fields = {**split_recipe(cfg.recipe)["key"], **fields}
    return WatermarkKey.generate(PAYLOAD, seed=KEY_SEED + cfg.seed, created_at="2026-11-23T00:00:00+00:00", **fields)


ARCHITECTURES = ("unet", "basicunet", "segresnet", "attentionunet", "swinunetr")


def build_network(channels=(16, 32, 64, 128, 256), arch: str = "unet") -> torch.nn.Module:
    """A MONAI 2D network with 2 output classes (background, LV cavity).

    Args:
        channels: UNet channels (``"unet"`` only).
        arch: ``"unet"`` (the experiment's), ``"basicunet"``, ``"segresnet"``, ``"attentionunet"`` or ``"swinunetr"``
            (2D, feature size 12 to stay trainable on a CPU; needs ``einops``).
    """
    if arch == "unet":
        return UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=channels, strides=(2,) * (len(channels) - 1), num_res_units=2)
    if arch == "basicunet":
        return BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=(16, 16, 32, 64, 128, 16))
    if arch == "segresnet":
        return SegResNet(spatial_dims=2, in_channels=1, out_channels=2, init_filters=16)
    if arch == "attentionunet":
        return AttentionUnet(spatial_dims=2, in_channels=1, out_channels=2, channels=channels, strides=(2,) * (len(channels) - 1))
    if arch == "swinunetr":
        return SwinUNETR(in_channels=1, out_channels=2, feature_size=12, spatial_dims=2)
    raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}.")


def _watermark_stage(key: WatermarkKey, cfg: ExperimentConfig) -> tuple[RandomizableTransform | PrepareBatch, torch.nn.Module]:
    """The watermark's training stage and loss for ``cfg`` (the recipe with the run's deviations): the batch-level
    stage as the trainer's ``prepare_batch``, as the bundle overlay wires it (BadNet: a per-sample transform)."""
    if cfg.badnet:
        return RandBadNetd(keys=("image", "label"), key=key), DiceCELoss(to_onehot_y=True, softmax=True)
    wm = cfg.watermark()
    stage = WatermarkBatch(key, **wm["transform"]).set_random_state(cfg.seed)
    loss = UncertaintyWatermarkLoss(DiceCELoss(to_onehot_y=True, softmax=True), key=key, **wm["loss"])
    return WatermarkPrepareBatch(stage), loss


def _training_loader(
    train_samples: list[dict], cfg: ExperimentConfig, key: WatermarkKey | None
) -> tuple[DataLoader, torch.nn.Module, PrepareBatch]:
    """The seeded training data loader (augmentation, CutMix, BadNet transform), the loss and the trainer's
    ``prepare_batch`` (the watermark stage) for ``cfg``."""
    data = [{"image": s["image"], "label": s["label"]} for s in train_samples]
    xforms = [RandScaleIntensityd(keys="image", factors=0.1, prob=0.5)]
    if cfg.cutmix_prob > 0:  # added only when on, so that the other transforms' random streams stay as they are
        xforms.append(RandPoolCutMixd(("image", "label"), pool=data, prob=cfg.cutmix_prob))
    loss: torch.nn.Module = DiceCELoss(to_onehot_y=True, softmax=True)
    prepare: PrepareBatch = PrepareBatchDefault()
    if key is not None:
        stage, loss = _watermark_stage(key, cfg)
        if isinstance(stage, PrepareBatch):
            prepare = stage
        else:
            xforms.append(stage)
    transform = Compose(xforms).set_random_state(seed=cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(Dataset(data, transform), batch_size=cfg.batch_size, shuffle=True, num_workers=0, generator=gen)
    return loader, loss, prepare


def _attach_checkpoints(trainer: SupervisedTrainer, ckpt_dir: Path, objs: dict[str, Any], epochs: int, device: torch.device) -> None:
    """Save about ten checkpoints over the run into ``ckpt_dir`` and resume from the last one found there.

    The watermark stage's and the simulated attacks' draws are part of a checkpoint; the augmentation's random state
    is not: a resumed run continues with fresh augmentation draws.
    """
    ckpts = sorted(ckpt_dir.glob("checkpoint_epoch=*.pt"), key=lambda f: int(f.stem.split("=")[1]))
    if ckpts:
        CheckpointLoader(str(ckpts[-1]), objs, map_location=device).attach(trainer)
    CheckpointSaver(str(ckpt_dir), objs, save_interval=max(1, epochs // 10), n_saved=1, file_prefix="", save_final=False).attach(trainer)


def train_model(
    train_samples: list[dict],
    cfg: ExperimentConfig,
    key: WatermarkKey | None,
    device: torch.device,
    ckpt_dir: Path | None = None,
) -> torch.nn.Module:
    """Train one model with MONAI's SupervisedTrainer; ``key=None`` trains the clean baseline.

    The clean and the watermarked model share seed, data order, schedule and batch size: the only difference is
    the watermark transform and the loss wrapper. A progress bar shows the steps with the current loss.
    """
    set_determinism(cfg.seed)
    net = build_network(cfg.channels, cfg.arch).to(device)
    loader, loss, prepare = _training_loader(train_samples, cfg, key)
    epochs = math.ceil(cfg.steps / len(loader))
    opt = torch.optim.Adam(net.parameters(), cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(loader))
    trainer = SupervisedTrainer(
        device=device, max_epochs=epochs, train_data_loader=loader, network=net, optimizer=opt, loss_function=loss,
        prepare_batch=prepare, amp=False,
    )
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda _: sched.step())
    objs: dict[str, Any] = {"net": net, "opt": opt, "sched": sched, "trainer": trainer}
    if isinstance(prepare, WatermarkPrepareBatch):
        objs["stage"] = prepare.stage
    hardening = cfg.watermark()["hardening"]
    if key is not None and hardening["simulate_attacks"] > 0:
        objs["hardening"] = SimulatedAttacks(kinds=hardening["simulate_attack_kinds"], prob=hardening["simulate_attacks"],
                                             seed=cfg.seed)
        objs["hardening"].attach(trainer)
    if ckpt_dir is not None:
        _attach_checkpoints(trainer, ckpt_dir, objs, epochs, device)
    attach_progress(trainer, f"train {'clean' if key is None else 'watermarked'} {cfg.arch}")
    trainer.run()
    return net.eval()


def load_or_train(
    path: Path,
    train_samples: list[dict],
    cfg: ExperimentConfig,
    key: WatermarkKey | None,
    device: torch.device,
    ckpt_dir: Path,
    settings: dict[str, Any] | None = None,
) -> torch.nn.Module:
    """The model saved at ``path``, or one trained with :func:`train_model` and saved there.

    Training checkpoints go to ``ckpt_dir`` (an interrupted run resumes from them) and are removed once the model
    is saved; ``settings``, when given, are written beside the new model as ``<name>.settings.json``.
    """
    if path.is_file():
        phase(f"reusing {path}")
        net = build_network(cfg.channels, cfg.arch).to(device)
        net.load_state_dict(torch.load(path, map_location=device))
        return net.eval()
    phase(f"training {path} ({cfg.arch}, {cfg.steps} steps of {cfg.batch_size})")
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    net = train_model(train_samples, cfg, key, device, ckpt_dir)
    tmp = path.with_suffix(".pt.tmp")
    torch.save(net.state_dict(), tmp)
    tmp.replace(path)
    if settings is not None:
        atomic_write_json(path.with_suffix(".settings.json"), settings)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return net


def stealth(m_clean: torch.Tensor, m_trig: torch.Tensor, n_classes: int = 2) -> tuple[float, float]:
    """``(mask Dice, pixel agreement)`` between the hard masks (class indices) on clean and on triggered inputs.

    The mask Dice is the mean over the foreground classes (``1 .. n_classes - 1``) that either mask contains.
    """
    dices = []
    for c in range(1, n_classes):
        a, b = m_clean == c, m_trig == c
        total = a.sum().item() + b.sum().item()
        if total:
            dices.append(2 * (a & b).sum().item() / max(1, total))
    dice = sum(dices) / len(dices) if dices else 1.0
    return float(dice), float((m_clean == m_trig).float().mean())


def segmentation_scores(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """Dice of the hard mask and pixel AUC of the probability, per foreground class and their means.

    Args:
        probs: ``(B, C, spatial...)`` per-class probabilities (class 0 the background).
        labels: ``(B, 1, spatial...)`` class indices.
    """
    n = probs.shape[1]
    dm = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=False)
    dm(one_hot(probs.argmax(1, keepdim=True), n), one_hot(labels.long(), n))
    dice = [float(d) for d in dm.aggregate().reshape(-1)]
    auc = [pixel_auc(probs[:, c], labels[:, 0] == c) for c in range(1, n)]
    res: dict[str, Any] = {"dice": float(np.mean(dice)), "auc": float(np.nanmean(auc))}
    if n > 2:
        res.update(dice_per_class=dice, auc_per_class=auc)
    return res


def _verify(query: Any, images: torch.Tensor, key: WatermarkKey, mode: str, cfg: ExperimentConfig, what: str) -> VerificationReport:
    """:func:`verify_ownership` with a bar of the images sent to the model (LIME on the first ``cfg.lime_images``)."""
    lime_samples = cfg.lime_samples
    if mode == "lime" and cfg.lime_images is not None:
        images = images[: cfg.lime_images]
    total = int(images.shape[0]) * (lime_samples + 1 if mode == "lime" else 1)
    counting = CountingQuery(query, total, f"verify {mode}: {what}")
    try:
        return verify_ownership(counting, images, key, mode=mode, lime_samples=lime_samples)
    finally:
        counting.close()


def _task_and_stealth(q_clean: ModelQuery, q_wm: ModelQuery, images, labels, key) -> tuple[dict[str, Any], torch.Tensor]:
    """Dice / AUC of both models on clean inputs and of the watermarked one on triggered inputs, and the stealth
    of its hard masks; also returns the watermarked model's probabilities on the clean inputs."""
    p_clean = q_clean(images)
    p_wm = q_wm(images)
    p_wm_trig = q_wm(trigger_batch(images, key))
    res: dict[str, Any] = {
        "clean": segmentation_scores(p_clean, labels),
        "watermarked": segmentation_scores(p_wm, labels),
        "watermarked_triggered_input": segmentation_scores(p_wm_trig, labels),
    }
    res["stealth_mask_dice"], res["stealth_agreement"] = stealth(p_wm.argmax(1), p_wm_trig.argmax(1), p_wm.shape[1])
    return res, p_wm


def _ownership(q_wm: ModelQuery, images, key: WatermarkKey, cfg: ExperimentConfig, report_dir: Path | None) -> dict[str, Any]:
    """The claim on the watermarked model in both modes (reports saved under ``report_dir``)."""
    reports = {}
    for mode in ("direct", "lime"):
        reports[mode] = _verify(q_wm, images, key, mode, cfg, "watermarked model")
        if report_dir is not None:
            reports[mode].save(report_dir)
    res: dict[str, Any] = {"asr": {m: r.asr for m, r in reports.items()}}
    res["decodes_by_read"] = {m: r.decodes_by_read() for m, r in reports.items()}  # raw / log scale / erasures
    for name, attr in (("bit_accuracy", "mean_bit_accuracy"), ("p_value", "p_value"), ("verdict", "verdict"),
                       ("verify_seconds", "seconds"), ("vote_decoded", "vote_decoded")):  # vote: one QR from all images
        res[name] = {m: getattr(r, attr) for m, r in reports.items()}
    return res


def _controls(q_clean: ModelQuery, q_wm: ModelQuery, images, p_wm: torch.Tensor, key: WatermarkKey, cfg: ExperimentConfig) -> dict[str, Any]:
    """The false claims: the payload read from clean inputs, from the clean model and with a wrong key (none may
    decode it)."""

    def n_decodes(decoded) -> int:
        return int(sum(t == key.payload for t in decoded))

    clean_input_decoded = read_scores(uncertainty_scores(p_wm, key), key, "direct", organ_modules(p_wm, key))[1]  # every read
    wrong_key = key.replace(trigger_seed=WRONG_KEY_SEED)
    controls: dict[str, dict[str, int]] = {"clean_inputs": {"direct": n_decodes(clean_input_decoded)}, "clean_model": {}, "wrong_key": {}}
    reports = {}
    for mode in ("direct", "lime"):
        r_cm = _verify(q_clean, images, key, mode, cfg, "clean model")
        r_wk = _verify(q_wm, images, wrong_key, mode, cfg, "wrong key")
        controls["clean_model"][mode] = n_decodes(r_cm.decoded)
        controls["wrong_key"][mode] = n_decodes(r_wk.decoded)
        reports[mode] = {"clean_model": r_cm, "wrong_key": r_wk}
    return {
        "false_decodes": {name: int(sum(v.values())) for name, v in controls.items()},
        "false_decodes_by_mode": controls,
        "false_vote_decodes": {
            name: int(sum(r.vote_decoded == key.payload for r in (d[name] for d in reports.values())))
            for name in ("clean_model", "wrong_key")
        },
        "control_bit_accuracy": {f"{name}_{mode}": r.mean_bit_accuracy for mode, d in reports.items() for name, r in d.items()},
        "control_verdicts": {f"{name}_{mode}": r.verdict for mode, d in reports.items() for name, r in d.items()},
    }


@torch.no_grad()
def evaluate(
    clean_net: torch.nn.Module,
    wm_net: torch.nn.Module,
    test_samples: list[dict],
    key: WatermarkKey,
    cfg: ExperimentConfig,
    device: torch.device,
    report_dir: Path | None = None,
    inferer: Any | None = None,
) -> dict[str, Any]:
    """Every number of the acceptance table, measured on the held-out patient's slices (2D) or volumes (3D).

    ``inferer`` (e.g. a bundle's ``SlidingWindowInferer``) is how the models are queried; None calls them.
    """
    images = torch.stack([s["image"] for s in test_samples]).to(device)
    labels = torch.stack([s["label"] for s in test_samples]).to(device)
    q_clean = ModelQuery(clean_net, activation="softmax", device=device, inferer=inferer)
    q_wm = ModelQuery(wm_net, activation="softmax", device=device, inferer=inferer)
    phase(f"measuring both models and verifying the watermark on {images.shape[0]} held-out images")
    res, p_wm = _task_and_stealth(q_clean, q_wm, images, labels, key)
    res.update(_ownership(q_wm, images, key, cfg, report_dir))
    phase("controls: clean inputs, the clean model, a wrong key")
    res.update(_controls(q_clean, q_wm, images, p_wm, key, cfg))
    res["n_images"] = int(images.shape[0])
    return res


def results_markdown(res: dict[str, Any], cfg: ExperimentConfig) -> str:
    """The results table of one run in markdown, headed by its setting."""
    fd = res["false_decodes"]
    rows = [
        ("clean model: Dice / AUC (held-out patient)", f"{res['clean']['dice']:.4f} / {res['clean']['auc']:.4f}"),
        ("watermarked model: Dice / AUC", f"{res['watermarked']['dice']:.4f} / {res['watermarked']['auc']:.4f}"),
        ("Dice drop (points) / AUC drop (%)", f"{100 * (res['clean']['dice'] - res['watermarked']['dice']):.2f} / "
         f"{100 * (res['clean']['auc'] - res['watermarked']['auc']) / res['clean']['auc']:.2f}"),
        ("watermarked, triggered input: Dice vs ground truth", f"{res['watermarked_triggered_input']['dice']:.4f}"),
        ("stealth: mask Dice clean vs triggered input", f"{res['stealth_mask_dice']:.4f}"),
        ("stealth: pixel agreement", f"{100 * res['stealth_agreement']:.3f} %"),
        ("ASR direct / LIME", f"{100 * res['asr']['direct']:.1f} % / {100 * res['asr']['lime']:.1f} %"),
        ("bit accuracy direct / LIME", f"{res['bit_accuracy']['direct']:.4f} / {res['bit_accuracy']['lime']:.4f}"),
    ]
    if res.get("decodes_by_read", {}).get("direct"):  # a results.json without per-read counts skips the row
        by = res["decodes_by_read"]
        rows.append(("exact decodes by read (raw / log scale / organ as erasures) direct; LIME",
                     "; ".join(" / ".join(str(by[m][k]) for k in ("raw", "log", "erasure")) for m in ("direct", "lime"))))
    rows += [
        ("p-value direct / LIME", f"{res['p_value']['direct']:.3g} / {res['p_value']['lime']:.3g}"),
        ("false decodes: clean inputs / clean model / wrong key",
         f"{fd['clean_inputs']} / {fd['clean_model']} / {fd['wrong_key']} (of {res['n_images']} images each)"),
    ]
    if "vote_decoded" in res:  # likewise for the majority-vote read-out
        fv = res["false_vote_decodes"]
        rows += [
            ("majority-vote QR of all images direct / LIME", " / ".join(repr(res["vote_decoded"][m]) for m in ("direct", "lime"))),
            ("false majority-vote decodes: clean model / wrong key (both modes)", f"{fv['clean_model']} / {fv['wrong_key']}"),
        ]
    rows += [
        ("device, seconds", f"{res['device']}, {res['seconds']:.0f} s"),
    ]
    net = f"UNet {tuple(cfg.channels)}" if cfg.arch == "unet" else cfg.arch
    head = (f"Sunnybrook LV, MONAI 2D {net}, {cfg.size}x{cfg.size}, {cfg.steps} steps x {cfg.batch_size}, "
            f"seed {cfg.seed}, held-out patient {cfg.test_patient} ({res['n_images']} slices), LIME {cfg.lime_samples} samples\n\n")
    return head + "| measure | value |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows) + "\n"


# settings that shape only the watermarked model (the clean one trains without them) or only the verification
_WATERMARK_ONLY = ("badnet", *(n for names in RECIPE_PARTS.values() for n in names))
_VERIFY_ONLY = ("lime_samples", "lime_images")


def _training_settings(cfg: ExperimentConfig, name: str) -> dict[str, Any]:
    """The settings a saved model ``name`` (``"clean"`` / ``"watermarked"``) depends on, to check before reusing it
    (the recipe's settings by their own names)."""
    settings = cfg.to_dict()
    for values in settings.pop("recipe").values():
        settings.update(values)
    skip = set(_VERIFY_ONLY) | (set(_WATERMARK_ONLY) if name == "clean" else set())
    return {k: v for k, v in settings.items() if k not in skip}


def _check_reuse(path: Path, cfg: ExperimentConfig, name: str) -> None:
    """Refuse to reuse ``path`` when its recorded training settings differ from ``cfg``'s."""
    rec = path.with_suffix(".settings.json")
    if not rec.is_file():
        warnings.warn(f"{path} has no record of its training settings; reusing it as it is.", stacklevel=3)
        return
    new = _training_settings(cfg, name)
    old = json.loads(rec.read_text())
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        raise ValueError(
            f"{path} was trained with other settings ({', '.join(f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in diff)}); "
            "use another --out folder or delete the model to retrain it."
        )


def run(cfg: ExperimentConfig, out: str | Path, device: str | None = None) -> dict[str, Any]:
    """Train both models (or reuse those in ``out``), verify, and write ``results.json`` + ``results.md``."""
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    key = experiment_key(cfg)
    key.save(out / "key.json")
    phase(f"loading the Sunnybrook slices from {cfg.data_root}")
    samples = load_sunnybrook(cfg.data_root, size=cfg.size, patients=cfg.patients)
    train, test = split_by_patient(samples, [cfg.test_patient])
    models = {}
    for name, k in (("clean", None), ("watermarked", key)):
        path = out / f"{name}.pt"
        if path.is_file():
            _check_reuse(path, cfg, name)
        models[name] = load_or_train(path, train, cfg, k, dev, out / f"ckpt_{name}", _training_settings(cfg, name))
    res = evaluate(models["clean"], models["watermarked"], test, key, cfg, dev, out / "report")
    res["device"] = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    res["seconds"] = time.perf_counter() - t0
    res["config"] = cfg.to_dict()
    res["key_fingerprint"] = key.fingerprint
    atomic_write_json(out / "results.json", res)
    atomic_write_text(out / "results.md", results_markdown(res, cfg))
    return res


def main(out: str, fast: bool = False, device: str | None = None, **settings: Any) -> None:
    """Train the clean and the watermarked model, verify both and print the results table.

    Args:
        out: output folder (models, key, report, ``results.json`` / ``results.md``); rerunning reuses its models.
        fast: the CPU setting.
        device: ``cuda`` / ``cpu`` (default: CUDA when available).
        **settings: any :class:`ExperimentConfig` setting or recipe deviation, e.g. ``--steps 800``,
            ``--test-patient SCD0000101``, ``--data DIR`` (the Sunnybrook folder), ``--margin-consistency 0``.
    """
    cfg = make_config(fast, **settings)
    res = run(cfg, out, device)
    print(results_markdown(res, cfg))


if __name__ == "__main__":
    raise SystemExit(cli(main))
