"""The GPU check of the real-time fast paths: one run, one JSON on stdout.

    python tests/gpu/check_speed.py                 # 1.3B, 832x480, bf16 on CUDA: under 8 minutes on an H100-class GPU
    python tests/gpu/check_speed.py --config tiny   # the same measurements on CPU in seconds (CI runs it)

Installs nothing and reads no file: every model (1.3B DiT, TAEHV, Wan VAE, the training teacher) is built
with random weights on the device. Needs torch (safetensors, einops and sentencepiece are the project's own
requirements; PyAV is not used). Chunk-wise (3 latent frames), 4 steps, window 12 / sink 3. For each mode -
eager, compile, compile + CUDA graphs, fp8 (+ compile + graphs) - it reports the median seconds per chunk
after warm-up, latent and video FPS of the DiT alone and with TAEHV decoding overlapped, the first-chunk
latency of a warm process, and the peak GPU memory; then the Wan VAE decode seconds per chunk, the ratio of
chunk 60 to chunk 10 (flat cost), and one Self Forcing LoRA training step (generator and critic) at 21
latent frames with its peak memory. Parts that would start after --budget-s seconds are skipped and listed, and
a part that fails is reported as {"error": ...} while the others still run: the JSON always comes out.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from sf_core.bench import random_dit, random_vae  # noqa: E402

PRESETS = {
    # chunks: timed chunks per mode (after a warm-up stream that fills the window and captures the graph)
    "1.3B": dict(height=480, width=832, dtype=torch.bfloat16, chunks=16, warmup=6, long=64,
                 taehv=None, wan_vae_dim=96, train_frames=21),
    "tiny": dict(height=64, width=64, dtype=torch.float32, chunks=8, warmup=5, long=64,
                 taehv=(32, 16, 8, 8), wan_vae_dim=8, train_frames=21),
}
MODES = {
    "eager": dict(),
    "compile": dict(compile=True),
    "compile+graphs": dict(compile=True, graphs=True),
    "fp8+compile+graphs": dict(fp8=True, compile=True, graphs=True),
}
WINDOW, SINK, FRAMES_PER_CHUNK = 12, 3, 3
GOALS = {"video_fps_with_taehv_bf16": 30, "video_fps_with_taehv_fp8": 40, "first_frame_s": 0.3,
         "streaming_gpu_memory_gib": 10, "train_step_gpu_memory_gib": 24}  # one H100-class GPU
PAPER = {"fps": 17.0, "first_frame_s": 0.69, "gpu": "H100", "source": "Self Forcing (Huang et al. 2025)"}


class Clock:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def peak_memory(device) -> dict:
    if device.type == "cuda":
        return {"peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3)}
    return {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def reset_peak(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def stream_of(backbone, text, h, w, chunks, seed=0):
    from sf_core.stream import Stream, StreamSettings

    settings = StreamSettings(frames_per_chunk=FRAMES_PER_CHUNK, window=WINDOW, sink=SINK)
    return Stream(backbone, text, latent_height=h, latent_width=w, num_frames=FRAMES_PER_CHUNK * chunks,
                  settings=settings, generator=seed)


def chunk_times(stream, clock, keep: list | None = None) -> list[float]:
    times, last = [], clock()
    for chunk in stream:
        now = clock()
        times.append(now - last)
        if keep is not None:
            keep.append(chunk.latents.float().cpu())
        last = time.perf_counter()
    return times


def measure_mode(name, opts, base_model, cfg, p, device, text, taehv, h, w, reference: dict) -> dict:
    """One mode: warm-up stream, timed stream (its latents compared with the first mode's), and a stream
    with TAEHV decoding overlapped."""
    from sf_core.pipeline import decode_stream
    from sf_core.wan import WanBackbone

    clock = Clock(device)
    model = base_model
    if opts.get("fp8"):
        from sf_core.wan.fp8 import fp8_matmul_unavailable, quantize_linears

        reason = fp8_matmul_unavailable(device)
        if reason:
            return {"skipped": reason}
        model = copy.deepcopy(base_model)
        quantize_linears(model)
    reset_peak(device)
    bb = WanBackbone(model, cfg, dtype=p["dtype"], compile=opts.get("compile", False) and not p["no_compile"],
                     graphs=opts.get("graphs", False))
    t0 = clock()
    chunk_times(stream_of(bb, text, h, w, p["warmup"]), clock)  # compile, fill the window, capture
    warmup_s = clock() - t0

    s = stream_of(bb, text, h, w, p["chunks"], seed=1)
    latents = []
    times = chunk_times(s, clock, latents)
    steady = times[p["warmup"] - 1:] if len(times) > p["warmup"] else times[1:]
    per_chunk = statistics.median(steady)
    out = {
        "seconds_per_chunk_median": round(per_chunk, 5),
        "latent_fps_dit": round(FRAMES_PER_CHUNK / per_chunk, 2),
        "video_fps_dit": round(4 * FRAMES_PER_CHUNK / per_chunk, 2),
        "first_chunk_latency_s": round(times[0], 4),
        "warmup_s": round(warmup_s, 2),
    }
    video = torch.cat(latents, dim=2)
    reference.setdefault("video", video)  # the first mode run (eager) is the reference of the others
    out["relative_difference_to_first_mode"] = round(((video - reference["video"]).norm() / reference["video"].norm()).item(), 5)
    # the same with TAEHV decoding each chunk while the next generates
    steps, start = [], clock()
    for step in decode_stream(stream_of(bb, text, h, w, p["chunks"], seed=2), taehv.stream_decoder(), overlap=True):
        steps.append((step.frames.shape[0], step.chunk.latents.shape[2], time.perf_counter() - start))
    k = min(p["warmup"], len(steps) - 2)
    span = steps[-1][2] - steps[k][2]
    out["latent_fps_with_taehv_overlapped"] = round(sum(s[1] for s in steps[k + 1:]) / span, 2)
    out["video_fps_with_taehv_overlapped"] = round(sum(s[0] for s in steps[k + 1:]) / span, 2)
    out["first_frame_latency_s_taehv_overlapped"] = round(steps[0][2], 4)
    out.update(peak_memory(device))
    if bb.graphs is not None:
        out["graphs"] = dict(bb.graphs.stats, captured=bb.graphs.capture is not None, fallback=bb.graphs.disabled)
    del bb, s
    return out


def flat_cost_ratio(model, cfg, p, device, text, h, w) -> dict:
    """Eager per-chunk time around chunk 60 over around chunk 10 (medians of 5): 1.0 = flat in length."""
    from sf_core.wan import WanBackbone

    times = chunk_times(stream_of(WanBackbone(model, cfg, dtype=p["dtype"]), text, h, w, p["long"]), Clock(device))
    around = lambda i: statistics.median(times[i - 3: i + 2])  # chunks i-2 .. i+2 (1-based i)
    return {"chunk60_over_chunk10": round(around(60) / around(10), 3),
            "seconds_chunk10": round(around(10), 5), "seconds_chunk60": round(around(60), 5)}


def wan_vae_decode(p, device, h, w) -> dict:
    vae = random_vae("wan", tiny=p["wan_vae_dim"] == 8, device=device, dtype=p["dtype"])
    dec, clock = vae.stream_decoder(), Clock(device)
    g = torch.Generator().manual_seed(0)
    times = []
    with torch.inference_mode():
        for _ in range(6):
            z = torch.randn(1, 16, FRAMES_PER_CHUNK, h, w, generator=g).to(device)
            t0 = clock()
            dec.decode_normalized(z)
            times.append(clock() - t0)
    del vae, dec
    return {"wan_vae_decode_s_per_chunk": round(statistics.median(times[2:]), 4)}


def train_step(cfg, p, device, h, w) -> dict:
    from sf_core.train.trainer import TrainSettings, Trainer

    reset_peak(device)
    settings = TrainSettings(rank=32, latent_frames=p["train_frames"], latent_height=h, latent_width=w,
                             frames_per_chunk=FRAMES_PER_CHUNK, checkpointing=True, ema=None)
    gen, teacher = random_dit(cfg, device, p["dtype"]), random_dit(cfg, device, p["dtype"])
    text = torch.randn(2, cfg.text_len, cfg.text_dim) * 0.1
    trainer = Trainer(gen, teacher, text, text[:1], settings, dtype=p["dtype"])
    clock = Clock(device)
    out = {"latent_frames": p["train_frames"], "rank": 32}
    for name, loss, lora, opt in (("generator", trainer.generator_loss, trainer.gen_lora, trainer.gen_opt),
                                  ("critic", trainer.critic_loss, trainer.critic_lora, trainer.critic_opt)):
        t0 = clock()
        trainer._update(loss, lora, opt)
        out[f"seconds_{name}_step"] = round(clock() - t0, 3)
    out.update(peak_memory(device))
    trainer.close()
    return out


def attempt(fn, *args) -> dict:
    """fn(*args), or {"error": what went wrong} (one failing part must not cost the others)."""
    import traceback

    try:
        return fn(*args)
    except Exception as e:  # reported in the JSON
        return {"error": f"{type(e).__name__}: {e}", "where": traceback.format_exc().strip().splitlines()[-3:]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=list(PRESETS), default="1.3B")
    ap.add_argument("--device", default=None, help="default: cuda for 1.3B, cpu for tiny")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}")
    ap.add_argument("--skip", default="", help="comma-separated parts to leave out: long, vae, train")
    ap.add_argument("--no-compile", action="store_true",
                    help="run the compile modes without torch.compile (a quick check of the script itself)")
    ap.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (0: PyTorch's default)")
    ap.add_argument("--budget-s", type=float, default=390.0, help="skip parts that would start after this")
    args = ap.parse_args(argv)
    from sf_core.config import WanConfig
    from sf_core.latents import latent_size_for

    wall = time.perf_counter()
    p = dict(PRESETS[args.config], no_compile=args.no_compile)
    device = torch.device(args.device or ("cuda" if args.config != "tiny" else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; run with --config tiny for the CPU version")
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)  # tiny ops: one thread is faster and steadier on a shared CPU
    cfg = WanConfig.preset(args.config)
    h, w = latent_size_for(p["height"], p["width"])
    report = {
        "config": args.config, "device": str(device) + (f" ({torch.cuda.get_device_name(device)})"
                                                         if device.type == "cuda" else ""),
        "torch": torch.__version__, "size": f"{p['width']}x{p['height']}",
        "dtype": str(p["dtype"]).replace("torch.", ""), "frames_per_chunk": FRAMES_PER_CHUNK,
        "window": WINDOW, "sink": SINK, "steps": 4, "compile_disabled": args.no_compile, "paper_h100": PAPER, "goals": GOALS, "modes": {}, "skipped": [],
    }
    model = random_dit(cfg, device, p["dtype"])
    text = torch.randn(1, cfg.text_len, cfg.text_dim, device=device) * 0.1
    taehv = random_vae("taehv", tiny=p["taehv"] is not None, device=device, dtype=p["dtype"])

    reference: dict = {}

    def time_left() -> bool:
        return time.perf_counter() - wall < args.budget_s

    with torch.inference_mode():
        for name in [m for m in args.modes.split(",") if m]:
            if name not in MODES:
                raise SystemExit(f"unknown mode {name!r}; choose from {', '.join(MODES)}")
            if not time_left():
                report["skipped"].append(name)
                continue
            report["modes"][name] = attempt(measure_mode, name, MODES[name], model, cfg, p, device, text, taehv, h, w,
                                            reference)
        skip = set(args.skip.split(","))
        if "long" not in skip and time_left():
            report["long"] = attempt(flat_cost_ratio, model, cfg, p, device, text, h, w)
        elif "long" not in skip:
            report["skipped"].append("long")
        del text, taehv
    if "vae" not in skip and time_left():
        report["wan_vae"] = attempt(wan_vae_decode, p, device, h, w)
    elif "vae" not in skip:
        report["skipped"].append("vae")
    del model
    if "train" not in skip and time_left():
        report["train"] = attempt(train_step, cfg, p, device, h, w)
    elif "train" not in skip:
        report["skipped"].append("train")
    report["wall_s"] = round(time.perf_counter() - wall, 1)
    return report


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
