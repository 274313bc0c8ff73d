"""Query a suspect model that runs as an HTTP service (black box: only images go out, probabilities come back).

Protocol (the reference server is :mod:`monai_stealthmark.serve`):

- ``POST <url>`` with body = a ``.npy`` file (``numpy.save``) of float32 images ``(B, C, spatial...)``,
  header ``Content-Type: application/x-npy``;
- response ``200`` with body = a ``.npy`` file of the model's per-class probabilities ``(B, K, spatial...)``
  (a service that returns logits or hard masks is detected by the verifier and refused with a clear error).

The key never leaves the verifier: the trigger is stamped locally and only triggered images are sent.
"""

from __future__ import annotations

import io
import time
import urllib.error
import urllib.request

import numpy as np
import torch

__all__ = ["RemoteModelQuery", "RemoteQueryError", "QueryBudgetExceeded"]


class RemoteQueryError(RuntimeError):
    """The endpoint could not be reached, timed out, or answered something that is not a probability array."""


class QueryBudgetExceeded(RuntimeError):
    """More images would be sent than the query budget allows."""


class RemoteModelQuery:
    """A callable ``images -> probabilities`` backed by an HTTP inference endpoint.

    Args:
        url: the endpoint (e.g. ``http://127.0.0.1:8000/predict``).
        timeout: seconds per request.
        retries: extra attempts after a timeout, a connection error or a 5xx answer (exponential backoff).
        budget: most images that may be sent in total (None: no limit); counted before sending.
        batch_size: images per request.
        backoff: seconds before the first retry (doubled each time).
        window: the network's input window (see :class:`~monai_stealthmark.verify.ModelQuery`): the verifier sends
            images of this size, so the server's sliding window sees one window, aligned with the QR.
    """

    def __init__(
        self,
        url: str,
        timeout: float = 30.0,
        retries: int = 2,
        budget: int | None = None,
        batch_size: int = 16,
        backoff: float = 0.5,
        window: tuple[int, ...] | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {url!r}.")
        self.url = url
        self.window = window
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.budget = budget
        self.batch_size = int(batch_size)
        self.backoff = float(backoff)
        self.n_queries = 0

    def _post(self, x: np.ndarray) -> np.ndarray:
        buf = io.BytesIO()
        np.save(buf, x.astype(np.float32), allow_pickle=False)
        req = urllib.request.Request(self.url, data=buf.getvalue(), headers={"Content-Type": "application/x-npy"}, method="POST")
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    body = r.read()
                break
            except urllib.error.HTTPError as e:
                if e.code < 500:  # the server refused the request itself: retrying will not help
                    detail = e.read().decode("utf-8", "replace")[:300]
                    raise RemoteQueryError(f"{self.url} answered HTTP {e.code}: {detail}") from e
                last = e
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = e
        else:
            raise RemoteQueryError(
                f"{self.url} did not answer after {self.retries + 1} attempt(s) (timeout {self.timeout:g} s): "
                f"{type(last).__name__}: {last}"
            ) from last
        try:
            y = np.load(io.BytesIO(body), allow_pickle=False)
        except Exception as e:
            raise RemoteQueryError(f"{self.url} did not return a .npy array ({len(body)} bytes: {body[:60]!r}...).") from e
        if not np.issubdtype(y.dtype, np.number) or y.ndim != x.ndim or y.shape[0] != x.shape[0] or y.shape[2:] != x.shape[2:]:
            raise RemoteQueryError(
                f"{self.url} returned an array of shape {y.shape} ({y.dtype}) for images of shape {x.shape}: expected "
                "(B, classes, same spatial size) probabilities."
            )
        return y

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        n = int(images.shape[0])
        if self.budget is not None and self.n_queries + n > self.budget:
            raise QueryBudgetExceeded(
                f"sending {n} more image(s) would exceed the query budget of {self.budget} ({self.n_queries} already sent)."
            )
        x = images.detach().cpu().float().numpy()
        outs = []
        for i in range(0, n, self.batch_size):
            outs.append(self._post(x[i : i + self.batch_size]))
            self.n_queries += min(self.batch_size, n - i)
        return torch.from_numpy(np.concatenate(outs)).to(images.device)
