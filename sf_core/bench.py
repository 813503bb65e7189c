"""`python -m sf_core bench`: time the chunk loop of a random-weight model, print JSON.

Per-chunk times are taken by the consumer after each yielded chunk (synchronising the device there is
part of measuring, not of the loop).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import torch

from .config import WanConfig
from .io import DTYPES, compute_dtype
from .latents import latent_size_for
from .stream import Stream, StreamSettings
from .wan.forward import WanBackbone
from .wan.modules import WanModel



def rss_mb() -> float:
    """Current resident memory of this process in MiB."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def random_model(config: WanConfig, device, dtype) -> WanModel:
    with torch.device(device):
        model = WanModel(config)
    for p in model.parameters():  # keep activations finite through many random layers
        if p.ndim >= 2:
            torch.nn.init.normal_(p, std=0.02)
    return model.to(dtype).eval().requires_grad_(False)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="tiny", choices=["tiny", "1.3B", "14B"])
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--chunks", type=int, default=7, help="chunks to generate")
    p.add_argument("--frames-per-chunk", type=int, default=3)
    p.add_argument("--steps", default="1000,750,500,250")
    p.add_argument("--window", type=int, default=None, help="rolling cache window in latent frames")
    p.add_argument("--sink", type=int, default=0)
    p.add_argument("--sink-positions", choices=["adjacent", "absolute"], default="adjacent",
                   help="where the sink sits for RoPE: right before the window (LongLive) or at its own frames")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--attn", default="auto")
    add_speed_arguments(p)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1, help="chunks run (and discarded) before timing")
    p.add_argument("--report", default="", help="comma-separated chunk numbers (1-based) to list in 'at_chunk'")
    p.add_argument("--strength", type=float, default=None,
                   help="time video-to-video at this strength instead of text-to-video (random input video)")
    p.add_argument("--input-encoder", choices=["none", "taehv", "wan"], default="none",
                   help="video-to-video: encode the input's pixels chunk by chunk with a random-weight TAEHV or Wan "
                        "VAE of the real size inside the timed loop (none: the input is given as latents)")
    p.add_argument("--train", action="store_true",
                   help="time Self Forcing training steps instead (generator and critic), with --chunks latent-frame "
                        "chunks per rollout, --rank, --steps-to-time")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--steps-to-time", type=int, default=3)
    p.add_argument("--no-checkpointing", action="store_true")


def add_speed_arguments(p: argparse.ArgumentParser) -> None:
    """The opt-in fast paths (bench and generate)."""
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each transformer block (regional; first chunk pays the compile)")
    p.add_argument("--fp8", action="store_true",
                   help="block Linear layers in fp8 e4m3 with per-tensor scales (fp8 matmul on GPUs of compute "
                        "capability 8.9+; emulated on CPU)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="capture the chunk forwards as a CUDA graph once the window is full (needs --window; CUDA)")


def check_speed_arguments(args) -> None:
    """--compile / --fp8 / --cuda-graphs where they cannot run: a clear error before any heavy work."""
    from .errors import SelfForcingError

    device = torch.device(args.device)
    if args.compile:
        from .wan.compile import compile_unavailable

        reason = compile_unavailable(device)
        if reason:
            raise SelfForcingError(f"--compile: {reason}; leave --compile out to run eager")
    if args.fp8:
        from .wan.fp8 import resolve_matmul

        resolve_matmul("auto", device)
    if args.cuda_graphs and device.type != "cuda":
        raise SelfForcingError(f"--cuda-graphs needs a CUDA device, not {device}; leave it out")


def run(args) -> dict:
    check_speed_arguments(args)
    device = torch.device(args.device)
    dtype = compute_dtype(args.dtype, device)
    cfg = WanConfig.preset(args.config)
    h, w = latent_size_for(args.height, args.width)
    settings = StreamSettings(
        frames_per_chunk=args.frames_per_chunk,
        steps=tuple(float(s) for s in args.steps.split(",")),
        window=args.window,
        sink=args.sink,
        sink_positions=args.sink_positions,
        strength=1.0 if args.strength is None else args.strength,
    )
    model = random_model(cfg, device, dtype)
    if args.fp8:
        from .wan.fp8 import quantize_linears

        quantize_linears(model)
    backbone = WanBackbone(model, cfg, dtype=dtype, attn=args.attn, compile=args.compile,
                           graphs=args.cuda_graphs)
    text = torch.randn(args.batch, cfg.text_len, cfg.text_dim, device=device) * 0.1
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    if args.warmup:
        n = args.warmup * args.frames_per_chunk
        warm = Stream(backbone, text, latent_height=h, latent_width=w, batch=args.batch, num_frames=n,
                      settings=settings, generator=0, video=_input_video(args, n, h, w, device, dtype))
        for _ in warm:
            pass
        warm.close()
        sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    num_frames = args.chunks * args.frames_per_chunk
    stream = Stream(backbone, text, latent_height=h, latent_width=w, batch=args.batch,
                    num_frames=num_frames, settings=settings, generator=0,
                    video=_input_video(args, num_frames, h, w, device, dtype))
    times, rss = [], []
    start = last = time.perf_counter()
    for chunk in stream:
        sync()
        now = time.perf_counter()
        times.append(now - last)
        rss.append(rss_mb())
        last = now
    total = time.perf_counter() - start
    steady = times[1:] or times
    steady_frames = args.frames_per_chunk * len(steady)
    report = [int(i) for i in args.report.split(",") if i.strip()]
    out = {
        "config": args.config,
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "dtype": str(dtype).replace("torch.", ""),
        "attn": backbone.attn_backend,
        "compile": args.compile,
        "fp8": args.fp8,
        "cuda_graphs": args.cuda_graphs,
        "size": f"{args.width}x{args.height}",
        "latent": [h, w],
        "tokens_per_frame": cfg.tokens_per_frame(h, w),
        "frames_per_chunk": args.frames_per_chunk,
        "steps": list(settings.steps),
        "video_to_video": None if args.strength is None else {"strength": args.strength,
                                                              "input_encoder": args.input_encoder},
        "window": args.window,
        "sink": args.sink,
        "chunks": len(times),
        "seconds_per_chunk": [round(t, 5) for t in times],
        "first_chunk_latency_s": round(times[0], 5),
        "latent_fps": round(steady_frames / sum(steady), 3),
        "video_fps": round(4 * steady_frames / sum(steady), 3),
        "latent_fps_including_first": round(num_frames / total, 3),
        "cache_bytes": stream.cache.nbytes,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_mb": [round(r, 1) for r in rss],
    }
    if report:
        out["at_chunk"] = {str(i): {"seconds": round(times[i - 1], 5), "rss_mb": round(rss[i - 1], 1),
                                    "median_seconds_of_11_around": round(_median(times[max(0, i - 6): i + 5]), 5)}
                           for i in report if 0 < i <= len(times)}
    if device.type == "cuda":
        out["peak_vram_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return out


def _input_video(args, latent_frames: int, h: int, w: int, device, dtype):
    """A random input video for video-to-video timing (None for text-to-video)."""
    if args.strength is None:
        return None
    from .sources import EncodedVideo, LatentVideo, frame_batches

    g = torch.Generator().manual_seed(1)
    if args.input_encoder == "none":
        return LatentVideo(torch.randn(args.batch, 16, latent_frames, h, w, generator=g).to(device))
    from .vae.taehv import random_taehv
    from .vae.wan_vae import random_wan_vae

    model = (random_taehv if args.input_encoder == "taehv" else random_wan_vae)(device=device, dtype=dtype)
    frames = (torch.rand(1 + 4 * (latent_frames - 1), 8 * h, 8 * w, 3, generator=g) * 255).to(torch.uint8)
    return EncodedVideo(frame_batches(frames, 1 + 4 * (args.frames_per_chunk - 1), 4 * args.frames_per_chunk),
                        model.stream_encoder())


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def run_train(args) -> dict:
    """Seconds per generator step and per critic step of the DMD trainer on random-weight models."""
    from .train.trainer import TrainSettings, Trainer

    device = torch.device(args.device)
    dtype = compute_dtype(args.dtype, device)
    cfg = WanConfig.preset(args.config)
    h, w = latent_size_for(args.height, args.width)
    settings = TrainSettings(rank=args.rank, latent_frames=args.chunks * args.frames_per_chunk, latent_height=h,
                             latent_width=w, frames_per_chunk=args.frames_per_chunk,
                             checkpointing=not args.no_checkpointing, ema=None)
    generator, teacher = random_model(cfg, device, dtype), random_model(cfg, device, dtype)
    text = torch.randn(2, cfg.text_len, cfg.text_dim) * 0.1
    trainer = Trainer(generator, teacher, text, text[:1], settings, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out = {"config": args.config, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
           "size": f"{args.width}x{args.height}", "latent_frames": settings.latent_frames, "rank": args.rank,
           "checkpointing": settings.checkpointing}
    for name, loss, lora, opt in (("generator", trainer.generator_loss, trainer.gen_lora, trainer.gen_opt),
                                  ("critic", trainer.critic_loss, trainer.critic_lora, trainer.critic_opt)):
        times = []
        for _ in range(args.warmup + args.steps_to_time):
            sync()
            t0 = time.perf_counter()
            trainer._update(loss, lora, opt)
            sync()
            times.append(time.perf_counter() - t0)
        out[f"seconds_per_{name}_step"] = round(_median(times[args.warmup:]), 4)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if device.type == "cuda":
        out["peak_vram_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    trainer.close()
    return out


def main(args) -> int:
    print(json.dumps(run_train(args) if args.train else run(args), indent=1))
    return 0
