"""Black-box verification: query a suspect model with triggered images and read the QR from its probabilities."""

from __future__ import annotations

from .badnet import BadNetReport, verify_badnet
from .calibrate import Commitment, NullDistribution, calibrate_null, check_commitment, vote_agreement
from .lime import lime_attributions, lime_masks, lime_reference_attributions, perturbed_queries, weighted_ridge
from .query import ModelQuery, NotProbabilitiesError, check_probabilities, is_softmax_output, uncertainty_map
from .readout import ERASURE_MARGIN_PX, binomial_p_value, bit_accuracy, cell_means, organ_modules, otsu_threshold, read_qr, read_scores, scores_to_modules, vote_modules
from .report import VerificationReport
from .verifier import direct_scores, trigger_batch, verify_ownership
