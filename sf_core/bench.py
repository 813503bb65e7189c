"""`python -m sf_core bench`: measurements as JSON, on random-weight models (no downloads) or a given file.

    python -m sf_core bench [--config 1.3B] ...              the chunk loop: seconds per chunk, FPS, memory
    python -m sf_core bench --train ...                      seconds per generator / critic step of DMD training
    python -m sf_core bench --decode [--decoders wan,taehv]  streaming decode seconds per chunk (real sizes,
                                                             or --tiny)
    python -m sf_core bench --text-encoder FILE [--encode]   peak RAM of loading a UMT5 file, in a fresh process

Times are taken by the consumer after each chunk or step (`sf_core.timing`); the loops are the product's own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from . import options
from .config import WanConfig
from .io import DTYPES, compute_dtype
from .latents import SPATIAL_STRIDE, TIME_STRIDE, latent_size_for, video_frames_for
from .preflight import check_device
from .sources import EncodedVideo, LatentVideo, frame_batches
from .stream import Stream
from .text import inspect_text_encoder, load_text_encoder
from .timing import Laps, device_name, median, peak_memory, reset_peak, rss_mb, synchronize
from .train.distributed import init_world
from .train.trainer import TrainSettings, Trainer
from .vae import TAEHV, TAEHVConfig, WanVAE, WanVAEConfig
from .errors import SelfForcingError
from .wan.compile import compile_unavailable
from .wan.forward import WanBackbone
from .wan.fp8 import quantize_linears, resolve_matmul
from .wan.modules import WanModel


# ---- random weights ---------------------------------------------------------------------------
def random_dit(config: WanConfig, device, dtype) -> WanModel:
    """A WanModel with N(0, 0.02) weights: activations stay finite through many random layers."""
    with torch.device(device):
        model = WanModel(config)
    for p in model.parameters():
        if p.ndim >= 2:
            nn.init.normal_(p, std=0.02)
    return model.to(dtype).eval().requires_grad_(False)


def random_weights_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Deterministic unit-variance-preserving random weights, in place: weights ~ N(0, 1 / fan_in),
    biases ~ N(0, 0.05^2), norm scales (`gamma`) ~ 1 + N(0, 0.1^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("gamma"):
                v = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
            elif name.endswith("bias"):
                v = 0.05 * torch.randn(p.shape, generator=g)
            else:
                v = torch.randn(p.shape, generator=g) / max(1, p[0].numel()) ** 0.5
            p.copy_(v.to(p.dtype))
    return module


def random_vae(kind: str, tiny: bool = False, device="cpu", dtype=torch.float32, encoder: bool = False) -> nn.Module:
    """A Wan VAE ("wan") or TAEHV ("taehv") with random weights, real sizes or tiny ones; decoder only unless
    `encoder`."""
    if kind == "wan":
        model = WanVAE(WanVAEConfig(dim=8 if tiny else 96, has_encoder=encoder))
    else:
        model = TAEHV(TAEHVConfig(decoder_channels=(32, 16, 8, 8) if tiny else (256, 128, 64, 64), has_encoder=encoder))
    return random_weights_(model).to(device=device, dtype=dtype).eval().requires_grad_(False)


# ---- arguments --------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="tiny", choices=["tiny", "1.3B", "14B"])
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--chunks", type=int, default=7, help="chunks to generate / decode")
    options.add_arguments(p)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--attn", default="auto")
    add_speed_arguments(p)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1, help="chunks (or steps) run and discarded before timing")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.add_argument("--report", default="", help="comma-separated chunk numbers (1-based) to list in 'at_chunk'")
    p.add_argument("--strength", type=float, default=None,
                   help="time video-to-video at this strength instead of text-to-video (random input video)")
    p.add_argument("--input-encoder", choices=["none", "taehv", "wan"], default="none",
                   help="video-to-video: encode the input's pixels chunk by chunk with a random-weight TAEHV or Wan "
                        "VAE of the real size inside the timed loop (none: the input is given as latents)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--train", action="store_true",
                      help="time Self Forcing training steps instead (generator and critic), with --chunks latent-frame "
                           "chunks per rollout, --rank, --steps-to-time")
    mode.add_argument("--decode", action="store_true",
                      help="time streaming decode of --chunks chunks of --frames-per-chunk latent frames instead")
    mode.add_argument("--text-encoder", default=None, metavar="FILE",
                      help="measure the peak RAM of loading this UMT5 file (in a fresh process) instead")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--steps-to-time", type=int, default=3)
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument("--decoders", default="wan,taehv", help="with --decode: comma list of wan, taehv")
    p.add_argument("--tiny", action="store_true", help="with --decode: tiny random decoders instead of the real sizes")
    p.add_argument("--tokenizer", default=None, help="with --text-encoder: tokenizer, if the file carries none")
    p.add_argument("--encode", action="store_true", help="with --text-encoder: also encode one prompt, report its peak")


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
    device = check_device(args.device)
    if args.compile:
        reason = compile_unavailable(device)
        if reason:
            raise SelfForcingError(f"--compile: {reason}; leave --compile out to run eager")
    if args.fp8:
        resolve_matmul("auto", device)
    if args.cuda_graphs and device.type != "cuda":
        raise SelfForcingError(f"--cuda-graphs needs a CUDA device, not {device}; leave it out")


# ---- the chunk loop ---------------------------------------------------------------------------
def run_stream(args) -> dict:
    check_speed_arguments(args)
    device = check_device(args.device)
    dtype = compute_dtype(args.dtype, device)
    cfg = WanConfig.preset(args.config)
    h, w = latent_size_for(args.height, args.width)
    settings = options.stream_settings(args, strength=1.0 if args.strength is None else args.strength)
    model = random_dit(cfg, device, dtype)
    if args.fp8:
        quantize_linears(model)
    backbone = WanBackbone(model, cfg, dtype=dtype, attn=args.attn, compile=args.compile, graphs=args.cuda_graphs)
    text = torch.randn(args.batch, cfg.text_len, cfg.text_dim, device=device) * 0.1

    def stream(chunks):
        n = chunks * args.frames_per_chunk
        return Stream(backbone, text, latent_height=h, latent_width=w, batch=args.batch, num_frames=n,
                      settings=settings, generator=0, video=_input_video(args, n, h, w, device, dtype))

    if args.warmup:
        warm = stream(args.warmup)
        for _ in warm:
            pass
        warm.close()
        synchronize(device)
    reset_peak(device)
    timed, laps, rss = stream(args.chunks), Laps(device), []
    for _ in timed:
        laps.lap()
        rss.append(rss_mb())
    times = laps.times
    steady = times[1:] or times
    steady_frames = args.frames_per_chunk * len(steady)
    out = {
        "config": args.config, "device": device_name(device), "dtype": str(dtype).replace("torch.", ""),
        "attn": backbone.attn_backend, "compile": args.compile, "fp8": args.fp8, "cuda_graphs": args.cuda_graphs,
        "size": f"{args.width}x{args.height}", "latent": [h, w],
        "tokens_per_frame": cfg.tokens_per_frame(h, w), "frames_per_chunk": args.frames_per_chunk,
        "steps": list(settings.steps),
        "video_to_video": None if args.strength is None else {"strength": args.strength,
                                                              "input_encoder": args.input_encoder},
        "window": settings.window, "sink": settings.sink, "chunks": len(times),
        "seconds_per_chunk": [round(t, 5) for t in times],
        "first_chunk_latency_s": round(times[0], 5),
        "latent_fps": round(steady_frames / sum(steady), 3),
        "video_fps": round(TIME_STRIDE * steady_frames / sum(steady), 3),
        "latent_fps_including_first": round(args.chunks * args.frames_per_chunk / laps.total, 3),
        "cache_bytes": timed.cache.nbytes,
        "rss_mb": [round(r, 1) for r in rss],
        **peak_memory(device),
    }
    report = [int(i) for i in args.report.split(",") if i.strip()]
    if report:
        out["at_chunk"] = {str(i): {"seconds": round(times[i - 1], 5), "rss_mb": round(rss[i - 1], 1),
                                    "median_seconds_of_11_around": round(median(times[max(0, i - 6): i + 5]), 5)}
                           for i in report if 0 < i <= len(times)}
    return out


def _input_video(args, latent_frames: int, h: int, w: int, device, dtype):
    """A random input video for video-to-video timing (None for text-to-video)."""
    if args.strength is None:
        return None
    g = torch.Generator().manual_seed(1)
    if args.input_encoder == "none":
        return LatentVideo(torch.randn(args.batch, 16, latent_frames, h, w, generator=g).to(device))
    model = random_vae(args.input_encoder, device=device, dtype=dtype, encoder=True)
    frames = (torch.rand(video_frames_for(latent_frames), SPATIAL_STRIDE * h, SPATIAL_STRIDE * w, 3, generator=g) * 255)
    n = args.frames_per_chunk
    return EncodedVideo(frame_batches(frames.to(torch.uint8), video_frames_for(n), TIME_STRIDE * n), model.stream_encoder())


# ---- training steps ---------------------------------------------------------------------------
def run_train(args) -> dict:
    """Seconds per generator step and per critic step of the DMD trainer on random-weight models (under
    torchrun: data-parallel over the ranks, --batch samples each; the figures are rank 0's)."""
    world, device = init_world(args.device)
    dtype = compute_dtype(args.dtype, device)
    cfg = WanConfig.preset(args.config)
    h, w = latent_size_for(args.height, args.width)
    settings = TrainSettings(rank=args.rank, latent_frames=args.chunks * args.frames_per_chunk, latent_height=h,
                             latent_width=w, frames_per_chunk=args.frames_per_chunk,
                             checkpointing=not args.no_checkpointing, ema=None, batch=args.batch)
    text = torch.randn(2, cfg.text_len, cfg.text_dim) * 0.1
    trainer = Trainer(random_dit(cfg, device, dtype), random_dit(cfg, device, dtype), text, text[:1], settings,
                      dtype=dtype, world=world)
    reset_peak(device)
    out = {"config": args.config, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
           "size": f"{args.width}x{args.height}", "latent_frames": settings.latent_frames, "rank": args.rank,
           "checkpointing": settings.checkpointing, "processes": world.size, "batch_per_process": args.batch}
    for name, loss, lora, opt in (("generator", trainer.generator_loss, trainer.gen_lora, trainer.gen_opt),
                                  ("critic", trainer.critic_loss, trainer.critic_lora, trainer.critic_opt)):
        synchronize(device)
        laps = Laps(device)
        for _ in range(args.warmup + args.steps_to_time):
            trainer._update(loss, lora, opt)
            laps.lap()
        out[f"seconds_per_{name}_step"] = round(median(laps.times[args.warmup:]), 4)
    out.update(peak_memory(device))
    trainer.close()
    world.close()
    return out if world.is_main else None


# ---- streaming decode -------------------------------------------------------------------------
def run_decode(args) -> dict:
    """Seconds per chunk of streaming decode; the first chunk (1 + 4(t - 1) frames) reported apart."""
    device = check_device(args.device)
    dtype = compute_dtype(args.dtype, device)
    kinds = [k.strip() for k in args.decoders.split(",") if k.strip()]
    bad = [k for k in kinds if k not in ("wan", "taehv")]
    if bad or not kinds:
        raise SystemExit(f"--decoders: unknown decoder(s) {bad}; use wan and/or taehv")
    h, w = latent_size_for(args.height, args.width, multiple=8)
    n = args.frames_per_chunk
    g = torch.Generator().manual_seed(0)
    z = torch.randn(args.batch, 16, n * args.chunks, h, w, generator=g).to(device=device, dtype=dtype)
    report = {"device": device_name(device), "dtype": str(dtype).replace("torch.", ""),
              "threads": torch.get_num_threads(), "pixels_hw": [args.height, args.width],
              "latent_bchw": [args.batch, 16, h, w], "chunk_latent_frames": n, "chunks": args.chunks,
              "tiny": args.tiny, "results": {}}
    for kind in kinds:
        model = random_vae(kind, args.tiny, device, dtype)
        for _ in range(args.warmup):
            model.stream_decoder().decode_normalized(z[:, :, :1])
        stream, frames = model.stream_decoder(), []
        synchronize(device)
        laps = Laps(device)
        for s in range(0, z.shape[2], n):
            frames.append(int(stream.decode_normalized(z[:, :, s: s + n]).shape[2]))
            laps.lap()
        times, later = laps.times, laps.times[1:]
        res = {"first_chunk_s": round(times[0], 4), "first_chunk_frames": frames[0],
               "chunk_s": round(sum(later) / len(later), 4) if later else None,
               "chunk_frames": frames[1] if later else None, "chunk_times_s": [round(t, 4) for t in times]}
        if later:
            res["frames_per_s"] = round(frames[1] / res["chunk_s"], 3)
        report["results"][kind] = res
        del model
    return report


# ---- loading a text encoder -------------------------------------------------------------------
def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return -1


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_text_load(path: str, tokenizer: str | None = None, encode: bool = False) -> dict:
    """In THIS process: load the UMT5 file at `path` and report resident-memory figures in bytes (peak:
    VmHWM after a reset through /proc/self/clear_refs). Call it in a fresh process (`measure_in_subprocess`)."""
    info = inspect_text_encoder(path)
    base = _status_bytes("VmRSS")
    _reset_rss_peak()
    t0 = time.perf_counter()
    te = load_text_encoder(path, tokenizer=tokenizer)
    seconds = time.perf_counter() - t0
    peak = _status_bytes("VmHWM")
    tensors = list(te.model.parameters()) + list(te.model.buffers())
    out = {
        "load_seconds": round(seconds, 3), "rss_before": base, "peak_rss": peak, "peak_growth": peak - base,
        "rss_after": _status_bytes("VmRSS"), "rss_anon_after": _status_bytes("RssAnon"),
        "rss_file_after": _status_bytes("RssFile"),
        "tensor_bytes_held": sum(t.numel() * t.element_size() for t in tensors),
        "tensor_bytes_used_in_file": info.nbytes(), "params": info.config.num_params(),
        "param_dtypes": sorted({str(p.dtype) for p in te.model.parameters()}), "torch": torch.__version__,
    }
    if encode:  # one prompt padded to 512 tokens, default compute dtype (fp32 on CPU)
        _reset_rss_peak()
        t0 = time.perf_counter()
        te.encode(["a red fox running through deep snow in a quiet forest at dawn"])
        out["encode_seconds"] = round(time.perf_counter() - t0, 3)
        out["peak_growth_during_encode"] = _status_bytes("VmHWM") - base
    return out


def measure_in_subprocess(path, tokenizer=None, encode: bool = False) -> dict:
    """`measure_text_load` in a fresh interpreter (so earlier allocations do not hide the peak)."""
    code = "import json, sys; from sf_core.bench import measure_text_load; print(json.dumps(measure_text_load(*json.loads(sys.argv[1]))))"
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    args = json.dumps([str(path), None if tokenizer is None else str(tokenizer), bool(encode)])
    res = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"measurement process failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_text_load(args) -> dict:
    if not sys.platform.startswith("linux"):
        raise SystemExit("--text-encoder measures through /proc/self: Linux only")
    r = measure_in_subprocess(args.text_encoder, args.tokenizer, args.encode)
    return {"file": args.text_encoder, "file_bytes": Path(args.text_encoder).stat().st_size, **r,
            "peak_growth_over_tensor_bytes": round(r["peak_growth"] / r["tensor_bytes_used_in_file"], 3)}


def main(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    run = run_train if args.train else run_decode if args.decode else run_text_load if args.text_encoder else run_stream
    out = run(args)
    if out is not None:  # None: a data-parallel rank other than 0
        print(json.dumps(out, indent=1))
    return 0
