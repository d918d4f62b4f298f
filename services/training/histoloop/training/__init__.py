"""histoloop training service."""

from .evaluate import classification_metrics
from .export import export_torchscript, input_layout
from .heads import (
    HEADS,
    FitReport,
    Head,
    UnknownHead,
    inverse_frequency_weights,
    make_head,
    stratified_split,
)
from .pipeline import TrainedModel, train_model
from .resampling import adaptive_resampling_weights, resampling_weights
from .scaling import FeatureScaling, log1p_normalise

__all__ = [
    "HEADS",
    "FeatureScaling",
    "FitReport",
    "Head",
    "TrainedModel",
    "UnknownHead",
    "adaptive_resampling_weights",
    "classification_metrics",
    "export_torchscript",
    "input_layout",
    "inverse_frequency_weights",
    "log1p_normalise",
    "make_head",
    "resampling_weights",
    "stratified_split",
    "train_model",
]
