"""histoloop annotation-store service."""
