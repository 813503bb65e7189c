"""Command line: `python -m sf_core {inspect,bench,...}`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import traceback

import torch
from safetensors.torch import save_file

from . import bench, generate
from .checkpoints import dequantize_fp8, inspect, load_dit_checkpoint
from .errors import SelfForcingError
from .io import atomic_path
from .paths import check_paths
from .signals import Interrupted, StopSignals
from .train import cli as train_cli
from .weights import SAFETENSORS_SUFFIXES


def _inspect(args) -> int:
    print(inspect(args.file))
    return 0


def _convert(args) -> int:
    """Any family layout -> plain Wan-named safetensors that ComfyUI's stock loader reads."""
    if not str(args.output).lower().endswith(SAFETENSORS_SUFFIXES):
        raise SelfForcingError(f"convert writes safetensors: name the output .safetensors, not {args.output}")
    check_paths({"the input": args.file}, {"output": args.output}, overwrite=args.overwrite)
    ckpt = load_dit_checkpoint(args.file)
    dtype = {"keep": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    sd = dequantize_fp8(ckpt.state_dict, dtype or torch.bfloat16)  # plain weights any loader reads correctly
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    with atomic_path(args.output) as tmp:
        save_file(sd, str(tmp), metadata={"source_format": ckpt.format})
    print(f"{args.file} ({ckpt.format}) -> {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sf_core", description="Self Forcing streaming video engine")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="print the detected format, config and dtype of a DiT file as JSON")
    p.add_argument("file")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("convert", help="write any DiT layout as plain Wan safetensors (for ComfyUI's stock loader)")
    p.add_argument("file")
    p.add_argument("output")
    p.add_argument("--dtype", choices=["keep", "bf16", "fp16", "fp32"], default="keep")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(func=_convert)

    p = sub.add_parser("bench", help="time the chunk loop on a random-weight model (JSON)")
    bench.add_arguments(p)
    p.set_defaults(func=bench.main)
    p = sub.add_parser("generate", help="text -> streaming video, written to MP4 as chunks arrive")
    generate.add_arguments(p)
    p.set_defaults(func=generate.main)
    p = sub.add_parser("train", help="Self Forcing DMD LoRA fine-tuning (writes a ComfyUI LoRA)")
    train_cli.add_arguments(p)
    p.set_defaults(func=train_cli.main)
    return parser


USER_ERRORS = (SelfForcingError, OSError)  # bad input or a file-system refusal: exit 2, one line


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status: 0 done, 2 bad input (one line on stderr), 128 + N stopped
    by signal N, 1 an unexpected failure (one line, and the traceback written to a file)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: usage error (2) or --help (0)
        return e.code if isinstance(e.code, int) else 2
    _log_warnings()
    try:
        with StopSignals():  # SIGTERM too ends the command through the normal clean-up (no partial file left)
            return args.func(args)
    except USER_ERRORS as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"stopped by {e.name}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("stopped by SIGINT", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not the input: one line here, the whole story in a file
        if isinstance(e, MemoryError) or "out of memory" in str(e) or "can't allocate memory" in str(e):
            print("error: out of memory; set a window (--window 12 --sink 3), a smaller size or fewer frames "
                  f"(full traceback in {_write_traceback(e)})", file=sys.stderr)
            return 2
        print(f"error: unexpected {type(e).__name__}: {_one_line(e)}; full traceback in {_write_traceback(e)}",
              file=sys.stderr)
        return 1


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 800 else text[:797] + "..."


def _write_traceback(e: BaseException) -> str:
    path = os.path.join(tempfile.gettempdir(), f"sf_core-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt")
    try:
        with open(path, "w") as f:
            f.write("python -m sf_core " + " ".join(sys.argv[1:]) + "\n\n")
            traceback.print_exception(e, file=f)
    except OSError:
        traceback.print_exception(e)
        return "(could not write a file; printed above)"
    return path


class _StderrWarnings(logging.Handler):
    """Warnings of the engine (logger "sf_core") as 'warning: ...' lines on the current stderr."""

    def emit(self, record):
        print(f"warning: {record.getMessage()}", file=sys.stderr)


def _log_warnings() -> None:
    logger = logging.getLogger("sf_core")
    if not any(isinstance(h, _StderrWarnings) for h in logger.handlers):
        logger.addHandler(_StderrWarnings(logging.WARNING))
