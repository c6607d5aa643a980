"""Exceptions raised by hf_pelrp. Each message says what was wrong and what to do."""

from __future__ import annotations


class HfPelrpError(Exception):
    """Base class of every hf_pelrp error."""


class UnsupportedModelError(HfPelrpError, ValueError):
    """The model's architecture has no adapter, or has been modified in a way the rules cannot see through."""


class AttributionInputError(HfPelrpError, ValueError):
    """The inputs or the target of an attribution are invalid."""


class AttributionStateError(HfPelrpError, RuntimeError):
    """The model is in a state where attribution cannot run (e.g. already inside an attribution context)."""


class AttributionFileError(HfPelrpError, ValueError):
    """A saved attribution file is truncated, tampered with, of an unknown format version, or not an attribution."""
