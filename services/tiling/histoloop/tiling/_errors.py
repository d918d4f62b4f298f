"""Typed errors of the tiling service; each names the file and the field at fault."""

from __future__ import annotations

from histoloop.errors import InvalidArgument, NotFound
from histoloop.formats.positions import BadPositionsFile, BadScaleFactors, SpatialFileMissing

__all__ = [
    "BadPositionsFile",
    "BadScaleFactors",
    "MissingMpp",
    "PositionsOutsideSlide",
    "ScaleMismatch",
    "SlideNotFound",
    "SlideUnreadable",
    "SpatialFileMissing",
]


class SlideNotFound(NotFound):
    """The slide file does not exist."""


class SlideUnreadable(InvalidArgument):
    """OpenSlide cannot read the slide: unsupported format, truncated or corrupt file."""


class MissingMpp(InvalidArgument):
    """The slide has no ``openslide.mpp-x`` property but a physical resolution is needed."""


class PositionsOutsideSlide(InvalidArgument):
    """Some in-tissue spot centres map outside the slide."""


class ScaleMismatch(InvalidArgument):
    """Most spots map outside the slide or onto background: the scale factor is wrong."""
