"""The digits example in one command: data + teacher, then the whole recipe.

    python examples/digits/run.py            # prepare (skipped when done) + recipe
    python examples/digits/run.py --dry-run  # show which recipe steps would run

Equivalent to ``python examples/digits/prepare.py`` followed by
``edgeship convert run examples/digits/recipe.toml``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="digits: teacher to signed int8 package")
    ap.add_argument("--dry-run", action="store_true", help="print the recipe plan, run nothing")
    ap.add_argument("--quiet", "-q", action="store_true")
    args = ap.parse_args(argv)
    from prepare import prepare

    from edgeship.converters.recipe import run_recipe
    from edgeship.errors import EdgeshipError

    t0 = time.monotonic()
    try:
        if not args.dry_run:
            prepare(HERE / "data", quiet=args.quiet)
        result = run_recipe(HERE / "recipe.toml", dry_run=args.dry_run, quiet=args.quiet)
    except EdgeshipError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(result.summary())
    if not args.dry_run:
        print(f"total wall time (prepare + recipe): {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
