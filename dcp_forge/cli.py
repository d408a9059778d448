"""The ``dcp-forge`` command line. Exit codes: 0 success, 1 a check failed, 2 bad usage/input."""

from __future__ import annotations

import argparse
import sys

from . import list_checkpoints, read_manifest
from .errors import ForgeError


def _cmd_ls(args: argparse.Namespace) -> int:
    for path in list_checkpoints(args.output_dir):
        print(path)
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    manifest = read_manifest(args.url)
    if args.json:
        print(manifest.to_json())
        return 0
    print(f"{manifest.checkpoint_path}: world size {manifest.world_size}, saved {manifest.timestamp.isoformat()}")
    print(f"saved topology: {manifest.describe_topology()}")
    print(f"{'component':<14} {'pattern':<11} {'copies':>6} {'bytes':>12}  {'checksum':<16}  writers")
    for key, comp in manifest.components.items():
        print(f"{key:<14} {comp.sharing_pattern:<11} {len(comp.copies):>6} {comp.size_bytes:>12}  "
              f"{comp.checksum or '-':<16}  {comp.ranks}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dcp-forge", description="Inspect and manage dcp_forge checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ls", help="list committed checkpoints under an output_dir")
    p.add_argument("output_dir")
    p.set_defaults(fn=_cmd_ls)
    p = sub.add_parser("inspect", help="show a checkpoint's components, patterns, sizes and checksums")
    p.add_argument("url")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(fn=_cmd_inspect)
    sub.add_parser("demo", help="run the demo job (train, interrupt, resume, compare); see demo --help",
                   add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["demo"]:  # the demo owns its options
        from .demo import main as demo_main

        return demo_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ForgeError, FileNotFoundError, ValueError) as err:
        print(f"dcp-forge: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
