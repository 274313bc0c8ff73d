"""Train an example bundle clean (its own ``train.json``) and watermarked (``train.json`` + the overlay) in-process
with MONAI's ConfigParser, then measure both models on the bundle's validation data like the 2D experiment.

    python -m experiments.bundle_pair --bundle bundles/ct_spleen_3d --out runs/ct_spleen_3d [--epochs N] [--seed S]

This is the 3D row of the architectures table (the CT spleen NIfTI setting with a 3D UNet). Writes
``DIR/results.json`` and ``DIR/results.md``; the two runs' bundle outputs go to ``DIR/clean`` and
``DIR/watermarked``.

Options: ``--epochs`` / ``--val-interval`` / ``--seed`` override the bundle's ``max_epochs`` / ``val_interval`` /
``seed``; ``--lime-samples`` sets the LIME samples per image of the verification.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser
from monai.utils import set_determinism

from experiments import attach_progress, cli, phase
from experiments.sunnybrook import ExperimentConfig, evaluate, experiment_key
from monai_stealthmark.bundle import bundle_parser
from monai_stealthmark.utils import atomic_write_json, atomic_write_text

__all__ = ["OVERLAY", "train_bundle", "run", "main"]

OVERLAY = Path(__file__).resolve().parents[1] / "bundles" / "stealthmark_overlay.json"


def train_bundle(bundle: Path, root: Path, key_file: str | None, overrides: dict[str, Any]) -> tuple[torch.nn.Module, ConfigParser]:
    """Run the bundle's ``train`` (with the overlay when ``key_file`` is given); returns the trained network."""
    files = ["train.json"] + ([str(OVERLAY)] if key_file is not None else [])
    parser = bundle_parser(bundle, files, root, key_file, overrides)
    parser.get_parsed_content("initialize")
    trainer = parser.get_parsed_content("train#trainer")
    attach_progress(trainer, f"train {'watermarked' if key_file else 'clean'} {bundle.name}")
    trainer.run()
    return parser.get_parsed_content("network").eval(), parser


def run(bundle: str | Path, out: str | Path, overrides: dict[str, Any] | None = None, lime_samples: int = 300) -> dict[str, Any]:
    """Train the bundle clean and watermarked, measure both on its validation data, write the results.

    Args:
        bundle: the bundle folder (``configs/train.json``).
        out: output folder.
        overrides: bundle config overrides (e.g. ``{"max_epochs": 2}``).
        lime_samples: LIME samples per image of the verification.
    """
    t0 = time.perf_counter()
    bundle, out = Path(bundle), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = dict(overrides or {})
    cfg = ExperimentConfig(lime_samples=lime_samples)
    key = experiment_key(cfg)
    key.save(out / "key.json")
    nets, parser = {}, None
    for name, key_file in (("clean", None), ("watermarked", str(out / "key.json"))):
        phase(f"training the {name} bundle")
        set_determinism(int(overrides.get("seed", 0)))
        nets[name], p = train_bundle(bundle, out / name, key_file, overrides)
        torch.save(nets[name].state_dict(), out / f"{name}.pt")
        parser = parser or p
    device = parser.get_parsed_content("device")
    batches = list(parser.get_parsed_content("validate#dataloader"))
    samples = [{"image": im, "label": lb} for b in batches for im, lb in zip(b["image"], b["label"])]
    res = evaluate(nets["clean"], nets["watermarked"], samples, key, cfg, device, out / "report", inferer=parser.get_parsed_content("validate#inferer"))
    res["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    res["seconds"] = time.perf_counter() - t0
    res["config"] = {"bundle": bundle.name, **overrides, "max_epochs": parser["max_epochs"], "lime_samples": lime_samples}
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
         lime_samples: int = 300) -> None:
    """Train the bundle clean and watermarked, verify both and print the results table.

    Args:
        bundle: the bundle folder, e.g. ``bundles/ct_spleen_3d``.
        out: output folder.
        epochs: the bundle's ``max_epochs`` (default: its own).
        val_interval: the bundle's ``val_interval`` (default: its own).
        seed: the bundle's ``seed`` (default: its own).
        lime_samples: LIME samples per image of the verification.
    """
    settings = (("max_epochs", epochs), ("val_interval", val_interval), ("seed", seed))
    res = run(bundle, out, {k: v for k, v in settings if v is not None}, lime_samples)
    print(_markdown(res))


if __name__ == "__main__":
    raise SystemExit(cli(main))
