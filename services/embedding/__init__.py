"""histoloop embedding service."""
