"""Optional dependencies of the views, imported on first use: matplotlib (figures), rich (terminal tables),
jinja2 (HTML templates). Importing hf_pelrp does not pay for them; a missing one says which extra to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: the distribution that provides each top-level module, for the error message
_DISTRIBUTIONS = {"matplotlib": "matplotlib", "rich": "rich", "jinja2": "jinja2"}


def require(module: str) -> ModuleType:
    """Import ``module`` (e.g. ``"matplotlib.figure"``), or raise an :class:`ImportError` that names the extra.

    Raises
    ------
    ImportError
        The package is not installed: ``pip install 'hf_pelrp[viz]'``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        top = module.split(".")[0]
        if err.name is not None and err.name.split(".")[0] != top:
            raise  # the package is there but one of its own imports failed: that message is the useful one
        dist = _DISTRIBUTIONS.get(top, top)
        raise ImportError(
            f"this view needs {dist}, which is not installed: pip install 'hf_pelrp[viz]' (or pip install {dist})"
        ) from err
