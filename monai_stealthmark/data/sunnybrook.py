"""Sunnybrook cardiac cine MR (DICOM + expert contours): datalist, contour masks and a cached 2D pipeline."""

from __future__ import annotations

import csv
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import PydicomReader
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Resized,
    ScaleIntensityRangePercentilesd,
)
from PIL import Image, ImageDraw

__all__ = [
    "DataFileError",
    "read_error",
    "sunnybrook_datalist",
    "contour_mask",
    "LoadSunnybrookContourd",
    "SafeLoadImaged",
    "sunnybrook_transforms",
    "load_sunnybrook",
    "split_by_patient",
    "DEFAULT_SUNNYBROOK_ROOT",
]

# the Sunnybrook slices shipped with the source checkout (``data/sunnybrook``, CC0); pass ``root`` elsewhere
DEFAULT_SUNNYBROOK_ROOT = Path(__file__).resolve().parents[2] / "data" / "sunnybrook"


class DataFileError(ValueError):
    """A data file is missing, unreadable or corrupt (the message names the file)."""


def read_error(path: Any, error: BaseException, what: str = "") -> DataFileError:
    """A :class:`DataFileError` that says why ``path`` could not be read, for an error raised while loading it.

    MONAI's ``LoadImage`` reports an unreadable DICOM as "cannot find a suitable reader ... install the reader
    libraries" and ``Compose`` wraps the cause in ``RuntimeError("applying transform ...")``; this names the
    real problem: a missing path, a file without the DICOM preamble (corrupt or not DICOM), or the innermost
    error.

    Args:
        path: the file or folder that was being read.
        error: the exception raised while reading it.
        what: a word for the kind of data in the message (e.g. ``"image"``, ``"DICOM series"``).
    """
    label = f"{what} {str(path)!r}" if what else repr(str(path))
    f = Path(str(path))
    if not f.exists():
        return DataFileError(f"cannot read {label}: no such file or folder.")
    if f.is_file() and f.suffix.lower() in (".dcm", ".dicom", ""):
        import pydicom

        if f.stat().st_size == 0:
            return DataFileError(f"cannot read {label}: the file is empty.")
        if not pydicom.misc.is_dicom(str(f)):
            return DataFileError(
                f"cannot read {label}: not a DICOM file (no 'DICM' marker after the 128-byte preamble) - corrupt, "
                "truncated or another format."
            )
    cause: BaseException = error
    while cause.__cause__ is not None:  # the innermost error says what went wrong
        cause = cause.__cause__
    return DataFileError(f"cannot read {label}: {type(cause).__name__}: {cause}")


def sunnybrook_datalist(root: str | os.PathLike = DEFAULT_SUNNYBROOK_ROOT, myocardium: bool = False) -> list[dict]:
    """One dict per contoured slice: ``image`` (DICOM path), ``icontour`` / ``ocontour`` (paths), ``patient``.

    Args:
        root: the ``sunnybrook`` folder (``dicoms/``, ``contourfiles/``, ``link.csv``).
        myocardium: also list the epicardial contour where one exists (label 2 = myocardium).
    """
    root = Path(root)
    link = root / "link.csv"
    if not link.is_file():
        raise DataFileError(
            f"{str(link)!r} not found: is {str(root)!r} the Sunnybrook folder (dicoms/, contourfiles/, link.csv)? "
            "A source checkout ships it as data/sunnybrook; elsewhere pass its folder (--data DIR on the commands)."
        )
    items = []
    with open(link, newline="") as f:
        for row in csv.DictReader(f):
            pid, oid = row["patient_id"], row["original_id"]
            for cf in sorted((root / "contourfiles" / oid / "i-contours").glob("IM-0001-*-icontour-manual.txt")):
                n = int(cf.name.split("-")[2])
                dcm = root / "dicoms" / pid / f"{n}.dcm"
                if not dcm.is_file():
                    raise DataFileError(f"contour {str(cf)!r} has no image: {str(dcm)!r} is missing.")
                item = {"image": str(dcm), "icontour": str(cf), "patient": pid, "slice": n}
                oc = cf.parent.parent / "o-contours" / cf.name.replace("icontour", "ocontour")
                if myocardium and oc.is_file():
                    item["ocontour"] = str(oc)
                items.append(item)
    if not items:
        raise DataFileError(f"no contoured slices found under {str(root)!r}.")
    return items


def _read_polygon(path: str) -> list[tuple[float, float]]:
    try:
        pts = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except (OSError, ValueError) as e:
        raise DataFileError(f"contour file {path!r} is unreadable: {e}") from e
    if pts.shape[1] != 2 or len(pts) < 3:
        raise DataFileError(f"contour file {path!r} must hold >= 3 lines of 'x y', got shape {pts.shape}.")
    return [tuple(p) for p in pts]


def contour_mask(path: str, shape_xy: tuple[int, int]) -> np.ndarray:
    """Fill a closed ``x y`` polygon into a boolean mask indexed ``[x, y]`` (MONAI's PydicomReader orientation)."""
    w, h = shape_xy  # x extent, y extent
    img = Image.new("L", (w, h), 0)
    ImageDraw.Draw(img).polygon(_read_polygon(path), outline=1, fill=1)
    return np.asarray(img, dtype=bool).T  # PIL is [y, x]


class LoadSunnybrookContourd(MapTransform):
    """Build the label from the contour files: 1 = LV cavity (i-contour), 2 = myocardium (o-contour minus cavity).

    Runs after the image was loaded (it takes the spatial shape from ``image_key``) and writes ``(1, X, Y)``.

    Args:
        keys: the key to write the label to.
        image_key: the loaded image (channel-first).
    """

    def __init__(self, keys: KeysCollection = "label", image_key: str = "image") -> None:
        super().__init__(keys)
        self.image_key = image_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        shape = tuple(int(s) for s in d[self.image_key].shape[-2:])
        lab = contour_mask(d["icontour"], shape).astype(np.uint8)
        if "ocontour" in d:
            lab = np.where(contour_mask(d["ocontour"], shape) & (lab == 0), 2, lab).astype(np.uint8)
        for k in self.keys:
            d[k] = lab[None]
        return d


class SafeLoadImaged(LoadImaged):
    """MONAI's ``LoadImaged`` whose errors name the file that could not be read (e.g. a corrupt DICOM)."""

    def __call__(self, data, reader=None):
        try:
            return super().__call__(data, reader)
        except Exception as e:  # MONAI wraps reader errors in RuntimeError/OSError with little context
            names = [data.get(k) for k in self.keys if k in data]
            raise read_error(names[0] if len(names) == 1 else ", ".join(map(str, names)), e) from e


def sunnybrook_transforms(size: int = 128) -> Compose:
    """Deterministic preprocessing: DICOM via PydicomReader, contour label, 1-99.5 percentile scaling, resize."""
    return Compose(
        [
            SafeLoadImaged(keys="image", reader=PydicomReader(), image_only=True),
            EnsureChannelFirstd(keys="image", channel_dim="no_channel"),
            LoadSunnybrookContourd(keys="label", image_key="image"),
            ScaleIntensityRangePercentilesd(keys="image", lower=1, upper=99.5, b_min=0.0, b_max=1.0, clip=True),
            Resized(keys="image", spatial_size=(size, size), mode="bilinear", anti_aliasing=True),
            Resized(keys="label", spatial_size=(size, size), mode="nearest"),
            EnsureTyped(keys=("image", "label"), dtype=torch.float32, track_meta=False),
        ]
    )


def load_sunnybrook(
    root: str | os.PathLike = DEFAULT_SUNNYBROOK_ROOT,
    size: int = 128,
    patients: Sequence[str] | None = None,
    myocardium: bool = False,
) -> list[dict]:
    """Load and preprocess the Sunnybrook slices into memory (96 slices, a few seconds).

    Args:
        root: the ``sunnybrook`` folder.
        size: output side in pixels.
        patients: keep only these patient ids (``SCD0000101`` ...); all when None.
        myocardium: label the myocardium as class 2 where an epicardial contour exists.

    Returns:
        dicts with ``image`` ``(1, size, size)`` float in [0, 1], ``label`` ``(1, size, size)`` float,
        ``patient`` and ``slice``.
    """
    items = sunnybrook_datalist(root, myocardium)
    if patients is not None:
        unknown = set(patients) - {i["patient"] for i in items}
        if unknown:
            raise ValueError(f"unknown Sunnybrook patient(s) {sorted(unknown)}.")
        items = [i for i in items if i["patient"] in set(patients)]
    xf = sunnybrook_transforms(size)
    out = []
    for it in items:
        try:
            d = xf(it)
        except Exception as e:  # Compose wraps errors in RuntimeError: surface the one that names the file
            cause: BaseException = e
            while cause.__cause__ is not None and not isinstance(cause, DataFileError):
                cause = cause.__cause__
            if isinstance(cause, DataFileError):
                raise cause from e
            raise DataFileError(f"cannot load slice {it['image']!r} (contour {it['icontour']!r}): {e}") from e
        out.append({"image": d["image"], "label": d["label"], "patient": it["patient"], "slice": it["slice"]})
    return out


def split_by_patient(samples: Sequence[dict], test_patients: Sequence[str]) -> tuple[list[dict], list[dict]]:
    """Split samples so that no patient is in both parts (slices of one patient are strongly correlated)."""
    test = set(test_patients)
    train = [s for s in samples if s["patient"] not in test]
    held = [s for s in samples if s["patient"] in test]
    if not held:
        raise ValueError(
            f"no sample of the held-out patient(s) {sorted(test)}; the data has {sorted({s['patient'] for s in samples})}."
        )
    return train, held
