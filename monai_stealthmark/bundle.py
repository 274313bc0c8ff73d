"""Helpers called from the bundle overlays in ``bundles/``.

``stealthmark_overlay.json`` is merged onto an existing MONAI bundle (``python -m monai.bundle run --config_file
"['configs/train.json','stealthmark_overlay.json']" --key_file key.json``). It needs two objects of the bundle, not
its transform list: the ``SupervisedTrainer`` and the ``SupervisedEvaluator`` (``stealthmark#engines``; default
``["@train#trainer", "@validate#evaluator"]`` as model-zoo bundles name them; a bundle in the flat layout passes
``--stealthmark#engines "['@trainer','@evaluator']"``, and :func:`bundle_parser` finds either layout by itself).
At ``initialize`` :func:`attach_watermark` wires the watermark to them:

- the trainer's ``prepare_batch`` runs :class:`~monai_stealthmark.transforms.WatermarkPrepareBatch` after the
  bundle's own preparation, on collated batches on the training device (multi-sample crops, any patch size);
- the trainer's ``loss_function`` is wrapped in :class:`~monai_stealthmark.losses.UncertaintyWatermarkLoss`;
- :class:`~monai_stealthmark.handlers.SimulatedAttacks` trains a share of the steps at pruned or noisy weights, so
  the watermark survives fine-tuning and pruning of a stolen copy;
- the evaluator gains ``val_auc`` (mean over the foreground classes, and each class), ``val_wm_asr`` and
  ``val_wm_asr_bit_acc``, computed before its own handlers log or save;
- the evaluator's key metric becomes ``val_wm_score``: its Dice when the QR decodes on at least ``min_asr`` of the
  validation queries, its Dice minus 1 otherwise, so the bundle's own ``CheckpointSaver`` keeps the best epoch that
  carries the watermark;
- the draw states of the stage and of the simulated attacks join the bundle's training checkpoints (a
  ``CheckpointSaver`` whose ``save_dict`` holds the trainer) and are restored with them (a ``CheckpointLoader``
  whose ``load_dict`` holds the trainer), so a resumed run draws what an uninterrupted one would. Checkpoints
  without the trainer, such as the model file a bundle ships, stay as the bundle writes them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser
from monai.handlers import CheckpointLoader, CheckpointSaver, from_engine

from monai_stealthmark.handlers import (
    PixelAUC,
    SimulatedAttacks,
    StashProbabilities,
    StripWatermarkChannel,
    WatermarkASR,
)
from monai_stealthmark.key import KeyFileError, WatermarkKey
from monai_stealthmark.losses import UncertaintyWatermarkLoss
from monai_stealthmark.transforms import WatermarkBatch, WatermarkPrepareBatch
from monai_stealthmark.verify import ModelQuery, VerificationReport, verify_ownership

__all__ = [
    "ENGINE_IDS",
    "BundleConfigError",
    "attach_metrics",
    "attach_watermark",
    "bundle_parser",
    "checkpoint_state_dict",
    "load_bundle_key",
    "load_bundle_model",
    "run_ownership_check",
]

# where bundles keep their trainer and evaluator: model-zoo's nested layout, and the flat one
ENGINE_IDS = (("train#trainer", "validate#evaluator"), ("trainer", "evaluator"))
PROB_KEY = "stealthmark_prob"


class BundleConfigError(ValueError):
    """The bundle does not have what the watermark overlay needs."""


def bundle_parser(
    bundle_dir: str | Path,
    files: Sequence[str],
    bundle_root: str | Path,
    key_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
):
    """A parsed :class:`monai.bundle.ConfigParser` for config files merged in order, as ``monai.bundle run`` does;
    when the overlay is merged, ``stealthmark#engines`` points at the trainer and evaluator of either layout.

    Args:
        bundle_dir: the bundle folder; relative file names are read from its ``configs/``.
        files: config files in merge order, e.g. ``["train.json", "<path>/stealthmark_overlay.json"]``.
        bundle_root: set as ``bundle_root`` (where the run writes its models and logs).
        key_file: set as ``key_file`` when given (the overlay reads the key from it).
        overrides: more ids to set before parsing (e.g. ``{"max_epochs": 1}``).
    """
    parser = ConfigParser()
    parser.read_config([f if Path(f).is_absolute() else str(Path(bundle_dir) / "configs" / f) for f in files])
    parser["bundle_root"] = str(bundle_root)
    if key_file is not None:
        parser["key_file"] = str(key_file)
    if parser.get("stealthmark#engines") == [f"@{i}" for i in ENGINE_IDS[0]]:  # the overlay's default: find them
        parser["stealthmark#engines"] = [f"@{i}" if i in parser else None for i in find_engine_ids(parser)]
    if parser.get("stealthmark#evaluator") == f"@{ENGINE_IDS[0][1]}" and ENGINE_IDS[0][1] not in parser:
        parser["stealthmark#evaluator"] = f"@{ENGINE_IDS[1][1]}"
    for k, v in (overrides or {}).items():
        parser[k] = v
    parser.parse()
    return parser


def find_engine_ids(parser: ConfigParser) -> tuple[str, str]:
    """The ids of a bundle's trainer and evaluator in either layout; :class:`BundleConfigError` names what is missing."""
    for trainer, evaluator in ENGINE_IDS:
        if trainer in parser:
            return trainer, evaluator
    raise BundleConfigError(
        "the bundle has no trainer: the watermark needs a SupervisedTrainer at `train#trainer` (model-zoo layout) or "
        "`trainer` (flat layout); name yours with --stealthmark#engines \"['@my#trainer','@my#evaluator']\"."
    )


def checkpoint_state_dict(path: str | Path, device: Any = "cpu") -> dict:
    """A state dict from a checkpoint file: plain, or ``{"model": state_dict}`` as CheckpointSaver writes it."""
    state = torch.load(path, map_location=device, weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    return state


def load_bundle_key(key_file: str | Path | None) -> WatermarkKey:
    """Load the owner's key for a bundle run; ``key_file`` comes from ``--key_file`` on the command line."""
    if key_file is None or str(key_file).strip() == "":
        raise KeyFileError(
            "no watermark key given: add --key_file path/to/key.json to the `monai.bundle run` command "
            "(make one with `python -m monai_stealthmark keygen --payload ... --out key.json`)."
        )
    return WatermarkKey.load(key_file)


def attach_watermark(
    trainer: Any,
    evaluator: Any,
    key: WatermarkKey | str,
    activation: str = "softmax",
    asr_mode: str = "direct",
    asr_max_images: int = 4,
    min_asr: float = 0.5,
    seed: int | None = None,
    output_mark_weight: float | None = None,
    simulate_attacks: float | None = None,
) -> bool:
    """Wire the watermark to a bundle's trainer (and evaluator); see the module docstring.

    Args:
        trainer: the bundle's ``SupervisedTrainer``.
        evaluator: its ``SupervisedEvaluator``, or None (no validation: no metrics, no checkpoint rule).
        key: the owner's key.
        activation: ``"softmax"`` (several output channels, label of class indices) or ``"sigmoid"``.
        asr_mode: ``"direct"`` or ``"lime"`` read-out of the validation ASR.
        asr_max_images: triggered validation images per epoch (a fixed subset spread over the validation set; see
            :class:`~monai_stealthmark.handlers.WatermarkASR`).
        min_asr: the validation ASR from which an epoch counts as carrying the watermark (checkpoint rule).
        seed: seed of the watermark stage's draws; default ``torch.initial_seed()`` (the bundle's
            ``set_determinism``), plus the process rank so DDP ranks draw independent triggers.
        output_mark_weight: weight of the key's output mark (see
            :class:`~monai_stealthmark.losses.UncertaintyWatermarkLoss`); None keeps the loss's default.
        simulate_attacks: share of steps trained at attacked weights (see
            :class:`~monai_stealthmark.handlers.SimulatedAttacks`); None keeps its default, 0 turns it off.

    Returns:
        True, so it can sit in a bundle's ``initialize`` list.
    """
    _require(trainer, ("prepare_batch", "loss_function", "network"), "trainer", "a SupervisedTrainer")
    if isinstance(trainer.prepare_batch, WatermarkPrepareBatch):
        raise BundleConfigError("the watermark is already attached to this trainer (the overlay was merged twice?).")
    key = key if isinstance(key, WatermarkKey) else load_bundle_key(key)
    base_seed = torch.initial_seed() if seed is None else int(seed)
    stage = WatermarkBatch(key).set_random_state((base_seed + idist.get_rank()) % (2**32))
    trainer.prepare_batch = WatermarkPrepareBatch(stage, trainer.prepare_batch)
    mark = {} if output_mark_weight is None else {"output_mark_weight": output_mark_weight}
    trainer.loss_function = UncertaintyWatermarkLoss(trainer.loss_function, key=key, activation=activation, **mark)
    StripWatermarkChannel(n_label_channels=None).attach(trainer)
    draws: dict[str, Any] = {"stealthmark_stage": stage}
    if simulate_attacks is None or simulate_attacks > 0:
        share = {} if simulate_attacks is None else {"prob": simulate_attacks}
        draws["stealthmark_attacks"] = SimulatedAttacks(seed=(base_seed + idist.get_rank()) % (2**32), **share)
        draws["stealthmark_attacks"].attach(trainer)
    _join_training_checkpoints(trainer, (trainer, evaluator), draws)
    if evaluator is not None:
        attach_metrics(evaluator, key, activation, asr_mode, asr_max_images)
        if getattr(evaluator.state, "key_metric_name", None) is None:
            warnings.warn(
                "the evaluator has no key metric (e.g. val_mean_dice): val_wm_score and the checkpoint rule are "
                "skipped; check val_wm_asr at the epoch of the checkpoint you ship.",
                stacklevel=2,
            )
        else:
            _attach_before_key_metric(evaluator, lambda e: _WatermarkScore(min_asr).attach(e))
            evaluator.state.key_metric_name = _WatermarkScore.name
    return True


def attach_metrics(
    evaluator: Any, key: WatermarkKey | str, activation: str = "softmax", asr_mode: str = "direct", asr_max_images: int = 4
) -> bool:
    """Attach ``val_auc`` and ``val_wm_asr`` (+ ``_bit_acc``) to an evaluator, ahead of its own handlers."""
    _require(evaluator, ("network",), "evaluator", "a SupervisedEvaluator")
    key = key if isinstance(key, WatermarkKey) else load_bundle_key(key)
    StashProbabilities(activation, out_key=PROB_KEY).attach(evaluator)
    auc = PixelAUC(label_index=None, output_transform=from_engine([PROB_KEY, "label"]))
    asr = WatermarkASR(key, mode=asr_mode, max_images=asr_max_images, activation=activation)
    _attach_before_key_metric(evaluator, lambda e: (auc.attach(e, "val_auc"), asr.attach(e, "val_wm_asr")))
    return True


class _WatermarkScore:
    """``val_wm_score``: the key metric's Dice when the validation ASR reaches ``min_asr``, else Dice - 1."""

    name = "val_wm_score"

    def __init__(self, min_asr: float, dice_name: str | None = None) -> None:
        self.min_asr = float(min_asr)
        self.dice_name = dice_name

    def attach(self, engine: Engine) -> None:
        self.dice_name = self.dice_name or engine.state.key_metric_name
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        m = engine.state.metrics
        if self.dice_name not in m:
            raise BundleConfigError(f"the evaluator has no key metric {self.dice_name!r} (e.g. val_mean_dice) to score.")
        m[self.name] = float(m[self.dice_name]) - (0.0 if m["val_wm_asr"] >= self.min_asr else 1.0)


def _checkpoint_handlers(engines: Sequence[Any]) -> list[CheckpointSaver | CheckpointLoader]:
    """The ``CheckpointSaver`` and ``CheckpointLoader`` objects attached to ``engines`` (through any event filter)."""
    found: list[Any] = []
    for engine in (e for e in engines if e is not None):
        for handlers in getattr(engine, "_event_handlers", {}).values():
            for fn, *_ in handlers:
                fn = fn._parent() if hasattr(fn, "_parent") else fn  # ignite wraps filtered handlers
                owner = fn if isinstance(fn, (CheckpointSaver, CheckpointLoader)) else getattr(fn, "__self__", None)
                if isinstance(owner, (CheckpointSaver, CheckpointLoader)) and all(owner is not f for f in found):
                    found.append(owner)
    return found


def _join_training_checkpoints(trainer: Any, engines: Sequence[Any], draws: dict[str, Any]) -> None:
    """Save ``draws`` (objects with ``state_dict``) in the checkpoints that hold the trainer, and restore them
    from such a checkpoint when one is loaded; a checkpoint written without them leaves the draws as seeded."""
    for handler in _checkpoint_handlers(engines):
        if isinstance(handler, CheckpointSaver) and any(v is trainer for v in handler.save_dict.values()):
            handler.save_dict.update(draws)  # the same dict object the saver's ignite Checkpoints write
        elif isinstance(handler, CheckpointLoader) and any(v is trainer for v in handler.load_dict.values()):
            trainer.add_event_handler(Events.STARTED, _DrawRestorer(handler, draws))


class _DrawRestorer:
    """Restore the watermark's draw states from the checkpoint a bundle's ``CheckpointLoader`` resumes from."""

    def __init__(self, loader: CheckpointLoader, draws: dict[str, Any]) -> None:
        self.loader, self.draws = loader, draws

    def __call__(self, engine: Engine) -> None:
        ckpt = torch.load(self.loader.load_path, map_location="cpu", weights_only=False)
        missing = [k for k in self.draws if not (isinstance(ckpt, dict) and k in ckpt)]
        for k, obj in self.draws.items():
            if k not in missing:
                obj.load_state_dict(ckpt[k])
        if missing:
            warnings.warn(
                f"the checkpoint {self.loader.load_path} has no {', '.join(missing)}: the watermark's draws continue "
                "from their seed instead of where that run stopped.",
                stacklevel=2,
            )


def _require(engine: Any, attrs: Sequence[str], what: str, kind: str) -> None:
    missing = [a for a in attrs if not hasattr(engine, a)]
    if engine is None or missing:
        raise BundleConfigError(
            f"the watermark needs the bundle's {what} ({kind}); got {type(engine).__name__} without "
            f"{', '.join(missing) or 'anything'}. Point stealthmark#engines at it, e.g. "
            "--stealthmark#engines \"['@trainer','@evaluator']\" for a flat bundle."
        )


def _attach_before_key_metric(engine: Any, attach: Callable[[Engine], Any]) -> None:
    """Attach handlers so that their EPOCH_COMPLETED work runs right after the evaluator's own metrics and before
    its key-metric comparison, loggers and checkpoint savers, which were registered when the bundle built it."""
    before = {event: list(handlers) for event, handlers in engine._event_handlers.items()}
    attach(engine)
    for event, handlers in engine._event_handlers.items():
        new = [h for h in handlers if h not in before.get(event, [])]
        if not new or event != Events.EPOCH_COMPLETED:
            continue
        old = before[event]
        cut = next((i for i, h in enumerate(old) if getattr(h[0], "__name__", "") == "_compare_metrics"), 0)
        handlers[:] = old[:cut] + new + old[cut:]


def run_ownership_check(
    network: Any,
    dataset: Any,
    key_file: str | Path,
    output_dir: str | Path,
    checkpoint: str | Path | None = None,
    inferer: Any | None = None,
    device: Any = "cpu",
    modes: Sequence[str] = ("direct",),
    activation: str = "softmax",
    image_key: str = "image",
    max_images: int = 64,
    lime_samples: int = 500,
) -> dict[str, Any]:
    """The ownership check of ``bundles/stealthmark_verify.json``: load a bundle's model, query it as a black box
    with the key's trigger on the dataset's images, and write ``report_<mode>.json/.md`` + PNGs.

    Args:
        network: the bundle's network (``@network``).
        dataset: the bundle's inference dataset (``@dataset``); items are dicts with ``image_key``.
        key_file: the owner's key file.
        output_dir: where the reports go.
        checkpoint: weights to load into ``network`` (a state dict, or ``{"model": state_dict}`` as
            CheckpointSaver writes); None if the network already holds them.
        inferer: the bundle's inferer (``@inferer``; SimpleInferer or SlidingWindowInferer), or None.
        device: where to run the queries.
        modes: ``"direct"`` and/or ``"lime"``.
        activation: turns the network's logits into the probabilities the verifier reads.
        image_key: the image field of the dataset items.
        max_images: images queried (the first ones of the dataset).
        lime_samples: LIME perturbation samples per image.

    Returns:
        ``{mode: report dict}``; each verdict is also printed.
    """
    key = load_bundle_key(key_file)
    device = torch.device(device)
    network = _load_checkpoint(network, checkpoint, device)
    images = _dataset_images(dataset, image_key, max_images)
    query = ModelQuery(network, activation=activation, device=device, inferer=inferer)
    out: dict[str, Any] = {}
    for mode in modes:
        report = verify_ownership(query, images, key, mode=mode, lime_samples=lime_samples)
        report.save(output_dir)
        out[mode] = report.to_dict()
        print(_verdict_line(report))
    return out


def _load_checkpoint(network: torch.nn.Module, checkpoint: str | Path | None, device: torch.device) -> torch.nn.Module:
    """``network`` with the checkpoint's weights (when one is given), on ``device`` and in eval mode."""
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist (train the bundle first or set ckpt_path).")
        network.load_state_dict(checkpoint_state_dict(path, device))
    return network.to(device).eval()


def _dataset_images(dataset: Any, image_key: str, max_images: int) -> torch.Tensor:
    """The first ``max_images`` images of a bundle dataset stacked as one batch (MetaTensors as plain tensors)."""
    n = min(len(dataset), int(max_images))
    if n == 0:
        raise ValueError("the bundle's dataset is empty: nothing to query (check input_dir / datalist).")
    items = [dataset[i][image_key] for i in range(n)]
    return torch.stack([x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x) for x in items])


def _verdict_line(report: VerificationReport) -> str:
    """One printed line per mode: ASR, bit accuracy, p-value and the verdict."""
    return (
        f"ownership check ({report.mode}): ASR {report.asr:.3f}, bit accuracy {report.mean_bit_accuracy:.4f}, "
        f"p = {report.p_value:.3g} -> {'ownership shown' if report.verdict else 'not shown'}"
    )


def load_bundle_model(bundle_dir: str | Path, config: str = "configs/inference.json", checkpoint: str | Path | None = None, device: Any = None):
    """The trained network of a MONAI bundle, with its inferer and its inference preprocessing.

    Args:
        bundle_dir: the bundle folder (``configs/``, ``models/model.pt``).
        config: the inference config inside it (needs ``network_def``; ``inferer`` and ``preprocessing`` are used
            when present).
        checkpoint: the weights; default: the config's ``ckpt_path`` or ``models/model.pt``.
        device: where to put the network (default: CUDA when available).

    Returns:
        ``(network in eval mode, inferer or None, preprocessing or None)``.
    """
    bundle_dir = Path(bundle_dir)
    cfg_file = bundle_dir / config
    if not cfg_file.is_file():
        raise FileNotFoundError(f"bundle config {str(cfg_file)!r} does not exist (is {str(bundle_dir)!r} a MONAI bundle?).")
    parser = bundle_parser(bundle_dir, [str(cfg_file.resolve())], bundle_dir)
    if "network_def" not in parser:
        raise BundleConfigError(f"{str(cfg_file)!r} has no `network_def`.")
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    network = parser.get_parsed_content("network_def").to(device)
    if checkpoint is None:
        checkpoint = parser.get_parsed_content("ckpt_path") if "ckpt_path" in parser else bundle_dir / "models" / "model.pt"
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"bundle checkpoint {str(path)!r} does not exist.")
    network.load_state_dict(checkpoint_state_dict(path, device))
    inferer = parser.get_parsed_content("inferer") if "inferer" in parser else None
    preprocessing = parser.get_parsed_content("preprocessing") if "preprocessing" in parser else None
    return network.eval(), inferer, preprocessing
