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

__all__ = ["make_server", "bundle_predictor", "main"]

MAX_BODY = 512 * 1024 * 1024


def bundle_predictor(bundle_dir: str, device: str | None = None, activation: str = "softmax") -> Callable[[np.ndarray], np.ndarray]:
    """``images -> probabilities`` for the bundle's trained network (through the bundle's own inferer)."""
    from monai_stealthmark.bundle import load_bundle_model
    from monai_stealthmark.verify import ModelQuery

    net, inferer, _ = load_bundle_model(bundle_dir, device=device)
    query = ModelQuery(net, activation=activation, device=next(net.parameters()).device, inferer=inferer)

    def predict(x: np.ndarray) -> np.ndarray:
        return query(torch.from_numpy(x)).cpu().numpy()

    return predict


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
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
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
                self._send(200, json.dumps({"status": "ok", "output": output}).encode(), "application/json")
            else:
                self._send(404, b"unknown path: use POST /predict or GET /health", "text/plain")

        def do_POST(self):
            if self.path.rstrip("/") != "/predict":
                self._send(404, b"unknown path: use POST /predict", "text/plain")
                return
            n = int(self.headers.get("Content-Length", 0))
            if n <= 0 or n > MAX_BODY:
                self._send(413 if n > MAX_BODY else 400, f"body of {n} bytes refused".encode(), "text/plain")
                return
            try:
                x = np.load(io.BytesIO(self.rfile.read(n)), allow_pickle=False).astype(np.float32)
            except Exception as e:
                self._send(400, f"body is not a .npy array: {e}".encode(), "text/plain")
                return
            if delay:
                time.sleep(delay)
            try:
                with lock:  # one forward at a time: the model is not shared across threads
                    y = predict(x)
            except Exception as e:
                self._send(500, f"inference failed: {type(e).__name__}: {e}".encode(), "text/plain")
                return
            if output == "masks":
                y = np.eye(y.shape[1], dtype=np.float32)[y.argmax(1)]
                y = np.moveaxis(y, -1, 1)
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(y, dtype=np.float32), allow_pickle=False)
            self._send(200, buf.getvalue(), "application/x-npy")

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


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
