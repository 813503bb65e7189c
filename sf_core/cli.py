"""Command line: `python -m sf_core {inspect,bench,...}`."""

from __future__ import annotations

import argparse
import sys

import torch
from safetensors.torch import save_file

from . import bench, generate
from .checkpoints import dequantize_fp8, inspect, load_dit_checkpoint
from .errors import SelfForcingError
from .io import atomic_path, check_writable
from .train import cli as train_cli


def _inspect(args) -> int:
    print(inspect(args.file))
    return 0


def _convert(args) -> int:
    """Any family layout -> plain Wan-named safetensors that ComfyUI's stock loader reads."""
    check_writable(args.output)
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (SelfForcingError, FileNotFoundError, PermissionError, IsADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
