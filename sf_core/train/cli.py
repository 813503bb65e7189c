"""`python -m sf_core train`: Self Forcing DMD LoRA training from the command line.

Every input is checked first (paths, prompts, sizes, what each file is); then the prompts and the
negative prompt are encoded once and the text encoder is freed; then the trainer runs, checkpointing
atomically, and the final LoRA is written in ComfyUI's LoRA layout.
"""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

import torch

from ..checkpoints import check_dit_file, load_dit
from ..errors import SelfForcingError
from ..io import DTYPES, check_writable, compute_dtype
from ..latents import latent_frames_for, latent_size_for
from ..text import inspect_text_encoder, load_text_encoder
from .session import run_session
from .trainer import TrainSettings, Trainer

# The negative prompt Wan2.1 and the Self Forcing recipe use for the teacher's unconditional branch.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，"
    "残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
    "三条腿，背景人很多，倒着走"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="generator: the Self Forcing checkpoint to adapt")
    p.add_argument("--teacher", required=True, help="real score: a bidirectional Wan2.1 T2V model (frozen)")
    p.add_argument("--text-encoder", required=True)
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--prompts", required=True, help="text file, one prompt per line")
    p.add_argument("--negative", default=WAN_NEGATIVE_PROMPT, help="negative prompt for the teacher's CFG")
    p.add_argument("--output", "-o", required=True, help="LoRA .safetensors (ComfyUI layout)")
    p.add_argument("--checkpoint", default=None, help="trainer checkpoint (default: OUTPUT with .ckpt.pt)")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    p.add_argument("--iterations", type=int, default=600)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--alpha", type=float, default=None)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--critic-lr", type=float, default=2e-5)
    p.add_argument("--critic-ratio", type=int, default=5)
    p.add_argument("--guidance", type=float, default=3.0, help="real = cond + g (cond - uncond); 3 = CFG 4")
    p.add_argument("--frames", type=int, default=81, help="video frames of each rollout (1 + 4k)")
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--frames-per-chunk", type=int, default=3)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--ema", type=float, default=0.99, help="EMA decay of the LoRA (0 disables)")
    p.add_argument("--ema-start", type=int, default=200)
    p.add_argument("--no-checkpointing", action="store_true", help="disable gradient checkpointing")
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on GPU, fp32 on CPU")


def settings_from(args) -> TrainSettings:
    h, w = latent_size_for(args.height, args.width)
    return TrainSettings(
        iterations=args.iterations, rank=args.rank, alpha=args.alpha, lr=args.lr, critic_lr=args.critic_lr,
        critic_ratio=args.critic_ratio, guidance=args.guidance, latent_frames=latent_frames_for(args.frames),
        latent_height=h, latent_width=w, frames_per_chunk=args.frames_per_chunk, batch=args.batch,
        grad_accum=args.grad_accum, ema=args.ema or None, ema_start=args.ema_start,
        checkpointing=not args.no_checkpointing, save_every=args.save_every, seed=args.seed,
    )


def read_prompts(path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise SelfForcingError(f"prompts file {path} does not exist")
    prompts = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not prompts:
        raise SelfForcingError(f"{path} holds no prompts; write one prompt per line")
    return prompts


def preflight(args) -> tuple[TrainSettings, list[str], Path]:
    settings = settings_from(args)
    if not str(args.output).endswith(".safetensors"):
        raise SelfForcingError(f"output {args.output} should end in .safetensors (ComfyUI's LoRA format)")
    check_writable(args.output)
    checkpoint = Path(args.checkpoint) if args.checkpoint else Path(str(args.output)[: -len(".safetensors")] + ".ckpt.pt")
    check_writable(checkpoint)
    if args.resume and not checkpoint.is_file():
        raise SelfForcingError(f"--resume: no checkpoint at {checkpoint}")
    prompts = read_prompts(args.prompts)
    check_dit_file(args.model)
    check_dit_file(args.teacher)
    if not inspect_text_encoder(args.text_encoder).has_tokenizer and args.tokenizer is None:
        raise SelfForcingError(f"{args.text_encoder} carries no tokenizer; pass --tokenizer")
    return settings, prompts, checkpoint


def run(args, log=print) -> dict:
    settings, prompts, checkpoint = preflight(args)
    device = torch.device(args.device)
    dtype = compute_dtype(args.dtype, device)
    with load_text_encoder(args.text_encoder, tokenizer=args.tokenizer, device="cpu") as te:
        embeds = te.encode(prompts).float()
        negative = te.encode([args.negative]).float()
    gc.collect()
    generator, _ = load_dit(args.model, device=device, dtype=dtype)
    teacher, _ = load_dit(args.teacher, device=device, dtype=dtype)
    trainer = Trainer(generator, teacher, embeds, negative, settings, dtype=dtype)
    try:
        result = run_session(trainer, checkpoint, args.output, resume=args.resume, metadata={"prompts": str(len(prompts))},
                             on_step=lambda info: log(json.dumps(_fmt(info))), log=log)
    finally:
        trainer.close()
    return {"history": result.history, "output": str(args.output), "checkpoint": str(checkpoint),
            "finished": result.finished}


def _fmt(info: dict) -> dict:
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in info.items()}


def main(args) -> int:
    return 0 if run(args)["finished"] else 130  # interrupted: the checkpoint is kept, continue with --resume
