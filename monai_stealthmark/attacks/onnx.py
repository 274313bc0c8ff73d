"""Deployment formats as attacks: the suspect exported to ONNX and run by onnxruntime in fp32, fp16 or real int8.

A thief who ships a stolen network rarely ships the PyTorch module: an ONNX export run by onnxruntime is the usual
deployment, often in half precision or quantised to int8 with onnxruntime's static post-training quantisation.
Unlike :mod:`.quantize` (which simulates int8 rounding in PyTorch), the models built here run onnxruntime's own
kernels: the int8 model is a QDQ graph that onnxruntime fuses into integer kernels (``QLinearConv``,
``QLinearAdd``, ...). Every function returns an ``onnx.ModelProto``; :class:`~monai_stealthmark.verify.OnnxModelQuery`
queries one as a black box.

Needs ``onnx``, ``onnxruntime`` and, for :func:`export_onnx` (torch's default exporter), ``onnxscript``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from monai_stealthmark.utils import atomic_write_bytes

from ._common import clone

__all__ = [
    "ONNX_PRECISIONS",
    "ImageCalibrationReader",
    "check_onnx",
    "export_onnx",
    "onnx_deployment",
    "onnx_fp16",
    "onnx_int8_static",
    "save_onnx",
]

ONNX_PRECISIONS = ("fp32", "fp16", "int8")
INPUT_NAME = "image"
OUTPUT_NAME = "prediction"
_QUANT_TYPES = {"uint8": "QUInt8", "int8": "QInt8"}
_CALIBRATION_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


def _require(module: str, purpose: str):
    """Import ``module`` or raise an ImportError naming the package to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        package = module.split(".")[0]
        raise ImportError(f"{purpose} needs the {package!r} package: `pip install {package}`. Original error: {e}") from e


def check_onnx(model) -> None:
    """Check an ``onnx.ModelProto`` with ``onnx.checker`` (full check, with shape inference).

    Raises:
        ValueError: the graph is not a valid ONNX model.
    """
    onnx = _require("onnx", "checking an ONNX model")
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ValueError(f"the ONNX graph is not valid: {e}") from e


def save_onnx(model, path: str | os.PathLike) -> Path:
    """Write an ``onnx.ModelProto`` to ``path`` atomically (a reader never sees a half-written model)."""
    return atomic_write_bytes(path, model.SerializeToString())


def export_onnx(
    model: torch.nn.Module,
    example: torch.Tensor,
    path: str | os.PathLike | None = None,
    opset: int = 18,
    dynamic_batch: bool = True,
):
    """Export ``model`` to ONNX with torch's default (``torch.export``-based) exporter and check the graph.

    The spatial shape is fixed to the example's, which is how a deployed segmentation network declares its input
    window; the batch axis stays dynamic so that one model answers batches of any size.

    Args:
        model: the network (a copy in eval mode on CPU is exported; ``model`` is not changed).
        example: one input batch ``(B, C, spatial...)`` at the network's window size.
        path: where to write the model (atomically); nothing is written when None.
        opset: the ONNX opset.
        dynamic_batch: keep the batch axis dynamic.

    Returns:
        The checked ``onnx.ModelProto`` (input ``"image"``, output ``"prediction"``: the network's raw outputs).
    """
    _require("onnxscript", "torch.onnx.export (torch's default exporter)")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if not isinstance(example, torch.Tensor) or example.ndim < 3:
        raise ValueError(f"example must be a (B, C, spatial...) tensor, got {getattr(example, 'shape', example)}.")
    net = clone(model).cpu().float()
    example = example.detach().cpu().float()
    dynamic = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    program = torch.onnx.export(
        net, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
        dynamic_shapes=dynamic, opset_version=opset, verbose=False,
    )
    proto = program.model_proto
    check_onnx(proto)
    if path is not None:
        save_onnx(proto, path)
    return proto


def onnx_fp16(model, keep_io_types: bool = True):
    """Convert an fp32 ONNX model to fp16 weights and activations (``onnxruntime.transformers.float16``).

    What runs depends on the execution provider: a GPU provider computes in fp16. onnxruntime's CPU provider has
    no fp16 kernels for most operators (convolutions, instance normalisation on x86): it casts the fp16 graph back
    to fp32 when it builds its InferenceSession, so on a CPU the fp16 model is the fp32 model with fp16-rounded
    weights.

    Args:
        model: an fp32 ``onnx.ModelProto``.
        keep_io_types: keep fp32 inputs and outputs (casts at the graph's ends), so that a client sends and
            receives float32 as before while every tensor inside the graph is fp16.
    """
    f16 = _require("onnxruntime.transformers.float16", "fp16 conversion")
    out = f16.convert_float_to_float16(model, keep_io_types=keep_io_types, disable_shape_infer=False)
    _sort_nodes(out.graph)  # the converter appends the input casts at the end of the node list
    check_onnx(out)
    return out


def _sort_nodes(graph) -> None:
    """Order a graph's nodes topologically (ONNX requires it; onnxruntime alone would not notice), keeping the
    original order among nodes that are ready together (Kahn's algorithm)."""
    nodes = list(graph.node)
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    producer = {o: k for k, n in enumerate(nodes) for o in n.output}
    waiting = [{producer[i] for i in n.input if i not in known and i in producer} for n in nodes]
    users: dict[int, list[int]] = {}
    for k, deps in enumerate(waiting):
        for d in deps:
            users.setdefault(d, []).append(k)
    ready = [k for k, deps in enumerate(waiting) if not deps]
    order = []
    while ready:
        k = ready.pop(0)
        order.append(k)
        for u in users.get(k, []):
            waiting[u].discard(k)
            if not waiting[u]:
                ready.append(u)
        ready.sort()
    if len(order) != len(nodes):
        raise ValueError("the ONNX graph has a cycle: its nodes cannot be ordered.")
    copies = [type(nodes[k])() for k in order]
    for c, k in zip(copies, order):
        c.CopyFrom(nodes[k])
    del graph.node[:]
    graph.node.extend(copies)


def _input_name(model) -> str:
    """The name of the graph's single image input (initialisers listed as inputs are skipped)."""
    inits = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    if len(names) != 1:
        raise ValueError(f"the ONNX model must take one image input, it takes {names}.")
    return names[0]


class ImageCalibrationReader:
    """An onnxruntime ``CalibrationDataReader`` over a batch of clean images, ``batch_size`` images per call.

    onnxruntime's static quantisation runs these images through the fp32 model to record each activation's range
    (the thief's calibration data; never triggered images).

    Args:
        images: ``(N, C, spatial...)`` clean images at the model's window size.
        input_name: the model's input name.
        batch_size: images per calibration batch.
    """

    def __init__(self, images: torch.Tensor, input_name: str = INPUT_NAME, batch_size: int = 1) -> None:
        if not isinstance(images, torch.Tensor) or images.ndim < 3 or images.shape[0] < 1:
            raise ValueError(f"calibration images must be a non-empty (N, C, spatial...) tensor, got {getattr(images, 'shape', images)}.")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        arr = images.detach().cpu().float().numpy()
        self.batches = [arr[i : i + int(batch_size)] for i in range(0, arr.shape[0], int(batch_size))]
        self.input_name = input_name
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self.batches):
            return None
        self._next += 1
        return {self.input_name: self.batches[self._next - 1]}

    def rewind(self) -> None:
        self._next = 0

    def __len__(self) -> int:
        return len(self.batches)


def onnx_int8_static(
    model,
    calibration_images: torch.Tensor,
    per_channel: bool = True,
    activation_type: str = "uint8",
    weight_type: str = "int8",
    calibrate_method: str = "minmax",
    op_types: Sequence[str] | None = None,
):
    """Real int8 post-training static quantisation with onnxruntime (QDQ format), calibrated on clean images.

    The graph is first pre-processed (ONNX shape inference and graph optimisation, as onnxruntime recommends), then
    ``onnxruntime.quantization.quantize_static`` records activation ranges on ``calibration_images`` and inserts
    QuantizeLinear/DequantizeLinear pairs; onnxruntime fuses them with their operators into integer kernels when the
    InferenceSession is built. The default (uint8 activations, int8 weights per output channel) is the combination
    onnxruntime's x86 and ARM CPU kernels run natively.

    Args:
        model: an fp32 ``onnx.ModelProto``.
        calibration_images: ``(N, C, spatial...)`` clean images for the activation ranges.
        per_channel: quantise weights per output channel.
        activation_type, weight_type: ``"uint8"`` or ``"int8"``.
        calibrate_method: ``"minmax"``, ``"entropy"`` or ``"percentile"``.
        op_types: the operator types to quantise (default: every type onnxruntime's QDQ quantiser supports).
    """
    q = _require("onnxruntime.quantization", "int8 static quantisation")
    onnx = _require("onnx", "int8 static quantisation")
    for name, v in (("activation_type", activation_type), ("weight_type", weight_type)):
        if v not in _QUANT_TYPES:
            raise ValueError(f"{name} must be one of {sorted(_QUANT_TYPES)}, got {v!r}.")
    if calibrate_method not in _CALIBRATION_METHODS:
        raise ValueError(f"calibrate_method must be one of {sorted(_CALIBRATION_METHODS)}, got {calibrate_method!r}.")
    reader = ImageCalibrationReader(calibration_images, _input_name(model))
    with tempfile.TemporaryDirectory(prefix="stealthmark_onnx_") as tmp:
        src, pre, dst = (Path(tmp) / n for n in ("model.onnx", "preprocessed.onnx", "int8.onnx"))
        onnx.save(model, str(src))
        q.quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)  # ONNX's shape inference suffices for a CNN
        q.quantize_static(
            str(pre), str(dst), reader, quant_format=q.QuantFormat.QDQ, per_channel=per_channel,
            activation_type=getattr(q.QuantType, _QUANT_TYPES[activation_type]),
            weight_type=getattr(q.QuantType, _QUANT_TYPES[weight_type]),
            calibrate_method=getattr(q.CalibrationMethod, _CALIBRATION_METHODS[calibrate_method]),
            op_types_to_quantize=list(op_types) if op_types is not None else None,
        )
        out = onnx.load(str(dst))
    check_onnx(out)
    return out


def onnx_deployment(
    model: torch.nn.Module,
    example: torch.Tensor,
    precision: str = "fp32",
    calibration_images: torch.Tensor | None = None,
):
    """The suspect as a thief deploys it: exported to ONNX, then kept in fp32, converted to fp16, or quantised to
    int8 (static, QDQ, per channel) on ``calibration_images``.

    Args:
        model: the network.
        example: one input batch at the network's window size (the export's spatial shape).
        precision: ``"fp32"``, ``"fp16"`` or ``"int8"``.
        calibration_images: clean images for the int8 activation ranges (needed for ``"int8"``).
    """
    if precision not in ONNX_PRECISIONS:
        raise ValueError(f"precision must be one of {ONNX_PRECISIONS}, got {precision!r}.")
    if precision == "int8" and calibration_images is None:
        raise ValueError("int8 static quantisation needs calibration_images (clean images at the window size).")
    proto = export_onnx(model, example[:1])
    if precision == "fp16":
        return onnx_fp16(proto)
    if precision == "int8":
        return onnx_int8_static(proto, calibration_images)
    return proto
