"""One training session, as the CLI and the ComfyUI node both run it: resume from the checkpoint when asked,
train with a checkpoint every `save_every` iterations, keep a checkpoint when stopped or interrupted (resume
later), and write the final LoRA (the EMA once it has started) in ComfyUI's layout when training finishes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from ..lora import LoRA
from .trainer import Trainer


@dataclass
class SessionResult:
    iteration: int
    finished: bool  # False: stopped or interrupted early; the checkpoint holds the state, no LoRA was written
    lora: LoRA | None = None
    history: list[dict] = field(default_factory=list)


def run_session(
    trainer: Trainer,
    checkpoint: str | Path,
    output: str | Path,
    *,
    resume: bool = False,
    metadata: Mapping[str, str] | None = None,
    on_step: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    interrupts: tuple[type[BaseException], ...] = (KeyboardInterrupt,),
    log: Callable[[str], None] = lambda _msg: None,
) -> SessionResult:
    """Train `trainer` to its `settings.iterations`. `interrupts`: exceptions that stop the session at once (from
    `on_step` or mid-iteration) after saving the checkpoint; `should_stop` is asked between iterations."""
    checkpoint = Path(checkpoint)
    if resume and trainer.world.broadcast_object(checkpoint.is_file()):  # rank 0 reads it (see Trainer.resume)
        trainer.resume(checkpoint)
        left = trainer.settings.iterations - trainer.iteration
        log(f"resumed {checkpoint.name} at iteration {trainer.iteration}/{trainer.settings.iterations}"
            + ("" if left > 0 else " - nothing left to train: raise iterations to continue"))
    history: list[dict] = []

    def step(info: dict) -> None:
        history.append(info)
        if on_step is not None:
            on_step(info)

    interrupted = False
    try:
        trainer.train(checkpoint, on_step=step, should_stop=should_stop)
    except interrupts:
        interrupted = True
        trainer.save_checkpoint(checkpoint)
    if interrupted or trainer.iteration < trainer.settings.iterations:  # train() or the handler saved the state
        log(f"stopped at iteration {trainer.iteration}; checkpoint {checkpoint.name} saved")
        return SessionResult(trainer.iteration, False, None, history)
    lora = trainer.final_lora()
    if trainer.world.is_main:  # data-parallel ranks hold the same LoRA: written once
        lora.save(output, metadata={**(metadata or {}), "iterations": str(trainer.iteration)})
    log(f"saved {Path(output).name} after {trainer.iteration} iterations")
    return SessionResult(trainer.iteration, True, lora, history)
