"""A suspect deployed as an ONNX model, queried through onnxruntime as a black box returning probabilities.

:class:`OnnxModelQuery` is a :class:`~monai_stealthmark.verify.ModelQuery` whose network is an ONNX model run by onnxruntime:
the same batching, inferer, window, activation and checks on what the suspect returns. :func:`load_suspect_query`
picks the query for a model file by its suffix (``.onnx``: onnxruntime; ``.ts`` / ``.pt`` / ``.pth``: TorchScript).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from monai_stealthmark.verify.query import ModelQuery

__all__ = ["ONNX_SUFFIXES", "TORCHSCRIPT_SUFFIXES", "OnnxRuntimeModel", "OnnxModelQuery", "load_suspect_query"]

ONNX_SUFFIXES = (".onnx",)
TORCHSCRIPT_SUFFIXES = (".ts", ".pt", ".pth")
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def _require_onnxruntime():
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise ImportError(f"querying an ONNX model needs onnx and onnxruntime: `pip install onnx onnxruntime`. Original error: {e}") from e
    return onnx, onnxruntime


def _model_bytes(model, onnx) -> tuple[bytes, str]:
    """The serialised model and a name for messages, from a path, bytes or an ``onnx.ModelProto``."""
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString(), "the ONNX model"
    if isinstance(model, (bytes, bytearray)):
        return bytes(model), "the ONNX model"
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"model file {str(path)!r} does not exist.")
        return path.read_bytes(), repr(str(path))
    raise TypeError(f"model must be an ONNX file path, bytes or an onnx.ModelProto, got {type(model).__name__}.")


def _parse(data: bytes, name: str, onnx):
    """Parse and check the model, with an error that says what is wrong with the file."""
    try:
        proto = onnx.load_model_from_string(data)
    except Exception as e:  # protobuf's DecodeError and friends
        raise ValueError(f"{name} is not an ONNX model: {e}") from e
    if not proto.graph.node:
        raise ValueError(f"{name} is not an ONNX model: it has no graph (empty or not an ONNX file).")
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:
        raise ValueError(f"{name} is not a valid ONNX model: {e}") from e
    return proto


class OnnxRuntimeModel:
    """An ONNX model run by onnxruntime, as a callable ``images (torch) -> outputs (torch, float32)``; ``proto`` holds the
    checked model and ``engine`` the ``onnxruntime.InferenceSession``.

    Args:
        model: an ONNX file path, its bytes, or an ``onnx.ModelProto``.
        providers: onnxruntime execution providers (default: the CPU provider).
        threads: onnxruntime's intra-op threads (default: onnxruntime's choice).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an ONNX model, or not a model with a single image input of rank >= 3.
    """

    def __init__(self, model, providers: Sequence[str] | None = None, threads: int | None = None) -> None:
        onnx, ort = _require_onnxruntime()
        data, self.name = _model_bytes(model, onnx)
        self.proto = _parse(data, self.name, onnx)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: notes on constant folding and fallbacks are not the user's concern
        if threads is not None:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        try:
            self.engine = ort.InferenceSession(data, options, providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as e:
            raise ValueError(f"onnxruntime cannot run {self.name}: {e}") from e
        inputs = self.engine.get_inputs()
        if len(inputs) != 1:
            raise ValueError(f"{self.name} must take one image input, it takes {[i.name for i in inputs]}.")
        self.input_name = inputs[0].name
        if inputs[0].type not in _NUMPY_TYPES:
            raise ValueError(f"{self.name} takes {inputs[0].type}, not a floating-point image tensor.")
        self.input_dtype = _NUMPY_TYPES[inputs[0].type]
        self.input_shape = tuple(d if isinstance(d, int) else None for d in inputs[0].shape)
        if len(self.input_shape) < 3:
            raise ValueError(f"{self.name} takes inputs of shape {inputs[0].shape}, expected (B, C, spatial...).")

    @property
    def spatial_shape(self) -> tuple[int, ...] | None:
        """The model's fixed spatial input shape (its window), or None when any spatial axis is dynamic."""
        spatial = self.input_shape[2:]
        return None if any(d is None for d in spatial) else tuple(spatial)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != len(self.input_shape):
            raise ValueError(f"{self.name} takes {len(self.input_shape)}-d inputs, got shape {tuple(x.shape)}.")
        fixed = {i: d for i, d in enumerate(self.input_shape) if d is not None and i > 0}
        wrong = {i: d for i, d in fixed.items() if x.shape[i] != d}
        if wrong:
            raise ValueError(
                f"{self.name} takes inputs of shape {self.input_shape} (None: any), got {tuple(x.shape)}; query at "
                "the model's window (ModelQuery's window= / fit_window) or through a sliding-window inferer."
            )

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.engine.run(None, {self.input_name: x})[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        arr = x.detach().cpu().numpy().astype(self.input_dtype, copy=False)
        batch = self.input_shape[0]
        if batch is None or batch == arr.shape[0]:
            y = self._run(arr)
        elif batch == 1:  # exported with a fixed batch of one: one image per run
            y = np.concatenate([self._run(arr[i : i + 1]) for i in range(arr.shape[0])])
        else:
            raise ValueError(f"{self.name} has a fixed batch of {batch}; got {arr.shape[0]} images.")
        return torch.from_numpy(np.asarray(y)).float()


class OnnxModelQuery(ModelQuery):
    """A suspect exported to ONNX, run by onnxruntime, as a black box returning probabilities.

    It behaves as :class:`~monai_stealthmark.verify.ModelQuery` (batching, optional MONAI inferer, the activation,
    the refusal of hard masks and label maps); the network is an ONNX model run by onnxruntime. A model with a fixed spatial
    input shape declares its window, so the verifier queries at that size unless ``window`` or the inferer's
    ``roi_size`` says otherwise.

    Args:
        model: an ONNX file path, its bytes, or an ``onnx.ModelProto``.
        activation: applied to the outputs: ``"softmax"``, ``"sigmoid"`` or None (already probabilities).
        batch_size: queries are sent in chunks of this size.
        inferer: an optional MONAI inferer (e.g. ``SlidingWindowInferer``) called as ``inferer(images, runtime)``.
        window: the network's input window (default: the inferer's ``roi_size``, else the model's fixed spatial
            input shape, else None).
        providers: onnxruntime execution providers (default: the CPU provider).
        threads: onnxruntime's intra-op threads (default: onnxruntime's choice).
    """

    def __init__(
        self,
        model,
        activation: str | None = "softmax",
        batch_size: int = 32,
        inferer: Callable | None = None,
        window: Sequence[int] | None = None,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
    ) -> None:
        runtime = OnnxRuntimeModel(model, providers, threads)
        if window is None and getattr(inferer, "roi_size", None) is None:
            window = runtime.spatial_shape
        super().__init__(runtime, activation=activation, device="cpu", batch_size=batch_size, inferer=inferer, window=window)
        self.runtime = runtime


def load_suspect_query(
    path: str | os.PathLike,
    activation: str | None = "softmax",
    window: Sequence[int] | None = None,
    **kwargs,
) -> ModelQuery:
    """The black box for a suspect model file, chosen by its suffix.

    Args:
        path: ``.onnx`` (run by onnxruntime: :class:`OnnxModelQuery`) or ``.ts`` / ``.pt`` / ``.pth`` (TorchScript:
            :class:`~monai_stealthmark.verify.ModelQuery`).
        activation: applied to the model's outputs (``"softmax"``, ``"sigmoid"`` or None).
        window: the network's input window (an ONNX model with a fixed spatial shape declares its own).
        **kwargs: passed to the query class (e.g. ``batch_size``, ``inferer``; ``threads`` for ONNX).

    Raises:
        ValueError: an unknown suffix, or a file that is not a model of its kind.
    """
    suffix = Path(path).suffix.lower()
    if suffix in ONNX_SUFFIXES:
        return OnnxModelQuery(path, activation=activation, window=window, **kwargs)
    if suffix in TORCHSCRIPT_SUFFIXES:
        return ModelQuery(path, activation=activation, window=window, **kwargs)
    raise ValueError(
        f"the suspect model must be an ONNX file ({', '.join(ONNX_SUFFIXES)}) or TorchScript "
        f"({', '.join(TORCHSCRIPT_SUFFIXES)}), got {str(path)!r}."
    )
