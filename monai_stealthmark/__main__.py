"""Command line: ``python -m monai_stealthmark keygen|verify|calibrate ...``.

- ``keygen``: the secret key file + its public commitment record (fingerprint and date);
- ``verify``: query a suspect (``--model`` TorchScript, ``--bundle`` folder, or ``--url`` endpoint) with the key's
  trigger and write the report; ``--null`` / ``--commitment`` make the claim calibrated and dated. Offline, through a
  pipeline's files: ``--write-queries DIR`` writes the triggered queries as DICOM series (NIfTI) and a manifest,
  ``--answers DIR --manifest FILE`` reads the pipeline's DICOM SEGs back. ``--referee`` checks a revealed key
  against its commitment, ``--reproduce REPORT`` requires the check to reproduce an earlier report; every report
  carries the hashes (key file, clean images, queries, answers) that make it reproducible; ``--output-mark`` also
  tests the answers to the clean images for the key's output mark (a student distilled from the model carries it);
- ``calibrate``: the empirical null of clean models (``--models`` TorchScript files) for a key. Clean models to
  calibrate with are trained by ``python -m experiments.null_models``, outside the installed package.
Embedding is the bundle overlay's job (``bundles/stealthmark_overlay.json``), not the CLI's.

Exit codes of ``verify``: 0 = ownership shown (with ``--output-mark``: by either test), 1 = not shown, 2 = error
(bad key, images, model or outputs; BINARY SEGs; offline files that do not match: missing answers, wrong references,
edited queries or manifest; a check that does not reproduce ``--reproduce``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from monai_stealthmark.bundle import load_bundle_model
from monai_stealthmark.data import DataFileError, read_error
from monai_stealthmark.key import TRIGGER_KINDS, WatermarkKey
from monai_stealthmark.utils import atomic_write_json
from monai_stealthmark.verify import (
    Commitment,
    ModelQuery,
    NullDistribution,
    calibrate_null,
    detect_output_mark,
    fit_window,
    load_suspect_query,
    trigger_batch,
    verify_ownership,
)
from monai_stealthmark.verify.offline import (
    MANIFEST_NAME,
    StoredAnswers,
    image_preprocessing,
    load_manifest,
    order_clean_files,
    read_answers,
    regenerate_queries,
    write_queries,
)
from monai_stealthmark.verify.remote import RemoteModelQuery
from monai_stealthmark.verify.report import array_sha256, file_sha256, reproduction_differences

__all__ = ["add_key_image_options", "build_parser", "load_images", "main", "null_summary"]

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


def load_images(paths: list[str], size: int | None = 128, resize_first: bool = False) -> torch.Tensor:
    """Read DICOM / NIfTI / PNG / NPY files with MONAI's LoadImage, scale to [0, 1] (1-99.5 percentiles), resize
    (``resize_first``: resize, then scale, as the offline queries are made; see ``image_preprocessing``)."""
    out = []
    for f in _collect(paths):
        try:
            img = image_preprocessing(f, size, resize_first)(str(f))
        except Exception as e:
            raise read_error(f, e, "image") from e
        img = torch.as_tensor(img).float()
        if img.ndim != 3:
            raise DataFileError(f"image {str(f)!r} is not a 2D slice after loading (shape {tuple(img.shape)}).")
        out.append(img[:1])
    return torch.stack(out)


def load_bundle_images(paths: list[str], preprocessing, window=None) -> torch.Tensor:
    """Read the images with the bundle's own inference preprocessing (``{"image": path}`` dicts).

    With the network's input ``window`` (a patch-trained bundle's ``roi_size``) each image is centre-cropped or
    padded to it, as the verifier queries, so volumes of different sizes make one batch.
    """
    out = []
    for f in _collect(paths):
        try:
            img = preprocessing({"image": str(f)})["image"]
        except Exception as e:
            raise read_error(f, e, "image (bundle preprocessing)") from e
        img = torch.as_tensor(img).as_subclass(torch.Tensor).float()
        out.append(fit_window(img[None], window)[0] if window is not None else img)
    shapes = {tuple(i.shape) for i in out}
    if len(shapes) > 1:
        raise DataFileError(f"the bundle's preprocessing gave images of different shapes {sorted(shapes)} and its inferer has no roi_size to query with.")
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
        query = ModelQuery(net, activation=activation, inferer=inferer)
        images = load_bundle_images(a.images, preprocessing, query.window) if preprocessing is not None else load_images(a.images, a.size)
        return query, images
    if a.url:
        query = RemoteModelQuery(a.url, timeout=a.timeout, retries=a.retries, budget=a.budget, window=a.window)
        return query, load_images(a.images, a.size)
    if a.model.endswith((".ts", ".pt", ".pth", ".onnx")):
        return load_suspect_query(a.model, activation, window=a.window), load_images(a.images, a.size)
    raise ValueError(f"--model must be a TorchScript (.ts/.pt/.pth) or ONNX (.onnx) file, got {a.model!r}.")


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
        self.window = getattr(query, "window", None)  # the verifier fits the queries to the wrapped model's window
        self.bar = tqdm(total=total, unit="img", desc="queries", disable=not enabled, file=sys.stderr)

    def __call__(self, images):
        out = self.query(images)
        self.bar.update(int(images.shape[0]))
        return out

    @property
    def n_queries(self):
        return getattr(self.query, "n_queries", None)

    def close(self) -> None:
        self.bar.close()


class _AnswerLog:
    """Hash what the suspect answers (reproducibility): per image, its answer to the triggered queries, and one
    running SHA-256 over every answer in order (LIME's perturbed queries included)."""

    def __init__(self, query, triggered: torch.Tensor) -> None:
        self.query, self.triggered = query, triggered
        self.window = getattr(query, "window", None)
        self.answers_sha256: list[str] = []
        self.all_answers = hashlib.sha256()

    @property
    def n_queries(self):
        return getattr(self.query, "n_queries", None)

    def __call__(self, images):
        out = self.query(images)
        if not self.answers_sha256 and images.shape == self.triggered.shape and torch.equal(images.cpu(), self.triggered.cpu()):
            self.answers_sha256 = [array_sha256(p) for p in out]
        self.all_answers.update(array_sha256(out).encode())
        return out


def _check_referee(a: argparse.Namespace, key: WatermarkKey, commitment: Commitment | None) -> None:
    """A referee's preconditions: the published commitment and the suspect's date are given, and the revealed key
    is the committed one."""
    if not a.referee:
        return
    if commitment is None or not a.suspect_date:
        raise ValueError("--referee needs --commitment (the published record) and --suspect-date (when the suspect appeared).")
    if commitment.fingerprint != key.fingerprint:
        raise ValueError(
            f"the revealed key does not match the commitment (fingerprint {key.fingerprint[:16]}... vs committed "
            f"{commitment.fingerprint[:16]}...): a referee does not verify with it."
        )


def _offline_query(a: argparse.Namespace, key: WatermarkKey) -> tuple[StoredAnswers, torch.Tensor, list[Path], dict]:
    """Step two of the offline path: the queries regenerated from the key and the clean images and checked against
    the manifest, the pipeline's answers read and matched to them; also their hashes for the report."""
    if a.mode != "direct":
        raise ValueError("offline verification (--answers) reads in direct mode only: LIME needs fresh perturbed queries.")
    if a.window:
        raise ValueError("--window does not apply to offline verification: the queries were written at the manifest's size.")
    manifest = load_manifest(a.manifest)
    files = order_clean_files(_collect(a.images), manifest)
    images = load_images([str(f) for f in files], manifest["size"] or 0, resize_first=True)
    triggered, checked = regenerate_queries(files, images, key, manifest, Path(a.manifest).parent)
    answers, records = read_answers(a.answers, manifest)
    qs = manifest["queries"]
    provenance = {
        "source": "offline",
        "manifest_sha256": file_sha256(a.manifest),
        "query_files": [q["query_file"] for q in qs],
        "queries_sha256": [q["query_sha256"] for q in qs],
        "queries_pixels_sha256": [q["query_pixels_sha256"] for q in qs],
        "query_files_checked": checked,
        "answer_files": [os.path.relpath(r["file"], a.answers) for r in records],
        "answers_sha256": [r["sha256"] for r in records],
        "answers_probabilities_sha256": [r["probabilities_sha256"] for r in records],
        "settings": {"size": manifest["size"]},  # the queries' grid is the manifest's, whatever --size says
    }
    return StoredAnswers(triggered, answers), images, files, provenance


def _online_query(a: argparse.Namespace, key: WatermarkKey) -> tuple[_AnswerLog, torch.Tensor, list[Path], dict]:
    """The suspect named by --model / --bundle / --url, wrapped to hash its answers; the triggered queries' hashes."""
    query, images = _suspect_query(a, None if a.activation == "none" else a.activation)
    triggered = trigger_batch(fit_window(images, getattr(query, "window", None)), key)
    source = f"model {a.model}" if a.model else f"bundle {a.bundle}" if a.bundle else f"url {a.url}"
    return _AnswerLog(query, triggered), images, _collect(a.images), {"source": source, "queries_sha256": [array_sha256(x) for x in triggered]}


def _provenance(a: argparse.Namespace, commitment: Commitment | None, files: list[Path], extra: dict) -> dict:
    """What a third party needs to reproduce the check: hashes of the key file, the clean images, the queries and
    the answers, the commitment's fingerprint and the settings of the read-out and the verdict."""
    settings = {k: getattr(a, k) for k in ("mode", "size", "activation", "window", "lime_samples", "suspect_date")}
    extra = dict(extra)
    settings.update(extra.pop("settings", {}))
    return {
        "key_file_sha256": file_sha256(a.key),
        "commitment_fingerprint": commitment.fingerprint if commitment is not None else None,
        "referee": bool(a.referee),
        "trigger_function": "monai_stealthmark.verify.trigger_batch",
        "image_files": [str(f) for f in files],
        "images_sha256": [file_sha256(f) for f in files],
        **extra,
        "settings": settings,
    }


def _check_reproduces(path: str, report: dict) -> None:
    """Refuse (exit 2) a referee run that does not reproduce the report at ``path``, naming what differs."""
    try:
        original = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the report to reproduce {path!r}: {e}") from e
    diffs = reproduction_differences(original, report)
    if diffs:
        raise ValueError(f"this check does not reproduce {path}: " + "; ".join(diffs))


def cmd_write_queries(a: argparse.Namespace) -> int:
    """Offline step one: write the key's triggered queries of the clean images as DICOM series (or NIfTI) + manifest."""
    if a.window:
        raise ValueError("--window does not apply to --write-queries: the queries are written at --size.")
    key = WatermarkKey.load(a.key)
    files = _collect(a.images)
    images = load_images([str(f) for f in files], a.size, resize_first=True)
    manifest = write_queries(files, images, key, a.write_queries, a.size or None)
    worst = max(q["readback_max_error"] for q in manifest["queries"])
    print(f"{len(manifest['queries'])} {manifest['output'].upper()} queries written to {a.write_queries} (read back within {worst:.4f} of the triggered images)")
    print(f"manifest: {Path(a.write_queries) / MANIFEST_NAME}")
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    """Query the suspect with the key's trigger (or read a pipeline's answers to the written queries), write the
    report; exit 0 when ownership is shown, else 1."""
    if a.write_queries:
        return cmd_write_queries(a)
    if not a.out:
        raise ValueError("verify needs --out (the report folder).")
    if bool(a.answers) != bool(a.manifest):
        raise ValueError("--answers and --manifest go together (the pipeline's outputs and the queries' manifest).")
    if a.output_mark and a.answers:
        raise ValueError("--output-mark reads answers to clean images; the offline answers (--answers) are to triggered queries only.")
    key = WatermarkKey.load(a.key)
    null = NullDistribution.load(a.null) if a.null else None
    commitment = Commitment.load(a.commitment) if a.commitment else None
    if a.suspect_date and commitment is None:
        raise ValueError("--suspect-date needs --commitment (the owner's published commitment record).")
    _check_referee(a, key, commitment)
    query, images, files, extra = _offline_query(a, key) if a.answers else _online_query(a, key)
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
    mark = None
    if a.output_mark:
        with torch.no_grad():
            mark = detect_output_mark(query, fit_window(images, getattr(query, "window", None)), key)
    if isinstance(query, _AnswerLog):
        extra.update(answers_sha256=query.answers_sha256, all_answers_sha256=query.all_answers.hexdigest())
    rep.provenance = _provenance(a, commitment, files, extra)
    if a.reproduce:
        _check_reproduces(a.reproduce, rep.to_dict())
    rep.save(a.out, stem="report")
    print(rep.to_markdown())
    if mark is not None:
        atomic_write_json(Path(a.out) / "output_mark.json", mark.to_dict())
        print(f"\noutput mark on {mark.n_images} clean images: t {mark.t:.2f}, p {mark.p_value:.3g} "
              f"({'shown' if mark.verdict else 'not shown'} at p <= {mark.alpha:g})")
    return 0 if rep.verdict or (mark is not None and mark.verdict) else 1


def add_key_image_options(p: argparse.ArgumentParser, images_help: str) -> None:
    """The options of every command that stamps the key's trigger on images: the key, the images, their size."""
    p.add_argument("--key", required=True, help="the owner's key file (keygen writes it)")
    p.add_argument("--images", nargs="+", required=True, help=images_help)
    p.add_argument("--size", type=int, default=128, help="resize the images to this side (0: keep)")


def _add_keygen(sub) -> None:
    k = sub.add_parser("keygen", help="make a key file and print its fingerprint")
    k.add_argument("--payload", required=True)
    k.add_argument("--out", required=True, help="key file (the commitment record goes beside it)")
    k.add_argument("--trigger", default=WatermarkKey.trigger, choices=TRIGGER_KINDS)
    k.add_argument("--seed", type=int, default=None, help="trigger seed (default: a fresh secret one)")
    k.add_argument("--tau", type=float, default=WatermarkKey.tau)
    k.add_argument("--force", action="store_true", help="overwrite an existing key file (its secret seed is lost)")
    k.set_defaults(run=cmd_keygen)


def _add_suspect_options(v: argparse.ArgumentParser) -> None:
    """Which black box ``verify`` queries (exactly one of model / bundle / url) and the HTTP client's limits."""
    src = v.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--write-queries", metavar="DIR",
        help="offline step one: write the triggered queries of --images as DICOM series (NIfTI for NIfTI inputs) at "
        "--size, and DIR/manifest.json, for a pipeline to read",
    )
    src.add_argument("--answers", metavar="DIR", help="offline step two: the pipeline's DICOM SEGs (or NIfTI probability maps); needs --manifest")
    src.add_argument("--model", help="TorchScript (.ts/.pt) or ONNX (.onnx) file of the suspect model")
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
    v.add_argument("--manifest", default=None, help="the manifest written by --write-queries (with --answers)")
    v.add_argument(
        "--referee", action="store_true",
        help="a referee's check with a revealed key: needs --commitment and --suspect-date, refuses a key that does "
        "not match the commitment",
    )
    v.add_argument(
        "--output-mark", action="store_true",
        help="also test the answers to the clean images for the key's output mark (models trained with "
        "output_mark_weight > 0, and students distilled from them); ownership is shown by either test",
    )
    v.add_argument("--reproduce", default=None, metavar="REPORT", help="a report.json this check must reproduce (exit 2 naming the differences otherwise)")
    v.add_argument("--quiet", action="store_true", help="no progress bar")
    v.add_argument("--out", default=None, help="report folder (not with --write-queries)")
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
