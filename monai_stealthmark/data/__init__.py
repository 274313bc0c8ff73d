"""Data: the Sunnybrook cardiac MR loader (DICOM via MONAI's PydicomReader + contour masks)."""

from __future__ import annotations

from .dicom_seg import LoadDicomSegd, dicom_seg_segments, load_dicom_series
from .sunnybrook import (
    DEFAULT_SUNNYBROOK_ROOT,
    DataFileError,
    LoadSunnybrookContourd,
    SafeLoadImaged,
    contour_mask,
    load_sunnybrook,
    read_error,
    split_by_patient,
    sunnybrook_datalist,
    sunnybrook_transforms,
)
