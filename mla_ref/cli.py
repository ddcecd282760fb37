"""The ``mla-ref`` command line: ``mla-ref info PRESET|config.json``."""

from __future__ import annotations

import argparse
import sys

from .config import load_config, preset_names
from .errors import MlaRefError
from .info import info_text


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mla-ref`` console script; returns the exit status."""
    parser = argparse.ArgumentParser(prog="mla-ref", description="NumPy reference for DeepSeek MLA, MoE routing and MTP.")
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="print the derived constants of a preset or a Hugging Face config.json")
    info.add_argument("config", help=f"a preset ({', '.join(preset_names())}) or a config.json / yaml path")
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            print(info_text(load_config(args.config)))
    except MlaRefError as error:
        print(f"mla-ref: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
