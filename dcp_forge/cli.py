"""The ``dcp-forge`` command line.

Exit codes, for scripts: 0 success (``verify``: intact; ``diff``: no differences), 1 a check found
something (``verify``: problems; ``diff``: differences), 2 bad usage or input (no such checkpoint,
unreadable records, ...). Progress bars appear on a terminal only.
"""

from __future__ import annotations

import argparse
import errno
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from .core.keys import encode_ranks
from .errors import ForgeError, LocationNotFoundError

EXIT_OK, EXIT_FOUND, EXIT_ERROR = 0, 1, 2


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    size: float = n
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)


def _ranks(ranks: Sequence[int] | None) -> str:
    if not ranks:
        return "-"
    try:
        return encode_ranks(sorted(set(ranks)))
    except ForgeError:
        return ",".join(map(str, ranks))


def _when(seconds: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds)) if seconds else "-"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> str:
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        padded = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def _progress(total: int | None, unit: str, desc: str) -> tuple[Callable[[int], None] | None, Callable[[], None]]:
    """A tqdm progress callback on a terminal; (None, no-op) otherwise."""
    if not sys.stderr.isatty():
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(total=total, unit=unit, unit_scale=True, desc=desc, leave=False)
    return bar.update, bar.close


def _storage_options(args: argparse.Namespace) -> dict[str, Any]:
    if not getattr(args, "storage_options", None):
        return {}
    try:
        options = json.loads(args.storage_options)
    except ValueError as err:
        raise ValueError(f"--storage-options must be a JSON object ({err})") from err
    if not isinstance(options, dict):
        raise ValueError("--storage-options must be a JSON object")
    return options


# --- commands -------------------------------------------------------------------------------------
def _cmd_ls(args: argparse.Namespace) -> int:
    from .ops.inspection import list_checkpoint_entries
    from .storage import location_exists

    options = _storage_options(args)
    entries = list_checkpoint_entries(args.output_dir, options, include_partial=not args.committed)
    if not entries and not location_exists(args.output_dir, options):  # a mistyped path is not an empty run
        raise LocationNotFoundError(errno.ENOENT, "no such output_dir (nothing is there)", args.output_dir)
    if args.local_dir is not None:
        return _ls_tiers(args, entries)
    if args.json:
        print(json.dumps([e.__dict__ for e in entries], indent=2))
        return EXIT_OK
    if not entries:
        print(f"no checkpoints under {args.output_dir}", file=sys.stderr)
        return EXIT_OK
    tiered = any(e.tier for e in entries)
    print(_table(["checkpoint", "step", "size", "time", "state"] + (["tier"] if tiered else []),
                 [[e.name, "-" if e.step is None else e.step, _size(e.size_bytes), _when(e.time), e.state]
                  + ([e.tier or "-"] if tiered else []) for e in entries], right=(1, 2)))
    return EXIT_OK


def _ls_tiers(args: argparse.Namespace, remote: list[Any]) -> int:
    """``ls OUTPUT_DIR --local-dir DIR``: each checkpoint once, with its state in either tier (the local
    tier as this machine's node holds it)."""
    from .ops.inspection import list_checkpoint_entries

    local = list_checkpoint_entries(args.local_dir, include_partial=not args.committed)
    by_name: dict[str, dict[str, Any]] = {}
    for tier, entries in (("remote", remote), ("local", local)):
        for e in entries:
            by_name.setdefault(e.name, {})[tier] = e
    rows = sorted(by_name.items(), key=lambda kv: min((e.time or 0.0, e.name) for e in kv[1].values()))
    if args.json:
        print(json.dumps([{"name": name, **{t: e.__dict__ for t, e in copies.items()}} for name, copies in rows],
                         indent=2))
        return EXIT_OK
    if not rows:
        print(f"no checkpoints under {args.output_dir} or in {args.local_dir}", file=sys.stderr)
        return EXIT_OK

    def state(e: Any) -> str:
        if e is None:
            return "-"
        return e.state + (f" ({e.tier})" if e.tier and e.tier.startswith("local") else "")

    table = []
    for name, copies in rows:
        first = copies.get("local") or copies["remote"]
        table.append([name, "-" if first.step is None else first.step, _size(first.size_bytes), _when(first.time),
                      state(copies.get("local")), state(copies.get("remote"))])
    print(_table(["checkpoint", "step", "size", "time", "local tier", "remote tier"], table, right=(1, 2)))
    return EXIT_OK


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .ops.inspection import summarize_checkpoint

    summary = summarize_checkpoint(args.url, _storage_options(args))
    if args.json:
        print(summary.to_json())
        return EXIT_OK
    print(f"checkpoint  {summary.path}")
    print(f"state       {summary.state}" + (f", committed {_when(summary.committed_at)}" if summary.committed_at else ""))
    if summary.topology:
        print(f"saved topology: {summary.topology}")
    if summary.versions:
        print("versions    " + ", ".join(f"{k} {v}" for k, v in sorted(summary.versions.items())))
    if summary.extra:
        print("extra       " + json.dumps(summary.extra, sort_keys=True, default=str))
    print(f"contents    {len(summary.components)} component(s), {summary.items} item(s), {_size(summary.size_bytes)}")
    print()
    print(_table(["component", "pattern", "ranks", "replicated_across", "group", "copies", "items", "size",
                  "checksum"],
                 [[c.key, c.pattern or "-", _ranks(c.ranks), _ranks(c.replicated_across), c.group or "-", c.copies,
                   c.items, _size(c.size_bytes), c.checksum or "-"] for c in summary.components],
                 right=(5, 6, 7)))
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace) -> int:
    from .errors import CheckpointNotFoundError
    from .ops.inspection import OpenCheckpoint
    from .ops.verify import ProblemKind, verify_checkpoint

    total = None
    try:
        opened = OpenCheckpoint.open(args.url, _storage_options(args))
        total = sum(c.size_bytes for c in opened.manifest.components.values()) if opened.manifest else None
    except (ForgeError, FileNotFoundError):
        pass  # verify_checkpoint reports what is wrong
    update, close = _progress(total, "B", "verify")
    try:
        problems = verify_checkpoint(args.url, _storage_options(args), thread_count=args.threads, progress=update)
    finally:
        close()
    missing = [p for p in problems if p.kind is ProblemKind.MISSING_CHECKPOINT]
    if missing:  # nothing to verify: bad input (exit 2), not a finding about a checkpoint
        raise CheckpointNotFoundError(missing[0].message)
    if args.json:
        print(json.dumps([{"kind": p.kind.value, "file": p.file, "component": p.component, "message": p.message}
                          for p in problems], indent=2))
    elif problems:
        for p in problems:
            print(f"{p.file or '-'}\t{p.component or '-'}\t{p.message}")
    else:
        print(f"OK {args.url}: every checksum matches and the checkpoint is complete"
              + (f" ({_size(total)} verified)" if total else ""))
    return EXIT_FOUND if problems else EXIT_OK


def _cmd_diff(args: argparse.Namespace) -> int:
    from .ops.diff import diff_checkpoints, differences_as_dicts

    update, close = _progress(None, "item", "diff")
    try:
        diffs = diff_checkpoints(args.a, args.b, _storage_options(args), values=not args.no_values, progress=update)
    finally:
        close()
    if args.json:
        print(json.dumps(differences_as_dicts(diffs), indent=2))
    else:
        shown = diffs if args.limit <= 0 else diffs[:args.limit]
        for d in shown:
            print(d)
        if len(shown) < len(diffs):
            print(f"... and {len(diffs) - len(shown)} more difference(s) (--limit 0 shows all)")
        if not diffs:
            print("no differences")
    return EXIT_FOUND if diffs else EXIT_OK


def _cmd_convert(args: argparse.Namespace) -> int:
    import os

    from .ops.convert import (
        guess_format,
        load_checkpoint_state,
        save_safetensors_file,
        save_torch_file,
        torch_file_to_checkpoint,
    )

    target = args.to or guess_format(args.dst)
    options = _storage_options(args)
    source_is_file = "://" not in args.src and os.path.isfile(args.src)
    if target == "dcp_forge":
        if not source_is_file:
            raise ValueError(f"converting to dcp_forge needs a torch.save file as source (got {args.src!r})")
        path = torch_file_to_checkpoint(args.src, args.dst, component=args.component, storage_options=options)
        print(f"wrote dcp_forge checkpoint {path}")
        return EXIT_OK
    if source_is_file:
        raise ValueError(f"{args.src!r} is a file; the source of a conversion to {target} is a checkpoint directory")
    state: Any = load_checkpoint_state(args.src, options, components=None if args.component is None else [args.component])
    if args.component is not None and list(state) == [args.component]:
        state = state[args.component]  # one logical value: the file holds its state dict itself
    if target == "torch":
        save_torch_file(state, args.dst)
        print(f"wrote torch.save file {args.dst} (top-level keys: {_key_list(state)})")
    else:
        skipped = save_safetensors_file(state, args.dst)
        print(f"wrote safetensors file {args.dst}")
        if skipped:
            print(f"left out {len(skipped)} non-tensor value(s) safetensors cannot hold: {skipped[:8]}"
                  + (" ..." if len(skipped) > 8 else ""), file=sys.stderr)
    return EXIT_OK


def _key_list(state: Any) -> str:
    keys = sorted(map(str, state)) if isinstance(state, dict) else []
    return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")


def _cmd_export_hf(args: argparse.Namespace) -> int:
    from .ops.export_hf import export_hf

    options = _storage_options(args)
    out_options = json.loads(args.out_storage_options) if args.out_storage_options else options
    if not isinstance(out_options, dict):
        raise ValueError("--out-storage-options must be a JSON object")
    update, close = _progress(None, "B", "export-hf")
    try:
        result = export_hf(args.url, args.out, component=args.component, max_shard_size=args.max_shard_size,
                           dtype=args.dtype, config=args.config, exclude=args.exclude or (),
                           overwrite=args.overwrite, storage_options=options, out_storage_options=out_options,
                           buffer_size=args.buffer_size, thread_count=args.threads, progress=update)
    finally:
        close()
    print(f"wrote {len(result.files)} safetensors file(s), {result.tensors} tensor(s), {_size(result.total_size)} "
          f"to {result.url}" + (f" (index {result.index})" if result.index else ""))
    if result.skipped:
        print(f"left out {len(result.skipped)} non-tensor value(s) safetensors cannot hold: {list(result.skipped[:8])}"
              + (" ..." if len(result.skipped) > 8 else ""), file=sys.stderr)
    return EXIT_OK


def _cmd_bench(args: argparse.Namespace) -> int:
    from benchmarks.suite import BenchConfig, run_suite

    config = BenchConfig(out_dir=args.out, size_mib=args.size_mib, repetitions=args.repetitions,
                         directory=args.dir, index_items=args.index_items, plot=not args.no_plot,
                         quick=args.quick)
    report = run_suite(config, log=(lambda line: print(line, file=sys.stderr)) if args.verbose else (lambda _: None),
                       progress=sys.stderr.isatty())
    print(report.text)
    print(f"\nwrote {report.json_path}" + (f" and {report.png_path}" if report.png_path else ""))
    return EXIT_OK


# --- parser ---------------------------------------------------------------------------------------
def _add_storage_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage-options", metavar="JSON", help="fsspec storage options as a JSON object "
                   "(e.g. '{\"endpoint_url\": \"http://127.0.0.1:8333\"}')")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dcp-forge", description="Inspect, verify, compare, convert and benchmark dcp_forge checkpoints.",
        epilog="Exit codes: 0 success, 1 a check found problems or differences, 2 bad usage or input. "
               "URLs may be local paths or fsspec URLs (s3://bucket/run/checkpoint-500).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("ls", help="list the checkpoints under an output_dir (committed, legacy and partial)",
                       description="List the checkpoints under OUTPUT_DIR, oldest first: name, step, size, "
                       "commit time and state (committed; legacy = plain DCP; partial = never committed, "
                       "invisible to loads).")
    p.add_argument("output_dir")
    p.add_argument("--local-dir", default=None, metavar="DIR",
                   help="also list this node's local tier (a LocalTier's path): one row per checkpoint, with its "
                        "state in the local and the remote tier")
    p.add_argument("--committed", action="store_true", help="leave out partial checkpoints")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_storage_options(p)
    p.set_defaults(fn=_cmd_ls)

    p = sub.add_parser("inspect", help="show a checkpoint's components, topology, versions and commit state",
                       description="Show what a checkpoint holds, read from its manifest and index.parquet "
                       "(never by unpickling DCP metadata): per component the sharing pattern, ranks that "
                       "wrote it, ranks holding a copy, process group, copies, items, size and checksum.")
    p.add_argument("url")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_storage_options(p)
    p.set_defaults(fn=_cmd_inspect)

    p = sub.add_parser("verify", help="recompute every checksum and check completeness",
                       description="Recompute the checksum of every stored item and check the checkpoint "
                       "against its own records. Exit 0 when intact; otherwise exit 1 and print one line "
                       "per problem: file, component, message.")
    p.add_argument("url")
    p.add_argument("--threads", type=int, default=2, help="parallel readers (default 2)")
    p.add_argument("--json", action="store_true", help="print the problems as JSON")
    _add_storage_options(p)
    p.set_defaults(fn=_cmd_verify)

    p = sub.add_parser("diff", help="compare two checkpoints: components, tensors, keys, max abs difference",
                       description="Compare checkpoints A and B through their indexes: components and keys "
                       "present in only one, dtype/shape changes, and for tensors whose bytes differ the "
                       "maximum absolute difference. Exit 0 when identical, 1 when they differ.")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--no-values", action="store_true", help="compare checksums only; read no tensor data")
    p.add_argument("--limit", type=int, default=50, help="print at most this many differences (0: all)")
    p.add_argument("--json", action="store_true", help="print the differences as JSON")
    _add_storage_options(p)
    p.set_defaults(fn=_cmd_diff)

    p = sub.add_parser("convert", help="dcp_forge → torch.save / safetensors; torch.save → dcp_forge",
                       description="Convert SRC to DST. A checkpoint directory converts to one torch.save file "
                       "(.pt/.pth/.bin) or a safetensors file (.safetensors; non-tensor values are left out "
                       "and listed), keyed by storage key (model, rng@rank0, ...); a torch.save file converts "
                       "to a dcp_forge checkpoint directory. Every checksum is verified on the way.")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--to", choices=["torch", "safetensors", "dcp_forge"], help="target format (default: from DST)")
    p.add_argument("--component", help="checkpoint → file: export only this component (a GLOBAL or REPLICATED "
                   "one as its state dict itself, the inverse of importing with --component); torch.save → "
                   "dcp_forge: store the whole file as this one component (default: each top-level key is one)")
    _add_storage_options(p)
    p.set_defaults(fn=_cmd_convert)

    p = sub.add_parser("export-hf", help="a checkpoint's model as Hugging Face safetensors (from_pretrained loads it)",
                       description="Write component COMPONENT of checkpoint URL into directory OUT as the "
                       "safetensors weights transformers' from_pretrained loads: model.safetensors, or "
                       "model-0000i-of-0000N.safetensors shards and model.safetensors.index.json. Streams a "
                       "batch of tensors at a time (memory about --buffer-size), verifying every checksum; "
                       "checkpoints saved at any world size and sharding export the same. OUT may be a local "
                       "path or a storage URL (s3://...).")
    p.add_argument("url")
    p.add_argument("out")
    p.add_argument("--component", default="model", help="the component holding the model (default: model)")
    p.add_argument("--max-shard-size", default="5GB", help="largest shard file, e.g. 5GB (10**9 bytes) or "
                   "4GiB (default 5GB)")
    p.add_argument("--dtype", help="cast floating-point tensors: bf16, fp16, fp32 or fp64 (default: as saved)")
    p.add_argument("--config", help="a config.json to copy into OUT (from_pretrained needs one)")
    p.add_argument("--exclude", action="append", metavar="GLOB", help="leave out tensors whose exported name "
                   "matches (repeatable), e.g. lm_head.weight of a model with tied embeddings")
    p.add_argument("--overwrite", action="store_true", help="replace weights already in OUT")
    p.add_argument("--buffer-size", default="1GiB", help="bytes of tensors held at once (default 1GiB); a "
                   "larger single tensor is held alone")
    p.add_argument("--threads", type=int, default=2, help="parallel readers (default 2)")
    _add_storage_options(p)
    p.add_argument("--out-storage-options", metavar="JSON", help="storage options for OUT (default: "
                   "--storage-options)")
    p.set_defaults(fn=_cmd_export_hf)

    sub.add_parser("demo", help="run the demo job (train, interrupt, resume, compare); see demo --help",
                   add_help=False)

    p = sub.add_parser("bench", help="run the benchmark suite; write a JSON report and a PNG plot",
                       description="Save and load a state of --size-mib MiB with dcp_forge, DCP (defaults and "
                       "thread_count=2) and torch.save against the disk's durable-write and cold-read limits "
                       "measured in the same run; time planning for 10,000 items x 8 ranks; time inspect and "
                       "diff of a synthetic --index-items index. Writes bench.json and bench.png to --out.")
    p.add_argument("--out", default="bench-report", help="directory for bench.json and bench.png (default ./bench-report)")
    p.add_argument("--size-mib", type=int, default=1024, help="state size for save/load (default 1024)")
    p.add_argument("--repetitions", type=int, default=5, help="repetitions; medians are reported (default 5)")
    p.add_argument("--dir", help="directory on the disk to measure (default: the system temp dir)")
    p.add_argument("--index-items", type=int, default=1_000_000, help="rows of the synthetic index (default 1e6)")
    p.add_argument("--quick", action="store_true", help="a small, fast run (64 MiB, 2 repetitions, 100k-row index)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    p.add_argument("-v", "--verbose", action="store_true", help="log every measurement to stderr")
    p.set_defaults(fn=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["demo"]:  # the demo owns its options
        from .trainers.demo import main as demo_main

        return demo_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ForgeError, FileNotFoundError, ValueError, KeyError, ImportError, OSError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"dcp-forge {args.command}: error: {message}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
