"""bayesprune: Bayesian structured pruning (BMRS) and Bayes-factor pruning for PyTorch."""

from .criteria import (
    CRITERIA,
    BMRSNormal,
    BMRSUniform,
    Criterion,
    ExpectedTheta,
    GradNorm,
    L2Norm,
    SNR,
    get_criterion,
)
from .distributions import LogUniform, TruncatedLogNormal
from .noise import DEFAULT_SHARING, MultiplicativeNoise, add_noise, kl, noise_layers, remove_noise, stored_example_inputs
from .pruning import LayerReport, PruneReport, prune, report, round_masks, scores
from .reduction import REFERENCE_THRESHOLD, delta_f_normal, delta_f_uniform
from .counting import remaining_parameters
from .removal import ShrinkVerificationWarning, count_parameters, shrink, shrink_for_training
from .export import OnnxExport, export_onnx, load_shrunk, save_shrunk
from .heads import HeadNoise, add_head_noise
from .benchmarking import SizeSpeedReport, size_speed_report

__version__ = "0.1.0"

__all__ = [
    "BMRSNormal",
    "BMRSUniform",
    "CRITERIA",
    "Criterion",
    "DEFAULT_SHARING",
    "ExpectedTheta",
    "GradNorm",
    "HeadNoise",
    "L2Norm",
    "LayerReport",
    "LogUniform",
    "MultiplicativeNoise",
    "OnnxExport",
    "PruneReport",
    "REFERENCE_THRESHOLD",
    "SNR",
    "ShrinkVerificationWarning",
    "SizeSpeedReport",
    "TruncatedLogNormal",
    "add_head_noise",
    "add_noise",
    "count_parameters",
    "delta_f_normal",
    "delta_f_uniform",
    "export_onnx",
    "get_criterion",
    "kl",
    "load_shrunk",
    "noise_layers",
    "prune",
    "remaining_parameters",
    "remove_noise",
    "report",
    "round_masks",
    "save_shrunk",
    "scores",
    "shrink",
    "shrink_for_training",
    "size_speed_report",
    "stored_example_inputs",
]
