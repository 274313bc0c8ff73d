"""The HTTP path for real: the reference server on loopback, queried by RemoteModelQuery and by the CLI."""

from __future__ import annotations

import json
import unittest
import urllib.request
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from io import StringIO
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
import torch

from monai_stealthmark.__main__ import main
from monai_stealthmark.key import WatermarkKey
from monai_stealthmark.serve import make_server, start_in_thread
from monai_stealthmark.verify.remote import QueryBudgetExceeded, RemoteModelQuery, RemoteQueryError

from helpers import TriggerOracle, images

KEY = WatermarkKey.generate("SM:http", seed=5)


def oracle_predict(x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(TriggerOracle(KEY)(torch.from_numpy(x)), 1).numpy()


@contextmanager
def serving(predict=oracle_predict, **kw):
    server = make_server(predict, **kw)
    url = start_in_thread(server)
    try:
        yield url
    finally:
        server.shutdown()
        server.server_close()


def run_cli(*args) -> tuple[int, str, str]:
    out, err = StringIO(), StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


class TestServeAndRemote(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = TemporaryDirectory()
        root = Path(cls.tmp.name)
        KEY.save(root / "key.json")
        WatermarkKey.generate("SM:http", seed=6).save(root / "wrong.json")
        (root / "imgs").mkdir()
        for i, img in enumerate(images(3, size=128)):
            np.save(root / "imgs" / f"{i}.npy", img[0].numpy())
        cls.root = root

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def verify(self, url, key="key.json", *extra):
        r = self.root
        return run_cli("verify", "--key", str(r / key), "--images", str(r / "imgs"), "--url", url, "--out", str(r / "out"), "--quiet", *extra)

    def test_remote_query_matches_local_model(self):
        with serving() as url:
            health = json.loads(urllib.request.urlopen(url.replace("/predict", "/health"), timeout=5).read())
            self.assertEqual(health["status"], "ok")
            q = RemoteModelQuery(url, batch_size=2, budget=3)
            x = images(3)
            torch.testing.assert_close(q(x), torch.from_numpy(oracle_predict(x.numpy())))
            self.assertEqual(q.n_queries, 3)
            with self.assertRaises(QueryBudgetExceeded):
                q(x[:1])

    def test_cli_over_http_verdicts(self):
        with serving() as url:
            code, out, _ = self.verify(url)
            self.assertEqual(code, 0, out)
            rep = json.loads((self.root / "out" / "report.json").read_text())
            self.assertEqual(rep["asr"], 1.0)
            self.assertEqual(rep["n_queries"], 3)
            code, _, _ = self.verify(url, "wrong.json")
            self.assertEqual(code, 1)

    def test_hard_mask_server_is_refused(self):
        with serving(output="masks") as url:
            code, _, err = self.verify(url)
        self.assertEqual(code, 2)
        self.assertIn("hard masks", err)

    def test_slow_server_times_out(self):
        with serving(delay=1.5) as url:
            code, _, err = self.verify(url, "key.json", "--timeout", "0.3", "--retries", "1")
        self.assertEqual(code, 2)
        self.assertIn("did not answer after 2 attempt(s)", err)

    def test_garbage_and_budget(self):
        with serving(predict=lambda x: x[:, :, :4]) as url:  # wrong spatial size
            with self.assertRaisesRegex(RemoteQueryError, "shape"):
                RemoteModelQuery(url)(images(1))
        with serving(predict=lambda x: 1 / 0) as url:  # the model crashes: HTTP 500, retried, then a clear error
            with self.assertRaisesRegex(RemoteQueryError, "did not answer"):
                RemoteModelQuery(url, retries=1, backoff=0.01)(images(1))
        with serving() as url:
            out_dir = self.root / "budget"
            code, _, err = run_cli(
                "verify", "--key", str(self.root / "key.json"), "--images", str(self.root / "imgs"), "--url", url,
                "--budget", "2", "--out", str(out_dir), "--quiet",
            )
        self.assertEqual(code, 2)
        self.assertIn("query budget", err)
        self.assertFalse(out_dir.exists())  # nothing half-written

    def test_bad_url(self):
        with self.assertRaisesRegex(ValueError, "http"):
            RemoteModelQuery("ftp://x")


if __name__ == "__main__":
    unittest.main()
