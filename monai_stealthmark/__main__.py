"""Command line: ``python -m monai_stealthmark keygen|verify|calibrate ...``.

- ``keygen``: the secret key file + its public commitment record (fingerprint and date);
- ``verify``: query a suspect (``--model`` TorchScript, ``--bundle`` folder, or ``--url`` endpoint) with the key's
  trigger and write the report; ``--null`` / ``--commitment`` make the claim calibrated and dated;
- ``calibrate``: the empirical null of clean models for a key.
Embedding is the bundle overlay's job (``bundles/stealthmark_overlay.json``), not the CLI's.

Exit codes of ``verify``: 0 = ownership shown, 1 = not shown, 2 = error (bad key, images, model or outputs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["main"]

IMAGE_SUFFIXES = (".dcm", ".nii", ".nii.gz", ".png", ".npy")


def _collect(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.name.lower().endswith(IMAGE_SUFFIXES))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"image path {str(p)!r} does not exist.")
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {paths}.")
    return files


def load_images(paths: list[str], size: int | None = 128):
    """Read DICOM / NIfTI / PNG / NPY files with MONAI's LoadImage, scale to [0, 1] (1-99.5 percentiles), resize."""
    import torch
    from monai.data import PydicomReader
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Resize, ScaleIntensityRangePercentiles

    from monai_stealthmark.data import DataFileError, read_error

    out = []
    for f in _collect(paths):
        reader = PydicomReader() if f.suffix.lower() == ".dcm" else None
        xf = [LoadImage(reader=reader, image_only=True), EnsureChannelFirst(channel_dim="no_channel" if f.suffix.lower() in (".dcm", ".npy") else None)]
        xf += [ScaleIntensityRangePercentiles(1, 99.5, 0.0, 1.0, clip=True)]
        if size:
            xf.append(Resize((size, size), mode="bilinear", anti_aliasing=True))
        try:
            img = Compose(xf)(str(f))
        except Exception as e:
            raise read_error(f, e, "image") from e
        img = torch.as_tensor(img).float()
        if img.ndim != 3:
            raise DataFileError(f"image {str(f)!r} is not a 2D slice after loading (shape {tuple(img.shape)}).")
        out.append(img[:1])
    return torch.stack(out)


def cmd_keygen(a) -> int:
    from monai_stealthmark.key import WatermarkKey

    from monai_stealthmark.verify.calibrate import Commitment

    commitment = Path(a.out).with_suffix(".commitment.json")
    existing = [str(f) for f in (Path(a.out), commitment) if f.exists()]
    if existing and not a.force:  # a key's secret seed cannot be recovered once overwritten
        raise FileExistsError(f"{', '.join(existing)} already exist(s); refusing to overwrite a key (use --force).")
    key = WatermarkKey.generate(a.payload, seed=a.seed, trigger=a.trigger, tau=a.tau)
    key.save(a.out)
    Commitment.for_key(key).save(commitment)
    print(f"key written to {a.out} (keep it secret)")
    print(f"fingerprint (publish this commitment): {key.fingerprint}")
    print(f"commitment record (public): {commitment}")
    return 0


def _suspect_query(a, activation):
    """The black box named by --model / --bundle / --url, and the images read for it."""
    from monai_stealthmark.verify import ModelQuery

    if getattr(a, "bundle", None):
        from monai_stealthmark.bundle import load_bundle_model

        net, inferer, preprocessing = load_bundle_model(a.bundle)
        images = load_bundle_images(a.images, preprocessing) if preprocessing is not None else load_images(a.images, a.size)
        return ModelQuery(net, activation=activation, inferer=inferer), images
    if getattr(a, "url", None):
        from monai_stealthmark.verify.remote import RemoteModelQuery

        return RemoteModelQuery(a.url, timeout=a.timeout, retries=a.retries, budget=a.budget), load_images(a.images, a.size)
    if a.model.endswith((".ts", ".pt", ".pth")):
        return ModelQuery(a.model, activation=activation), load_images(a.images, a.size)
    raise ValueError(f"--model must be a TorchScript file (.ts/.pt), got {a.model!r}.")


def cmd_calibrate(a) -> int:
    """Measure the empirical null: clean models (files, or trained here) queried with the key's trigger."""
    import torch

    from monai_stealthmark.key import WatermarkKey
    from monai_stealthmark.verify import ModelQuery, calibrate_null

    key = WatermarkKey.load(a.key)
    images = load_images(a.images, a.size)
    queries, names = [], []
    for m in a.models or []:
        queries.append(ModelQuery(m, activation="softmax"))
        names.append(str(m))
    if a.train:
        from monai_stealthmark.data import load_sunnybrook, split_by_patient
        from experiments.sunnybrook import ARCHITECTURES, ExperimentConfig, train_model

        samples = load_sunnybrook(a.data, size=a.size or 128) if a.data else load_sunnybrook(size=a.size or 128)
        train, _ = split_by_patient(samples, [a.holdout])
        for i in range(a.train):
            arch = ARCHITECTURES[i % len(ARCHITECTURES)]
            cfg = ExperimentConfig(fast=True, steps=a.steps, seed=1000 + i, arch=arch)
            print(f"training clean model {i + 1}/{a.train} ({arch}, seed {cfg.seed}, {a.steps} steps)", file=sys.stderr)
            net = train_model(train, cfg, None, torch.device("cpu"))
            queries.append(ModelQuery(net, activation="softmax", device="cpu"))
            names.append(f"{arch} seed {cfg.seed} ({a.steps} steps)")
    if len(queries) < 2:
        raise ValueError("calibrate needs at least 2 clean models: give --models files and/or --train N.")
    null = calibrate_null(queries, images, key, names)
    null.save(a.out)
    print(f"null of {len(null.agreements)} clean models: agreement {null.mean:.4f} ± {null.std:.4f} -> {a.out}")
    return 0


def load_bundle_images(paths: list[str], preprocessing):
    """Read the images with the bundle's own inference preprocessing (``{"image": path}`` dicts)."""
    import torch

    from monai_stealthmark.data import DataFileError, read_error

    out = []
    for f in _collect(paths):
        try:
            img = preprocessing({"image": str(f)})["image"]
        except Exception as e:
            raise read_error(f, e, "image (bundle preprocessing)") from e
        out.append(torch.as_tensor(img).float())
    shapes = {tuple(i.shape) for i in out}
    if len(shapes) > 1:
        raise DataFileError(f"the bundle's preprocessing gave images of different shapes {sorted(shapes)}.")
    return torch.stack(out)


class _Progress:
    """Count the images sent to a query callable on a tqdm bar (stderr)."""

    def __init__(self, query, total: int, enabled: bool = True) -> None:
        from tqdm import tqdm

        self.query = query
        self.bar = tqdm(total=total, unit="img", desc="queries", disable=not enabled, file=sys.stderr)

    def __call__(self, images):
        out = self.query(images)
        self.bar.update(int(images.shape[0]))
        return out

    def close(self) -> None:
        self.bar.close()


def cmd_verify(a) -> int:
    import torch

    from monai_stealthmark.key import WatermarkKey
    from monai_stealthmark.verify import Commitment, NullDistribution, verify_ownership

    key = WatermarkKey.load(a.key)
    null = NullDistribution.load(a.null) if a.null else None
    commitment = Commitment.load(a.commitment) if a.commitment else None
    if a.suspect_date and commitment is None:
        raise ValueError("--suspect-date needs --commitment (the owner's published commitment record).")
    query, images = _suspect_query(a, None if a.activation == "none" else a.activation)
    total = images.shape[0] * (a.lime_samples if a.mode == "lime" else 1)
    progress = _Progress(query, total, enabled=not a.quiet)
    try:
        with torch.no_grad():
            rep = verify_ownership(
                progress, images, key, mode=a.mode, lime_samples=a.lime_samples, null=null, commitment=commitment,
                suspect_date=a.suspect_date,
            )
    finally:
        progress.close()
    rep.save(a.out, stem="report")
    print(rep.to_markdown())
    return 0 if rep.verdict else 1


def main(argv: list[str] | None = None) -> int:
    from monai_stealthmark.key import TRIGGER_KINDS

    p = argparse.ArgumentParser(prog="monai_stealthmark", description="Ownership watermarks for MONAI segmentation models.")
    sub = p.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("keygen", help="make a key file and print its fingerprint")
    k.add_argument("--payload", required=True)
    k.add_argument("--out", required=True)
    k.add_argument("--trigger", default="patch", choices=TRIGGER_KINDS)
    k.add_argument("--seed", type=int, default=None, help="trigger seed (default: a fresh secret one)")
    k.add_argument("--tau", type=float, default=0.25)
    k.add_argument("--force", action="store_true", help="overwrite an existing key file (its secret seed is lost)")
    v = sub.add_parser("verify", help="query a suspect model black-box and write a report")
    v.add_argument("--key", required=True)
    v.add_argument("--images", nargs="+", required=True, help="folders or files: DICOM, NIfTI, PNG, NPY")
    src = v.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="TorchScript file of the suspect model")
    src.add_argument("--bundle", help="MONAI bundle folder (configs/inference.json + models/model.pt)")
    src.add_argument("--url", help="HTTP endpoint: POST .npy images -> .npy probabilities (see monai_stealthmark.serve)")
    v.add_argument("--timeout", type=float, default=30.0, help="seconds per HTTP request (--url)")
    v.add_argument("--retries", type=int, default=2, help="extra attempts per HTTP request (--url)")
    v.add_argument("--budget", type=int, default=None, help="most images sent to the endpoint (--url)")
    v.add_argument("--quiet", action="store_true", help="no progress bar")
    v.add_argument("--null", default=None, help="empirical null from `calibrate` (the verdict then needs it too)")
    v.add_argument("--commitment", default=None, help="the owner's published commitment record (keygen writes it)")
    v.add_argument("--suspect-date", default=None, help="when the suspect model appeared (ISO 8601)")
    c = sub.add_parser("calibrate", help="measure the empirical null of clean models for a key")
    c.add_argument("--key", required=True)
    c.add_argument("--images", nargs="+", required=True, help="clean images to stamp the trigger on")
    c.add_argument("--models", nargs="*", default=None, help="TorchScript files of clean models")
    c.add_argument("--train", type=int, default=0, help="also train N clean models on Sunnybrook (UNet/BasicUNet/SegResNet)")
    c.add_argument("--steps", type=int, default=200, help="training steps per clean model (--train)")
    c.add_argument("--data", default=None, help="the sunnybrook folder (--train)")
    c.add_argument("--holdout", default="SCD0000501", help="patient left out of the clean models' training")
    c.add_argument("--size", type=int, default=128)
    c.add_argument("--out", required=True, help="null distribution JSON")
    v.add_argument("--activation", default="softmax", choices=("softmax", "sigmoid", "none"))
    v.add_argument("--mode", default="direct", choices=("direct", "lime"))
    v.add_argument("--lime-samples", type=int, default=300)
    v.add_argument("--size", type=int, default=128, help="resize the images to this side (0: keep; --bundle uses its own preprocessing)")
    v.add_argument("--out", required=True, help="report folder")
    a = p.parse_args(argv)
    try:
        return {"keygen": cmd_keygen, "verify": cmd_verify, "calibrate": cmd_calibrate}[a.cmd](a)
    except Exception as e:  # every failure is exit code 2 with the reason, never a half-written report
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
