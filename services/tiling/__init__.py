"""histoloop tiling service."""
