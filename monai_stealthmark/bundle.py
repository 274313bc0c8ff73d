"""Helpers called from the bundle overlay ``bundles/stealthmark_overlay.json``.

The overlay is merged onto an existing MONAI bundle (``python -m monai.bundle run --config_file
"['configs/train.json','stealthmark_overlay.json']" --key_file key.json``). It expects these ids, as in the
model-zoo bundles:

========================== ==================================================================================
``loss``                    the bundle's segmentation loss (wrapped, not replaced)
``train#random_transforms`` list of random training transforms, the last part of ``train#preprocessing``
``train#handlers``          list of trainer handlers
``train#trainer``           the ``SupervisedTrainer`` (its ``loss_function`` is switched to the watermark loss)
``validate#handlers``       list of evaluator handlers
``validate#additional_metrics`` dict of extra evaluator metrics (gets ``val_auc`` and ``val_wm_asr``)
``validate#evaluator``      the ``SupervisedEvaluator``
``initialize``              list of expressions run before training (gets the check below)
========================== ==================================================================================

:func:`check_watermark_bundle` runs first and fails with a message naming the missing id when the merge did
not reach one of them (MONAI's merge only warns when a ``+`` id is absent).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser

from monai_stealthmark.handlers import PixelAUC, StashProbabilities, StripWatermarkChannel, WatermarkASR
from monai_stealthmark.key import KeyFileError, WatermarkKey
from monai_stealthmark.losses import UncertaintyWatermarkLoss
from monai_stealthmark.transforms import RandWatermarkd
from monai_stealthmark.verify import ModelQuery, VerificationReport, verify_ownership

__all__ = [
    "BundleConfigError",
    "bundle_parser",
    "load_bundle_key",
    "check_watermark_bundle",
    "find_transforms",
    "run_ownership_check",
    "load_bundle_model",
]


class BundleConfigError(ValueError):
    """The bundle does not have the ids the watermark overlay needs."""


def bundle_parser(
    bundle_dir: str | Path,
    files: Sequence[str],
    bundle_root: str | Path,
    key_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
):
    """A parsed :class:`monai.bundle.ConfigParser` for config files merged in order, as ``monai.bundle run`` does.

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
    for k, v in (overrides or {}).items():
        parser[k] = v
    parser.parse()
    return parser


def _state_dict(path: Path, device: Any) -> dict:
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


def find_transforms(transform: Any, cls: type) -> list:
    """All transforms of type ``cls`` inside ``transform`` (Compose and nested Compose walked recursively)."""
    found = []
    if isinstance(transform, cls):
        found.append(transform)
    for t in getattr(transform, "transforms", ()) or ():
        found.extend(find_transforms(t, cls))
    return found


def _attached(engine: Any, cls: type) -> list:
    """Objects of type ``cls`` whose methods are registered as handlers on an ignite engine."""
    out = []
    for handlers in getattr(engine, "_event_handlers", {}).values():
        for h, *_ in handlers:
            obj = getattr(h, "__self__", h)
            if isinstance(obj, cls) and obj not in out:
                out.append(obj)
    return out


def check_watermark_bundle(trainer: Any | None, evaluator: Any | None = None) -> bool:
    """Check that the overlay reached the bundle's trainer (and evaluator); raise :class:`BundleConfigError`.

    Args:
        trainer: the bundle's ``train#trainer``; None to check only the evaluator (metrics-only overlay).
        evaluator: the bundle's ``validate#evaluator`` (optional).

    Returns:
        True, so it can sit in a bundle's ``initialize`` list.
    """
    if trainer is not None:
        _check_trainer(trainer)
    if evaluator is not None:
        if not _attached(evaluator, StashProbabilities):
            raise BundleConfigError("StashProbabilities is not attached to the evaluator: the bundle needs a `validate#handlers` list.")
        if not _attached(evaluator, WatermarkASR) or not _attached(evaluator, PixelAUC):
            raise BundleConfigError(
                "the evaluator has no val_wm_asr / val_auc metrics: the bundle needs a `validate#additional_metrics` "
                "dict passed to `validate#evaluator` as `additional_metrics`."
            )
    return True


def _check_trainer(trainer: Any) -> None:
    """Raise :class:`BundleConfigError` naming the missing id unless the overlay's loss, transform and handler
    all reached the trainer."""
    if not isinstance(getattr(trainer, "loss_function", None), UncertaintyWatermarkLoss):
        raise BundleConfigError(
            "the trainer's loss is not the watermark loss: the bundle needs `train#trainer` with a `loss_function` "
            "(the overlay sets `train#trainer#loss_function` to `@stealthmark#loss`, wrapping `@loss`)."
        )
    loader = getattr(trainer, "data_loader", None)
    transform = getattr(getattr(loader, "dataset", None), "transform", None)
    wm = find_transforms(transform, RandWatermarkd)
    if not wm:
        raise BundleConfigError(
            "RandWatermarkd is not in the training transforms: the bundle needs a `train#random_transforms` list "
            "that `train#preprocessing` uses (the overlay appends the watermark transform to it)."
        )
    chain = list(getattr(transform, "transforms", ()))
    if chain and wm[-1] is not chain[-1] and wm[-1].paired:
        raise BundleConfigError(
            "RandWatermarkd(paired=True) must be the last training transform (it returns [clean twin, triggered] "
            "lists): put it at the end of `train#random_transforms`."
        )
    if not _attached(trainer, StripWatermarkChannel):
        raise BundleConfigError("StripWatermarkChannel is not attached to the trainer: the bundle needs a `train#handlers` list.")


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
        network.load_state_dict(_state_dict(path, device))
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
    network.load_state_dict(_state_dict(path, device))
    inferer = parser.get_parsed_content("inferer") if "inferer" in parser else None
    preprocessing = parser.get_parsed_content("preprocessing") if "preprocessing" in parser else None
    return network.eval(), inferer, preprocessing
