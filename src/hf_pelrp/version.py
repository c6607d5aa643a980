"""The installed version of hf_pelrp, read from the package metadata (never from the package ``__init__``)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def package_version() -> str:
    """The version pip installed (``"0+unknown"`` when running from a source tree that was never installed)."""
    try:
        return version("hf_pelrp")
    except PackageNotFoundError:
        return "0+unknown"
