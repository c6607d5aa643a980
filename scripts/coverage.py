"""Print (or write into README.md) the table of which transformers model types hf_pelrp explains, per head.

``python scripts/coverage.py``          print the table
``python scripts/coverage.py --write``  replace the README's table between its coverage markers
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hf_pelrp.adapters.coverage import coverage_table

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- coverage:table -->", "<!-- /coverage:table -->"


def write(text: str) -> None:
    readme = README.read_text(encoding="utf-8")
    start, stop = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    README.write_text(readme[:start] + "\n" + text + "\n" + readme[stop:], encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--write", action="store_true", help="write the table into README.md")
    args = parser.parse_args(argv)
    text = coverage_table()
    if args.write:
        write(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
