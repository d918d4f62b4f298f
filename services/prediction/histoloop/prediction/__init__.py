"""histoloop prediction service: every spot through the latest model (TorchScript artifact)."""

from histoloop.prediction.step import OnDemandPredictions, PredictionStep, prediction_map_png

__all__ = ["OnDemandPredictions", "PredictionStep", "prediction_map_png"]
