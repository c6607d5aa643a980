"""Write the pip constraints files of the three environments the project is tested in.

``python scripts/constraints.py lock``   the locked set: every package of the current (passing) environment,
                                         from ``pip freeze``, written to constraints/lock.txt (``make lock``)
``python scripts/constraints.py oldest`` the lower bounds of pyproject.toml's ranges (core and extras), pinned
                                         with ``==``, to standard output (``make test-oldest``)

pyproject.toml keeps the ranges users install with; the lock is what ``make demo``, ``make test`` and CI install.
"""

from __future__ import annotations

import argparse
import datetime
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints" / "lock.txt"
#: the project itself and the build tools of the environment: never constraints
SKIP = {"hf-pelrp", "pip", "setuptools", "wheel"}


#: extras the oldest environment leaves out (inseq 0.7 needs newer releases than several of our lower bounds)
NOT_OLDEST = {"inseq"}


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for name, extra in project.get("optional-dependencies", {}).items():
        if name not in NOT_OLDEST:
            reqs += [Requirement(r) for r in extra]
    return [r for r in reqs if canonicalize_name(r.name) not in SKIP]


def oldest() -> list[str]:
    """``name==X`` for every ``>=X`` (or ``==X.*``) lower bound in pyproject.toml."""
    pins: dict[str, str] = {}
    for req in _requirements():
        for spec in req.specifier:
            if spec.operator in (">=", "==", "~="):
                pins[canonicalize_name(req.name)] = f"{req.name}=={spec.version.replace('.*', '.0')}"
    return sorted(pins.values())


def lock(python: str) -> list[str]:
    """Every installed package of ``python``'s environment, local version labels (``+cpu``) dropped: the torch
    CPU build and the default build share a version number, and ``==2.13.0`` admits both."""
    frozen = subprocess.run(
        [python, "-m", "pip", "freeze", "--exclude-editable", "--all"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    lines = []
    for line in frozen.splitlines():
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^+\s]+)(\+\S+)?", line.strip())
        if match and canonicalize_name(match[1]) not in SKIP:
            lines.append(f"{match[1]}=={match[2]}")
    return sorted(lines, key=str.lower)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=["lock", "oldest"])
    parser.add_argument(
        "--python", default=sys.executable, help="the environment to lock (default: this one)"
    )
    args = parser.parse_args(argv)
    if args.what == "oldest":
        print("\n".join(oldest()))
        return 0
    version = subprocess.run(
        [args.python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    header = [
        "# The versions the test suite last passed with (make lock writes this file from a passing environment).",
        f"# Python {version}, {datetime.date.today().isoformat()}. make demo / make test / CI install exactly these;",
        "# pyproject.toml keeps the ranges users install with.",
    ]
    LOCK.write_text("\n".join(header + lock(args.python)) + "\n", encoding="utf-8")
    print(f"wrote {LOCK.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
