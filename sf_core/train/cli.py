"""`python -m sf_core train`: Self Forcing DMD LoRA training from the command line.

Every input is checked first (paths, prompts, sizes, what each file is); then the prompts and the
negative prompt are encoded once and the text encoder is freed; then the trainer runs, checkpointing
atomically, and the final LoRA is written in ComfyUI's LoRA layout.

Under torchrun (`torchrun --nproc_per_node N -m sf_core train ...`) every rank runs this same command
data-parallel (see `distributed`): rank 0 encodes the prompts and hands them out, reads a checkpoint to
resume from, writes checkpoints and the LoRA, and is the only one that logs.
"""

from __future__ import annotations

import argparse
import gc
import json
import signal
import sys
from pathlib import Path

import torch

from ..checkpoints import load_dit
from ..errors import SelfForcingError
from .. import options
from .. import preflight as pf
from ..io import DTYPES, compute_dtype
from ..paths import check_paths
from ..signals import StopSignals
from ..stream import StreamSettings
from ..latents import latent_frames_for, latent_size_for
from ..text import inspect_text_encoder, load_text_encoder
from .distributed import World, init_world, launched_by_torchrun, shard_frozen_base
from .session import run_session
from .state import check_state, read_state
from .trainer import TrainSettings, Trainer, check_prompt_count

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
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing OUTPUT and start afresh over an existing --checkpoint")
    options.add_arguments(p, options.TRAINING)  # --iterations --rank --lr --critic-lr --critic-ratio --guidance
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    p.add_argument("--frames", type=int, default=81, help="video frames of each rollout (1 + 4k)")
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--frames-per-chunk", type=int, default=3)
    p.add_argument("--batch", type=int, default=1, help="videos per step (per process under torchrun)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--ema", type=float, default=0.99, help="EMA decay of the LoRA (0 disables)")
    p.add_argument("--ema-start", type=int, default=200)
    p.add_argument("--no-checkpointing", action="store_true", help="disable gradient checkpointing")
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--shard-base", action="store_true",
                   help="under torchrun: split the frozen generator and teacher weights across the ranks (FSDP2)")
    p.add_argument("--dist-timeout", type=float, default=1800.0,
                   help="under torchrun: seconds a rank waits for the others before the job fails")


def settings_from(args) -> TrainSettings:
    h, w = latent_size_for(args.height, args.width)
    return options.train_settings(
        args, alpha=args.alpha, latent_frames=latent_frames_for(args.frames), latent_height=h, latent_width=w,
        frames_per_chunk=args.frames_per_chunk, batch=args.batch, grad_accum=args.grad_accum, ema=args.ema or None,
        ema_start=args.ema_start,
        checkpointing=not args.no_checkpointing, save_every=args.save_every, seed=args.seed,
    )


def read_prompts(path) -> list[str]:
    text = pf.read_text_file(path, "prompts file")
    prompts = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not prompts:
        raise SelfForcingError(f"{path} holds no prompts; write one prompt per line")
    return prompts


def preflight(args, world_size: int = 1) -> tuple[TrainSettings, list[str], Path]:
    """Every check before heavy work: values, devices, paths (inputs never outputs, no silent replacing),
    what each file is, the resume checkpoint against this run, a lower bound of the memory needed."""
    device = pf.check_device(args.device)
    pf.positive("--lr", args.learning_rate)
    pf.positive("--critic-lr", args.critic_learning_rate)
    pf.finite("--guidance", args.guidance)
    pf.share("--switch-share", args.switch_share)
    if args.alpha is not None:
        pf.positive("--alpha", args.alpha)
    pf.at_least("--save-every", args.save_every, 1)
    settings = settings_from(args)
    if args.shard_base and not launched_by_torchrun():
        raise SelfForcingError("--shard-base splits the weights across processes: launch with "
                               "torchrun --nproc_per_node N -m sf_core train ...")
    if not str(args.output).endswith(".safetensors"):
        raise SelfForcingError(f"output {args.output} should end in .safetensors (ComfyUI's LoRA format)")
    checkpoint = Path(args.checkpoint) if args.checkpoint else Path(str(args.output)[: -len(".safetensors")] + ".ckpt.pt")
    if args.resume and not checkpoint.is_file():
        raise SelfForcingError(f"--resume: no checkpoint at {checkpoint}")
    check_paths({"--model": args.model, "--teacher": args.teacher, "--text-encoder": args.text_encoder,
                 "--tokenizer": args.tokenizer, "--prompts": args.prompts},
                {"--output": args.output, "--checkpoint": checkpoint}, overwrite=args.overwrite,
                replaceable=("--output", "--checkpoint") if args.resume or checkpoint.exists() else ("--checkpoint",))
    if checkpoint.exists() and not (args.resume or args.overwrite):
        raise SelfForcingError(f"a training checkpoint already exists at {checkpoint}; pass --resume to continue "
                               "it, or --overwrite to start afresh and replace it")
    prompts = read_prompts(args.prompts)
    check_prompt_count(len(prompts), settings)
    gcfg, tcfg = pf.dit_config(args.model), pf.dit_config(args.teacher)
    if (gcfg.in_dim, gcfg.out_dim, gcfg.text_dim) != (tcfg.in_dim, tcfg.out_dim, tcfg.text_dim):
        raise SelfForcingError(
            f"the teacher works on {tcfg.in_dim}-channel latents and {tcfg.text_dim}-wide text, the generator on "
            f"{gcfg.in_dim} and {gcfg.text_dim}; use a teacher from the same family (Wan2.1 T2V)"
        )
    gcfg.tokens_per_frame(settings.latent_height, settings.latent_width)
    te = inspect_text_encoder(args.text_encoder)
    if not te.has_tokenizer and args.tokenizer is None:
        raise SelfForcingError(f"{args.text_encoder} carries no tokenizer; pass --tokenizer")
    if te.config.dim != gcfg.text_dim:
        raise SelfForcingError(f"{args.text_encoder} gives {te.config.dim}-wide text embeddings but {args.model} "
                               f"reads {gcfg.text_dim}-wide ones; use the text encoder made for this model (UMT5-XXL)")
    if args.resume:
        check_state(read_state(checkpoint), settings, gcfg, tcfg, checkpoint, world_size=world_size)
    dtype = compute_dtype(args.dtype, device)
    cache = StreamSettings(frames_per_chunk=settings.frames_per_chunk).cache_bytes(
        gcfg, settings.latent_height, settings.latent_width, settings.latent_frames, batch=settings.batch, dtype=dtype)
    plan = pf.memory_plan(gcfg, settings.latent_height, settings.latent_width, settings.frames_per_chunk, dtype, cache,
                          batch=settings.batch, models=2)
    pf.check_memory(plan, device, "training (at least)", "use fewer --frames, a smaller size or a smaller --batch")
    return settings, prompts, checkpoint


def run(args, log=print) -> dict:
    """Train; returns {history, output, checkpoint, stopped}. A SIGINT / SIGTERM during training stops it at
    the end of the current iteration with a checkpoint saved (`stopped` names the signal, no LoRA is
    written); during loading, it stops at once (nothing written). Under torchrun: one data-parallel rank."""
    world, device = init_world(args.device, args.dist_timeout)
    try:
        return _run(args, world, device, log if world.is_main else (lambda *a, **k: None))
    finally:
        world.close()


def _run(args, world: World, device: torch.device, log) -> dict:
    settings, prompts, checkpoint = preflight(args, world.size)
    dtype = compute_dtype(args.dtype, device)
    embeds = negative = None
    if world.is_main:
        with load_text_encoder(args.text_encoder, tokenizer=args.tokenizer, device="cpu") as te:
            embeds = te.encode(prompts).float()
            negative = te.encode([args.negative]).float()
        gc.collect()
    embeds, negative = world.broadcast_object((embeds, negative))
    load_to = torch.device("cpu") if args.shard_base else device  # sharding moves each rank's part to the device
    generator, _ = load_dit(args.model, device=load_to, dtype=dtype)
    teacher, _ = load_dit(args.teacher, device=load_to, dtype=dtype)
    if args.shard_base:
        shard_frozen_base(generator, world, device)
        shard_frozen_base(teacher, world, device)
    trainer = Trainer(generator, teacher, embeds, negative, settings, dtype=dtype, world=world)
    if world.size > 1:
        log(f"{world.size} processes x batch {settings.batch} x accumulation {settings.grad_accum} = "
            f"{world.size * settings.batch * settings.grad_accum} samples per step"
            + (", base weights sharded (FSDP2)" if args.shard_base else ""))
    with StopSignals(defer=True) as stop:  # a signal stops training at the end of the iteration
        try:
            result = run_session(trainer, checkpoint, args.output, resume=args.resume,
                                 metadata={"prompts": str(len(prompts))}, on_step=lambda info: log(progress_line(info)),
                                 should_stop=lambda: stop.requested, interrupts=(), log=log)
        finally:
            trainer.close()
    return {"history": result.history, "output": str(args.output), "checkpoint": str(checkpoint),
            "finished": result.finished, "iteration": result.iteration, "stopped": stop.name}


def progress_line(info: dict) -> str:
    """One JSON line per iteration; losses in scientific notation (small losses stay visible)."""
    parts = []
    for k, v in info.items():
        if isinstance(v, float):
            v = f"{v:.4e}" if "loss" in k else f"{v:.3f}"
        parts.append(f"{json.dumps(k)}: {v}")
    return "{" + ", ".join(parts) + "}"


def main(args) -> int:
    with StopSignals():  # while loading: stop at once, nothing written
        if launched_by_torchrun():  # a failing rank's traceback reaches torchrun's failure summary
            from torch.distributed.elastic.multiprocessing.errors import record

            result = record(run)(args)
        else:
            result = run(args)
    if not result["finished"]:
        sig = signal.Signals[result["stopped"] or "SIGINT"]
        print(f"stopped by {sig.name} at iteration {result['iteration']}/{args.iterations}: checkpoint "
              f"{result['checkpoint']} saved; run the same command with --resume to continue", file=sys.stderr)
        return 128 + sig.value
    return 0
