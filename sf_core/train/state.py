"""Training checkpoints: read one safely and check it fits the run about to resume from it.

A checkpoint is the dict `Trainer.state_dict()` writes (torch.save, tensors and plain values only):
iteration, generator_steps, gen_lora, critic_lora, ema, gen_opt, critic_opt, settings, world_size.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from pathlib import Path

import torch

from ..config import WanConfig
from ..errors import CheckpointError, SelfForcingError
from ..lora import LoRA
from ..wan.modules import WanModel
from ..weights import load_error_reason

STATE_KEYS = ("iteration", "generator_steps", "gen_lora", "critic_lora", "ema", "gen_opt", "critic_opt", "settings")
# Settings a resumed run must share with the checkpoint (they fix the LoRA and the rollout shapes).
FIXED_SETTINGS = ("rank", "alpha", "latent_frames", "latent_height", "latent_width", "frames_per_chunk", "context")
# settings that checkpoints written before they existed do not record, with the value those runs used
UNRECORDED = {"context": "self"}


def read_state(path: str | os.PathLike) -> dict:
    """Open a training checkpoint (plain tensors only: weights_only). CheckpointError when it is missing,
    empty, truncated, foreign (e.g. a model or a LoRA file) or incomplete."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"training checkpoint {path} is a folder; give the .ckpt.pt file")
    if not path.is_file():
        raise CheckpointError(f"no training checkpoint at {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"training checkpoint {path} is empty (an interrupted write?); remove it to start afresh")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # torch raises many types for corrupt / foreign files
        raise CheckpointError(
            f"{path} is not a readable training checkpoint ({load_error_reason(e)}); it may be truncated or another kind "
            "of file: remove it (or pass --overwrite) to start afresh"
        ) from e
    if not isinstance(state, dict) or not all(k in state for k in STATE_KEYS):
        found = sorted(state)[:5] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"{path} is not a training checkpoint of this trainer (found {found}; expected {', '.join(STATE_KEYS[:4])}, "
            "...); give the .ckpt.pt file a training run wrote"
        )
    if not isinstance(state["settings"], dict) or not isinstance(state["iteration"], int):
        raise CheckpointError(f"{path}: the checkpoint's settings / iteration are damaged; start afresh")
    return state


def expected_lora_shapes(config: WanConfig, rank: int, alpha: float | None) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes of the LoRA a trainer injects into a model of `config` (nothing allocated)."""
    with torch.device("meta"):
        model = WanModel(config)
    lora = LoRA.create(model, rank, alpha, device="meta")
    return {k: tuple(v.shape) for k, v in lora.state_dict().items()}


def check_state(state: dict, settings, generator: WanConfig | None = None, teacher: WanConfig | None = None,
                path: str | os.PathLike = "checkpoint", world_size: int = 1) -> None:
    """Raise SelfForcingError unless `state` can resume a run of `settings` (TrainSettings) on models of
    these configs: same fixed settings, LoRA tensors of the same names and shapes."""
    mine = dataclasses.asdict(settings)
    for key in FIXED_SETTINGS:
        theirs = state["settings"].get(key, UNRECORDED.get(key))
        if _norm(theirs) != _norm(mine[key]):
            raise SelfForcingError(
                f"cannot resume from {path}: it was trained with {key}={theirs}, this run has "
                f"{mine[key]}; resume with the same settings, or start afresh (overwrite, or remove the checkpoint)"
            )
    # Randomness is keyed by the global sample index, so any split of the same samples per step continues the
    # same run: 2 processes x batch 1 resume as 1 process x batch 2 and the other way round.
    ranks, batch = state.get("world_size", 1), state["settings"].get("batch")
    if ranks * batch != world_size * settings.batch:
        raise SelfForcingError(
            f"cannot resume from {path}: it was trained with {ranks} process(es) x batch {batch} = {ranks * batch} "
            f"samples per step, this run has {world_size} x batch {settings.batch} = {world_size * settings.batch}; "
            f"resume with processes x batch = {ranks * batch} (e.g. set the per-process batch to that number divided "
            "by the process count)"
        )
    for name, config in (("gen_lora", generator), ("critic_lora", teacher)):
        if config is None:
            continue
        want = expected_lora_shapes(config, settings.rank, settings.alpha)
        have = state[name]
        if not isinstance(have, dict):
            raise CheckpointError(f"cannot resume from {path}: its {name} is damaged; start afresh")
        got = {k: tuple(v.shape) for k, v in have.items() if isinstance(v, torch.Tensor)}
        if got != want:
            diff = sorted(set(got) ^ set(want))[:2] or [k for k in want if got[k] != want[k]][:2]
            raise SelfForcingError(
                f"cannot resume from {path}: its {name} does not fit this model ({len(got)} tensors, {len(want)} "
                f"expected; first difference {diff}); it was trained on another model - start afresh"
            )


def _norm(v):
    return list(v) if isinstance(v, tuple) else v
