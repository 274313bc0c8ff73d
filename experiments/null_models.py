"""Train clean models on Sunnybrook and measure the empirical null of a key with them.

    python -m experiments.null_models --key key.json --images clean_dir/ --train 5 --steps 150 --out null.json

The null of :func:`~monai_stealthmark.verify.calibrate_null` needs clean models of different seeds and
architectures. This script trains ``N`` of them (cycling through :data:`experiments.sunnybrook.ARCHITECTURES`,
seeds 1000, 1001, ...; the held-out patient is never trained on), adds any ``--models`` TorchScript files, and
writes the null distribution JSON that ``python -m monai_stealthmark verify --null`` reads. It lives outside the
installed package because training needs the experiment code; ``python -m monai_stealthmark calibrate --models``
measures a null from model files alone.
"""

from __future__ import annotations

import argparse
import sys

import torch
from tqdm import tqdm

from experiments.sunnybrook import ARCHITECTURES, ExperimentConfig, train_model
from monai_stealthmark.__main__ import MIN_NULL_MODELS, add_key_image_options, load_images, null_summary
from monai_stealthmark.data import DEFAULT_SUNNYBROOK_ROOT, load_sunnybrook, split_by_patient
from monai_stealthmark.key import WatermarkKey
from monai_stealthmark.verify import ModelQuery, calibrate_null

__all__ = ["train_clean_models", "main"]


def train_clean_models(n: int, steps: int, train_samples: list[dict]) -> tuple[list[ModelQuery], list[str]]:
    """Train ``n`` clean models on CPU, one architecture and seed each, with a tqdm bar naming the current one.

    Returns:
        ``(black-box queries of the models, a description of each)``.
    """
    queries, names = [], []
    bar = tqdm(range(n), unit="model", file=sys.stderr)
    for i in bar:
        arch = ARCHITECTURES[i % len(ARCHITECTURES)]
        cfg = ExperimentConfig(fast=True, steps=steps, seed=1000 + i, arch=arch)
        bar.set_description(f"clean model {i + 1}/{n}: {arch}, seed {cfg.seed}, {steps} steps")
        net = train_model(train_samples, cfg, None, torch.device("cpu"))
        queries.append(ModelQuery(net, activation="softmax", device="cpu"))
        names.append(f"{arch} seed {cfg.seed} ({steps} steps)")
    return queries, names


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="experiments.null_models", description=__doc__.splitlines()[0])
    add_key_image_options(p, "clean images to stamp the trigger on")
    p.add_argument("--train", type=int, required=True, help="clean models to train (UNet, BasicUNet, SegResNet, ...)")
    p.add_argument("--steps", type=int, default=200, help="training steps per clean model")
    p.add_argument("--data", default=str(DEFAULT_SUNNYBROOK_ROOT), help="the sunnybrook folder")
    p.add_argument("--holdout", default="SCD0000501", help="patient left out of the clean models' training")
    p.add_argument("--models", nargs="*", default=[], help="TorchScript files of more clean models")
    p.add_argument("--out", required=True, help="null distribution JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    """Train the clean models, add the given model files, measure and save the null; print its summary."""
    a = _parser().parse_args(argv)
    if a.train + len(a.models) < MIN_NULL_MODELS:
        raise SystemExit(f"a null needs at least {MIN_NULL_MODELS} clean models: raise --train or add --models files.")
    key = WatermarkKey.load(a.key)
    images = load_images(a.images, a.size)
    queries = [ModelQuery(m, activation="softmax") for m in a.models]
    names = [str(m) for m in a.models]
    if a.train:
        train, _ = split_by_patient(load_sunnybrook(a.data, size=a.size or 128), [a.holdout])
        trained, trained_names = train_clean_models(a.train, a.steps, train)
        queries, names = queries + trained, names + trained_names
    null = calibrate_null(queries, images, key, names)
    null.save(a.out)
    print(null_summary(null, a.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
