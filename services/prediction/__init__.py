"""histoloop prediction service: every spot through the latest model (TorchScript artifact)."""
