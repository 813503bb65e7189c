"""`python -m sf_core generate`: text -> streaming video -> MP4, written as the chunks arrive.

Every input is checked before heavy work (paths, sizes, what each file is), then: prompts are encoded
(the text encoder is freed right after), the DiT streams chunks, each chunk is decoded at once by a
streaming decoder (Wan VAE or TAEHV) and appended to the MP4 (and optionally to PNG frames).
"""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

import torch

from .checkpoints import check_dit_file, load_dit
from .errors import CheckpointError, SelfForcingError
from .io import DTYPES, check_writable, compute_dtype, peek_keys
from .pipeline import Timings, decode_stream
from .latents import latent_frames_for, latent_size_for, video_frames_for
from .stream import PromptSegment, PromptTimeline, Stream, StreamSettings
from .timeline import parse_timeline
from .wan.forward import WanBackbone



def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Self Forcing / Wan2.1 DiT file (any layout) or diffusers folder")
    p.add_argument("--text-encoder", required=True, help="UMT5-XXL file (ComfyUI or Wan layout)")
    p.add_argument("--tokenizer", default=None, help="sentencepiece model or tokenizer folder, if the file has none")
    p.add_argument("--vae", default=None, help="Wan2.1 VAE file (needed for --decoder wan)")
    p.add_argument("--taehv", default=None, help="TAEHV taew2_1.pth (needed for --decoder taehv)")
    p.add_argument("--decoder", choices=["wan", "taehv"], default="wan")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="one prompt, or a timeline: lines like '0s: ...' / '5s: ...' / '#4: ...'")
    g.add_argument("--timeline-file", help="a text file with a prompt timeline")
    p.add_argument("--seed", type=int, default=0)
    length = p.add_mutually_exclusive_group()
    length.add_argument("--frames", type=int, default=None, help="video frames, 1 + 4k (default 81)")
    length.add_argument("--seconds", type=float, default=None, help="video length in seconds at --fps")
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--frames-per-chunk", type=int, default=3, help="latent frames per chunk (3 chunk-wise, 1 frame-wise)")
    p.add_argument("--steps", default="1000,750,500,250")
    p.add_argument("--shift", type=float, default=5.0)
    p.add_argument("--window", type=int, default=None, help="rolling cache window (latent frames)")
    p.add_argument("--sink", type=int, default=0, help="attention-sink frames kept in the window")
    p.add_argument("--switch", choices=["recache", "cut"], default="recache")
    p.add_argument("--sink-positions", choices=["adjacent", "absolute"], default="adjacent",
                   help="where the sink sits for RoPE: right before the window (LongLive) or at its own frames")
    p.add_argument("--fps", type=float, default=16.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--attn", default="auto")
    p.add_argument("--text-device", default="cpu", help="where the text encoder runs (freed after encoding)")
    p.add_argument("--output", "-o", required=True, help="MP4 path (written to a temporary file, then renamed)")
    p.add_argument("--frames-dir", default=None, help="also write each chunk's frames as PNG as soon as they exist")
    p.add_argument("--latents-out", default=None,
                   help="also save the latents (un-normalised, ComfyUI .latent layout: key 'latent_tensor')")


def _video_frames(args) -> int:
    if args.seconds is not None:
        n = max(1, round(args.seconds * args.fps))
        return 1 + 4 * max(0, (n - 1 + 3) // 4)  # round up to 1 + 4k
    return 81 if args.frames is None else args.frames


def preflight(args) -> dict:
    """All checks that need no heavy work. Returns the plan (sizes, timeline texts)."""
    check_writable(args.output)
    if not str(args.output).lower().endswith(".mp4"):
        raise SelfForcingError(f"output {args.output} should end in .mp4")
    if args.frames_dir:
        Path(args.frames_dir).mkdir(parents=True, exist_ok=True)
    if args.latents_out:
        check_writable(args.latents_out)
    h, w = latent_size_for(args.height, args.width)
    latent_frames = latent_frames_for(_video_frames(args))
    settings = StreamSettings(frames_per_chunk=args.frames_per_chunk, shift=args.shift, window=args.window,
                              sink=args.sink, switch=args.switch, sink_positions=args.sink_positions,
                              steps=tuple(float(s) for s in args.steps.split(",")))
    text = Path(args.timeline_file).read_text() if args.timeline_file else args.prompt
    timeline = parse_timeline(text, args.fps, args.frames_per_chunk)

    check_dit_file(args.model)
    decoder_path = args.vae if args.decoder == "wan" else args.taehv
    if decoder_path is None:
        raise SelfForcingError(f"--decoder {args.decoder} needs --{'vae' if args.decoder == 'wan' else 'taehv'} PATH")
    from .vae import detect_decoder_kind

    kind = detect_decoder_kind(peek_keys(decoder_path))
    if kind != args.decoder:
        what = {"wan": "a Wan2.1 VAE", "taehv": "a TAEHV tiny decoder", None: "not a video decoder"}[kind]
        raise CheckpointError(f"{decoder_path}: expected {'a Wan2.1 VAE' if args.decoder == 'wan' else 'TAEHV'} "
                              f"for --decoder {args.decoder}, but the file is {what}")
    from .text import inspect_text_encoder, read_embedded_tokenizer

    inspect_text_encoder(args.text_encoder)
    if args.tokenizer is None and read_embedded_tokenizer(args.text_encoder) is None:
        raise SelfForcingError(
            f"{args.text_encoder} carries no tokenizer (no 'spiece_model' tensor); pass --tokenizer with the "
            "sentencepiece model or the tokenizer folder that came with it"
        )
    return {"latent": (h, w), "latent_frames": latent_frames, "settings": settings, "timeline": timeline}


def save_latents(path, z: torch.Tensor) -> None:
    """Normalised latents -> a ComfyUI-style .latent file (un-normalised, key 'latent_tensor'), atomically."""
    from safetensors.torch import save_file

    from .io import atomic_path
    from .latents import denormalize

    with atomic_path(path) as tmp:
        save_file({"latent_tensor": denormalize(z).contiguous(), "latent_format_version_0": torch.tensor([])}, str(tmp))


def encode_timeline(args, timeline: list[tuple[int, str]]) -> PromptTimeline:
    from .text import load_text_encoder

    with load_text_encoder(args.text_encoder, tokenizer=args.tokenizer, device=args.text_device) as te:
        emb = te.encode([p for _, p in timeline]).float().cpu()
    gc.collect()
    return PromptTimeline([PromptSegment(c, emb[i : i + 1], label=p) for i, (c, p) in enumerate(timeline)])


def run(args, log=print) -> dict:
    plan = preflight(args)
    device = torch.device(args.device)
    dtype = compute_dtype(args.dtype, device)
    timeline = encode_timeline(args, plan["timeline"])

    from .vae import load_decoder
    from .video import VideoWriter, write_frames_png

    model, ckpt = load_dit(args.model, device=device, dtype=dtype)
    backbone = WanBackbone(model, dtype=dtype, attn=args.attn)
    decoder = load_decoder(args.vae if args.decoder == "wan" else args.taehv, device=device, dtype=dtype).stream_decoder()
    h, w = plan["latent"]
    stream = Stream(backbone, timeline, latent_height=h, latent_width=w, num_frames=plan["latent_frames"],
                    settings=plan["settings"], generator=torch.Generator(device="cpu").manual_seed(args.seed))
    log(f"model {ckpt.format} {ckpt.config.dim}d x{ckpt.config.num_layers} | {args.width}x{args.height}, "
        f"{video_frames_for(plan['latent_frames'])} frames in {stream.num_chunks} chunks | attention {backbone.attn_backend}")

    timings = Timings()
    latents = []
    with VideoWriter(args.output, fps=args.fps) as writer:
        for step in decode_stream(stream, decoder, timings):
            if args.latents_out:
                latents.append(step.chunk.latents.float().cpu())
            first = timings.frames - len(step.frames)
            writer.write(step.frames.numpy())
            if args.frames_dir:
                write_frames_png(args.frames_dir, step.frames.numpy(), first)
            log(f"chunk {step.chunk.index + 1}/{stream.num_chunks}  frames {first}-{timings.frames - 1}  "
                f"dit {step.dit_s:.3f}s  decode {step.decode_s:.3f}s  prompt {step.chunk.prompt}")
    if args.latents_out:
        save_latents(args.latents_out, torch.cat(latents, dim=2))
    summary = {"output": str(args.output), **timings.summary()}
    log(json.dumps(summary))
    return summary


def main(args) -> int:
    run(args)
    return 0
