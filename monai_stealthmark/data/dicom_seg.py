"""DICOM series + DICOM-SEG labels through MONAI's ``LoadImage(PydicomReader)``, aligned on the image grid.

A DICOM-SEG object stores its frames in its own order (dcmqi writes them by increasing patient z, while a CT
series may come out of ``PydicomReader`` with decreasing z). :class:`LoadDicomSegd` reads the SEG with
``PydicomReader(label_dict=...)``, checks that it references the image series, and resamples it onto the image
grid with ``ResampleToMatch`` (nearest neighbour, i.e. an exact reindexing when the grids coincide).
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import pydicom
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor, PydicomReader
from monai.transforms import EnsureChannelFirst, LoadImage, MapTransform, ResampleToMatch

from .sunnybrook import DataFileError, read_error

__all__ = ["LoadDicomSegd", "load_dicom_series", "dicom_seg_segments"]

SERIES_REGEX = r".*\.dcm$"


def _referenced_uids(seg: pydicom.Dataset) -> set[str]:
    uids = set()
    for f in getattr(seg, "PerFrameFunctionalGroupsSequence", []):
        for d in getattr(f, "DerivationImageSequence", []):
            for s in getattr(d, "SourceImageSequence", []):
                uids.add(str(s.ReferencedSOPInstanceUID))
    for s in getattr(seg, "ReferencedSeriesSequence", []):
        for r in getattr(s, "ReferencedInstanceSequence", []):
            uids.add(str(r.ReferencedSOPInstanceUID))
    return uids


def dicom_seg_segments(seg_file: str | os.PathLike) -> dict[str, int]:
    """``{segment label: channel index}`` of a DICOM-SEG file, in segment-number order (for ``label_dict``)."""
    try:
        ds = pydicom.dcmread(str(seg_file), stop_before_pixels=True)
    except Exception as e:
        raise DataFileError(f"cannot read DICOM-SEG {str(seg_file)!r}: {type(e).__name__}: {e}") from e
    if "SegmentSequence" not in ds:
        raise DataFileError(f"{str(seg_file)!r} is not a DICOM Segmentation object (no SegmentSequence).")
    segs = sorted(ds.SegmentSequence, key=lambda s: int(s.SegmentNumber))
    return {str(getattr(s, "SegmentLabel", f"label_{int(s.SegmentNumber)}")): i for i, s in enumerate(segs)}


def load_dicom_series(series: str | os.PathLike, fname_regex: str = SERIES_REGEX) -> MetaTensor:
    """A DICOM series folder as a channel-first ``MetaTensor`` via ``LoadImage(PydicomReader)``.

    Args:
        series: the folder of the series' slices.
        fname_regex: which files of the folder belong to the series (e.g. ``r".*/\\d+\\.dcm$"`` when a SEG file
            lies in the same folder).
    """
    try:
        return LoadImage(reader=PydicomReader(fname_regex=fname_regex), image_only=True, ensure_channel_first=True)(str(series))
    except Exception as e:
        raise read_error(series, e, "DICOM series") from e


class LoadDicomSegd(MapTransform):
    """Replace the DICOM-SEG path in ``keys`` by its label map on the grid of the already loaded ``image_key``.

    The output is ``(1, spatial...)`` with values ``0`` (background) and ``i + 1`` for the segment in channel
    ``i`` of ``label_dict`` (overlaps: the later segment wins).

    Args:
        keys: fields holding DICOM-SEG file paths.
        image_key: the loaded image (a channel-first ``MetaTensor`` with its affine).
        label_dict: ``{segment label: channel}``; None reads it from the file (all segments).
        check_references: fail when the SEG does not reference the image's SOP instances (needs the image's
                source files or folder in its metadata ``filename_or_obj``).
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        image_key: str = "image",
        label_dict: dict[str, int] | None = None,
        check_references: bool = True,
    ) -> None:
        super().__init__(keys)
        self.image_key = image_key
        self.label_dict = label_dict
        self.check_references = check_references

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d[self.image_key]
        if not isinstance(image, MetaTensor):
            raise TypeError(f"LoadDicomSegd needs {self.image_key!r} loaded as a MetaTensor (with its affine).")
        for k in self.keys:
            path = str(d[k])
            label_dict = self.label_dict or dicom_seg_segments(path)
            if self.check_references:
                self._check(path, image)
            try:
                seg = LoadImage(reader=PydicomReader(label_dict=label_dict), image_only=True)(path)
            except Exception as e:
                raise DataFileError(f"cannot read DICOM-SEG {path!r}: {type(e).__name__}: {e}") from e
            seg = EnsureChannelFirst(channel_dim=-1)(seg)  # (n_segments, spatial...)
            seg = ResampleToMatch(mode="nearest", padding_mode="zeros")(seg, img_dst=image)
            index = torch.zeros_like(seg[:1])
            for i in range(seg.shape[0]):
                index = torch.where(seg[i : i + 1] > 0.5, torch.as_tensor(i + 1, dtype=index.dtype), index)
            d[k] = index
        return d

    @staticmethod
    def _check(path: str, image: MetaTensor) -> None:
        files = image.meta.get("filename_or_obj")
        if files is None:
            return
        files = [str(f) for f in (files if isinstance(files, (list, tuple)) else [files])]
        files = [os.path.join(f, n) for f in files if os.path.isdir(f) for n in sorted(os.listdir(f))] + [f for f in files if os.path.isfile(f)]
        uids = set()
        for f in files:
            if os.path.isfile(f) and pydicom.misc.is_dicom(f):
                uids.add(str(pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID))
        if not uids:
            return
        try:
            refs = _referenced_uids(pydicom.dcmread(path, stop_before_pixels=True))
        except Exception as e:
            raise DataFileError(f"cannot read DICOM-SEG {path!r}: {type(e).__name__}: {e}") from e
        if refs and not (refs & uids):
            raise DataFileError(f"DICOM-SEG {path!r} references none of the {len(uids)} images of the loaded series.")
        if np.any([r not in uids for r in refs]):
            missing = len([r for r in refs if r not in uids])
            raise DataFileError(f"DICOM-SEG {path!r} references {missing} image(s) that are not in the loaded series.")
