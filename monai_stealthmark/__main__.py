"""Command line: ``python -m monai_stealthmark keygen|verify ...``.

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

    from monai_stealthmark.data import DataFileError

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
            raise DataFileError(f"cannot read image {str(f)!r}: {e}") from e
        img = torch.as_tensor(img).float()
        if img.ndim != 3:
            raise DataFileError(f"image {str(f)!r} is not a 2D slice after loading (shape {tuple(img.shape)}).")
        out.append(img[:1])
    return torch.stack(out)


def cmd_keygen(a) -> int:
    from monai_stealthmark.key import WatermarkKey

    key = WatermarkKey.generate(a.payload, seed=a.seed, trigger=a.trigger, tau=a.tau)
    key.save(a.out)
    print(f"key written to {a.out} (keep it secret)")
    print(f"fingerprint (publish this commitment): {key.fingerprint}")
    return 0


def load_bundle_images(paths: list[str], preprocessing):
    """Read the images with the bundle's own inference preprocessing (``{"image": path}`` dicts)."""
    import torch

    from monai_stealthmark.data import DataFileError

    out = []
    for f in _collect(paths):
        try:
            img = preprocessing({"image": str(f)})["image"]
        except Exception as e:
            raise DataFileError(f"cannot read image {str(f)!r} with the bundle's preprocessing: {e}") from e
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
    from monai_stealthmark.verify import ModelQuery, verify_ownership

    key = WatermarkKey.load(a.key)
    activation = None if a.activation == "none" else a.activation
    if a.bundle:
        from monai_stealthmark.bundle import load_bundle_model

        net, inferer, preprocessing = load_bundle_model(a.bundle)
        images = load_bundle_images(a.images, preprocessing) if preprocessing is not None else load_images(a.images, a.size)
        query = ModelQuery(net, activation=activation, inferer=inferer)
    elif a.url:
        from monai_stealthmark.verify.remote import RemoteModelQuery

        images = load_images(a.images, a.size)
        query = RemoteModelQuery(a.url, timeout=a.timeout, retries=a.retries, budget=a.budget)
    elif a.model.endswith((".ts", ".pt", ".pth")):
        images = load_images(a.images, a.size)
        query = ModelQuery(a.model, activation=activation)
    else:
        raise ValueError(f"--model must be a TorchScript file (.ts/.pt), got {a.model!r}.")
    total = images.shape[0] * (a.lime_samples if a.mode == "lime" else 1)
    progress = _Progress(query, total, enabled=not a.quiet)
    try:
        with torch.no_grad():
            rep = verify_ownership(progress, images, key, mode=a.mode, lime_samples=a.lime_samples)
    finally:
        progress.close()
    rep.save(a.out)
    print(rep.to_markdown())
    return 0 if rep.verdict else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="monai_stealthmark", description="Ownership watermarks for MONAI segmentation models.")
    sub = p.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("keygen", help="make a key file and print its fingerprint")
    k.add_argument("--payload", required=True)
    k.add_argument("--out", required=True)
    k.add_argument("--trigger", default="patch", choices=("patch", "noise", "lowfreq"))
    k.add_argument("--seed", type=int, default=None, help="trigger seed (default: a fresh secret one)")
    k.add_argument("--tau", type=float, default=0.25)
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
    v.add_argument("--activation", default="softmax", choices=("softmax", "sigmoid", "none"))
    v.add_argument("--mode", default="direct", choices=("direct", "lime"))
    v.add_argument("--lime-samples", type=int, default=300)
    v.add_argument("--size", type=int, default=128, help="resize the images to this side (0: keep; --bundle uses its own preprocessing)")
    v.add_argument("--out", required=True, help="report folder")
    a = p.parse_args(argv)
    try:
        return cmd_keygen(a) if a.cmd == "keygen" else cmd_verify(a)
    except Exception as e:  # every failure is exit code 2 with the reason, never a half-written report
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
