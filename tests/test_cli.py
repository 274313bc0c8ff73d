from __future__ import annotations

import ast
import io
import tempfile
import unittest
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
from helpers import KEY, images
from parameterized import parameterized

import monai_stealthmark
from monai_stealthmark.__main__ import main
from monai_stealthmark.key import WatermarkKey


def run_cli(*args: str) -> tuple[int, str]:
    """Exit code and stderr of one CLI call (argparse's own exits count as their code)."""
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        try:
            code = main(list(args))
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


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

    @parameterized.expand([("no_models", 0), ("one_model", 1)])
    def test_calibrate_needs_two_models_and_names_the_training_script(self, _, n_models):
        with tempfile.TemporaryDirectory() as d:
            KEY.save(f"{d}/k.json")
            np.save(f"{d}/0.npy", images(1)[0, 0].numpy())
            models = [f"{d}/clean{i}.ts" for i in range(n_models)]
            code, err = run_cli("calibrate", "--key", f"{d}/k.json", "--images", d, "--models", *models, "--out", f"{d}/null.json")
            self.assertEqual(code, 2)
            self.assertIn("at least 2 clean models", err)
            self.assertIn("python -m experiments.null_models", err)
            self.assertFalse(Path(f"{d}/null.json").exists())

    @parameterized.expand([("train", ["--train", "3"]), ("data", ["--data", "x"]), ("unknown_command", None)])
    def test_removed_or_unknown_options_exit_2(self, _, extra):
        args = ["calibrate", "--key", "k.json", "--images", "d", "--out", "n.json", *extra] if extra else ["train"]
        code, err = run_cli(*args)
        self.assertEqual(code, 2)
        self.assertIn("usage:", err)

    def test_package_never_imports_experiments(self):
        """Training code stays in the repository's experiments/, which an installed package does not have."""
        root = Path(monai_stealthmark.__file__).parent
        for f in root.rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                names += [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
                self.assertFalse([n for n in names if n.split(".")[0] == "experiments"], f"{f} imports experiments")


if __name__ == "__main__":
    unittest.main()
