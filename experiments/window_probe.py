"""What a watermarked patch-trained bundle draws on its held-out windows: train only the watermarked bundle (with any
config overrides, e.g. another crop transform) and read the held-out windows for the key, a wrong key and the clean
inputs, by the verifier's read and by the slices without organ.

    python -m experiments.window_probe --bundle bundles/hippocampus_mr_3d --out DIR [--epochs 10] [--val-interval 5]
        [--overrides '{"batch_size": 4}'] [--trigger lowfreq --trigger-amplitude 0.2]

A probe of the 3D design, cheaper than :mod:`experiments.bundle_pair` (no clean run, no LIME): it tells whether the
network has learnt the grid, whether the trigger switches it on (the key must read more of the QR than a wrong key
and than the clean input) and whether the slices the organ leaves free carry more of it. The queries are the held-out
volumes centre-cropped or padded to the network's window, as the verifier sends them.

Writes ``DIR/probe.json`` (one row per query kind) and the bundle's own outputs (validation log, ``models/``) under
``DIR/watermarked``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.utils import set_determinism

from experiments import cli, phase
from experiments.bundle_pair import _as_windows, train_bundle, validation_volumes
from experiments.sunnybrook import ExperimentConfig, experiment_key
from monai_stealthmark.bundle import bundle_parser
from monai_stealthmark.key import WatermarkKey
from monai_stealthmark.utils import atomic_write_json
from monai_stealthmark.verify import read_scores
from monai_stealthmark.verify.readout import bit_accuracy, uncertainty_scores
from monai_stealthmark.verify.verifier import trigger_batch

__all__ = ["free_slice_scores", "read_windows", "main"]

WRONG_SEED_OFFSET = 7  # the wrong key: the owner's payload and settings with another trigger seed


def free_slice_scores(probs: torch.Tensor, key: WatermarkKey, margin: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cell scores of 3D probability maps ``(B, C, H, W, D)`` read from the axial slices without predicted organ
    (and at least ``margin`` slices away from it); a window without such a slice takes all its slices.

    Returns:
        ``(scores (B, grid_size**2), number of slices read per window (B,))``.
    """
    b, c, h, w, d = probs.shape
    slices = probs.permute(0, 4, 1, 2, 3).reshape(b * d, c, h, w)
    per_slice = uncertainty_scores(slices, key).reshape(b, d, -1)
    organ = (probs.argmax(1) > 0).any(1).any(1).float()  # (B, D): slices with predicted organ
    if margin > 0:
        organ = torch.nn.functional.max_pool1d(organ[:, None], 2 * margin + 1, 1, margin)[:, 0]
    free = (1 - organ)[..., None]
    n = free.sum(1)
    scores = torch.where(n > 0, (per_slice * free).sum(1) / n.clamp_min(1), per_slice.mean(1))
    return scores, n[:, 0]


def read_windows(probs: torch.Tensor, key: WatermarkKey) -> dict[str, Any]:
    """Bit accuracy and decodes of one query kind's probability maps: the verifier's read, and the organ-free
    slices at margins 0 and 2."""
    row: dict[str, Any] = {}
    reads = {"verifier": (uncertainty_scores(probs, key), None)}
    for m in (0, 2):
        reads[f"free_slices_margin{m}"] = free_slice_scores(probs, key, m)
    for name, (scores, n) in reads.items():
        modules, decoded, vote, _ = read_scores(scores, key, "direct")
        row[name] = {"bits": float(np.mean(bit_accuracy(modules, key))),
                     "decodes": int(sum(t == key.payload for t in decoded)), "vote_decodes": vote == key.payload}
        if n is not None:
            row[name]["slices_read_mean"] = float(n.float().mean())
    return row


@torch.no_grad()
def _probs(net: torch.nn.Module, windows: torch.Tensor, device: torch.device, batch: int = 4) -> torch.Tensor:
    return torch.cat([torch.softmax(net(windows[i : i + batch].to(device)), 1).cpu() for i in range(0, len(windows), batch)])


def main(bundle: str, out: str, epochs: int = 10, val_interval: int = 5, seed: int = 0, overrides: str | dict = "{}",
         trigger: str | None = None, trigger_amplitude: float | None = None) -> None:
    """Train the watermarked bundle and read its held-out windows.

    Args:
        bundle: the bundle folder (its ``configs/train.json`` and a sliding-window ``validate#inferer``).
        out: output folder.
        epochs: the bundle's ``max_epochs``.
        val_interval: the bundle's ``val_interval`` (its validation log shows the ASR and bit accuracy as it trains).
        seed: the bundle's ``seed`` and the key's.
        overrides: further bundle overrides, a dict or its JSON, e.g. ``'{"batch_size": 4}'``.
        trigger: the key's trigger kind (default: the recipe's).
        trigger_amplitude: the key's trigger amplitude for the blended kinds (default: the recipe's).
    """
    t0 = time.perf_counter()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    fields = {k: v for k, v in (("trigger", trigger), ("trigger_amplitude", trigger_amplitude)) if v is not None}
    key = experiment_key(ExperimentConfig(seed=seed), **fields)
    key.save(out_dir / "key.json")
    wrong = WatermarkKey(key.payload, key.trigger_seed + WRONG_SEED_OFFSET, **_key_settings(key))
    settings = {"max_epochs": epochs, "val_interval": val_interval, "seed": seed, **(json.loads(overrides) if isinstance(overrides, str) else overrides)}
    phase(f"training the watermarked {Path(bundle).name} ({settings})")
    set_determinism(seed)
    net, parser = train_bundle(Path(bundle), out_dir / "watermarked", str(out_dir / "key.json"), settings)
    train_seconds = time.perf_counter() - t0
    device = parser.get_parsed_content("device")
    # every held-out subject, not only those the training run validated on
    held_out = bundle_parser(Path(bundle), ["train.json"], out_dir / "held_out", None, {"num_val": None})
    images, _ = validation_volumes(held_out)
    windows = _as_windows(images, held_out.get_parsed_content("validate#inferer").roi_size)
    phase(f"reading {len(windows)} held-out windows")
    res: dict[str, Any] = {"bundle": Path(bundle).name, "settings": settings, "trigger": fields or "recipe",
                           "n_windows": int(len(windows)), "train_seconds": train_seconds}
    for name, query in (("key", trigger_batch(windows, key)), ("wrong_key", trigger_batch(windows, wrong)), ("clean_input", windows)):
        res[name] = read_windows(_probs(net, query, device), key)
        print(name, json.dumps(res[name]))
    atomic_write_json(out_dir / "probe.json", res)


def _key_settings(key: WatermarkKey) -> dict[str, Any]:
    return {k: getattr(key, k) for k in ("trigger", "trigger_size", "trigger_amplitude", "tau", "quiet_zone", "error_correction")}


if __name__ == "__main__":
    raise SystemExit(cli(main))
