"""Offline verification through a clinical pipeline's own files: DICOM (or NIfTI) queries out, DICOM SEG back.

Many deployed models are reached only through a pipeline that reads DICOM series and writes DICOM Segmentations.
Verification then runs in two steps around it:

1. :func:`write_queries` stamps the key's trigger on the clean images with the verifier's public function
   (:func:`~monai_stealthmark.verify.trigger_batch`) and writes each triggered image as a DICOM series of its own
   (new Study / Series / SOP Instance UIDs, the original headers and geometry otherwise; NIfTI for NIfTI inputs),
   plus a manifest (the key's fingerprint, the SHA-256 of each clean image and each query, the query UIDs and the
   image preprocessing). The queries are written at the grid the model consumes (``size``), with the pixel spacing
   scaled so that the field of view is kept: a pipeline that resampled a full-resolution query to its network's
   grid would blur the trigger away. Each written query is read back and preprocessed as the pipeline does
   (:func:`image_preprocessing`) and must reproduce the in-memory triggered image (:data:`QUERY_TOLERANCE`).
2. :func:`regenerate_queries` rebuilds the queries from the key and the clean images and refuses a manifest or a
   query file that does not match them (hand-made triggered images are never accepted as queries);
   :func:`read_answers` reads the pipeline's SEGs (FRACTIONAL only: a BINARY SEG carries no probabilities), matches
   them to the queries by their referenced series and instance UIDs and rebuilds the probability maps;
   :class:`StoredAnswers` hands them to :func:`~monai_stealthmark.verify.verify_ownership` as the suspect's answers,
   so the read-out and the verdict are the online ones.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch
from monai.data import PydicomReader
from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Resize, ScaleIntensityRangePercentiles
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from monai_stealthmark.key import WatermarkKey
from monai_stealthmark.utils import atomic_write_bytes, atomic_write_json
from monai_stealthmark.verify.query import NotProbabilitiesError
from monai_stealthmark.verify.report import array_sha256, file_sha256
from monai_stealthmark.verify.verifier import trigger_batch

__all__ = [
    "MANIFEST_NAME",
    "QUERY_TOLERANCE",
    "BinarySegError",
    "OfflineMismatchError",
    "StoredAnswers",
    "image_preprocessing",
    "preprocessing_record",
    "is_nifti",
    "write_queries",
    "load_manifest",
    "order_clean_files",
    "regenerate_queries",
    "read_answers",
]

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "monai-stealthmark offline queries"
MANIFEST_VERSION = 1
PERCENTILES = (1.0, 99.5)
QUERY_TOLERANCE = 0.01  # most a read-back query may differ from the in-memory one, on the [0, 1] scale
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
NIFTI_SUFFIXES = (".nii", ".nii.gz")
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


class OfflineMismatchError(ValueError):
    """The offline files do not belong together: another key, other clean images, an edited manifest or query,
    missing or extra answers, answers that reference other instances."""


class BinarySegError(NotProbabilitiesError):
    """The pipeline wrote BINARY Segmentations: hard masks, which carry no probabilities and so no watermark."""


def is_nifti(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def _is_dicom_name(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(".dcm")


def image_preprocessing(path: str | os.PathLike, size: int | None, resize_first: bool = False) -> Compose:
    """How the verifier and the reference pipeline read one 2D image file: MONAI ``LoadImage`` (DICOM through
    ``PydicomReader``), channel first, intensities scaled to [0, 1] between the 1st and 99.5th percentiles (clipped)
    and resized to ``size x size`` (bilinear, anti-aliased; an image already at that size is left as it is).

    Args:
        path: the file (its suffix picks the reader).
        size: the side to resize to; None or 0 keeps the size.
        resize_first: resize before scaling. The offline queries are made this way: the clean image on the model's
            grid, then scaled, so that its triggered copy keeps its percentiles and a pipeline's own scaling of the
            written query gives back the triggered image (scaling first and resizing after moves the extremes, and a
            second scaling would then shift every intensity of the query by up to 0.2).
    """
    suffix = Path(path).suffix.lower()
    reader = PydicomReader() if suffix == ".dcm" else None
    load = [LoadImage(reader=reader, image_only=True), EnsureChannelFirst(channel_dim="no_channel" if suffix in (".dcm", ".npy") else None)]
    scale = [ScaleIntensityRangePercentiles(*PERCENTILES, 0.0, 1.0, clip=True)]
    resize = [Resize((size, size), mode="bilinear", anti_aliasing=True)] if size else []
    return Compose(load + (resize + scale if resize_first else scale + resize))


def preprocessing_record(size: int | None) -> dict[str, Any]:
    """The offline queries' preprocessing (:func:`image_preprocessing` with ``resize_first``) in words, for the
    manifest: what a pipeline does to see the queries as the verifier made them."""
    return {
        "reader": "monai.transforms.LoadImage (DICOM: monai.data.PydicomReader), channel first",
        "resize": None if not size else {"spatial_size": [int(size), int(size)], "mode": "bilinear", "anti_aliasing": True},
        "intensity": {"transform": "ScaleIntensityRangePercentiles", "lower": PERCENTILES[0], "upper": PERCENTILES[1], "b_min": 0.0, "b_max": 1.0, "clip": True},
        "order": "resize, then intensity scaling",
    }


def _read_back(path: Path, size: int | None) -> torch.Tensor:
    return torch.as_tensor(image_preprocessing(path, size, resize_first=True)(str(path))).float()[:1]


def _percentile_range(real: np.ndarray) -> tuple[float, float]:
    """The intensities that the preprocessing maps to 0 and 1 on the clean image (1st and 99.5th percentiles)."""
    lo, hi = (float(v) for v in np.percentile(real, PERCENTILES))
    return lo, (hi if hi - lo > 1e-6 else lo + 1.0)


def _stored_range(ds: pydicom.Dataset) -> tuple[np.dtype, int, int]:
    """The stored pixels' dtype and value range, from Bits Allocated / Stored and Pixel Representation."""
    bits, stored, signed = int(ds.BitsAllocated), int(getattr(ds, "BitsStored", ds.BitsAllocated)), int(getattr(ds, "PixelRepresentation", 0)) == 1
    if bits not in (8, 16, 32) or int(getattr(ds, "SamplesPerPixel", 1)) != 1:
        raise ValueError(f"queries can be written for single-sample 8/16/32-bit images only (Bits Allocated {bits}).")
    dtype = np.dtype(f"{'i' if signed else 'u'}{bits // 8}").newbyteorder("<")
    lo, hi = (-(1 << (stored - 1)), (1 << (stored - 1)) - 1) if signed else (0, (1 << stored) - 1)
    return dtype, lo, hi


def _dicom_query_pixels(clean_file: str | os.PathLike, ds: pydicom.Dataset, x: torch.Tensor) -> np.ndarray:
    """The stored pixel values ``(Rows, Columns)`` of a triggered image ``x`` (``(H, W)`` on [0, 1], in the reader's
    orientation): mapped back to the clean image's intensities (its percentile range), then through the inverse
    of its Rescale Slope / Intercept, rounded to its stored integer type."""
    real = np.asarray(LoadImage(reader=PydicomReader(), image_only=True)(str(clean_file)), dtype=np.float64)
    lo, hi = _percentile_range(real)
    values = lo + x.detach().cpu().double().numpy().T * (hi - lo)  # PydicomReader reads (Columns, Rows)
    slope, intercept = float(getattr(ds, "RescaleSlope", 1) or 1), float(getattr(ds, "RescaleIntercept", 0) or 0)
    dtype, vmin, vmax = _stored_range(ds)
    return np.clip(np.rint((values - intercept) / slope), vmin, vmax).astype(dtype)


def _nifti_query_values(clean_file: str | os.PathLike, x: torch.Tensor) -> np.ndarray:
    """The float32 values ``(H, W)`` of a triggered image ``x`` mapped back to the clean NIfTI's intensities."""
    real = np.asarray(LoadImage(image_only=True)(str(clean_file)), dtype=np.float64)
    lo, hi = _percentile_range(real)
    return (lo + x.detach().cpu().double().numpy() * (hi - lo)).astype("<f4")


def _query_pixels(clean_file: str | os.PathLike, x: torch.Tensor) -> np.ndarray:
    """The written values of the query for ``clean_file`` (DICOM stored integers or NIfTI floats)."""
    if is_nifti(clean_file):
        return _nifti_query_values(clean_file, x)
    return _dicom_query_pixels(clean_file, pydicom.dcmread(str(clean_file), stop_before_pixels=True), x)


def _grid_scale(shape: Sequence[int], new_shape: Sequence[int]) -> tuple[float, float]:
    return float(shape[0]) / float(new_shape[0]), float(shape[1]) / float(new_shape[1])


def _dicom_query(ds: pydicom.Dataset, pixels: np.ndarray, uids: dict[str, str]) -> bytes:
    """The clean slice's dataset with the query's pixels, UIDs and grid (spacing scaled to keep the field of view,
    the first pixel's centre moved to where the coarser grid puts it), as DICOM file bytes."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    s_row, s_col = _grid_scale((rows, cols), pixels.shape)
    if "PixelSpacing" in ds:
        spacing = [float(v) for v in ds.PixelSpacing]  # (between rows, between columns)
        new_spacing = [spacing[0] * s_row, spacing[1] * s_col]
        if "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds:
            iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
            shift = iop[:3] * (new_spacing[1] - spacing[1]) / 2 + iop[3:] * (new_spacing[0] - spacing[0]) / 2
            ds.ImagePositionPatient = [round(float(v), 6) for v in np.asarray([float(v) for v in ds.ImagePositionPatient]) + shift]
        ds.PixelSpacing = [round(v, 8) for v in new_spacing]
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = uids["study_uid"], uids["series_uid"], uids["sop_uid"]
    ds.file_meta.MediaStorageSOPInstanceUID = uids["sop_uid"]
    for tag in ("SmallestImagePixelValue", "LargestImagePixelValue"):  # stale for the written pixels
        if tag in ds:
            del ds[tag]
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    if ds.file_meta.get("TransferSyntaxUID") not in UNCOMPRESSED:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds)
    return buf.getvalue()


def _nifti_query(clean_file: str | os.PathLike, values: np.ndarray) -> bytes:
    """The clean 2D NIfTI's header with the query's values and grid (voxel size scaled to keep the field of view),
    as gzip-compressed NIfTI bytes (no time stamp, so equal queries give equal files)."""
    import nibabel as nib

    src = nib.load(str(clean_file))
    shape = src.shape[:2]
    s0, s1 = _grid_scale(shape, values.shape)
    aff = np.asarray(src.affine, dtype=np.float64).copy()
    aff[:3, 3] += aff[:3, 0] * (s0 - 1) / 2 + aff[:3, 1] * (s1 - 1) / 2
    aff[:3, 0] *= s0
    aff[:3, 1] *= s1
    header = src.header.copy()
    header.set_data_dtype(np.float32)
    img = nib.Nifti1Image(values.astype(np.float32), aff, header=header)
    img.header.set_slope_inter(1.0, 0.0)
    return gzip.compress(img.to_bytes(), mtime=0)


def _check_output_dir(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"query folder {str(out)!r} is not empty; write the queries to a new folder.")


def _check_inputs(files: Sequence[Path]) -> str:
    """``"dicom"`` or ``"nifti"``: the one format of the clean files; other formats have no header to keep."""
    kinds = {"nifti" if is_nifti(f) else "dicom" if _is_dicom_name(f) else "other" for f in files}
    if "other" in kinds or len(kinds) != 1:
        raise ValueError(
            "offline queries are written from DICOM (.dcm) or 2D NIfTI (.nii, .nii.gz) clean images, one format at a "
            f"time (the query keeps the clean image's header); got {sorted(str(f) for f in files)[:4]}..."
        )
    return kinds.pop()


def write_queries(
    files: Sequence[str | os.PathLike],
    images: torch.Tensor,
    key: WatermarkKey,
    out_dir: str | os.PathLike,
    size: int | None,
    tolerance: float = QUERY_TOLERANCE,
) -> dict[str, Any]:
    """Write the triggered queries of ``images`` as files a pipeline reads, and their manifest.

    Args:
        files: the clean image files, one per image, in batch order (DICOM slices or 2D NIfTI files).
        images: the clean images ``(B, 1, H, W)`` read by :func:`image_preprocessing` at ``size`` with
            ``resize_first``; the queries are ``trigger_batch(images, key)``.
        key: the owner's key.
        out_dir: an empty or missing folder; gets ``query_NNN/query_NNN.dcm`` (one series per query) or
            ``query_NNN.nii.gz``, and :data:`MANIFEST_NAME` last, once every query is written and checked.
        size: the side the images were resized to (recorded; None or 0: kept).
        tolerance: most a read-back query, preprocessed as the pipeline does, may differ from the in-memory one.

    Returns:
        the manifest.

    Raises:
        ValueError: the trigger did not survive the write (the read-back query differs by more than ``tolerance``).
    """
    files = [Path(f) for f in files]
    if len(files) != images.shape[0]:
        raise ValueError(f"{len(files)} files for {images.shape[0]} images.")
    out = Path(out_dir)
    _check_output_dir(out)
    kind = _check_inputs(files)
    triggered = trigger_batch(images, key)
    study_uids: dict[str, str] = {}
    entries = []
    for i, (f, x) in enumerate(zip(files, triggered)):
        entry: dict[str, Any] = {"index": i, "clean_file": str(f), "clean_sha256": file_sha256(f), "triggered_sha256": array_sha256(x)}
        values = _query_pixels(f, x[0])
        if kind == "dicom":
            ds = pydicom.dcmread(str(f))
            uids = {"study_uid": study_uids.setdefault(str(ds.StudyInstanceUID), generate_uid()), "series_uid": generate_uid(), "sop_uid": generate_uid()}
            rel = f"query_{i:03d}/query_{i:03d}.dcm"
            data = _dicom_query(ds, values, uids)
            entry.update(uids)
        else:
            rel, data = f"query_{i:03d}.nii.gz", _nifti_query(f, values)
        path = atomic_write_bytes(out / rel, data)
        error = float((_read_back(path, size) - x).abs().max())
        if error > tolerance:
            raise ValueError(
                f"the trigger does not survive writing query {rel} (from {str(f)!r}): read back and preprocessed, it "
                f"differs from the triggered image by {error:.4f} > {tolerance} on the [0, 1] scale."
            )
        entry.update(query_file=rel, query_sha256=file_sha256(path), query_pixels_sha256=array_sha256(values), shape=list(values.shape), readback_max_error=error)
        entries.append(entry)
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "key_fingerprint": key.fingerprint,
        "trigger_function": "monai_stealthmark.verify.trigger_batch",
        "output": kind,
        "size": int(size) if size else None,
        "preprocessing": preprocessing_record(size),
        "queries": entries,
    }
    atomic_write_json(out / MANIFEST_NAME, manifest)
    return manifest


def load_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Read a query manifest written by :func:`write_queries`, refusing any other JSON."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {str(path)!r} does not exist (step one, `verify --write-queries DIR`, writes DIR/{MANIFEST_NAME}).")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(path)!r} is not a query manifest (not JSON: {e}).") from e
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT or m.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{str(path)!r} is not a query manifest of version {MANIFEST_VERSION} (format {MANIFEST_FORMAT!r}).")
    if m.get("output") not in ("dicom", "nifti") or not m.get("queries"):
        raise ValueError(f"{str(path)!r} is not a usable query manifest (no queries, or unknown output {m.get('output')!r}).")
    return m


def order_clean_files(files: Sequence[str | os.PathLike], manifest: dict[str, Any]) -> list[Path]:
    """The clean files in the manifest's query order, matched by their SHA-256 (paths may differ).

    Raises:
        OfflineMismatchError: a manifest image is not among ``files``, or ``files`` holds images the queries were
            not made from.
    """
    by_hash: dict[str, Path] = {}
    for f in map(Path, files):
        by_hash.setdefault(file_sha256(f), f)
    wanted = [q["clean_sha256"] for q in manifest["queries"]]
    missing = [q["clean_file"] for q in manifest["queries"] if q["clean_sha256"] not in by_hash]
    if missing:
        raise OfflineMismatchError(f"{len(missing)} clean image(s) of the manifest are not among --images (by SHA-256): {missing[:3]}.")
    extra = [str(f) for h, f in by_hash.items() if h not in set(wanted)]
    if extra:
        raise OfflineMismatchError(f"{len(extra)} image(s) of --images have no query in the manifest: {extra[:3]}.")
    return [by_hash[h] for h in wanted]


def regenerate_queries(
    files: Sequence[str | os.PathLike], images: torch.Tensor, key: WatermarkKey, manifest: dict[str, Any], manifest_dir: str | os.PathLike
) -> tuple[torch.Tensor, int]:
    """Rebuild the queries from the key and the clean images and check the manifest and the query files against them.

    Args:
        files: the clean files in the manifest's order (:func:`order_clean_files`).
        images: those images read as step one read them (:func:`image_preprocessing` at the manifest's size,
            ``resize_first``).
        key: the key (the owner's, or the one revealed to a referee).
        manifest: the manifest of step one.
        manifest_dir: where the query files lie (the manifest's folder).

    Returns:
        ``(triggered queries (B, 1, H, W), number of query files found and checked)``.

    Raises:
        OfflineMismatchError: another key; a manifest query that is not the key's trigger on its clean image (an
            edited manifest or hand-made queries); a query file edited after it was written.
    """
    if manifest["key_fingerprint"] != key.fingerprint:
        raise OfflineMismatchError(f"the queries were made with another key (manifest fingerprint {manifest['key_fingerprint'][:16]}..., key {key.fingerprint[:16]}...).")
    triggered = trigger_batch(images, key)
    checked = 0
    for q, f, x in zip(manifest["queries"], files, triggered):
        if array_sha256(_query_pixels(f, x[0])) != q["query_pixels_sha256"]:
            raise OfflineMismatchError(
                f"query {q['query_file']} of the manifest is not the key's trigger on {str(f)!r}: refused (queries are "
                "always derived from the clean images by trigger_batch, never taken as given)."
            )
        path = Path(manifest_dir) / q["query_file"]
        if path.is_file():
            if file_sha256(path) != q["query_sha256"]:
                raise OfflineMismatchError(f"query file {str(path)!r} was edited after it was written (SHA-256 differs from the manifest).")
            checked += 1
    return triggered, checked


def _dicom_files(folder: Path) -> list[Path]:
    files = [f for f in sorted(folder.rglob("*")) if f.is_file() and (_is_dicom_name(f) or pydicom.misc.is_dicom(str(f)))]
    return files


def _seg_headers(folder: Path) -> list[tuple[Path, pydicom.Dataset]]:
    """The DICOM Segmentations in ``folder`` (other DICOM files, such as copies of the inputs, are skipped)."""
    segs = []
    for f in _dicom_files(folder):
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=True)
        except Exception as e:
            raise ValueError(f"answer {str(f)!r} is not a readable DICOM file: {type(e).__name__}: {e}") from e
        if str(getattr(ds, "SOPClassUID", "")) == SEG_STORAGE:
            segs.append((f, ds))
    if not segs:
        raise FileNotFoundError(f"no DICOM Segmentation (SEG) found in {str(folder)!r}.")
    binary = [str(f) for f, ds in segs if str(getattr(ds, "SegmentationType", "")).upper() == "BINARY"]
    if binary:
        raise BinarySegError(
            f"cannot verify: {len(binary)} answer(s) are BINARY DICOM SEGs (e.g. {binary[0]!r}). A BINARY SEG carries "
            "hard masks only, no probabilities, and the watermark lives in the probability maps; have the pipeline "
            "write FRACTIONAL (PROBABILITY) SEGs."
        )
    return segs


def _seg_answers(folder: Path, manifest: dict[str, Any]) -> tuple[list[np.ndarray | None], list[dict[str, Any] | None]]:
    """Per query, the foreground probabilities ``(S, H, W)`` (reader orientation) from the SEG that references it."""
    import highdicom as hd

    by_sop = {q["sop_uid"]: q for q in manifest["queries"]}
    answers: list[np.ndarray | None] = [None] * len(manifest["queries"])
    records: list[dict[str, Any] | None] = [None] * len(manifest["queries"])
    for f, _ in _seg_headers(folder):
        seg = hd.seg.segread(str(f))
        digest = file_sha256(f)
        for study, series, sop in seg.get_source_image_uids():
            q = by_sop.get(str(sop))
            if q is None or q["series_uid"] != str(series) or q["study_uid"] != str(study):
                raise OfflineMismatchError(f"answer {str(f)!r} references an image that is not one of the manifest's queries (series {series}, instance {sop}).")
            i = q["index"]
            if answers[i] is not None:
                raise OfflineMismatchError(f"two answers for query {q['query_file']} ({records[i]['file']!r} and {str(f)!r}).")
            frames = seg.get_pixels_by_source_instance([str(sop)], combine_segments=False, rescale_fractional=True)
            fg = np.moveaxis(np.asarray(frames[0], dtype=np.float32), -1, 0)  # (S, Rows, Columns)
            if list(fg.shape[1:]) != list(q["shape"]):
                raise OfflineMismatchError(f"answer {str(f)!r} for query {q['query_file']} has grid {fg.shape[1:]}, the query {tuple(q['shape'])}.")
            answers[i] = np.swapaxes(fg, 1, 2)  # to the reader's (Columns, Rows) orientation, as the query was read
            records[i] = {"file": str(f), "sha256": digest}
    return answers, records


def _nifti_answers(folder: Path, manifest: dict[str, Any]) -> tuple[list[np.ndarray | None], list[dict[str, Any] | None]]:
    """Per query, all classes' probabilities ``(C, H, W)`` from the NIfTI file of the query's name (channels last)."""
    import nibabel as nib

    answers: list[np.ndarray | None] = []
    records: list[dict[str, Any] | None] = []
    for q in manifest["queries"]:
        f = folder / Path(q["query_file"]).name
        if not f.is_file():
            answers.append(None)
            records.append(None)
            continue
        data = np.asarray(nib.load(str(f)).get_fdata(dtype=np.float32))
        if data.ndim == 2:
            data = data[..., None]
        if data.ndim != 3 or list(data.shape[:2]) != list(q["shape"]):
            raise OfflineMismatchError(f"answer {str(f)!r} has shape {data.shape}; expected (H, W, classes) with (H, W) = {tuple(q['shape'])}.")
        answers.append(np.moveaxis(data, -1, 0))
        records.append({"file": str(f), "sha256": file_sha256(f)})
    return answers, records


def _with_background(fg: np.ndarray) -> np.ndarray:
    """``(S, H, W)`` foreground probabilities -> ``(S + 1, H, W)`` with background ``1 - sum`` first; where the
    stored fractions' rounding makes the foreground sum exceed one, the background is 0 and the classes are rescaled
    to sum to one."""
    bg = 1.0 - fg.sum(0, keepdims=True)
    p = np.concatenate([np.clip(bg, 0.0, None), fg], 0)
    return p / np.maximum(p.sum(0, keepdims=True), 1e-12)


def read_answers(answers_dir: str | os.PathLike, manifest: dict[str, Any]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """The pipeline's answers to the manifest's queries as probability maps ``(B, C, H, W)`` in query order.

    DICOM: FRACTIONAL SEGs (any number, each referencing some of the queries by series and instance UID), one segment
    per foreground class; the background is rebuilt as ``1 - sum`` of the foreground. NIfTI: one file per query,
    named as the query, ``(H, W, classes)`` probabilities.

    Returns:
        ``(probabilities, per query {"file", "sha256", "probabilities_sha256"})``.

    Raises:
        BinarySegError: a BINARY SEG.
        OfflineMismatchError: a missing or duplicate answer, an answer referencing an image that is not a query, a
            grid or class count that differs.
    """
    folder = Path(answers_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"answers folder {str(folder)!r} does not exist.")
    if manifest["output"] == "dicom":
        answers, records = _seg_answers(folder, manifest)
        answers = [a if a is None else _with_background(a) for a in answers]
    else:
        answers, records = _nifti_answers(folder, manifest)
    missing = [q["query_file"] for q, a in zip(manifest["queries"], answers) if a is None]
    if missing:
        raise OfflineMismatchError(f"no answer in {str(folder)!r} for {len(missing)} of {len(answers)} queries: {missing[:4]}.")
    classes = {a.shape[0] for a in answers}
    if len(classes) != 1:
        raise OfflineMismatchError(f"the answers have different numbers of classes {sorted(classes)}.")
    probs = torch.as_tensor(np.stack(answers)).float()
    for r, p in zip(records, probs):
        r["probabilities_sha256"] = array_sha256(p)
    return probs, records


class StoredAnswers:
    """A query callable that answers exactly the manifest's triggered queries with the pipeline's stored answers, so
    :func:`~monai_stealthmark.verify.verify_ownership` reads them as it reads a live model's.

    Args:
        queries: the regenerated triggered queries ``(B, 1, H, W)`` (:func:`regenerate_queries`).
        answers: the probabilities ``(B, C, H, W)`` (:func:`read_answers`), in the same order.
    """

    window = None

    def __init__(self, queries: torch.Tensor, answers: torch.Tensor) -> None:
        if queries.shape[0] != answers.shape[0] or queries.shape[2:] != answers.shape[2:]:
            raise OfflineMismatchError(f"{tuple(answers.shape)} answers do not fit {tuple(queries.shape)} queries.")
        self.queries, self.answers = queries, answers
        self.n_queries = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape != self.queries.shape or not torch.equal(images.to(self.queries.device), self.queries):
            raise OfflineMismatchError(
                "the stored answers answer only the manifest's triggered queries; offline verification reads them in "
                "direct mode (LIME needs fresh perturbed queries)."
            )
        self.n_queries += int(images.shape[0])
        return self.answers.clone()
