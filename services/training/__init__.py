"""histoloop training service."""
