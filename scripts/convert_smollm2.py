"""Convert the pip-shipped SmolLM2-135M-Instruct GGUF file once into a cached safetensors checkpoint.

Run by ``scripts/setup.sh``; skipped when the cache is already complete (every file listed in its manifest is
present with its size). The checkpoint is written into a temporary folder and renamed into place, so an
interrupted run leaves nothing broken behind. The cache folder is ``hf_pelrp.assets.cache_dir()`` (``$HF_PELRP_CACHE``, else the user's cache).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hf_pelrp.assets import SMOLLM2_CACHE_NAME, cache_dir, checkpoint_complete, convert_smollm2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output",
        default=None,
        help=f"checkpoint folder (default: <cache>/{SMOLLM2_CACHE_NAME}, cache = {cache_dir()})",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    destination = cache_dir() / SMOLLM2_CACHE_NAME if args.output is None else Path(args.output)
    if checkpoint_complete(destination):
        print(f"SmolLM2 checkpoint already converted: {destination}")
        return 0
    convert_smollm2(destination, progress=not args.quiet)
    print(f"SmolLM2 checkpoint written to {destination}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
