"""Offline verification through a pipeline's files (DICOM queries out, DICOM SEG back) and the referee mode, on the
shipped Sunnybrook DICOMs with test doubles of a watermarked and a clean network."""

from __future__ import annotations

import io
import json
import shutil
import tempfile
import unittest
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import torch
from helpers import KEY, CleanOracle, TriggerOracle
from monai.networks.nets import UNet
from parameterized import parameterized

from monai_stealthmark.__main__ import load_images, main
from monai_stealthmark.bundle import bundle_parser
from monai_stealthmark.key import WatermarkKey
from monai_stealthmark.pipeline import main as pipeline_main
from monai_stealthmark.pipeline import run_pipeline
from monai_stealthmark.verify import Commitment, ModelQuery, trigger_batch
from monai_stealthmark.verify.offline import MANIFEST_NAME, image_preprocessing
from monai_stealthmark.verify.report import file_sha256

SLICES = sorted(Path("data/sunnybrook/dicoms/SCD0000501").glob("*.dcm"))[:4]
OTHER_SLICE = sorted(Path("data/sunnybrook/dicoms/SCD0000401").glob("*.dcm"))[0]
SIZE = 128
COMMITTED, SUSPECT_DATE = "2026-01-01T00:00:00+00:00", "2026-06-01"


def run_cli(*args: str) -> tuple[int, str]:
    """Exit code and stderr of one ``monai_stealthmark`` CLI call."""
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        code = main([str(a) for a in args])
    return code, err.getvalue()


def clean_torchscript(path: Path) -> Path:
    """A small clean network (seeded 3x3 convolution, two-class logits) exported to TorchScript."""
    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 2, 3, padding=1).eval()
    torch.jit.trace(net, torch.rand(1, 1, SIZE, SIZE)).save(str(path))
    return path


class TestOfflineVerify(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        d = cls.d = Path(cls.tmp.name)
        KEY.save(d / "key.json")
        Commitment.for_key(KEY, COMMITTED).save(d / "key.commitment.json")
        code, err = run_cli("verify", "--key", d / "key.json", "--images", *SLICES, "--write-queries", d / "q", "--size", SIZE)
        assert code == 0, err
        run_pipeline(ModelQuery(TriggerOracle(KEY), device="cpu"), d / "q", d / "wm")

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def verify(self, answers: Path, out: str, *extra: str, manifest: Path | None = None, key: str = "key.json", images=SLICES) -> tuple[int, str]:
        d = self.d
        return run_cli(
            "verify", "--key", d / key, "--images", *images, "--answers", answers, "--manifest", manifest or d / "q" / MANIFEST_NAME,
            "--out", d / out, "--quiet", *extra,
        )

    def copy_queries(self, name: str) -> Path:
        """A copy of the written queries and their manifest, to edit."""
        return Path(shutil.copytree(self.d / "q", self.d / name))

    def test_query_reproduces_the_triggered_image_and_keeps_the_field_of_view(self):
        manifest = json.loads((self.d / "q" / MANIFEST_NAME).read_text())
        triggered = trigger_batch(load_images([str(f) for f in SLICES], SIZE, resize_first=True), KEY)
        studies = set()
        for q, clean, x in zip(manifest["queries"], SLICES, triggered):
            path = self.d / "q" / q["query_file"]
            back = torch.as_tensor(image_preprocessing(path, SIZE, resize_first=True)(str(path)))[:1]
            self.assertLess(float((back - x).abs().max()), 0.005)  # integer rounding and the pipeline's rescaling
            src, ds = pydicom.dcmread(str(clean)), pydicom.dcmread(str(path))
            self.assertEqual((ds.Rows, ds.Columns), (SIZE, SIZE))
            for uid in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
                self.assertNotEqual(ds[uid].value, src[uid].value)
            self.assertEqual((ds.PatientID, ds.FrameOfReferenceUID, ds.SeriesNumber), (src.PatientID, src.FrameOfReferenceUID, src.SeriesNumber))
            np.testing.assert_allclose([float(v) for v in ds.PixelSpacing], [float(v) * src.Rows / SIZE for v in src.PixelSpacing])
            np.testing.assert_allclose(self.centre(ds), self.centre(src), atol=1e-3)
            studies.add(ds.StudyInstanceUID)
        self.assertEqual(len(studies), 1)  # one original study -> one query study, one series per query
        self.assertEqual(len({q["series_uid"] for q in manifest["queries"]}), len(SLICES))

    @staticmethod
    def centre(ds: pydicom.Dataset) -> np.ndarray:
        """The field of view's centre in patient coordinates."""
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        sr, sc = (float(v) for v in ds.PixelSpacing)
        return np.asarray([float(v) for v in ds.ImagePositionPatient]) + iop[:3] * sc * (ds.Columns - 1) / 2 + iop[3:] * sr * (ds.Rows - 1) / 2

    def answers_for(self, name: str, seg_type: str) -> Path:
        """The pipeline's SEGs of the queries: the watermarked double in-process, or the pipeline's command line with
        a clean TorchScript model or a clean bundle (the Sunnybrook bundle's configs, untrained UNet weights) through
        the pipeline's command line or its own inference.json merged with bundles/stealthmark_pipeline.json."""
        d = self.d
        if name == "watermarked":
            return d / "wm"
        answers = d / f"a_{name}"
        if name == "binary_seg":  # a pipeline that writes hard masks only, the watermarked double behind it
            run_pipeline(ModelQuery(TriggerOracle(KEY), device="cpu"), d / "q", answers, seg_type="binary")
            return answers
        if name == "clean_torchscript":
            model = ["--model", str(clean_torchscript(d / "clean.ts"))]
        else:
            bundle = d / name
            shutil.copytree(Path("bundles/sunnybrook_lv_2d/configs"), bundle / "configs")
            (bundle / "models").mkdir()
            torch.manual_seed(0)
            torch.save(UNet(2, 1, 2, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2).state_dict(), bundle / "models" / "model.pt")
            model = ["--bundle", str(bundle), "--device", "cpu"]
        if name == "clean_bundle_config":  # the bundle's own inference.json with bundles/stealthmark_pipeline.json
            parser = bundle_parser(bundle, ["inference.json", str(Path("bundles/stealthmark_pipeline.json").resolve())], bundle)
            parser["pipeline#input_dir"], parser["pipeline#output_dir"], parser["device"] = str(d / "q"), str(answers), "cpu"
            parser.get_parsed_content("run")
            return answers
        with redirect_stdout(io.StringIO()):
            self.assertEqual(pipeline_main([*model, "--in", str(d / "q"), "--out", str(answers), "--seg-type", seg_type]), 0)
        return answers

    @parameterized.expand(
        [("watermarked", "fractional", 0), ("clean_torchscript", "fractional", 1), ("clean_bundle", "fractional", 1),
         ("clean_bundle_config", "fractional", 1), ("binary_seg", "binary", 2)]
    )
    def test_round_trip_exit_codes(self, name, seg_type, expected):
        d = self.d
        answers = self.answers_for(name, seg_type)
        kinds = {pydicom.dcmread(str(f), stop_before_pixels=True).SegmentationType for f in answers.glob("*.dcm")}
        self.assertEqual(kinds, {seg_type.upper()})
        code, err = self.verify(answers, f"r_{name}")
        self.assertEqual(code, expected, err)
        if expected == 2:
            self.assertIn("BINARY", err)
            self.assertFalse((d / f"r_{name}").exists())
            return
        report = json.loads((d / f"r_{name}" / "report.json").read_text())
        self.assertEqual(report["asr"], 1.0 if expected == 0 else 0.0)
        prov = report["provenance"]
        self.assertEqual(prov["key_file_sha256"], file_sha256(d / "key.json"))
        self.assertEqual(prov["images_sha256"], [file_sha256(f) for f in SLICES])
        self.assertEqual(prov["answers_sha256"], [file_sha256(answers / f) for f in prov["answer_files"]])
        self.assertEqual(prov["query_files_checked"], len(SLICES))

    def test_the_pipeline_clean_model_answers_probabilities_not_masks(self):
        """The clean double's SEG is FRACTIONAL and soft: exit 1 is the verdict, not a refusal."""
        d = self.d
        run_pipeline(ModelQuery(CleanOracle(), device="cpu"), d / "q", d / "clean")
        code, err = self.verify(d / "clean", "r_clean")
        self.assertEqual(code, 1, err)

    def edit_query_file(self, q: Path) -> None:
        path = q / "query_001" / "query_001.dcm"
        ds = pydicom.dcmread(str(path))
        px = ds.pixel_array.copy()
        px[-12:, -12:] = px.max()  # a hand-drawn patch where the trigger is
        ds.PixelData = px.tobytes()
        ds.save_as(str(path))

    def edit_manifest_hashes(self, q: Path) -> None:
        m = json.loads((q / MANIFEST_NAME).read_text())
        m["queries"][0]["query_pixels_sha256"] = m["queries"][1]["query_pixels_sha256"]
        (q / MANIFEST_NAME).write_text(json.dumps(m))

    def other_keys_queries(self, q: Path) -> None:
        """Queries stamped by another key's trigger, their manifest relabelled with the owner's fingerprint: the
        hand-made queries of a false claim."""
        other = WatermarkKey.generate(KEY.payload, seed=KEY.trigger_seed + 1)
        other.save(self.d / "other.json")
        shutil.rmtree(q)
        self.assertEqual(run_cli("verify", "--key", self.d / "other.json", "--images", *SLICES, "--write-queries", q)[0], 0)
        m = json.loads((q / MANIFEST_NAME).read_text())
        m["key_fingerprint"] = KEY.fingerprint
        (q / MANIFEST_NAME).write_text(json.dumps(m))

    @parameterized.expand(
        [
            ("edited_query", "edit_query_file", "edited after it was written"),
            ("edited_manifest", "edit_manifest_hashes", "is not the key's trigger"),
            ("hand_made_queries", "other_keys_queries", "is not the key's trigger"),
        ]
    )
    def test_queries_not_derived_from_the_key_are_refused(self, name, edit, message):
        q = self.copy_queries(f"q_{name}")
        getattr(self, edit)(q)
        code, err = self.verify(self.d / "wm", f"r_{name}", manifest=q / MANIFEST_NAME)
        self.assertEqual(code, 2)
        self.assertIn(message, err)
        self.assertFalse((self.d / f"r_{name}").exists())

    @parameterized.expand([("missing_answer",), ("wrong_references",), ("other_clean_images",), ("other_key",)])
    def test_mismatches_exit_2(self, name):
        d = self.d
        answers, images, key = d / "wm", list(SLICES), "key.json"
        if name == "missing_answer":
            answers = Path(shutil.copytree(d / "wm", d / "wm_missing"))
            next(iter(sorted(answers.glob("*.dcm")))).unlink()
            message = "no answer"
        elif name == "wrong_references":  # answers to another run's queries: other UIDs
            self.assertEqual(run_cli("verify", "--key", d / "key.json", "--images", *SLICES, "--write-queries", d / "q_again")[0], 0)
            answers = d / "wm_again"
            run_pipeline(ModelQuery(TriggerOracle(KEY), device="cpu"), d / "q_again", answers)
            message = "not one of the manifest's queries"
        elif name == "other_clean_images":
            images[-1] = OTHER_SLICE
            message = "not among --images"
        else:
            WatermarkKey.generate(KEY.payload, seed=KEY.trigger_seed + 2).save(d / "other2.json")
            key, message = "other2.json", "another key"
        code, err = self.verify(answers, f"r_{name}", key=key, images=images)
        self.assertEqual(code, 2)
        self.assertIn(message, err)

    def test_referee_reproduces_the_owners_verdict(self):
        d = self.d
        dated = ("--commitment", d / "key.commitment.json", "--suspect-date", SUSPECT_DATE)
        self.assertEqual(self.verify(d / "wm", "owner", *dated)[0], 0)
        # the referee: the revealed key (a copy), its own run from the clean images, the owner's report to reproduce
        shutil.copy(d / "key.json", d / "revealed.json")
        code, err = self.verify(d / "wm", "referee", *dated, "--referee", "--reproduce", d / "owner" / "report.json", key="revealed.json")
        self.assertEqual(code, 0, err)
        owner, referee = (json.loads((d / r / "report.json").read_text()) for r in ("owner", "referee"))
        self.assertTrue(referee["provenance"]["referee"])
        for k in ("verdict", "asr", "p_value", "decoded"):
            self.assertEqual(owner[k], referee[k])
        # a clean model's answers do not reproduce the owner's claim
        run_pipeline(ModelQuery(CleanOracle(), device="cpu"), d / "q", d / "clean_ref")
        code, err = self.verify(d / "clean_ref", "referee_clean", *dated, "--referee", "--reproduce", d / "owner" / "report.json")
        self.assertEqual(code, 2)
        self.assertIn("does not reproduce", err)

    @parameterized.expand([("other_key", "does not match the commitment"), ("no_date", "--suspect-date")])
    def test_referee_preconditions(self, name, message):
        d = self.d
        WatermarkKey.generate(KEY.payload, seed=KEY.trigger_seed + 3).save(d / "revealed_other.json")
        key = "revealed_other.json" if name == "other_key" else "key.json"
        extra = ("--suspect-date", SUSPECT_DATE) if name == "other_key" else ()
        code, err = self.verify(d / "wm", f"ref_{name}", "--referee", "--commitment", d / "key.commitment.json", *extra, key=key)
        self.assertEqual(code, 2)
        self.assertIn(message, err)

    def test_online_report_is_reproducible(self):
        d = self.d
        model = clean_torchscript(d / "clean_online.ts")
        args = ("verify", "--key", d / "key.json", "--images", *SLICES[:2], "--model", model, "--quiet")
        self.assertEqual(run_cli(*args, "--out", d / "online")[0], 1)
        prov = json.loads((d / "online" / "report.json").read_text())["provenance"]
        self.assertEqual((len(prov["queries_sha256"]), len(prov["answers_sha256"]), prov["source"]), (2, 2, f"model {model}"))
        self.assertEqual(run_cli(*args, "--out", d / "online2", "--reproduce", d / "online" / "report.json")[0], 1)

    def test_full_resolution_queries_through_a_resampling_pipeline(self):
        """Queries written at the slices' 256x256 and resampled to the network's 128x128 by the pipeline: the blocks
        trigger, whose cells scale with the image, reaches the network as it was trained (verified); a per-pixel patch
        trigger does not (the watermarked double answers no QR)."""
        d = self.d
        patch_key = KEY.replace(trigger="patch", trigger_size=0.0625)
        patch_key.save(d / "patch_key.json")
        for name, key, expected in (("blocks", KEY, 0), ("patch", patch_key, 1)):
            key_file = "key.json" if key is KEY else "patch_key.json"
            queries = d / f"q256_{name}"
            code, err = run_cli("verify", "--key", d / key_file, "--images", *SLICES[:2], "--write-queries", queries, "--size", 0)
            self.assertEqual(code, 0, err)
            self.assertEqual(pydicom.dcmread(str(queries / "query_000" / "query_000.dcm")).Rows, 256)
            run_pipeline(ModelQuery(TriggerOracle(key), device="cpu"), queries, d / f"a256_{name}", size=SIZE)
            code, err = self.verify(d / f"a256_{name}", f"r256_{name}", manifest=queries / MANIFEST_NAME, key=key_file,
                                    images=SLICES[:2])
            self.assertEqual(code, expected, f"{name}: {err}")

    def test_nifti_round_trip(self):
        d = self.d
        (d / "nii").mkdir()
        for i, f in enumerate(SLICES[:2]):  # 2D NIfTI slices of the DICOMs, 1.3672 mm pixels
            ds = pydicom.dcmread(str(f))
            nib.save(nib.Nifti1Image(ds.pixel_array.T.astype(np.int16), np.diag([1.3672, 1.3672, 8.0, 1.0])), str(d / "nii" / f"slice_{i}.nii.gz"))
        code, err = run_cli("verify", "--key", d / "key.json", "--images", d / "nii", "--write-queries", d / "qn")
        self.assertEqual(code, 0, err)
        query = nib.load(str(d / "qn" / "query_000.nii.gz"))
        self.assertEqual(query.shape, (SIZE, SIZE))
        np.testing.assert_allclose(np.diag(query.affine)[:2], [1.3672 * 256 / SIZE] * 2, rtol=1e-5)
        run_pipeline(ModelQuery(TriggerOracle(KEY), device="cpu"), d / "qn", d / "an")
        code, err = run_cli(
            "verify", "--key", d / "key.json", "--images", d / "nii", "--answers", d / "an", "--manifest", d / "qn" / MANIFEST_NAME,
            "--out", d / "rn", "--quiet",
        )
        self.assertEqual(code, 0, err)


if __name__ == "__main__":
    unittest.main()
