"""bayesprune: Bayesian structured pruning (BMRS) and Bayes-factor pruning for PyTorch."""

from .criteria import CRITERIA, PruneReport, prune, report, scores
from .distributions import LogUniform, TruncatedLogNormal
from .noise import MultiplicativeNoise, add_noise, kl, noise_layers, remove_noise
from .reduction import delta_f_normal, delta_f_uniform
from .removal import count_parameters, remaining_parameters, shrink, shrink_for_training
from .export import export_onnx, load_shrunk, save_shrunk
from .benchmarking import size_speed_report

__version__ = "0.1.0"

__all__ = [
    "CRITERIA",
    "LogUniform",
    "MultiplicativeNoise",
    "PruneReport",
    "TruncatedLogNormal",
    "add_noise",
    "count_parameters",
    "delta_f_normal",
    "delta_f_uniform",
    "export_onnx",
    "kl",
    "load_shrunk",
    "noise_layers",
    "prune",
    "remaining_parameters",
    "remove_noise",
    "report",
    "save_shrunk",
    "scores",
    "shrink",
    "shrink_for_training",
    "size_speed_report",
]
