"""histoloop acquisition service."""
