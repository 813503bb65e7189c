"""Time streaming decode per latent chunk for the Wan2.1 VAE and TAEHV; prints JSON.

Random weights with the REAL architectures (or tiny ones with --tiny), so no files are needed:

    python -m sf_core.vae.bench --height 256 --width 256 --chunks 2 --device cpu --dtype float32

Each decoder decodes `--chunks` chunks of `--chunk` latent frames of one stream; the first chunk
(which yields 1 + 4(t - 1) frames) is reported apart from the later ones (4t frames each).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from .taehv import TAEHVConfig, random_taehv
from .wan_vae import WanVAEConfig, random_wan_vae

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_stream(model, z: torch.Tensor, chunk: int, device: torch.device) -> dict:
    stream = model.stream_decoder()
    times, frames = [], []
    for s in range(0, z.shape[2], chunk):
        _sync(device)
        t0 = time.perf_counter()
        out = stream.decode_normalized(z[:, :, s : s + chunk])
        _sync(device)
        times.append(time.perf_counter() - t0)
        frames.append(int(out.shape[2]))
        del out
    later = times[1:]
    res = {
        "first_chunk_s": round(times[0], 4),
        "first_chunk_frames": frames[0],
        "chunk_s": round(sum(later) / len(later), 4) if later else None,
        "chunk_frames": frames[1] if later else None,
        "chunk_times_s": [round(t, 4) for t in times],
    }
    if later:
        res["frames_per_s"] = round(frames[1] / res["chunk_s"], 3)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sf_core.vae.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--height", type=int, default=256, help="pixel height (multiple of 8)")
    ap.add_argument("--width", type=int, default=256, help="pixel width (multiple of 8)")
    ap.add_argument("--chunk", type=int, default=3, help="latent frames per chunk (default 3)")
    ap.add_argument("--chunks", type=int, default=2, help="chunks to decode (>= 2 to see a steady-state chunk)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--which", default="wan,taehv", help="comma list of: wan, taehv")
    ap.add_argument("--tiny", action="store_true", help="tiny random models instead of the real sizes")
    ap.add_argument("--warmup", type=int, default=1, help="untimed single-latent decodes first")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    args = ap.parse_args(argv)

    if args.height % 8 or args.width % 8 or args.chunk < 1 or args.chunks < 1:
        ap.error("height and width must be multiples of 8; chunk and chunks >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    which = [w.strip() for w in args.which.split(",") if w.strip()]
    bad = [w for w in which if w not in ("wan", "taehv")]
    if bad:
        ap.error(f"unknown decoder(s) {bad}; use wan and/or taehv")

    h, w = args.height // 8, args.width // 8
    g = torch.Generator().manual_seed(0)
    z = torch.randn(args.batch, 16, args.chunk * args.chunks, h, w, generator=g).to(device=device, dtype=dtype)
    report = {
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "pixels_hw": [args.height, args.width],
        "latent_bchw": [args.batch, 16, h, w],
        "chunk_latent_frames": args.chunk,
        "chunks": args.chunks,
        "tiny": args.tiny,
        "results": {},
    }
    for name in which:
        if name == "wan":
            cfg = WanVAEConfig(dim=8, has_encoder=False) if args.tiny else WanVAEConfig(has_encoder=False)
            model = random_wan_vae(cfg, device=device, dtype=dtype)
        else:
            cfg = TAEHVConfig(decoder_channels=(32, 16, 8, 8), has_encoder=False) if args.tiny else TAEHVConfig(has_encoder=False)
            model = random_taehv(cfg, device=device, dtype=dtype)
        for _ in range(args.warmup):
            model.stream_decoder().decode_normalized(z[:, :, :1])
        report["results"][name] = _time_stream(model, z, args.chunk, device)
        del model
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
