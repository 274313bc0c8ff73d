"""A small reference inference server that exposes a MONAI bundle's model as a black box over HTTP.

``python -m monai_stealthmark.serve --bundle DIR [--port 8000]`` listens on loopback and answers
``POST /predict`` (body: ``.npy`` of float32 images ``(B, C, spatial...)``, already preprocessed as the
bundle's network expects) with a ``.npy`` of per-class probabilities. ``GET /health`` answers a small JSON.
It is the counterpart of :class:`~monai_stealthmark.verify.remote.RemoteModelQuery` and of
``python -m monai_stealthmark verify --url``. ``--output masks`` imitates an API that returns only hard masks
and ``--delay`` a slow one (both for tests and demonstrations).
"""

from __future__ import annotations

import argparse
import io
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import torch

from monai_stealthmark.bundle import load_bundle_model
from monai_stealthmark.verify import ModelQuery

__all__ = ["make_server", "bundle_predictor", "main"]

MAX_BODY = 512 * 1024 * 1024


def bundle_predictor(bundle_dir: str, device: str | None = None, activation: str = "softmax") -> Callable[[np.ndarray], np.ndarray]:
    """``images -> probabilities`` for the bundle's trained network (through the bundle's own inferer)."""
    net, inferer, _ = load_bundle_model(bundle_dir, device=device)
    query = ModelQuery(net, activation=activation, device=next(net.parameters()).device, inferer=inferer)

    def predict(x: np.ndarray) -> np.ndarray:
        return query(torch.from_numpy(x)).cpu().numpy()

    return predict


def _as_masks(probs: np.ndarray) -> np.ndarray:
    """One-hot hard masks ``(B, K, spatial...)`` of the argmax class: what a mask-only API would answer."""
    return np.moveaxis(np.eye(probs.shape[1], dtype=np.float32)[probs.argmax(1)], -1, 1)


def _npy_bytes(y: np.ndarray) -> bytes:
    """``y`` as float32 ``.npy`` bytes (no pickles)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(y, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


class _PredictServer(ThreadingHTTPServer):
    """A threading HTTP server that holds the model callable and the answer settings its handlers read."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], predict: Callable[[np.ndarray], np.ndarray], output: str, delay: float):
        super().__init__(address, _PredictHandler)
        self.predict, self.output, self.delay = predict, output, delay
        self.lock = threading.Lock()  # one forward at a time: the model is not shared across threads


class _PredictHandler(BaseHTTPRequestHandler):
    """``POST /predict`` (``.npy`` images in, ``.npy`` probabilities or masks out) and ``GET /health``."""

    server: _PredictServer

    def log_message(self, fmt, *args):  # quiet: the verifier prints its own progress
        pass

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        try:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout): nothing to answer
            pass

    def do_GET(self):
        if self.path.rstrip("/") == "/health":
            self._send(200, json.dumps({"status": "ok", "output": self.server.output}).encode(), "application/json")
        else:
            self._send(404, b"unknown path: use POST /predict or GET /health", "text/plain")

    def _read_images(self) -> np.ndarray | None:
        """The request body as a float32 array; None after answering 400/413 to a missing, huge or non-npy body."""
        n = int(self.headers.get("Content-Length", 0))
        if n <= 0 or n > MAX_BODY:
            self._send(413 if n > MAX_BODY else 400, f"body of {n} bytes refused".encode(), "text/plain")
            return None
        try:
            return np.load(io.BytesIO(self.rfile.read(n)), allow_pickle=False).astype(np.float32)
        except Exception as e:
            self._send(400, f"body is not a .npy array: {e}".encode(), "text/plain")
            return None

    def do_POST(self):
        if self.path.rstrip("/") != "/predict":
            self._send(404, b"unknown path: use POST /predict", "text/plain")
            return
        x = self._read_images()
        if x is None:
            return
        if self.server.delay:
            time.sleep(self.server.delay)
        try:
            with self.server.lock:
                y = self.server.predict(x)
        except Exception as e:
            self._send(500, f"inference failed: {type(e).__name__}: {e}".encode(), "text/plain")
            return
        self._send(200, _npy_bytes(_as_masks(y) if self.server.output == "masks" else y), "application/x-npy")


def make_server(
    predict: Callable[[np.ndarray], np.ndarray],
    host: str = "127.0.0.1",
    port: int = 0,
    output: str = "probabilities",
    delay: float = 0.0,
) -> ThreadingHTTPServer:
    """An HTTP server (not yet serving: call ``serve_forever`` or use :func:`start_in_thread`).

    Args:
        predict: float32 ``(B, C, spatial...)`` -> probabilities ``(B, K, spatial...)``.
        host: bind address (loopback by default).
        port: 0 picks a free port (``server.server_address[1]``).
        output: ``"probabilities"``, or ``"masks"`` to answer one-hot hard masks only.
        delay: seconds to wait before each answer.
    """
    if output not in ("probabilities", "masks"):
        raise ValueError(f"output must be 'probabilities' or 'masks', got {output!r}.")
    return _PredictServer((host, port), predict, output, delay)


def start_in_thread(server: ThreadingHTTPServer) -> str:
    """Serve in a daemon thread; returns the ``/predict`` URL. Stop with ``server.shutdown()``."""
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    return f"http://{host}:{port}/predict"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="monai_stealthmark.serve", description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True, help="bundle folder (configs/inference.json, models/model.pt)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default=None)
    p.add_argument("--activation", default="softmax", choices=("softmax", "sigmoid"))
    p.add_argument("--output", default="probabilities", choices=("probabilities", "masks"))
    p.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    a = p.parse_args(argv)
    server = make_server(bundle_predictor(a.bundle, a.device, a.activation), a.host, a.port, a.output, a.delay)
    print(f"serving {a.bundle} on http://{server.server_address[0]}:{server.server_address[1]}/predict (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
