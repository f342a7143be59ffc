"""The ``nipype-s3`` command line.

Errors print as one clear line (exit status 1) unless ``--debug`` is given.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from . import __version__
from .exceptions import NipypeS3Error

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nipype-s3",
        description="Nipype pipelines in AWS: S3 sinks and grabbers, containers and "
                    "workflows on EC2.")
    parser.add_argument("--version", action="version", version=f"nipype-s3 {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show full tracebacks and debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo", help="run a real pipeline on an embedded S3 (no AWS account needed)",
        description="Start an S3 server on 127.0.0.1, upload real NIfTI data, run a Nipype "
                    "workflow that computes per-subject mean images and sinks them with "
                    "S3DataSink, then print the keys written.")
    demo.add_argument("--keep", metavar="DIR",
                      help="also keep a local copy of the outputs in DIR")
    demo.add_argument("--plugin", default="Linear", choices=["Linear", "MultiProc"],
                      help="nipype execution plugin (default: Linear)")
    demo.set_defaults(func=_cmd_demo)
    return parser


def _cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(keep=args.keep, plugin=args.plugin)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    os.environ.setdefault("NIPYPE_NO_ET", "1")
    if args.debug:
        logging.basicConfig(level=logging.DEBUG)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("nipype-s3: interrupted", file=sys.stderr)
        return 130
    except (NipypeS3Error, OSError, RuntimeError) as exc:
        if args.debug:
            raise
        print(f"nipype-s3 {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
