"""Train an example bundle clean (its own ``train.json``) and watermarked (``train.json`` + the overlay) in-process
with MONAI's ConfigParser, then measure both models on the bundle's validation data like the 2D experiment.

    python -m experiments.bundle_pair --bundle bundles/ct_spleen_3d --out runs/ct_spleen_3d [--epochs N] [--seed S]

The watermark of a patch-trained bundle lives on the network's input window (the sliding window's ``roi_size``), so
the verification queries are the held-out volumes centre-cropped or padded to that window
(:func:`~monai_stealthmark.verify.fit_window`): ASR, stealth and the false-decode controls are measured on those
queries, while Dice and AUC are measured as the bundle measures them, on the whole held-out volumes through its own
inferer (mean Dice per volume over the foreground classes, pixel AUC over all voxels). Writes ``DIR/results.json``
and ``DIR/results.md``; the two runs' bundle outputs (``models/model.pt``, logs) go to ``DIR/clean`` and
``DIR/watermarked``.

Options: ``--epochs`` / ``--val-interval`` / ``--seed`` override the bundle's ``max_epochs`` / ``val_interval`` /
``seed``; ``--lime-samples`` sets the LIME samples per image and ``--lime-images`` how many held-out images LIME
reads (the direct read always reads all of them).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser
from monai.utils import set_determinism

from experiments import attach_progress, cli, phase
from experiments.sunnybrook import ExperimentConfig, evaluate, experiment_key, segmentation_scores
from monai_stealthmark.bundle import bundle_parser
from monai_stealthmark.utils import atomic_write_json, atomic_write_text
from monai_stealthmark.verify import ModelQuery, fit_window

__all__ = ["OVERLAY", "main", "run", "train_bundle", "validation_volumes", "volume_scores"]

OVERLAY = Path(__file__).resolve().parents[1] / "bundles" / "stealthmark_overlay.json"


def train_bundle(bundle: Path, root: Path, key_file: str | None, overrides: dict[str, Any]) -> tuple[torch.nn.Module, ConfigParser]:
    """Run the bundle's ``train`` (with the overlay when ``key_file`` is given); returns the trained network.

    ``root`` becomes a bundle of its own: the bundle's ``configs/`` are copied beside the ``models/model.pt`` that
    training saves, so ``verify --bundle root`` queries the trained model through the bundle's inference config.
    """
    shutil.copytree(bundle / "configs", root / "configs", dirs_exist_ok=True)
    files = ["train.json"] + ([str(OVERLAY)] if key_file is not None else [])
    parser = bundle_parser(bundle, files, root, key_file, overrides)
    parser.get_parsed_content("initialize")
    trainer = parser.get_parsed_content("train#trainer")
    attach_progress(trainer, f"train {'watermarked' if key_file else 'clean'} {bundle.name}")
    trainer.run()
    return parser.get_parsed_content("network").eval(), parser


def validation_volumes(parser: ConfigParser) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The bundle's validation images and labels, one ``(C, spatial...)`` tensor each, as its dataloader gives them."""
    images, labels = [], []
    for batch in parser.get_parsed_content("validate#dataloader"):
        images += [torch.as_tensor(im).as_subclass(torch.Tensor) for im in batch["image"]]
        labels += [torch.as_tensor(lb).as_subclass(torch.Tensor) for lb in batch["label"]]
    return images, labels


@torch.no_grad()
def volume_scores(query: ModelQuery, images: list[torch.Tensor], labels: list[torch.Tensor]) -> dict[str, Any]:
    """Dice (mean over volumes of the mean over foreground classes) and pixel AUC (over all voxels) of whole volumes
    queried through the bundle's inferer, as the bundle's own validation measures them."""
    dices, probs, truth = [], [], []
    for im, lb in zip(images, labels):
        p = query(im[None])
        dices.append(segmentation_scores(p, lb[None].to(p.device))["dice"])
        probs.append(p.reshape(p.shape[1], -1).cpu())
        truth.append(lb.reshape(1, -1))
    pooled = segmentation_scores(torch.cat(probs, 1)[None], torch.cat(truth, 1)[None])
    return {**pooled, "dice": float(sum(dices) / len(dices))}


def _as_windows(tensors: list[torch.Tensor], window: Any) -> torch.Tensor:
    """Volumes centre-cropped or padded to the network's window, stacked (the verifier's queries)."""
    return torch.cat([fit_window(t[None], window) for t in tensors])


def run(bundle: str | Path, out: str | Path, overrides: dict[str, Any] | None = None, lime_samples: int = 300,
        lime_images: int | None = None) -> dict[str, Any]:
    """Train the bundle clean and watermarked, measure both on its validation data, write the results.

    Args:
        bundle: the bundle folder (``configs/train.json``).
        out: output folder.
        overrides: bundle config overrides (e.g. ``{"max_epochs": 2}``).
        lime_samples: LIME samples per image of the verification.
        lime_images: how many held-out images LIME reads (all when None).
    """
    t0 = time.perf_counter()
    bundle, out = Path(bundle), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = dict(overrides or {})
    cfg = ExperimentConfig(lime_samples=lime_samples, lime_images=lime_images)
    key = experiment_key(cfg)
    key.save(out / "key.json")
    nets, parser = {}, None
    for name, key_file in (("watermarked", str(out / "key.json")), ("clean", None)):  # the watermark first: its log shows ASR early
        phase(f"training the {name} bundle")
        set_determinism(int(overrides.get("seed", 0)))
        nets[name], p = train_bundle(bundle, out / name, key_file, overrides)
        torch.save(nets[name].state_dict(), out / f"{name}.pt")
        parser = parser or p
    device = parser.get_parsed_content("device")
    inferer = parser.get_parsed_content("validate#inferer")
    images, labels = validation_volumes(parser)
    window = getattr(inferer, "roi_size", None)
    if window is None and len({tuple(im.shape) for im in images}) > 1:
        raise ValueError("the validation images differ in size and the bundle's inferer has no roi_size to query with.")
    samples = _as_windows(images, window), _as_windows(labels, window)
    res = evaluate(nets["clean"], nets["watermarked"], [{"image": i, "label": lb} for i, lb in zip(*samples)], key, cfg,
                   device, out / "report", inferer=inferer)
    if window is not None:  # task scores on whole volumes; the evaluation above saw the verifier's windows
        phase(f"Dice and AUC of both models on {len(images)} whole held-out volumes")
        res["window"] = {name: res[name] for name in ("clean", "watermarked", "watermarked_triggered_input")}
        for name in ("clean", "watermarked"):
            res[name] = volume_scores(ModelQuery(nets[name], device=device, inferer=inferer), images, labels)
    res["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    res["seconds"] = time.perf_counter() - t0
    res["config"] = {"bundle": bundle.name, **overrides, "max_epochs": parser["max_epochs"], "lime_samples": lime_samples,
                     "lime_images": lime_images, "window": list(window) if window is not None else None}
    res["key_fingerprint"] = key.fingerprint
    atomic_write_json(out / "results.json", res)
    atomic_write_text(out / "results.md", _markdown(res))
    return res


def _markdown(res: dict[str, Any]) -> str:
    fd = res["false_decodes"]
    return (
        f"{res['config']}\n\n| measure | value |\n|---|---|\n"
        f"| clean Dice / AUC | {res['clean']['dice']:.4f} / {res['clean']['auc']:.4f} |\n"
        f"| watermarked Dice / AUC | {res['watermarked']['dice']:.4f} / {res['watermarked']['auc']:.4f} |\n"
        f"| stealth mask Dice / agreement | {res['stealth_mask_dice']:.4f} / {100 * res['stealth_agreement']:.3f} % |\n"
        f"| ASR direct / LIME | {100 * res['asr']['direct']:.1f} % / {100 * res['asr']['lime']:.1f} % |\n"
        f"| bit accuracy direct / LIME | {res['bit_accuracy']['direct']:.4f} / {res['bit_accuracy']['lime']:.4f} |\n"
        f"| false decodes clean inputs / clean model / wrong key | {fd['clean_inputs']} / {fd['clean_model']} / {fd['wrong_key']} "
        f"(of {res['n_images']}) |\n| device, seconds | {res['device']}, {res['seconds']:.0f} |\n"
    )


def main(bundle: str, out: str, epochs: int | None = None, val_interval: int | None = None, seed: int | None = None,
         lime_samples: int = 300, lime_images: int | None = None) -> None:
    """Train the bundle clean and watermarked, verify both and print the results table.

    Args:
        bundle: the bundle folder, e.g. ``bundles/ct_spleen_3d``.
        out: output folder.
        epochs: the bundle's ``max_epochs`` (default: its own).
        val_interval: the bundle's ``val_interval`` (default: its own).
        seed: the bundle's ``seed`` (default: its own).
        lime_samples: LIME samples per image of the verification.
        lime_images: how many held-out images LIME reads (all when None).
    """
    settings = (("max_epochs", epochs), ("val_interval", val_interval), ("seed", seed))
    res = run(bundle, out, {k: v for k, v in settings if v is not None}, lime_samples, lime_images)
    print(_markdown(res))


if __name__ == "__main__":
    raise SystemExit(cli(main))
