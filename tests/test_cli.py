from __future__ import annotations

import io
import tempfile
import unittest
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from monai_stealthmark.__main__ import main
from monai_stealthmark.key import WatermarkKey


class TestCLI(unittest.TestCase):
    def test_keygen(self):
        with tempfile.TemporaryDirectory() as d:
            out = io.StringIO()
            with redirect_stdout(out):
                rc = main(["keygen", "--payload", "SM:cli", "--out", f"{d}/k.json", "--seed", "5", "--trigger", "noise"])
            self.assertEqual(rc, 0)
            key = WatermarkKey.load(f"{d}/k.json")
            self.assertEqual((key.payload, key.trigger_seed, key.trigger), ("SM:cli", 5, "noise"))
            self.assertIn(key.fingerprint, out.getvalue())
            self.assertEqual(oct(Path(f"{d}/k.json").stat().st_mode & 0o777), "0o600")
            # a second keygen on the same file would lose the secret seed: refused unless --force
            err = io.StringIO()
            with redirect_stderr(err), redirect_stdout(io.StringIO()):
                self.assertEqual(main(["keygen", "--payload", "SM:other", "--out", f"{d}/k.json"]), 2)
            self.assertIn("--force", err.getvalue())
            self.assertEqual(WatermarkKey.load(f"{d}/k.json").trigger_seed, 5)
            with redirect_stdout(io.StringIO()):
                self.assertEqual(main(["keygen", "--payload", "SM:other", "--out", f"{d}/k.json", "--force", "--seed", "6"]), 0)
            self.assertEqual(WatermarkKey.load(f"{d}/k.json").trigger_seed, 6)

    def test_errors_exit_2(self):
        with tempfile.TemporaryDirectory() as d:
            err = io.StringIO()
            with redirect_stderr(err):
                rc = main(["verify", "--key", f"{d}/missing.json", "--images", d, "--model", f"{d}/m.ts", "--out", f"{d}/r"])
            self.assertEqual(rc, 2)
            self.assertIn("does not exist", err.getvalue())
            WatermarkKey.generate("SM:x", seed=1).save(f"{d}/k.json")
            with redirect_stderr(io.StringIO()):
                self.assertEqual(main(["verify", "--key", f"{d}/k.json", "--images", f"{d}/nope", "--model", "m.ts", "--out", f"{d}/r"]), 2)
                self.assertEqual(main(["keygen", "--payload", "x" * 100, "--out", f"{d}/long.json"]), 2)
            self.assertFalse(Path(f"{d}/r").exists())


if __name__ == "__main__":
    unittest.main()
