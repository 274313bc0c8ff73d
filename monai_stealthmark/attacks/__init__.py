"""Attacks a thief could run on a watermarked model, and a runner that verifies before and after each.

One module per attack: :mod:`.finetune` (all layers, last layer, re-initialised head), :mod:`.prune` (global
magnitude, channel fine-pruning), :mod:`.quantize` (fp16/bf16, int8 weights, int8 static with calibrated
activations, TorchScript round trip), :mod:`.onnx` (the model exported to ONNX and run by onnxruntime in fp32, fp16
or real int8 static quantisation), :mod:`.noise` (weight noise), :mod:`.distill` (students on soft outputs or
hard masks, with a query budget), :mod:`.input` (transforms of the verifier's queries: noise, blur, rescaling,
resampling, flips, JPEG), :mod:`.overwrite` (the attacker embeds their own watermark). :mod:`.runner` records
clean Dice, ASR, p-value and time for each and decides whether the watermark was *removed* (verdict lost while
clean Dice stays within 5 points).
"""

from __future__ import annotations

from .distill import distill
from .false_claim import (
    ForgedTrigger,
    ProtocolError,
    check_referee_images,
    claim_summary,
    false_claim_upper_bound,
    forge_trigger,
    image_digest,
    nearest_seeds,
    optimise_images,
    protocol_claim,
    qr_cell_targets,
    random_accuser_keys,
    read_submitted_queries,
    stamp_forged,
    trigger_canvas,
    uncertainty_loss,
)
from .finetune import finetune, reinit_head
from .input import INPUT_ATTACKS, GridQuery, InputTransformQuery, SpacingQuery
from .noise import weight_noise
from .onnx import ONNX_PRECISIONS, ImageCalibrationReader, export_onnx, onnx_deployment, onnx_fp16, onnx_int8_static, save_onnx
from .overwrite import overwrite
from .prune import channel_prune, global_magnitude_prune, sparsity
from .quantize import CastQuery, int8_static, int8_weights, torchscript_roundtrip
from .runner import AttackResult, is_removed, run_attack

__all__ = [
    "distill", "finetune", "reinit_head", "INPUT_ATTACKS", "InputTransformQuery", "GridQuery", "SpacingQuery", "weight_noise", "overwrite",
    "channel_prune", "global_magnitude_prune", "sparsity", "CastQuery", "int8_static", "int8_weights",
    "torchscript_roundtrip", "AttackResult", "is_removed", "run_attack",
    "ONNX_PRECISIONS", "ImageCalibrationReader", "export_onnx", "onnx_deployment", "onnx_fp16", "onnx_int8_static",
    "save_onnx",
    "ForgedTrigger", "ProtocolError", "check_referee_images", "claim_summary", "false_claim_upper_bound", "forge_trigger",
    "image_digest", "nearest_seeds", "optimise_images", "protocol_claim", "qr_cell_targets", "random_accuser_keys",
    "read_submitted_queries", "stamp_forged", "trigger_canvas", "uncertainty_loss",
]
