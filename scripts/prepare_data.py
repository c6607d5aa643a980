"""Fetch the evaluation data from offline sources into the git-ignored cache (idempotent).

* Rotten-Tomatoes movie-review sentences: only in the vaderSentiment 3.3.2 source tarball (PyPI), file
  ``movieReviewSnippets_GroundTruth.txt`` -> ``.cache/data/movie_reviews.tsv`` (id, mean score, text).
* Fashion-MNIST: the Debian package ``dataset-fashion-mnist`` (IDX files in /usr/share/datasets/fashion-mnist/);
  installed with apt-get when missing (needs root).

Usage: ``python scripts/prepare_data.py [--skip-fashion-mnist]``
"""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".cache" / "data"
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
VADER = "vaderSentiment==3.3.2"
SNIPPETS = "movieReviewSnippets_GroundTruth.txt"


def movie_reviews() -> Path:
    out = DATA / "movie_reviews.tsv"
    if out.exists():
        print(f"movie reviews: {out} exists")
        return out
    DATA.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"downloading the {VADER} source distribution ...")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--no-binary",
                ":all:",
                "-d",
                tmp,
                VADER,
            ],
            check=True,
        )
        sdist = next(Path(tmp).glob("vaderSentiment-*.tar.gz"))
        with tarfile.open(sdist) as outer:
            inner_name = next(n for n in outer.getnames() if n.endswith("hutto_ICWSM_2014.tar.gz"))
            inner_bytes = outer.extractfile(inner_name).read()
        with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
            member = next(n for n in inner.getnames() if n.endswith(SNIPPETS))
            raw = inner.extractfile(member).read()
    text = raw.decode("utf-8", errors="replace")
    rows = []
    for line in text.splitlines():
        parts = line.rstrip("\n").split("\t")
        if len(parts) < 3:
            continue
        rows.append("\t".join([parts[0].strip(), parts[1].strip(), " ".join(parts[2:]).strip()]))
    out.write_text("\n".join(rows) + "\n", encoding="utf-8")
    print(f"movie reviews: {len(rows)} sentences -> {out}")
    return out


def fashion_mnist() -> Path:
    if FMNIST_DIR.exists() and any(FMNIST_DIR.iterdir()):
        print(f"fashion-mnist: {FMNIST_DIR} exists")
        return FMNIST_DIR
    if shutil.which("apt-get") is None:
        raise SystemExit("Fashion-MNIST needs the Debian package dataset-fashion-mnist (apt-get not found)")
    print("installing dataset-fashion-mnist with apt-get ...")
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "dataset-fashion-mnist"], check=True)
    return FMNIST_DIR


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-fashion-mnist", action="store_true")
    args = parser.parse_args()
    movie_reviews()
    if not args.skip_fashion_mnist:
        fashion_mnist()


if __name__ == "__main__":
    main()
