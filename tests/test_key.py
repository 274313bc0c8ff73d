from __future__ import annotations

import json
import tempfile
import unittest
from pathlib import Path

import numpy as np
import qrcode
from parameterized import parameterized

from monai_stealthmark.key import (
    KeyFileError,
    PayloadTooLongError,
    WatermarkKey,
    correct_codewords,
    data_module_order,
    decode_qr,
    function_pattern_mask,
    read_format,
    make_qr_matrix,
    restore_function_patterns,
)
from monai_stealthmark.key.qr import ERROR_CORRECTION, _block_layout


def _qr(payload: str, ec: str, version: int | None = None) -> qrcode.QRCode:
    qr = qrcode.QRCode(version=version, error_correction=ERROR_CORRECTION[ec], box_size=1, border=0)
    qr.add_data(payload)
    qr.make(fit=version is None)
    return qr


class TestQR(unittest.TestCase):
    @parameterized.expand([("SM:3f9a2c71",), ("hospital-xyz/2026",), ("a",)])
    def test_encode_decode(self, payload):
        m = make_qr_matrix(payload)
        self.assertEqual(m.dtype, bool)
        self.assertEqual(decode_qr(m), [payload])

    def test_smallest_version_and_ec_h(self):
        self.assertEqual(make_qr_matrix("SM:3f9a2c71").shape, (25, 25))  # 11 bytes at H -> version 2

    def test_too_long(self):
        with self.assertRaisesRegex(PayloadTooLongError, "needs QR version"):
            make_qr_matrix("x" * 60)

    @parameterized.expand([(1,), (2,), (3,), (4,), (7,)])
    def test_function_patterns_fixed_per_version(self, version):
        mask, values = function_pattern_mask(version)
        rng = np.random.default_rng(version)
        seen = 0
        for ec in "LMQH":
            for _ in range(4):
                payload = "".join(rng.choice(list("ABCDEFGH0123456789"), size=int(rng.integers(1, 8))))
                qr = qrcode.QRCode(version=version, error_correction=ERROR_CORRECTION[ec], box_size=1, border=0)
                qr.add_data(payload)
                qr.make(fit=False)
                m = np.asarray(qr.get_matrix(), dtype=bool)
                np.testing.assert_array_equal(m[mask], values[mask])
                seen += 1
        self.assertGreater(seen, 0)

    def test_restore_rescues_damaged_finder(self):
        m = make_qr_matrix("SM:3f9a2c71")
        damaged = m.copy()
        damaged[:7, :7] = ~damaged[:7, :7]
        self.assertEqual(decode_qr(damaged), [])
        self.assertEqual(decode_qr(restore_function_patterns(damaged)), ["SM:3f9a2c71"])

    def test_random_modules_never_decode(self):
        rng = np.random.default_rng(0)
        for _ in range(50):
            m = restore_function_patterns(rng.random((25, 25)) < 0.5)
            self.assertEqual(decode_qr(m), [])


class TestErasureCorrection(unittest.TestCase):
    CASES = [("SM:3f9a2c71", "H"), ("hospital-xyz/2026", "M"), ("A" * 60, "Q"), ("x" * 90, "L"), ("y" * 40, "H")]

    @parameterized.expand(CASES)
    def test_placement_and_format_match_qrcode(self, payload, ec):
        """Reading the modules along data_module_order and unmasking gives exactly qrcode's interleaved codewords."""
        qr = _qr(payload, ec)
        m = np.asarray(qr.get_matrix(), dtype=bool)
        level, mask, dist = read_format(m)
        self.assertEqual((level, dist), (ec, 0))
        stream = qrcode.util.create_data(qr.version, ERROR_CORRECTION[ec], qr.data_list)
        order = data_module_order(qr.version)
        self.assertEqual(len(order), len(set(map(tuple, order))))  # no module twice
        flip = np.array([qrcode.util.mask_func(mask)(int(r), int(c)) for r, c in order])
        bits = m[order[:, 0], order[:, 1]] ^ flip
        got = np.packbits(bits[: 8 * len(stream)].reshape(-1, 8), axis=1)[:, 0]
        np.testing.assert_array_equal(got, stream)
        self.assertFalse(bits[8 * len(stream) :].any())  # remainder bits are light before masking
        self.assertEqual(sum(len(p) for p, _ in _block_layout(qr.version, ec)), len(stream))

    @parameterized.expand(CASES)
    def test_undamaged_round_trip(self, payload, ec):
        m = np.asarray(_qr(payload, ec).get_matrix(), dtype=bool)
        fixed = correct_codewords(m, np.zeros_like(m), ec)
        np.testing.assert_array_equal(fixed, m)

    def test_erasures_rescue_what_zbar_cannot(self):
        """A blob of scrambled modules (the organ) plus scattered errors: past zbar's error correction, within
        erasures + errors; the corrected matrix is the original one."""
        m = make_qr_matrix("SM:3f9a2c71")
        order = data_module_order(2)
        rng = np.random.default_rng(0)
        blob = np.zeros_like(m)
        blob[8:17, 8:17] = True
        damaged = m.copy()
        damaged[blob] = rng.random(int(blob.sum())) < 0.5
        for i in rng.choice(len(order), 6, replace=False):
            damaged[tuple(order[i])] ^= True
        self.assertEqual(decode_qr(restore_function_patterns(damaged)), [])
        fixed = correct_codewords(damaged, blob, "H")
        np.testing.assert_array_equal(fixed, m)
        self.assertEqual(decode_qr(fixed), ["SM:3f9a2c71"])
        self.assertIsNone(correct_codewords(damaged, np.zeros_like(m), "H"))  # without the erasures: too many errors

    def test_random_modules_never_decode_with_erasures(self):
        rng = np.random.default_rng(1)
        blob = np.zeros((25, 25), dtype=bool)
        blob[8:17, 8:17] = True
        for _ in range(50):
            fixed = correct_codewords(rng.random((25, 25)) < 0.5, blob, "H")
            self.assertTrue(fixed is None or "SM:3f9a2c71" not in decode_qr(fixed))

    def test_shape_errors(self):
        with self.assertRaisesRegex(ValueError, "same square"):
            correct_codewords(np.zeros((25, 25), bool), np.zeros((21, 21), bool), "H")
        with self.assertRaisesRegex(ValueError, "not the side of a QR"):
            correct_codewords(np.zeros((24, 24), bool), np.zeros((24, 24), bool), "H")
        with self.assertRaisesRegex(ValueError, "error_correction must be one of"):
            correct_codewords(np.zeros((25, 25), bool), np.zeros((25, 25), bool), "X")
        with self.assertRaisesRegex(ValueError, "error_correction must be one of"):
            read_format(np.zeros((25, 25), bool), "h")


class TestWatermarkKey(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.path = Path(self.tmp.name) / "key.json"
        self.key = WatermarkKey.generate("SM:3f9a2c71", seed=7)

    def tearDown(self):
        self.tmp.cleanup()

    def test_round_trip(self):
        self.key.save(self.path)
        loaded = WatermarkKey.load(self.path)
        self.assertEqual(loaded, self.key)
        self.assertEqual(loaded.fingerprint, self.key.fingerprint)
        self.assertEqual(json.loads(self.path.read_text())["fingerprint"], self.key.fingerprint)
        self.assertEqual(len(self.key.fingerprint), 64)
        self.assertEqual(self.key.grid_size, 25 + 2 * self.key.quiet_zone)
        self.assertFalse(list(Path(self.tmp.name).glob("*.tmp")))  # atomic write leaves nothing behind

    def test_fingerprint_depends_on_content(self):
        self.assertNotEqual(self.key.fingerprint, self.key.replace(trigger_seed=8).fingerprint)
        self.assertNotEqual(self.key.fingerprint, self.key.replace(payload="SM:3f9a2c72").fingerprint)

    def test_generate_without_seed_is_random(self):
        a, b = WatermarkKey.generate("x"), WatermarkKey.generate("x")
        self.assertNotEqual(a.trigger_seed, b.trigger_seed)

    def test_edited_key_fails(self):
        self.key.save(self.path)
        d = json.loads(self.path.read_text())
        d["payload"] = "SM:someone-else"
        self.path.write_text(json.dumps(d))
        with self.assertRaisesRegex(KeyFileError, "edited"):
            WatermarkKey.load(self.path)

    def test_truncated_key_fails(self):
        self.key.save(self.path)
        self.path.write_text(self.path.read_text()[:40])
        with self.assertRaisesRegex(KeyFileError, "not valid JSON"):
            WatermarkKey.load(self.path)

    def test_missing_field_and_missing_file(self):
        self.key.save(self.path)
        d = json.loads(self.path.read_text())
        del d["tau"]
        self.path.write_text(json.dumps(d))
        with self.assertRaisesRegex(KeyFileError, "lacks"):
            WatermarkKey.load(self.path)
        with self.assertRaisesRegex(KeyFileError, "does not exist"):
            WatermarkKey.load(Path(self.tmp.name) / "nope.json")

    @parameterized.expand([({"tau": 0.6},), ({"trigger": "laser"},), ({"trigger_seed": -1},)])
    def test_invalid_params(self, kw):
        with self.assertRaises(ValueError):
            WatermarkKey.generate("x", seed=1, **kw) if "trigger_seed" not in kw else WatermarkKey("x", **kw)

    def test_payload_too_long(self):
        with self.assertRaises(PayloadTooLongError):
            WatermarkKey.generate("y" * 100, seed=1)
        with self.assertRaisesRegex(PayloadTooLongError, "does not fit in any QR code"):  # beyond version 40
            WatermarkKey.generate("y" * 5000, seed=1, max_version=40)

    @parameterized.expand([({"max_version": 0}, "max_version"), ({"max_version": 41}, "max_version"),
                           ({"tau": "0.2"}, "tau must be a number"), ({"quiet_zone": 2.5}, "quiet_zone must be an int")])
    def test_field_types_and_ranges(self, kw, msg):
        with self.assertRaisesRegex(ValueError, msg):
            WatermarkKey.generate("x", seed=1, **kw)

    def test_folder_is_not_a_key(self):
        with self.assertRaisesRegex(KeyFileError, "is a folder"):
            WatermarkKey.load(self.tmp.name)


if __name__ == "__main__":
    unittest.main()
