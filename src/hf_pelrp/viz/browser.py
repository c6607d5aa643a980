"""Headless Chromium for HTML views: a screenshot (PNG) or the DOM after the page's scripts ran.

Used by the browser test and ``scripts/render_screenshot.py``. Chromium runs isolated: no sandbox (it runs
as root in containers), no GPU, no network services, a throw-away profile folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

#: flags that keep Chromium from reaching out (updates, sync, QUIC) and from needing a display or a GPU
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
)


class BrowserError(RuntimeError):
    """Chromium is missing or failed to render the page."""


def find_chromium() -> str | None:
    """The Chromium executable: ``$HF_PELRP_CHROMIUM``, else ``chromium`` / ``chromium-browser`` on PATH."""
    env = os.environ.get("HF_PELRP_CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    for name in ("chromium", "chromium-browser", "/usr/bin/chromium"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _run(page: Path, extra: list[str], fragment: str, timeout: float) -> subprocess.CompletedProcess[str]:
    exe = find_chromium()
    if exe is None:
        raise BrowserError(
            "Chromium not found: install the Debian package `chromium` or set HF_PELRP_CHROMIUM"
        )
    url = Path(page).resolve().as_uri() + fragment
    with tempfile.TemporaryDirectory(prefix="hfp-chromium-") as profile:
        cmd = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, url]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as err:
            raise BrowserError(f"Chromium did not finish within {timeout} s rendering {url}") from err
    if done.returncode != 0:
        raise BrowserError(f"Chromium exited with {done.returncode}: {done.stderr[-2000:]}")
    return done


def screenshot(
    page: str | Path,
    png: str | Path,
    width: int = 1000,
    height: int = 700,
    *,
    fragment: str = "",
    timeout: float = 90.0,
) -> Path:
    """Render the HTML file ``page`` (``fragment``: a ``#...`` suffix for the URL) into ``png``."""
    png = Path(png).resolve()
    _run(Path(page), [f"--screenshot={png}", f"--window-size={width},{height}"], fragment, timeout)
    if not png.is_file() or png.stat().st_size == 0:
        raise BrowserError(f"Chromium reported success but wrote no screenshot to {png}")
    return png


def dump_dom(page: str | Path, *, fragment: str = "", timeout: float = 90.0) -> str:
    """The serialised DOM of the HTML file ``page`` after its scripts ran."""
    return _run(Path(page), ["--dump-dom"], fragment, timeout).stdout
