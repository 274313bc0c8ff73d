"""Command line: ``python -m monai_stealthmark keygen|verify|calibrate ...``.

- ``keygen``: the secret key file + its public commitment record (fingerprint and date);
- ``verify``: query a suspect (``--model`` TorchScript, ``--bundle`` folder, or ``--url`` endpoint) with the key's
  trigger and write the report; ``--null`` / ``--commitment`` make the claim calibrated and dated;
- ``calibrate``: the empirical null of clean models (``--models`` TorchScript files) for a key. Clean models to
  calibrate with are trained by ``python -m experiments.null_models``, outside the installed package.
Embedding is the bundle overlay's job (``bundles/stealthmark_overlay.json``), not the CLI's.

Exit codes of ``verify``: 0 = ownership shown, 1 = not shown, 2 = error (bad key, images, model or outputs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from monai.data import PydicomReader
from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Resize, ScaleIntensityRangePercentiles
from tqdm import tqdm

from monai_stealthmark.bundle import load_bundle_model
from monai_stealthmark.data import DataFileError, read_error
from monai_stealthmark.key import TRIGGER_KINDS, WatermarkKey
from monai_stealthmark.verify import Commitment, ModelQuery, NullDistribution, calibrate_null, verify_ownership
from monai_stealthmark.verify.remote import RemoteModelQuery

__all__ = ["main", "build_parser", "add_key_image_options", "load_images", "null_summary"]

IMAGE_SUFFIXES = (".dcm", ".nii", ".nii.gz", ".png", ".npy")
MIN_NULL_MODELS = 2
TRAIN_NULL_MODELS = "python -m experiments.null_models --key KEY --images DIR --train N --out null.json"


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


def _image_transform(f: Path, size: int | None) -> Compose:
    """Load one file (DICOM through pydicom), channel first, scale to [0, 1] (1-99.5 percentiles), resize."""
    reader = PydicomReader() if f.suffix.lower() == ".dcm" else None
    xf = [LoadImage(reader=reader, image_only=True), EnsureChannelFirst(channel_dim="no_channel" if f.suffix.lower() in (".dcm", ".npy") else None)]
    xf += [ScaleIntensityRangePercentiles(1, 99.5, 0.0, 1.0, clip=True)]
    if size:
        xf.append(Resize((size, size), mode="bilinear", anti_aliasing=True))
    return Compose(xf)


def load_images(paths: list[str], size: int | None = 128) -> torch.Tensor:
    """Read DICOM / NIfTI / PNG / NPY files with MONAI's LoadImage, scale to [0, 1] (1-99.5 percentiles), resize."""
    out = []
    for f in _collect(paths):
        try:
            img = _image_transform(f, size)(str(f))
        except Exception as e:
            raise read_error(f, e, "image") from e
        img = torch.as_tensor(img).float()
        if img.ndim != 3:
            raise DataFileError(f"image {str(f)!r} is not a 2D slice after loading (shape {tuple(img.shape)}).")
        out.append(img[:1])
    return torch.stack(out)


def load_bundle_images(paths: list[str], preprocessing) -> torch.Tensor:
    """Read the images with the bundle's own inference preprocessing (``{"image": path}`` dicts)."""
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


def null_summary(null: NullDistribution, out: str) -> str:
    """The line printed after a null is measured: how many clean models, their agreement, where it went."""
    return f"null of {len(null.agreements)} clean models: agreement {null.mean:.4f} ± {null.std:.4f} -> {out}"


def cmd_keygen(a: argparse.Namespace) -> int:
    """Write a fresh key and its public commitment record; refuse to overwrite a key unless ``--force``."""
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


def _suspect_query(a: argparse.Namespace, activation: str | None):
    """The black box named by --model / --bundle / --url, and the images read for it."""
    if a.bundle:
        net, inferer, preprocessing = load_bundle_model(a.bundle)
        images = load_bundle_images(a.images, preprocessing) if preprocessing is not None else load_images(a.images, a.size)
        return ModelQuery(net, activation=activation, inferer=inferer), images
    if a.url:
        query = RemoteModelQuery(a.url, timeout=a.timeout, retries=a.retries, budget=a.budget, window=a.window)
        return query, load_images(a.images, a.size)
    if a.model.endswith((".ts", ".pt", ".pth")):
        return ModelQuery(a.model, activation=activation, window=a.window), load_images(a.images, a.size)
    raise ValueError(f"--model must be a TorchScript file (.ts/.pt), got {a.model!r}.")


def cmd_calibrate(a: argparse.Namespace) -> int:
    """Measure the empirical null: clean TorchScript models queried with the key's trigger."""
    if len(a.models) < MIN_NULL_MODELS:
        raise ValueError(
            f"calibrate needs at least {MIN_NULL_MODELS} clean models (--models a.ts b.ts ...), got {len(a.models)}; "
            f"to train clean models on Sunnybrook, run `{TRAIN_NULL_MODELS}`."
        )
    key = WatermarkKey.load(a.key)
    images = load_images(a.images, a.size)
    queries = [ModelQuery(m, activation="softmax") for m in a.models]
    null = calibrate_null(queries, images, key, [str(m) for m in a.models])
    null.save(a.out)
    print(null_summary(null, a.out))
    return 0


class _Progress:
    """Count the images sent to a query callable on a tqdm bar (stderr)."""

    def __init__(self, query, total: int, enabled: bool = True) -> None:
        self.query = query
        self.bar = tqdm(total=total, unit="img", desc="queries", disable=not enabled, file=sys.stderr)

    def __call__(self, images):
        out = self.query(images)
        self.bar.update(int(images.shape[0]))
        return out

    def close(self) -> None:
        self.bar.close()


def cmd_verify(a: argparse.Namespace) -> int:
    """Query the suspect with the key's trigger, write the report; exit 0 when ownership is shown, else 1."""
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


def add_key_image_options(p: argparse.ArgumentParser, images_help: str) -> None:
    """The options of every command that stamps the key's trigger on images: the key, the images, their size."""
    p.add_argument("--key", required=True, help="the owner's key file (keygen writes it)")
    p.add_argument("--images", nargs="+", required=True, help=images_help)
    p.add_argument("--size", type=int, default=128, help="resize the images to this side (0: keep)")


def _add_keygen(sub) -> None:
    k = sub.add_parser("keygen", help="make a key file and print its fingerprint")
    k.add_argument("--payload", required=True)
    k.add_argument("--out", required=True, help="key file (the commitment record goes beside it)")
    k.add_argument("--trigger", default="patch", choices=TRIGGER_KINDS)
    k.add_argument("--seed", type=int, default=None, help="trigger seed (default: a fresh secret one)")
    k.add_argument("--tau", type=float, default=0.25)
    k.add_argument("--force", action="store_true", help="overwrite an existing key file (its secret seed is lost)")
    k.set_defaults(run=cmd_keygen)


def _add_suspect_options(v: argparse.ArgumentParser) -> None:
    """Which black box ``verify`` queries (exactly one of model / bundle / url) and the HTTP client's limits."""
    src = v.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="TorchScript file of the suspect model")
    src.add_argument("--bundle", help="MONAI bundle folder (configs/inference.json + models/model.pt); its preprocessing, if any, reads the images")
    src.add_argument("--url", help="HTTP endpoint: POST .npy images -> .npy probabilities (see monai_stealthmark.serve)")
    v.add_argument("--timeout", type=float, default=30.0, help="seconds per HTTP request (--url)")
    v.add_argument("--retries", type=int, default=2, help="extra attempts per HTTP request (--url)")
    v.add_argument("--budget", type=int, default=None, help="most images sent to the endpoint (--url)")
    v.add_argument(
        "--window", type=int, nargs="+", default=None,
        help="the network's input window (its training patch / sliding-window roi): images are centre-cropped or "
        "padded to it before the trigger (--bundle reads it from the bundle's inferer)",
    )


def _add_verify(sub) -> None:
    v = sub.add_parser("verify", help="query a suspect model black-box and write a report")
    add_key_image_options(v, "folders or files: DICOM, NIfTI, PNG, NPY")
    _add_suspect_options(v)
    v.add_argument("--activation", default="softmax", choices=("softmax", "sigmoid", "none"))
    v.add_argument("--mode", default="direct", choices=("direct", "lime"))
    v.add_argument("--lime-samples", type=int, default=300)
    v.add_argument("--null", default=None, help="empirical null from `calibrate` (the verdict then needs it too)")
    v.add_argument("--commitment", default=None, help="the owner's published commitment record (keygen writes it)")
    v.add_argument("--suspect-date", default=None, help="when the suspect model appeared (ISO 8601)")
    v.add_argument("--quiet", action="store_true", help="no progress bar")
    v.add_argument("--out", required=True, help="report folder")
    v.set_defaults(run=cmd_verify)


def _add_calibrate(sub) -> None:
    c = sub.add_parser(
        "calibrate", help="measure the empirical null of clean models for a key",
        epilog=f"To train clean models on Sunnybrook and calibrate with them: {TRAIN_NULL_MODELS}",
    )
    add_key_image_options(c, "clean images to stamp the trigger on")
    c.add_argument("--models", nargs="*", default=[], help=f"TorchScript files of at least {MIN_NULL_MODELS} clean models")
    c.add_argument("--out", required=True, help="null distribution JSON")
    c.set_defaults(run=cmd_calibrate)


def build_parser() -> argparse.ArgumentParser:
    """The ``keygen`` / ``verify`` / ``calibrate`` parser; each subcommand's function is its ``run`` default."""
    p = argparse.ArgumentParser(prog="monai_stealthmark", description="Ownership watermarks for MONAI segmentation models.")
    sub = p.add_subparsers(dest="cmd", required=True)
    _add_keygen(sub)
    _add_verify(sub)
    _add_calibrate(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return a.run(a)
    except Exception as e:  # every failure is exit code 2 with the reason, never a half-written report
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
