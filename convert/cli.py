"""altjax-convert to-altjax|to-hf SRC OUT [--check]: convert a checkpoint directory, optionally
proving with one batch through both frameworks that nothing changed on the way.

SRC is a local directory or a Hugging Face Hub id (``org/name``, at ``--revision``): its config,
weights and processor files are fetched into the Hub cache, or found there offline
(``HF_HUB_OFFLINE``). ``--check`` feeds both models the source's own processor (its tokenizer and
the image settings of ``processor_config.json`` or ``preprocessor_config.json``) when it has one,
on ``--images``/``--texts`` or synthetic images and fixed captions, else random token ids and
noise; it prints which.

Exit status: 0 on success, 1 when ``--check`` finds a difference above the tolerance (nothing is
written then), 2 on bad input or an output that cannot be written (one line on stderr, no
traceback, nothing written).

``--overwrite`` replaces OUT only when it is an earlier output of altjax (an altjax directory, or an
HF directory altjax wrote) or an empty directory, and never when OUT is SRC or a directory above
it; anything else is refused with exit status 2 and left as it was.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from typing import Optional, Sequence

from altjax import console, fsutil
from altjax.model_io import parity
from altjax.model_io.directories import CheckpointError, check_replaceable, model_dir
from altjax.model_io.engine import ConversionError
from altjax.models import registry

PROG = "altjax-convert"
EXIT_CODES = {
    0: "converted (and, with --check, checked)",
    1: "--check found a difference above the tolerance; nothing was written",
    2: "a mistake in the command or an unreadable source, or an output that cannot be written; nothing was "
       "written",
    130: "interrupted (Ctrl-C); nothing was written",
}


def _parser() -> argparse.ArgumentParser:
    epilog = (console.help_section("models", ", ".join(sorted(registry.MODELS)) + " (the model_type of the "
                                   "directory's config.json, altjax.models.registry)")
              + "\n\n" + console.exit_status_help(EXIT_CODES))
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Convert ALIGN, AltCLIP and CLIP checkpoints between Hugging Face (PyTorch) and altjax (orbax).",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog)
    sub = parser.add_subparsers(dest="direction", required=True, metavar="{to-altjax,to-hf}")
    for name, help_, src, out in [
        ("to-altjax", "HF directory -> altjax directory",
         "HF model directory (config.json + weights) or Hugging Face Hub id (org/name)", "new altjax directory"),
        ("to-hf", "altjax directory -> HF directory", "altjax (or HF) model directory or Hub id", "new HF directory"),
    ]:
        p = sub.add_parser(name, help=help_, description=help_, formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog=epilog)
        p.add_argument("src", metavar="SRC", help=src)
        p.add_argument("out", metavar="OUT", help=out + " (must not exist unless --overwrite)")
        p.add_argument("--revision", default=None,
                       help="branch, tag or commit of a Hub id SRC (default main; fetched into the Hub cache)")
        p.add_argument("--check", action="store_true",
                       help="run transformers and altjax on one batch and compare (needs torch + transformers)")
        p.add_argument("--images", nargs="+", default=(), metavar="PATH", help="images for --check")
        p.add_argument("--texts", nargs="+", default=(), metavar="TEXT", help="captions for --check")
        p.add_argument("--tolerance", type=float, default=None,
                       help="largest relative difference --check accepts (default 1e-4)")
        p.add_argument("--overwrite", action="store_true",
                       help="replace OUT if it is an earlier output of altjax (never another directory, SRC or one above it)")
        p.add_argument("--quiet", action="store_true", help="no progress output")
        p.add_argument("--verbose", action="store_true", help=console.VERBOSE_HELP)
        if name == "to-hf":
            p.add_argument("--max-shard-size", default="50GB",
                           help="split the safetensors into files of at most this size (default 50GB, as transformers 5)")
    return parser


def _log(quiet: bool, message: str) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def convert(args: argparse.Namespace) -> int:
    out = fsutil.output_path(args.out)
    if os.path.lexists(out) and not args.overwrite:
        raise CheckpointError(f"{out}: output path exists (choose another path or pass --overwrite)")
    if not os.path.isdir(os.path.dirname(out)):
        raise CheckpointError(f"{os.path.dirname(out)}: the output's parent directory does not exist")
    if args.images or args.texts or args.tolerance is not None:
        if not args.check:
            raise CheckpointError("--images, --texts and --tolerance only apply with --check")
    # A Hub id becomes its snapshot in the Hub cache, fetched once the arguments are known good.
    src = os.path.abspath(model_dir(args.src, revision=args.revision))
    if os.path.lexists(out):
        # --overwrite replaces only an output altjax wrote, never the source or a directory above it.
        check_replaceable(out, sources=(src,))
    kind = registry.of_directory(src)
    progress = not args.quiet
    start = time.perf_counter()
    _log(args.quiet, f"reading {src} ({kind.model_type})")
    model = kind.model.from_pretrained(src, progress=progress)
    fmt = "altjax" if args.direction == "to-altjax" else "hf"
    # Written and checked in a staging directory beside OUT; renamed into place only when it passed.
    try:
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.stage-", dir=os.path.dirname(out))
    except OSError as e:  # no permission to write there
        raise CheckpointError(f"{out}: cannot write the output ({e.strerror or e})") from None
    try:
        written = os.path.join(staging, "out")
        kwargs = {"max_shard_size": args.max_shard_size} if fmt == "hf" else {}
        try:
            model.save_pretrained(written, format=fmt, progress=progress, **kwargs)
        except OSError as e:  # a full disk: one line, and the staging directory goes
            raise CheckpointError(f"{out}: cannot write the output ({e.strerror or e}); nothing written") from None
        _log(args.quiet, f"converted in {time.perf_counter() - start:.1f}s")
        if args.check:
            hf_dir, jax_dir = (src, written) if fmt == "altjax" else (written, src)
            converted = kind.model.from_pretrained(jax_dir) if fmt == "altjax" else model
            inputs = parity.check_inputs(converted.config, kind.processor, src, images=args.images, texts=args.texts)
            _log(args.quiet, "checking: transformers vs altjax on one batch")
            print("inputs: " + parity.describe_inputs(kind.processor, src, images=args.images, texts=args.texts))
            reference = parity.run_transformers(hf_dir, kind.transformers_class, inputs)
            rows = parity.compare(parity.run_altjax(converted, inputs), reference,
                                  tolerance=parity.DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance)
            print(parity.format_table(rows))
            failed = [r.name for r in rows if not r.passed]
            if failed:
                print(f"{PROG}: parity check failed for {', '.join(failed)}; nothing written to {out}", file=sys.stderr)
                return 1
        if os.path.lexists(out):  # again, just before replacing it: conversion takes a while
            check_replaceable(out, sources=(src,))
        fsutil.replace_path(written, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {out}")
    return 0


def _return_freed_memory_to_the_system() -> None:
    # Conversion allocates and frees one tensor after another, mostly 1-16 MiB. glibc raises its
    # mmap threshold after each large free, so later tensors come from the heap, whose freed pages
    # stay resident: converting AltCLIP peaked at 2.1x the checkpoint size. A fixed 1 MiB threshold
    # serves every tensor-sized block by mmap, returned on free (measured: 1.5x).
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    console.quiet_third_party(args.verbose)
    _return_freed_memory_to_the_system()
    try:
        return convert(args)
    except (CheckpointError, ConversionError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a source file that cannot be read
        where = f"{e.filename}: " if e.filename else ""
        print(f"{PROG}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing written", file=sys.stderr)
        return 130
