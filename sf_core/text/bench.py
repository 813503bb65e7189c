"""Peak RAM of loading a UMT5 file, versus the file's size.

    python -m sf_core.text.bench                      # ~1.3 GB bf16 random file, HF/ComfyUI names
    python -m sf_core.text.bench --layout comfy_fp8   # same config, fp8 scaled
    python -m sf_core.text.bench --mode naive         # the usual way, for comparison
    python -m sf_core.text.bench --encode             # plus the peak while encoding one 512-token prompt

Writes a random UMT5 file (in this process), then loads it in a FRESH process and reports, as JSON,
that process's resident-memory growth during the load (peak, VmHWM after a reset via
/proc/self/clear_refs; ru_maxrss where that is unavailable) next to the file size.
mode "meta" = load_text_encoder (module on the meta device, tensors read once, in file dtype).
mode "naive" = module built in fp32 on CPU, safetensors.torch.load_file, load_state_dict (copy).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_load(path: str, mode: str = "meta", encode: bool = False) -> dict:
    """In THIS process: load `path` and return RSS figures in bytes (call it in a fresh process)."""
    import torch

    from sf_core.text import load_text_encoder
    from sf_core.text.testing import train_tiny_sentencepiece
    from sf_core.text.umt5 import UMT5Encoder, inspect_text_encoder

    train_tiny_sentencepiece()  # before the baseline: not part of the load

    info = inspect_text_encoder(path)
    base = _status_kb("VmRSS") * 1024
    reset = _reset_peak()
    maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    if mode == "meta":
        tokenizer = None if info.has_tokenizer else train_tiny_sentencepiece()  # Wan files carry none
        te = load_text_encoder(path, tokenizer=tokenizer)
        model = te.model
    else:
        from sf_core.io import read_state_dict

        if info.quantized:
            raise SystemExit("--mode naive compares plain (non-fp8) files only")
        model = UMT5Encoder(info.config)  # fp32 parameters on CPU
        sd = read_state_dict(path)
        model.load_state_dict({n: sd[k] for n, k in info.names.items()}, strict=True)
        del sd
    seconds = time.perf_counter() - t0
    peak = _status_kb("VmHWM") * 1024 if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    held = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    out = {
        "mode": mode,
        "load_seconds": round(seconds, 3),
        "rss_before": base,
        "peak_rss": peak,
        "peak_growth": peak - base if reset else peak - max(base, maxrss0),
        "peak_measure": "VmHWM after clear_refs" if reset else "ru_maxrss",
        "rss_after": _status_kb("VmRSS") * 1024,
        "rss_anon_after": _status_kb("RssAnon") * 1024,
        "rss_file_after": _status_kb("RssFile") * 1024,
        "tensor_bytes_held": held,
        "tensor_bytes_used_in_file": info.nbytes(),
        "param_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        "torch": torch.__version__,
    }
    if encode and mode == "meta":  # one 512-token prompt, default compute dtype (fp32 on CPU)
        _reset_peak()
        t0 = time.perf_counter()
        te.encode(["a red fox running through deep snow in a quiet forest at dawn"])
        out["encode_seconds"] = round(time.perf_counter() - t0, 3)
        out["peak_growth_during_encode"] = _status_kb("VmHWM") * 1024 - base
        out["rss_anon_after_encode"] = _status_kb("RssAnon") * 1024
        out["rss_file_after_encode"] = _status_kb("RssFile") * 1024
    return out


def measure_in_subprocess(path: str | os.PathLike, mode: str = "meta", encode: bool = False) -> dict:
    """measure_load in a fresh interpreter (so earlier allocations do not hide the peak)."""
    code = ("import json; from sf_core.text.bench import measure_load; "
            f"print(json.dumps(measure_load({str(path)!r}, {mode!r}, {encode!r})))")
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"measurement process failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layout", default="comfy_hf", choices=["comfy_hf", "comfy_fp8", "wan"])
    p.add_argument("--dtype", default="bf16", choices=sorted(_DTYPES), help="file dtype (comfy_hf / wan)")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=5120)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--mode", default="meta", choices=["meta", "naive"])
    p.add_argument("--encode", action="store_true", help="also encode one 512-token prompt and report its peak")
    p.add_argument("--dir", default=None, help="where to write the random file (default: a temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the random file")
    args = p.parse_args(argv)

    import torch

    from sf_core.text.testing import write_tiny_umt5
    from sf_core.text.umt5 import UMT5Config

    cfg = UMT5Config(vocab_size=args.vocab, dim=args.dim, ffn_dim=args.ffn, num_heads=args.heads,
                     head_dim=args.dim // args.heads, num_layers=args.layers)
    folder = Path(args.dir or tempfile.mkdtemp(prefix="umt5_bench_"))
    path = folder / ("umt5_bench.pth" if args.layout == "wan" else "umt5_bench.safetensors")
    write_tiny_umt5(path, args.layout, config=cfg, dtype=getattr(torch, _DTYPES[args.dtype]), spiece=True)
    file_bytes = path.stat().st_size
    try:
        r = measure_in_subprocess(path, args.mode, args.encode)
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)
    xxl = UMT5Config()
    result = {
        "command": "python -m sf_core.text.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "layout": args.layout,
        "file_dtype": "fp8+fp16" if args.layout == "comfy_fp8" else args.dtype,
        "params": cfg.num_params(),
        "tensor_bytes_used_in_file": r["tensor_bytes_used_in_file"],
        "file_bytes": file_bytes,
        **{k: v for k, v in r.items() if k != "tensor_bytes_used_in_file"},
        "peak_growth_over_tensor_bytes": round(r["peak_growth"] / r["tensor_bytes_used_in_file"], 3),
        "xxl_params": xxl.num_params(),
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
