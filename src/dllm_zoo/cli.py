"""The ``dllm-zoo`` console command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _summary(cls: type) -> str:
    doc = (cls.__doc__ or "").strip().splitlines()
    return doc[0] if doc else ""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``dllm-zoo list [axis]``."""
    import dllm_zoo  # noqa: F401  (imports every built-in component)
    from dllm_zoo import registry

    parser = argparse.ArgumentParser(prog="dllm-zoo", description="dllm_zoo utilities")
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="list the components of one axis, or of all")
    p_list.add_argument("axis", nargs="?", choices=sorted(registry.AXES), help="component axis")
    args = parser.parse_args(argv)

    if args.command == "list":
        for axis in [args.axis] if args.axis else sorted(registry.AXES):
            print(f"{axis}:")
            for name, cls in registry.components(axis).items():
                print(f"  {name:<32} {cls.__module__}  {_summary(cls)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
