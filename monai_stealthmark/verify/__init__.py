"""Black-box verification: query a suspect model with triggered images and read the QR from its probabilities.

Layers, each importing only the ones above it: ``query`` (black-box calls, probability checks), ``readout``
(scores to QR modules, statistics), ``lime`` and ``report``, ``claims`` (null distribution, commitment),
``verifier`` (:func:`verify_ownership`), then ``calibrate`` (:func:`calibrate_null`), ``badnet`` and ``sweep``
(:func:`verify_over_scales`, through a pipeline that resamples by the stated spacing) on top;
``output_mark`` (:func:`detect_output_mark`, clean queries) and ``onnx_query`` (ONNX models run by onnxruntime) sit
on ``query``; ``remote`` (HTTP queries) stands alone.
"""

from __future__ import annotations

from .badnet import BadNetReport, verify_badnet
from .calibrate import calibrate_null
from .output_mark import OUTPUT_MARK_ALPHA, OutputMarkReport, detect_output_mark, output_mark_logits
from .claims import Commitment, NullDistribution, check_commitment, vote_agreement
from .lime import lime_attributions, lime_masks, lime_reference_attributions, perturbed_queries, weighted_ridge
from .onnx_query import OnnxModelQuery, OnnxRuntimeModel, load_suspect_query
from .query import ModelQuery, NotProbabilitiesError, check_probabilities, fit_window, is_softmax_output, uncertainty_map
from .readout import (
    ERASURE_MARGIN_PX,
    binomial_p_value,
    bit_accuracy,
    cell_means,
    organ_mask,
    organ_modules,
    otsu_threshold,
    read_qr,
    read_scores,
    scores_to_modules,
    uncertainty_scores,
    vote_modules,
)
from .report import VerificationReport
from .verifier import direct_scores, trigger_batch, verify_ownership
from .sweep import COARSE_EVERY, SCALE_STEP, ScaleSweepReport, sweep_scales, verify_over_scales

__all__ = [
    "BadNetReport", "verify_badnet",
    "calibrate_null",
    "OUTPUT_MARK_ALPHA", "OutputMarkReport", "detect_output_mark", "output_mark_logits",
    "Commitment", "NullDistribution", "check_commitment", "vote_agreement",
    "lime_attributions", "lime_masks", "lime_reference_attributions", "perturbed_queries", "weighted_ridge",
    "OnnxModelQuery", "OnnxRuntimeModel", "load_suspect_query",
    "ModelQuery", "NotProbabilitiesError", "fit_window", "check_probabilities", "is_softmax_output", "uncertainty_map",
    "ERASURE_MARGIN_PX", "binomial_p_value", "bit_accuracy", "cell_means", "organ_mask", "organ_modules", "uncertainty_scores", "otsu_threshold", "read_qr",
    "read_scores", "scores_to_modules", "vote_modules",
    "VerificationReport",
    "direct_scores", "trigger_batch", "verify_ownership",
    "COARSE_EVERY", "SCALE_STEP", "ScaleSweepReport", "sweep_scales", "verify_over_scales",
]
