"""histoloop prediction service."""
