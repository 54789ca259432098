"""The ``dllm-zoo`` console command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _summary(cls: type) -> str:
    doc = (cls.__doc__ or "").strip().splitlines()
    return doc[0] if doc else ""


def _convert_checkpoint(args: argparse.Namespace) -> int:
    import torch

    from dllm_zoo import registry
    from dllm_zoo.parallel import convert_checkpoint

    cls = registry.resolve("backbone", args.backbone)
    if args.pretrained is not None and args.preset is not None:
        raise SystemExit("convert-checkpoint: pass --preset or --pretrained, not both")
    if args.layout is not None and args.pretrained is not None:
        raise SystemExit("convert-checkpoint: --layout goes with --preset (a --pretrained directory has its layout)")
    if args.pretrained is not None:
        backbone = cls(pretrained=args.pretrained)
    else:  # the checkpoint replaces every weight: allocate, never initialise (an 8B init costs minutes)
        layout = {} if args.layout is None else {"layout": args.layout}
        with torch.device("meta"):
            backbone = cls(config=args.preset, **layout)
        backbone.to_empty(device="cpu")
    out = convert_checkpoint(args.checkpoint, args.out, backbone)
    print(f"wrote {out} ({type(backbone).__name__}, original layout)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``dllm-zoo list [axis]``, ``convert-checkpoint CKPT OUT --backbone …``, ``estimate-memory …``."""
    import dllm_zoo  # noqa: F401  (imports every built-in component)
    from dllm_zoo import registry

    parser = argparse.ArgumentParser(prog="dllm-zoo", description="dllm_zoo utilities")
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="list the components of one axis, or of all")
    p_list.add_argument("axis", nargs="?", choices=sorted(registry.AXES), help="component axis")
    p_conv = sub.add_parser(
        "convert-checkpoint",
        help="stage checkpoint (sharded FSDP2 dir or single .ckpt) -> the backbone's original layout",
    )
    p_conv.add_argument(
        "checkpoint", help="the checkpoint: a sharded directory (…/last.ckpt/ with meta.pt) or a single .ckpt file"
    )
    p_conv.add_argument("out", help="output directory")
    p_conv.add_argument("--backbone", required=True, help="backbone class (e.g. LLaDABackbone, SDARBackbone)")
    p_conv.add_argument("--preset", default=None, help="size preset the run trained (e.g. tiny, llada-8b)")
    p_conv.add_argument(
        "--layout", default=None, help="with --preset: the token layout the run trained (words; default: the preset's)"
    )
    p_conv.add_argument("--pretrained", default=None, help="or: the checkpoint directory the run started from")
    from dllm_zoo import memory

    p_mem = sub.add_parser("estimate-memory", help="per-device training memory: weights, grads, AdamW, activations")
    memory.add_arguments(p_mem)
    args = parser.parse_args(argv)

    if args.command == "estimate-memory":
        return memory.run_cli(args)

    if args.command == "convert-checkpoint":
        return _convert_checkpoint(args)
    if args.command == "list":
        for axis in [args.axis] if args.axis else sorted(registry.AXES):
            print(f"{axis}:")
            for name, cls in registry.components(axis).items():
                print(f"  {name:<32} {cls.__module__}  {_summary(cls)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
