"""`python -m whisper.prepare [NAME ...]`: convert and cache models so they load offline."""

from __future__ import annotations

import argparse

from .checkpoints import ModelFormatError
from .models import DEFAULT_MODEL, ModelNotFoundError, local_models, prepare


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m whisper.prepare", description=__doc__.split(": ", 1)[1])
    parser.add_argument("names", nargs="*", default=[DEFAULT_MODEL], help=f"model names (default: {DEFAULT_MODEL})")
    parser.add_argument("--list", action="store_true", help="list bundled and cached models, then stop")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(local_models()))
        return 0
    for name in args.names:
        try:
            print(f"{name}: ready in {prepare(name)}")
        except (ModelNotFoundError, ModelFormatError) as error:
            print(f"{name}: {error}")
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
