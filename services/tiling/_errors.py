"""Typed errors of the tiling service; each names the file and the field at fault."""

from __future__ import annotations

from histoloop.errors import InvalidArgument, NotFound

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


class SpatialFileMissing(NotFound):
    """A Space Ranger ``spatial/`` file (positions CSV, ``scalefactors_json.json``) is absent."""


class BadPositionsFile(InvalidArgument):
    """The tissue positions CSV has wrong columns or values; the message names the field."""


class BadScaleFactors(InvalidArgument):
    """``scalefactors_json.json`` is not valid JSON or lacks a needed numeric field."""


class PositionsOutsideSlide(InvalidArgument):
    """Some in-tissue spot centres map outside the slide."""


class ScaleMismatch(InvalidArgument):
    """Most spots map outside the slide or onto background: the scale factor is wrong."""
