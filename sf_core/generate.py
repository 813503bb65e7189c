"""`python -m sf_core generate`: text (+ a start image, or an input video) -> streaming video -> MP4, written
as the chunks arrive.

Every input is checked before heavy work (paths, sizes, what each file is), then: prompts are encoded
(the text encoder is freed right after, or kept with --interactive to encode prompts typed on standard input),
the DiT streams chunks, each chunk is decoded at once by a streaming decoder (Wan VAE or TAEHV) and appended
to the MP4 (and optionally to PNG frames). With --input-video the input's frames are read and encoded chunk
by chunk as the stream asks for them (video-to-video); with --interactive every applied prompt change is
written as a timeline that replays the run (same seed and flags).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import threading
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import options
from . import preflight as pf
from .bench import add_speed_arguments, check_speed_arguments
from .checkpoints import load_dit
from .errors import CheckpointError, SelfForcingError
from .io import DTYPES, atomic_path, compute_dtype
from .paths import check_paths
from .signals import Interrupted, StopSignals
from .weights import peek_keys
from .pipeline import Timings, decode_stream
from .latents import TIME_STRIDE, denormalize, latent_frames_for, latent_size_for, video_frames_at_least, video_frames_for
from .sources import EncodedVideo
from .steering import PromptInbox
from .stream import SWITCH_MODES, PromptSegment, PromptTimeline, Stream
from .text import inspect_text_encoder, load_text_encoder, read_embedded_tokenizer
from .timeline import format_timeline, parse_timeline
from .toy.models import REAL_WEIGHTS_HINT, check_shipped, toy_defaults
from .toy.world import check_caption
from .vae import detect_decoder_kind, load_decoder, load_encoder
from .video import VideoWriter, iter_video, probe_video, read_image, write_frames_png
from .wan.forward import WanBackbone
from .wan.fp8 import quantize_linears

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="Self Forcing / Wan2.1 DiT file (any layout) or diffusers folder "
                   "(with no model flags at all, the embedded toy models are used)")
    p.add_argument("--text-encoder", default=None, help="UMT5-XXL file (ComfyUI or Wan layout)")
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
    p.add_argument("--width", type=int, default=None, help="default 832, or the input video's width")
    p.add_argument("--height", type=int, default=None, help="default 480, or the input video's height")
    options.add_arguments(p)
    p.add_argument("--switch", choices=list(SWITCH_MODES), default="recache",
                   help="at a prompt change: re-encode the cached frames under the new prompt, or cut")
    options.add_arguments(p, options.STREAMING)
    inp = p.add_mutually_exclusive_group()
    inp.add_argument("--image", default=None,
                     help="image-to-video: the first frame (PNG/JPEG), scaled to cover the size and centre-cropped")
    inp.add_argument("--input-video", default=None,
                     help="video-to-video: restyle this video as it streams (encoded chunk by chunk). It is not "
                          "resized: its size must be the output size (the default). A shorter video ends the stream")
    p.add_argument("--start-step", type=int, default=None,
                   help="video-to-video: begin at this step of --steps instead of --strength (0 = all steps)")
    p.add_argument("--encoder", choices=["wan", "taehv"], default=None,
                   help="what encodes --image / --input-video (default: the --decoder kind; wan needs --vae)")
    p.add_argument("--interactive", action="store_true",
                   help="read new prompts from standard input (one per line) while streaming; each applies at the "
                        "next chunk. Keeps the text encoder loaded")
    p.add_argument("--timeline-out", default=None,
                   help="write the prompt changes applied as a replayable timeline (default with --interactive: "
                        "OUTPUT.timeline.txt)")
    p.add_argument("--fps", type=float, default=16.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--attn", default="auto")
    add_speed_arguments(p)
    p.add_argument("--text-device", default="cpu", help="where the text encoder runs (freed after encoding)")
    p.add_argument("--output", "-o", required=True, help="MP4 path (written to a temporary file, then renamed)")
    p.add_argument("--overlap-decode", action=argparse.BooleanOptionalAction, default=None,
                   help="decode each chunk while the next one generates (default: on with CUDA); the MP4 and PNG "
                        "writes then also run off the generating thread")
    p.add_argument("--frames-dir", default=None, help="also write each chunk's frames as PNG as soon as they exist")
    p.add_argument("--latents-out", default=None,
                   help="also save the latents (un-normalised, ComfyUI .latent layout: key 'latent_tensor')")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (refused otherwise)")


def _video_frames(args) -> int:
    if args.seconds is not None:
        return video_frames_at_least(max(1, round(args.seconds * args.fps)))
    return 81 if args.frames is None else args.frames


MODEL_FLAGS = ("model", "text_encoder", "tokenizer", "vae", "taehv")


def resolve_models(args, log=print) -> None:
    """No model flags at all: the embedded toy models, with their size (64x64), schedule (shift 1) and a rolling
    window of their trained length in place of the defaults. Otherwise --model and --text-encoder are needed."""
    if any(getattr(args, f) is not None for f in MODEL_FLAGS):
        missing = [f"--{f.replace('_', '-')}" for f in ("model", "text_encoder") if getattr(args, f) is None]
        if missing:
            raise SelfForcingError(f"{' and '.join(missing)} needed when other model files are given (or give no "
                                   "model flags at all to use the embedded toy models)")
        return
    files = check_shipped()
    args.model, args.text_encoder, args.taehv = str(files["dit"]), str(files["text_encoder"]), str(files["autoencoder"])
    toy = toy_defaults()
    args.decoder = "taehv"
    args.width, args.height = args.width or toy["width"], args.height or toy["height"]
    for key, default in (("shift", 5.0), ("window", 0), ("sink", 0), ("switch", "recache")):
        if getattr(args, key) == default:  # the real models' default: the toy models' own applies
            setattr(args, key, toy[key])
    args.toy = True
    log(f"embedded toy models (a 64x64 procedural world of coloured shapes) from {files['dit'].parent}; {REAL_WEIGHTS_HINT}")


def _check_toy_prompts(timeline) -> None:
    for _, prompt in timeline:
        check_caption(prompt, "the embedded toy models (no model flags given; for other prompts pass --model ...)")


def preflight(args, log=print) -> dict:
    """All checks that need no heavy work (values, paths, what each file is, memory), before any file is
    created. Returns the plan (sizes, timeline texts, device)."""
    resolve_models(args, log)
    device = pf.check_device(args.device)
    pf.check_device(args.text_device, "--text-device")
    pf.check_attention(args.attn, device)
    pf.positive("--fps", args.fps)
    pf.positive("--shift", args.shift)
    if args.seconds is not None:
        pf.positive("--seconds", args.seconds)
    if not str(args.output).lower().endswith(".mp4"):
        raise SelfForcingError(f"output {args.output} should end in .mp4")
    if args.interactive and args.timeline_out is None:
        args.timeline_out = str(Path(args.output).with_suffix(".timeline.txt"))
    decoder_path = args.vae if args.decoder == "wan" else args.taehv
    if decoder_path is None:
        raise SelfForcingError(f"--decoder {args.decoder} needs --{'vae' if args.decoder == 'wan' else 'taehv'} PATH")
    check_paths(
        {"--model": args.model, "--text-encoder": args.text_encoder, "--tokenizer": args.tokenizer,
         "--vae": args.vae, "--taehv": args.taehv, "--timeline-file": args.timeline_file, "--image": args.image,
         "--input-video": args.input_video},
        {"--output": args.output, "--latents-out": args.latents_out, "--timeline-out": args.timeline_out},
        folders={"--frames-dir": args.frames_dir}, overwrite=args.overwrite,
    )
    if args.frames_dir and not args.overwrite and any(Path(args.frames_dir).glob("frame_*.png")):
        raise SelfForcingError(f"--frames-dir {args.frames_dir} already holds frames; pass --overwrite to replace "
                               "them, or choose an empty folder")
    video = _check_input_video(args)
    h, w = latent_size_for(args.height, args.width)
    latent_frames = latent_frames_for(_video_frames(args))
    if args.image is not None and latent_frames < 2:
        raise SelfForcingError("image-to-video needs at least 5 frames (the image is the first)")
    settings = options.stream_settings(args, switch=args.switch, start_step=args.start_step)
    text = pf.read_text_file(args.timeline_file, "--timeline-file") if args.timeline_file else args.prompt
    timeline = parse_timeline(text, args.fps, args.frames_per_chunk)
    chunks = -(-latent_frames // args.frames_per_chunk)
    if getattr(args, "toy", False):
        _check_toy_prompts(timeline)
    for start, prompt in timeline:
        if start >= chunks:
            logger.warning("timeline prompt %r starts at chunk %d, after the end of this video (%d chunks): it is not "
                           "used; make the video longer or start it earlier", prompt[:60], start, chunks)

    check_speed_arguments(args)
    config = pf.dit_config(args.model)
    kind = detect_decoder_kind(peek_keys(decoder_path))
    if kind != args.decoder:
        what = {"wan": "a Wan2.1 VAE", "taehv": "a TAEHV tiny decoder", None: "not a video decoder"}[kind]
        raise CheckpointError(f"{decoder_path}: expected {'a Wan2.1 VAE' if args.decoder == 'wan' else 'TAEHV'} "
                              f"for --decoder {args.decoder}, but the file is {what}")
    encoder_path = _check_encoder(args)
    te = inspect_text_encoder(args.text_encoder)
    if te.config.dim != config.text_dim:
        raise SelfForcingError(f"{args.text_encoder} gives {te.config.dim}-wide text embeddings but {args.model} "
                               f"reads {config.text_dim}-wide ones; use the text encoder made for this model (UMT5-XXL)")
    if args.tokenizer is None and read_embedded_tokenizer(args.text_encoder) is None:
        raise SelfForcingError(
            f"{args.text_encoder} carries no tokenizer (no 'spiece_model' tensor); pass --tokenizer with the "
            "sentencepiece model or the tokenizer folder that came with it"
        )
    dtype = compute_dtype(args.dtype, device)
    plan = pf.memory_plan(config, h, w, args.frames_per_chunk, dtype, settings.cache_bytes(config, h, w, latent_frames,
                          dtype=dtype), extra=Path(decoder_path).stat().st_size
                          + (16 * latent_frames * h * w * 4 if args.latents_out else 0))  # kept for --latents-out
    what = (f"{video_frames_for(latent_frames)} frames at {args.width}x{args.height} "
            + (f"with a window of {settings.window}" if settings.window else "without a window (the whole video cached)"))
    fix = ("use fewer frames or a smaller size" + ("; --latents-out keeps every latent frame in memory"
                                                   if args.latents_out else "") if settings.window else
           "set a window (--window 12 --sink 3) to keep memory flat in length, or use fewer frames or a smaller size")
    pf.check_memory(plan, device, what, fix)
    return {"latent": (h, w), "latent_frames": latent_frames, "settings": settings, "timeline": timeline,
            "encoder": encoder_path, "video": video, "device": device}


def _check_input_video(args) -> dict | None:
    """Probe --input-video; take the output size and length from it unless given (its size must match)."""
    if args.input_video is None:
        args.width, args.height = args.width or 832, args.height or 480
        return None
    info = probe_video(args.input_video)
    vw, vh = info["width"], info["height"]
    if (args.width or vw, args.height or vh) != (vw, vh):
        raise SelfForcingError(
            f"--input-video {args.input_video} is {vw}x{vh} but --width/--height ask for {args.width or vw}x"
            f"{args.height or vh}; the input is not resized: drop --width/--height to stream at its size, or resize "
            f"the video first (e.g. ffmpeg -i in.mp4 -vf scale={args.width or vw}:{args.height or vh} out.mp4)"
        )
    if vw % 16 or vh % 16:
        raise SelfForcingError(
            f"--input-video {args.input_video} is {vw}x{vh}, not a multiple of 16; resize or crop it first "
            f"(e.g. ffmpeg -i in.mp4 -vf crop={vw // 16 * 16}:{vh // 16 * 16} out.mp4)"
        )
    args.width, args.height = vw, vh
    if args.frames is None and args.seconds is None and info["frames"] >= 1:
        args.frames = 1 + TIME_STRIDE * ((info["frames"] - 1) // TIME_STRIDE)  # the longest 1 + 4k it holds
    return info


def _check_encoder(args) -> str | None:
    """Which file encodes --image / --input-video; checked to hold an encoder."""
    if args.image is None and args.input_video is None:
        return None
    kind = args.encoder or args.decoder
    path = args.vae if kind == "wan" else args.taehv
    if path is None:
        raise SelfForcingError(f"encoding the {'image' if args.image else 'input video'} with {kind} needs "
                               f"--{'vae' if kind == 'wan' else 'taehv'} PATH (or choose --encoder)")
    keys = peek_keys(path)
    need = "encoder.conv1.weight" if kind == "wan" else "encoder.0.weight"
    if need not in keys:
        raise CheckpointError(f"{path}: has no encoder weights ('{need}'); --encoder {kind} needs the full file")
    if args.image is not None and not Path(args.image).is_file():
        raise FileNotFoundError(f"{args.image}: no such image file")
    return path


def save_latents(path, z: torch.Tensor) -> None:
    """Normalised latents -> a ComfyUI-style .latent file (un-normalised, key 'latent_tensor'), atomically."""
    with atomic_path(path) as tmp:
        save_file({"latent_tensor": denormalize(z).contiguous(), "latent_format_version_0": torch.tensor([])}, str(tmp))


def encode_one(te, prompt: str) -> torch.Tensor:
    """One prompt -> embeddings [1, 512, D] float32 on the CPU (alone, so a live prompt encodes exactly as the
    same line of a timeline does)."""
    return te.encode([prompt]).float().cpu()


def encode_timeline(args, timeline: list[tuple[int, str]], keep: bool = False):
    """-> (PromptTimeline, the text encoder if `keep` else None)."""
    te = load_text_encoder(args.text_encoder, tokenizer=args.tokenizer, device=args.text_device)
    segments = [PromptSegment(c, encode_one(te, p), label=p) for c, p in timeline]
    if not keep:
        te.release()
        te = None
        gc.collect()
    return PromptTimeline(segments), te


def _read_stdin(inbox: PromptInbox, log) -> None:
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            ticket = inbox.post(line)
        except SelfForcingError as e:
            log(f"prompt not taken: {e}")
            if not inbox.running:
                return
            continue
        when = "before the first chunk" if ticket.posted_during < 0 else f"during chunk {ticket.posted_during + 1}"
        log(f"prompt {ticket.id} queued {when}: applies at the next chunk")


def run(args, log=print) -> dict:
    plan = preflight(args, log)
    device = plan["device"]
    dtype = compute_dtype(args.dtype, device)
    timeline, te = encode_timeline(args, plan["timeline"], keep=args.interactive)

    model, ckpt = load_dit(args.model, device=device, dtype=dtype, keep_fp8=args.fp8)
    if args.fp8:
        quantize_linears(model)
    backbone = WanBackbone(model, dtype=dtype, attn=args.attn, compile=args.compile,
                           graphs=args.cuda_graphs)
    decoder_path = args.vae if args.decoder == "wan" else args.taehv
    encoder = None
    if plan["encoder"] is not None:
        encoder = load_encoder(plan["encoder"], device=device, dtype=dtype)
    same = encoder is not None and plan["encoder"] == decoder_path
    decoder = (encoder if same else load_decoder(decoder_path, device=device, dtype=dtype)).stream_decoder()
    h, w = plan["latent"]
    prefix = video = None
    if args.image is not None:
        enc = encoder.stream_encoder()
        pixels = read_image(args.image, args.width, args.height).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
        prefix = torch.cat([enc.encode_normalized(pixels), enc.flush_normalized()], dim=2).float()
    if args.input_video is not None:
        video = EncodedVideo(iter_video(args.input_video), encoder.stream_encoder())
    inbox = PromptInbox(encode=lambda text: encode_one(te, text)) if args.interactive else None
    generated = plan["latent_frames"] - (0 if prefix is None else prefix.shape[2])
    stream = Stream(backbone, timeline, latent_height=h, latent_width=w, num_frames=generated,
                    settings=plan["settings"], generator=torch.Generator(device="cpu").manual_seed(args.seed),
                    prefix=prefix, video=video, inbox=inbox)
    if inbox is not None:
        threading.Thread(target=_read_stdin, args=(inbox, log), name="sf-stdin", daemon=True).start()
        log("interactive: type a new prompt and press Enter; it applies at the next chunk")
    log(f"model {ckpt.format} {ckpt.config.dim}d x{ckpt.config.num_layers} | {args.width}x{args.height}, "
        f"{video_frames_for(plan['latent_frames'])} frames in {stream.num_chunks} chunks | attention {backbone.attn_backend}")

    timings = Timings()
    latents = []
    with VideoWriter(args.output, fps=args.fps) as writer:
        overlap = device.type == "cuda" if args.overlap_decode is None else args.overlap_decode
        for step in decode_stream(stream, decoder, timings, overlap=overlap):
            if args.latents_out:
                latents.append(step.chunk.latents.float().cpu())
            first = timings.frames - len(step.frames)
            writer.write(step.frames.numpy())
            if args.frames_dir:
                write_frames_png(args.frames_dir, step.frames.numpy(), first)
            sw = step.chunk.switch
            note = "" if sw is None else (f"  switched to {sw.label[:60]!r} ({sw.source}"
                                          + (f", blend {sw.step}/{sw.steps}" if sw.steps > 1 else "") + ")")
            name = "image" if step.chunk.is_prefix else f"chunk {step.chunk.index + 1}/{stream.num_chunks}"
            log(f"{name}  frames {first}-{timings.frames - 1}  "
                f"dit {step.dit_s:.3f}s  decode {step.decode_s:.3f}s  prompt {step.chunk.prompt}{note}")
    stream.close()
    if te is not None:
        te.release()
    if args.latents_out:
        save_latents(args.latents_out, torch.cat(latents, dim=2))
    if args.timeline_out:
        with atomic_path(args.timeline_out) as tmp:
            Path(tmp).write_text(format_timeline(stream.replay_timeline().segments))
        log(f"timeline of the prompts applied: {args.timeline_out} (replay with --timeline-file and the same flags)")
    if stream.input_ended:
        log("the input video ended: the stream stopped with it")
    summary = {"output": str(args.output), **timings.summary()}
    log(json.dumps(summary))
    return summary


def main(args) -> int:
    """The command: SIGINT / SIGTERM stop it with the partial video removed (exit 128 + signal)."""
    with StopSignals():
        try:
            run(args)
        except Interrupted as e:
            kept = f"; frames already in {args.frames_dir} are kept" if args.frames_dir else ""
            print(f"stopped by {e.name}: {args.output} was not written (its partial file was removed){kept}",
                  file=sys.stderr)
            return e.exit_code
    return 0
