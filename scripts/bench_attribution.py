"""``make bench``: the cost of one PE-LRP attribution against plain Gradient x Input.

A thin caller of :mod:`hf_pelrp.bench` (the benchmark ships with the package, so ``hf-pelrp bench`` runs the
same code); see that module for the method and ``--help`` for the options.
"""

from __future__ import annotations

import sys

from hf_pelrp.bench import main

if __name__ == "__main__":
    sys.exit(main())
