"""A reference clinical pipeline: DICOM series in, DICOM Segmentation out (NIfTI in, NIfTI probabilities out).

``python -m monai_stealthmark.pipeline --model M.ts|--bundle DIR --in DIR --out DIR [--seg-type fractional|binary]``
reads every DICOM series under ``--in`` (slice by slice, MONAI ``LoadImage`` with ``PydicomReader``; a bundle's
own inference preprocessing when it has one), runs the model on each slice at its grid (``--size``) and writes one
DICOM Segmentation per series with ``highdicom``: FRACTIONAL (PROBABILITY, one segment per foreground class, the probabilities at 8 bits) or, with ``--seg-type
binary``, BINARY (the argmax as hard masks: what a pipeline that returns masks only gives back). Each SEG
references its source series and instances. 2D NIfTI inputs get a NIfTI of the same name with the probabilities
of every class, channels last. It is the counterpart of the offline verification
(:mod:`monai_stealthmark.verify.offline`) in the tests and the tutorial ``docs/tutorial_dicom.md``.
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pydicom
import torch
import torch.nn.functional as F

from monai_stealthmark.utils import atomic_write_bytes
from monai_stealthmark.verify.offline import SEG_STORAGE, image_preprocessing, is_nifti

__all__ = ["SEG_TYPES", "default_reader", "bundle_reader", "find_series", "segment_series", "write_nifti_probabilities", "run_pipeline", "run_bundle_pipeline", "main"]

SEG_TYPES = ("fractional", "binary")
SOFTWARE = "monai-stealthmark reference pipeline"


def find_series(in_dir: str | os.PathLike) -> list[list[Path]]:
    """The DICOM image series under ``in_dir``: files grouped by Series Instance UID, each series ordered by
    Instance Number, the series in the order of their first file's path. Segmentation objects are skipped."""
    groups: dict[str, list[tuple[int, Path]]] = {}
    for f in sorted(Path(in_dir).rglob("*")):
        if not f.is_file() or is_nifti(f) or not (f.suffix.lower() == ".dcm" or pydicom.misc.is_dicom(str(f))):
            continue
        ds = pydicom.dcmread(str(f), stop_before_pixels=True)
        if str(getattr(ds, "SOPClassUID", "")) == SEG_STORAGE:
            continue
        groups.setdefault(str(ds.SeriesInstanceUID), []).append((int(getattr(ds, "InstanceNumber", 0) or 0), f))
    return [[f for _, f in sorted(g, key=lambda t: (t[0], str(t[1])))] for g in groups.values()]


Reader = Callable[[Path], torch.Tensor]


def default_reader(size: int | None) -> Reader:
    """One slice file -> ``(1, h, w)`` on [0, 1] at the model's grid, as the offline queries are made
    (:func:`~monai_stealthmark.verify.offline.image_preprocessing`: resized to ``size``, then scaled)."""
    return lambda f: torch.as_tensor(image_preprocessing(f, size, resize_first=True)(str(f))).float()[:1]


def bundle_reader(preprocessing: Callable) -> Reader:
    """One slice file -> the image as a bundle's own inference preprocessing gives it (``{"image": path}``)."""
    return lambda f: torch.as_tensor(preprocessing({"image": str(f)})["image"]).float()


def _probabilities(predict: Callable[[torch.Tensor], torch.Tensor], f: Path, reader: Reader) -> torch.Tensor:
    """The model's probabilities ``(1, K, h, w)`` for one slice, at the grid ``reader`` gives (its orientation)."""
    return torch.as_tensor(predict(reader(f)[None])).float().cpu()


def _foreground(probs: np.ndarray, seg_type: str) -> np.ndarray:
    """``(N, K, Rows, Columns)`` probabilities -> SEG pixels ``(N, Rows, Columns, segments)``: the foreground
    classes (a one-channel model's channel is its foreground) as fractions, or as the argmax's masks."""
    if probs.shape[1] == 1:
        fg = probs
        masks = fg > 0.5
    else:
        fg = probs[:, 1:]
        masks = np.eye(probs.shape[1], dtype=bool)[probs.argmax(1)][..., 1:].transpose(0, 3, 1, 2)
    out = fg.clip(0, 1).astype(np.float32) if seg_type == "fractional" else masks.astype(np.uint8)
    return np.moveaxis(out, 1, -1)


def _native_grid(p: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """``(N, K, h, w)`` probabilities resampled to ``shape`` (bilinear), unchanged when already there."""
    if tuple(p.shape[2:]) == tuple(shape):
        return p
    return F.interpolate(p, size=shape, mode="bilinear", align_corners=False)


def _valid_date(value: str) -> bool:
    try:
        pydicom.valuerep.DA(value)
    except ValueError:
        return False
    return True


def _without_invalid_dates(ds: pydicom.Dataset) -> pydicom.Dataset:
    """``ds`` with its unparsable top-level dates emptied (anonymised data often holds ``00000000``), which
    highdicom would otherwise refuse to copy into the SEG; only the in-memory source copy is changed."""
    for elem in ds:
        if elem.VR == "DA" and elem.value and not _valid_date(str(elem.value)):
            elem.value = ""
    return ds


def _segment_descriptions(n_segments: int, labels: Sequence[str] | None):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(name=SOFTWARE, family=codes.cid7162.ArtificialIntelligence, version="1")
    return [
        hd.seg.SegmentDescription(
            segment_number=k,
            segment_label=labels[k - 1] if labels else f"class {k}",
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for k in range(1, n_segments + 1)
    ]


def segment_series(
    predict: Callable[[torch.Tensor], torch.Tensor],
    files: Sequence[Path],
    reader: Reader,
    seg_type: str = "fractional",
    labels: Sequence[str] | None = None,
) -> bytes:
    """One DICOM Segmentation (file bytes) of a series: one frame per source slice, one segment per foreground class.

    Args:
        predict: ``(1, 1, H, W)`` images on [0, 1] -> per-class probabilities ``(1, K, H, W)``, background first
            (or one channel: the foreground's probability).
        files: the series' slices, in order.
        reader: one slice file -> the model's input ``(1, h, w)`` (:func:`default_reader`, :func:`bundle_reader`);
            the answer is resampled back to the slice's grid when ``(h, w)`` differs from it.
        seg_type: ``"fractional"`` (probabilities, 8-bit) or ``"binary"`` (argmax masks).
        labels: segment labels of the foreground classes (default ``class 1`` ...).
    """
    import highdicom as hd

    if seg_type not in SEG_TYPES:
        raise ValueError(f"seg_type must be one of {SEG_TYPES}, got {seg_type!r}.")
    sources = [_without_invalid_dates(pydicom.dcmread(str(f))) for f in files]
    probs = torch.cat([_native_grid(_probabilities(predict, f, reader), (int(ds.Columns), int(ds.Rows))) for f, ds in zip(files, sources)])
    probs = probs.transpose(2, 3).numpy()  # PydicomReader's (Columns, Rows) back to the frames' (Rows, Columns)
    pixels = _foreground(probs, seg_type)
    kind = hd.seg.SegmentationTypeValues.FRACTIONAL if seg_type == "fractional" else hd.seg.SegmentationTypeValues.BINARY
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixels,
        segmentation_type=kind,
        segment_descriptions=_segment_descriptions(pixels.shape[-1], labels),
        series_instance_uid=hd.UID(),
        series_number=int(getattr(sources[0], "SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="monai-stealthmark",
        manufacturer_model_name=SOFTWARE,
        software_versions="1",
        device_serial_number="0",
        omit_empty_frames=False,
    )
    buf = io.BytesIO()
    seg.save_as(buf)
    return buf.getvalue()


def write_nifti_probabilities(predict: Callable[[torch.Tensor], torch.Tensor], src: Path, out: Path, reader: Reader) -> Path:
    """The probabilities of every class of a 2D NIfTI slice, ``(H, W, K)`` on its grid and affine, gzip-compressed."""
    import nibabel as nib

    img = nib.load(str(src))
    p = _native_grid(_probabilities(predict, src, reader), tuple(int(s) for s in img.shape[:2]))[0]
    data = np.moveaxis(p.numpy(), 0, -1).astype(np.float32)
    header = img.header.copy()
    header.set_data_dtype(np.float32)
    nii = nib.Nifti1Image(data, img.affine, header=header)
    nii.header.set_slope_inter(1.0, 0.0)
    return atomic_write_bytes(out, gzip.compress(nii.to_bytes(), mtime=0))


def run_pipeline(
    predict: Callable[[torch.Tensor], torch.Tensor],
    in_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    seg_type: str = "fractional",
    size: int | None = 128,
    reader: Reader | None = None,
) -> list[Path]:
    """Segment every DICOM series (one SEG each, ``seg_NNN.dcm``) and every 2D NIfTI file (same name) under ``in_dir``.

    Args:
        predict: ``(1, 1, h, w)`` images -> probabilities ``(1, K, h, w)`` (e.g. a ``ModelQuery``).
        in_dir: the folder to read.
        out_dir: where the SEGs (NIfTI probabilities) go.
        seg_type: ``"fractional"`` or ``"binary"``.
        size: the model's grid, for the default reader.
        reader: how a slice becomes the model's input; default :func:`default_reader` at ``size``.

    Returns:
        the files written to ``out_dir``.
    """
    out = Path(out_dir)
    reader = reader or default_reader(size)
    written = []
    for i, files in enumerate(find_series(in_dir)):
        written.append(atomic_write_bytes(out / f"seg_{i:03d}.dcm", segment_series(predict, files, reader, seg_type)))
    for f in sorted(p for p in Path(in_dir).rglob("*") if p.is_file() and is_nifti(p)):
        written.append(write_nifti_probabilities(predict, f, out / f.name, reader))
    if not written:
        raise FileNotFoundError(f"no DICOM series or NIfTI files under {str(in_dir)!r}.")
    return written


def run_bundle_pipeline(
    network: torch.nn.Module,
    checkpoint: str | os.PathLike,
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    preprocessing: Callable | None = None,
    inferer: Callable | None = None,
    seg_type: str = "fractional",
    activation: str = "softmax",
    device: str | torch.device | None = None,
) -> list[Path]:
    """The reference pipeline inside a bundle's own ``inference.json``, merged with ``bundles/stealthmark_pipeline.json``:
    the bundle's network with its trained checkpoint, preprocessing and inferer segments every series under
    ``input_dir`` into DICOM SEGs under ``output_dir`` (see :func:`run_pipeline`)."""
    from monai_stealthmark.bundle import checkpoint_state_dict
    from monai_stealthmark.verify import ModelQuery

    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"bundle checkpoint {str(path)!r} does not exist.")
    network.load_state_dict(checkpoint_state_dict(path, next(network.parameters()).device))
    query = ModelQuery(network.eval(), activation=activation, device=device, inferer=inferer)
    return run_pipeline(query, input_dir, output_dir, seg_type, reader=bundle_reader(preprocessing) if preprocessing is not None else None)


def _predictor(a: argparse.Namespace) -> tuple[Callable[[torch.Tensor], torch.Tensor], Reader | None]:
    """The model named by --model (TorchScript) or --bundle as ``images -> probabilities``, and how it reads a
    slice: a bundle's own inference preprocessing when it has one, else the default reader."""
    from monai_stealthmark.verify import ModelQuery

    if a.bundle:
        from monai_stealthmark.bundle import load_bundle_model

        net, inferer, preprocessing = load_bundle_model(a.bundle, device=a.device)
        query = ModelQuery(net, activation=a.activation, device=a.device, inferer=inferer)
        return query, bundle_reader(preprocessing) if preprocessing is not None else None
    return ModelQuery(a.model, activation=a.activation, device=a.device), None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="monai_stealthmark.pipeline", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="TorchScript file of the model")
    src.add_argument("--bundle", help="MONAI bundle folder (configs/inference.json + models/model.pt)")
    p.add_argument("--in", dest="in_dir", required=True, help="folder of DICOM series (or 2D NIfTI files)")
    p.add_argument("--out", required=True, help="folder for the SEGs (NIfTI probabilities for NIfTI inputs)")
    p.add_argument("--seg-type", default="fractional", choices=SEG_TYPES)
    p.add_argument("--size", type=int, default=128, help="the model's grid (0: each slice's own size)")
    p.add_argument("--activation", default="softmax", choices=("softmax", "sigmoid"))
    p.add_argument("--device", default=None)
    a = p.parse_args(argv)
    try:
        predict, reader = _predictor(a)
        written = run_pipeline(predict, a.in_dir, a.out, a.seg_type, a.size or None, reader)
    except Exception as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(f"{len(written)} file(s) written to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
