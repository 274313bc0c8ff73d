from __future__ import annotations

import os
import shutil
import tempfile
import unittest
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from monai.data import PydicomReader

from monai_stealthmark.data import (
    DEFAULT_SUNNYBROOK_ROOT,
    DataFileError,
    SafeLoadImaged,
    contour_mask,
    load_dicom_series,
    load_sunnybrook,
    split_by_patient,
    sunnybrook_datalist,
    sunnybrook_transforms,
)

HAVE_DATA = Path(DEFAULT_SUNNYBROOK_ROOT, "link.csv").is_file()


@unittest.skipUnless(HAVE_DATA, f"Sunnybrook data not found at {DEFAULT_SUNNYBROOK_ROOT}")
class TestSunnybrook(unittest.TestCase):
    def test_datalist(self):
        items = sunnybrook_datalist()
        self.assertEqual(len(items), 96)
        counts = {}
        for it in items:
            counts[it["patient"]] = counts.get(it["patient"], 0) + 1
        self.assertEqual(sorted(counts.values()), [18, 18, 18, 20, 22])

    def test_mask_follows_contour(self):
        it = sunnybrook_datalist()[0]
        d = sunnybrook_transforms(size=256)(it)
        lab = np.asarray(d["label"][0])
        pts = np.loadtxt(it["icontour"])
        cx, cy = pts.mean(0)
        self.assertEqual(lab[int(round(cx)), int(round(cy))], 1)  # [x, y] orientation, as PydicomReader loads
        self.assertEqual(lab[0, 0], 0)
        # the LV is brighter (blood pool) than the image on average
        img = np.asarray(d["image"][0])
        self.assertGreater(img[lab > 0].mean(), img.mean())

    def test_load_and_split(self):
        s = load_sunnybrook(size=64, patients=["SCD0000101", "SCD0000501"])
        self.assertEqual(len(s), 40)
        self.assertEqual(tuple(s[0]["image"].shape), (1, 64, 64))
        self.assertTrue(0.0 <= float(s[0]["image"].min()) and float(s[0]["image"].max()) <= 1.0)
        train, test = split_by_patient(s, ["SCD0000501"])
        self.assertEqual({x["patient"] for x in test}, {"SCD0000501"})
        self.assertNotIn("SCD0000501", {x["patient"] for x in train})
        with self.assertRaisesRegex(ValueError, r"SCD0000999.*the data has \['SCD0000101'"):
            split_by_patient(s, ["SCD0000999"])  # a mistyped patient id: the message lists the real ones

    def test_myocardium_label(self):
        s = load_sunnybrook(size=64, patients=["SCD0000101"], myocardium=True)
        self.assertTrue(any((x["label"] == 2).any() for x in s))

    def test_corrupt_dicom_named(self):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "sb"
            shutil.copytree(DEFAULT_SUNNYBROOK_ROOT, root)
            victim = root / "dicoms" / "SCD0000101" / "48.dcm"
            victim.write_bytes(b"not a dicom" * 10)
            with self.assertRaisesRegex(DataFileError, "48.dcm.*not a DICOM file"):
                load_sunnybrook(root, size=64, patients=["SCD0000101"])
            data = (root / "dicoms" / "SCD0000101" / "59.dcm").read_bytes()
            (root / "dicoms" / "SCD0000101" / "59.dcm").write_bytes(data[: len(data) // 2])  # truncated pixel data
            with self.assertRaisesRegex(DataFileError, "59.dcm.*pixel data"):
                SafeLoadImaged(keys="image", reader=PydicomReader())({"image": str(root / "dicoms" / "SCD0000101" / "59.dcm")})
            with self.assertRaisesRegex(DataFileError, "no such file"):
                load_dicom_series(root / "missing_series")
            os.remove(root / "link.csv")
            with self.assertRaisesRegex(DataFileError, "link.csv"):
                sunnybrook_datalist(root)

    def test_bad_contour(self):
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.write("1 2\n")
        try:
            with self.assertRaisesRegex(DataFileError, "contour file"):
                contour_mask(f.name, (10, 10))
        finally:
            os.unlink(f.name)


if __name__ == "__main__":
    unittest.main()


# the DICOM-SEG reference data: shipped in data/ or in the shared data folder beside the repository
_DCMQI_PLACES = (
    DEFAULT_SUNNYBROOK_ROOT.parent / "dcmqi-ct",
    Path(__file__).resolve().parents[2] / "shared" / "data" / "dcmqi-ct",
)
DCMQI = next((d for d in _DCMQI_PLACES if d.is_dir()), _DCMQI_PLACES[0])


@pytest.mark.skipif(not DCMQI.is_dir(), reason="needs ../shared/data/dcmqi-ct")
def test_dicom_seg_labels_match_the_nrrd_label_map(tmp_path):
    from monai.data import NrrdReader
    from monai.transforms import LoadImage, ResampleToMatch

    from monai_stealthmark.data import LoadDicomSegd, dicom_seg_segments, load_dicom_series

    image = load_dicom_series(DCMQI, fname_regex=r".*/\d+\.dcm$")
    assert tuple(image.shape) == (1, 512, 512, 3)
    assert dicom_seg_segments(DCMQI / "liver.dcm") == {"Liver": 0}
    label = LoadDicomSegd(keys="label")({"image": image, "label": str(DCMQI / "liver.dcm")})["label"]
    assert tuple(label.shape) == (1, 512, 512, 3) and set(label.unique().tolist()) == {0.0, 1.0}
    nrrd = LoadImage(reader=NrrdReader(), image_only=True, ensure_channel_first=True)(str(DCMQI / "liver_seg.nrrd"))
    assert torch.equal(label.as_tensor(), ResampleToMatch(mode="nearest")(nrrd, img_dst=image).as_tensor())
    # the series comes out with decreasing z and the SEG/NRRD with increasing z: the alignment really reorders
    per_slice = [int(label[0, ..., k].sum()) for k in range(3)]
    assert per_slice == [int(nrrd[0, ..., k].sum()) for k in range(3)][::-1] and len(set(per_slice)) == 3
    # a SEG checked against another series is refused, naming the file
    other = tmp_path / "other"
    other.mkdir()
    src = pydicom.dcmread(DCMQI / "01.dcm")
    src.SOPInstanceUID = "1.2.3.4.5"
    src.save_as(other / "1.dcm")
    wrong = load_dicom_series(other)
    with pytest.raises(DataFileError, match="liver.dcm"):
        LoadDicomSegd(keys="label")({"image": wrong, "label": str(DCMQI / "liver.dcm")})
    with pytest.raises(DataFileError, match="not a DICOM Segmentation"):
        dicom_seg_segments(DCMQI / "01.dcm")
