"""LoRA trainer for Self Forcing (DMD with a self rollout), resumable and deterministic.

Models: generator = student (the causal few-step model) + its LoRA; teacher (real score) = a
bidirectional Wan, frozen; critic (fake score) = the same frozen teacher base + the critic's own LoRA.
Only LoRA tensors train; the handed-in models are restored by `close()`.

One iteration: a critic step on a no-grad rollout; every `critic_ratio` iterations (starting with the
first) a generator step first: rollout with one random exit step shared by all chunks -> DMD loss.

Randomness is a function of (seed, iteration, step kind, global sample index): sample j of an optimiser step
has its own generator (prompt choice, rollout noise, DMD/critic timesteps and noise), and the exit step is
keyed by (seed, iteration, step kind, accumulation step). So a run is the same whatever its split into
processes x per-process batch (`world`, see `distributed`), and resuming needs no generator state.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .. import noise
from ..errors import SelfForcingError
from ..io import atomic_path, check_writable
from ..lora import LoRA
from ..schedule import SELF_FORCING_STEPS, FlowSchedule, frame_sigma
from ..stream import PromptSegment, PromptTimeline, Stream, StreamSettings
from ..wan.forward import WanBackbone, infer_config
from .distributed import World
from .context import CONTEXTS, context_source
from .losses import critic_loss, dmd_loss
from .state import check_state, read_state


@dataclass(frozen=True)
class TrainSettings:
    iterations: int = 100
    rank: int = 32
    alpha: float | None = None  # default: rank (scale 1)
    lr: float = 1e-4  # generator LoRA (the recipe's 2e-6 is for full fine-tuning)
    critic_lr: float = 2e-5  # critic LoRA (recipe ratio 1:5)
    betas: tuple[float, float] = (0.0, 0.999)
    weight_decay: float = 0.01
    grad_clip: float = 10.0
    critic_ratio: int = 5  # one generator step every this many critic steps
    ema: float | None = 0.99
    ema_start: int = 200  # iteration from which the EMA is kept (as the recipe counts)
    grad_accum: int = 1
    checkpointing: bool = True
    latent_frames: int = 21
    latent_height: int = 60
    latent_width: int = 104
    frames_per_chunk: int = 3
    denoising_steps: tuple[float, ...] = SELF_FORCING_STEPS
    shift: float = 5.0
    guidance: float = 3.0  # real = cond + guidance * (cond - uncond), i.e. CFG 4
    batch: int = 1
    seed: int = 0
    save_every: int = 50
    context: str = "self"  # what the rollout's cache holds: "self" | "teacher" | "diffusion" (sf_core.train.context)
    switch: float = 0.0  # share of rollouts whose prompt switches (re-cache) at a random chunk boundary to another
    # prompt: the frames after the switch are judged as a clip of their own under it (tuning for live prompt switches)

    def __post_init__(self):
        if self.rank < 1:
            raise SelfForcingError(f"LoRA rank must be at least 1, got {self.rank}")
        if not 0.0 <= self.switch <= 1.0:
            raise SelfForcingError(f"switch is a share of rollouts in [0, 1], got {self.switch}")
        if self.switch and self.context != "self":
            raise SelfForcingError("prompt-switch rollouts need the self context (the model's own frames in the cache)")
        if self.switch and self.latent_frames < 2 * self.frames_per_chunk:
            raise SelfForcingError(f"prompt-switch tuning needs two chunks per video or more, got {self.latent_frames} "
                                   f"latent frames in chunks of {self.frames_per_chunk}: train on longer videos or "
                                   "smaller chunks")
        if self.iterations < 1:
            raise SelfForcingError(f"iterations must be at least 1, got {self.iterations}")
        for name in ("critic_ratio", "grad_accum", "batch", "latent_frames", "frames_per_chunk"):
            if getattr(self, name) < 1:
                raise SelfForcingError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.critic_lr <= 0:
            raise SelfForcingError("learning rates must be positive")
        if self.ema is not None and not 0 < self.ema < 1:
            raise SelfForcingError(f"EMA decay must be in (0, 1), got {self.ema}")
        if self.context not in CONTEXTS:
            raise SelfForcingError(f"unknown rollout context {self.context!r}; choose one of {', '.join(CONTEXTS)}")


def check_prompt_count(count: int, settings: TrainSettings) -> None:
    """Prompt-switch tuning switches between prompts, so it needs two or more (checked before any heavy work)."""
    if settings.switch and count < 2:
        raise SelfForcingError("prompt-switch tuning switches between prompts: give two prompts or more "
                               "(one per line), or a switch share of 0")


class Trainer:
    """Train a generator LoRA with Self Forcing DMD.

    prompts: text embeddings [N, Lt, text_dim] (encoded once; the text encoder can be freed).
    negative: [1, Lt, text_dim] embedding of the negative prompt (the teacher's unconditional branch).
    world: this process's place among data-parallel ranks (default: a single process). Each rank rolls out
    `settings.batch` samples; gradients are averaged over ranks, so one optimiser step sees
    world.size x batch x grad_accum samples.
    videos: ground-truth latents [N, 16, latent_frames, h, w] of the prompts, for settings.context "teacher" or
    "diffusion" (Teacher / Diffusion Forcing: the rollout's cache holds them instead of the generated chunks).
    """

    def __init__(
        self,
        generator_model: nn.Module,
        teacher_model: nn.Module,
        prompts: torch.Tensor,
        negative: torch.Tensor,
        settings: TrainSettings = TrainSettings(),
        *,
        dtype: torch.dtype | None = None,
        world: World | None = None,
        videos: torch.Tensor | None = None,
    ):
        s = self.settings = settings
        self.world = world or World()
        gcfg, tcfg = infer_config(generator_model), infer_config(teacher_model)
        if gcfg.in_dim != tcfg.in_dim or gcfg.out_dim != tcfg.out_dim:
            raise SelfForcingError(
                f"the teacher works on {tcfg.in_dim}-channel latents, the generator on {gcfg.in_dim}; "
                "use a teacher from the same family (Wan2.1 T2V)"
            )
        if gcfg.text_dim != tcfg.text_dim:
            raise SelfForcingError(f"teacher text width {tcfg.text_dim} != generator text width {gcfg.text_dim}")
        if prompts.ndim != 3 or prompts.shape[0] == 0:
            raise SelfForcingError("no prompts to train on: give at least one prompt (one per line)")
        check_prompt_count(prompts.shape[0], s)
        if prompts.shape[-1] != gcfg.text_dim or negative.shape[-1] != gcfg.text_dim:
            raise SelfForcingError(f"prompt embeddings must be {gcfg.text_dim} wide for this model")
        gcfg.tokens_per_frame(s.latent_height, s.latent_width)  # size check before any work
        if s.context != "self":
            want = (prompts.shape[0], gcfg.in_dim, s.latent_frames, s.latent_height, s.latent_width)
            if videos is None or tuple(videos.shape) != want:
                got = None if videos is None else tuple(videos.shape)
                raise SelfForcingError(f"{s.context} forcing needs ground-truth latents {list(want)} (one per prompt), "
                                       f"got {got}")
        self.videos = videos

        init = torch.Generator(device="cpu").manual_seed(s.seed)  # the same LoRA initialisation on every rank
        self.generator_model, self.teacher_model = generator_model, teacher_model
        self.gen_lora = LoRA.inject(generator_model, s.rank, s.alpha, generator=init)
        self.critic_lora = LoRA.inject(teacher_model, s.rank, s.alpha, generator=init)
        self.student = WanBackbone(generator_model, gcfg, dtype=dtype, checkpointing=s.checkpointing)
        self.teacher = WanBackbone(teacher_model, tcfg, dtype=dtype, checkpointing=s.checkpointing)
        self.device = self.student.device
        self.prompts = prompts.to(self.device)
        self.negative = negative.to(self.device)
        self.schedule = FlowSchedule(s.shift)
        self.stream_settings = StreamSettings(frames_per_chunk=s.frames_per_chunk, steps=s.denoising_steps,
                                              shift=s.shift)
        adamw = dict(betas=s.betas, weight_decay=s.weight_decay)
        self.gen_opt = torch.optim.AdamW(self.gen_lora.parameters(), lr=s.lr, **adamw)
        self.critic_opt = torch.optim.AdamW(self.critic_lora.parameters(), lr=s.critic_lr, **adamw)
        self.ema: LoRA | None = None
        self.iteration = 0
        self.generator_steps = 0

    # ---- pieces ------------------------------------------------------------------------------
    def sample_generators(self, kind: str, micro: int = 0) -> list[torch.Generator]:
        """One generator per local sample, keyed by (seed, iteration, kind, global sample index). The samples
        of accumulation step `micro` are numbered rank after rank: j = (micro x ranks + rank) x batch + b."""
        s, w = self.settings, self.world
        first = (micro * w.size + w.rank) * s.batch
        return [noise.keyed_generator(s.seed, self.iteration, kind, first + b) for b in range(s.batch)]

    def exit_step(self, kind: str, micro: int = 0) -> int:
        """One exit step per rollout, shared by all its chunks and by all ranks."""
        g = noise.keyed_generator(self.settings.seed, self.iteration, kind, "exit", micro)
        return int(torch.randint(0, len(self.settings.denoising_steps), (1,), generator=g))

    def _sample_prompts(self, generators: list[torch.Generator]) -> torch.Tensor:
        idx = noise.randint(self.prompts.shape[0], len(generators), generators)
        self._last_idx = idx
        return self.prompts[idx.to(self.device)]

    def switch_chunk(self, kind: str, micro: int = 0) -> int | None:
        """The chunk at which this rollout's prompt switches (shared by its samples and all ranks), or None."""
        s = self.settings
        if not s.switch:
            return None
        g = noise.keyed_generator(s.seed, self.iteration, kind, "switch", micro)
        chunks = -(-s.latent_frames // s.frames_per_chunk)
        happens, at = torch.rand((), generator=g) < s.switch, int(torch.randint(1, chunks, (1,), generator=g))
        return at if happens else None

    def _prompts_for(self, kind: str, micro: int, gens) -> tuple[torch.Tensor, tuple[torch.Tensor, int] | None]:
        """(first prompts, None or (the prompts switched to, the switch chunk))."""
        text = self._sample_prompts(gens)
        at = self.switch_chunk(kind, micro)
        if at is None:
            return text, None
        idx = self._last_idx
        after = self._sample_prompts([noise.keyed_generator(self.settings.seed, self.iteration, kind, "switched", j)
                                      for j in range(len(gens))])
        self._last_idx = idx
        return text, (after, at)

    def _judged(self, text: torch.Tensor, video: torch.Tensor, switch) -> tuple[torch.Tensor, torch.Tensor]:
        """What DMD and the critic judge: the whole video under its prompts, or after a switch the frames made after
        it, as a clip of their own under the new prompts."""
        if switch is None:
            return text, video
        after, at = switch
        return after, video[:, :, at * self.settings.frames_per_chunk:]

    def rollout(self, text: torch.Tensor, exit_step: int | None, generators: noise.Generators,
                grad: bool = True, switch: tuple[torch.Tensor, int] | None = None) -> torch.Tensor:
        """The inference chunk loop on the generator; returns the video [B, C, F, H, W]. With a Teacher /
        Diffusion Forcing context, the cache holds the ground truth of the prompts last sampled. `switch`:
        (the prompts switched to, the chunk) — the cached frames are re-encoded under them there, as at inference."""
        s = self.settings
        video = None if self.videos is None else self.videos[self._last_idx]
        if switch is not None:
            text = PromptTimeline([PromptSegment(0, text), PromptSegment(switch[1], switch[0])])
        stream = Stream(self.student, text, latent_height=s.latent_height, latent_width=s.latent_width,
                        num_frames=s.latent_frames, batch=s.batch, settings=self.stream_settings,
                        generator=generators,
                        context_source=context_source(s.context, video, generators[0] if isinstance(generators, (list, tuple)) else generators, self.schedule))
        return torch.cat([c.latents for c in stream.rollout(exit_step, grad)], dim=2)

    def _x0(self, backbone: WanBackbone, prompt, x_t, t):
        sigma = frame_sigma(self.schedule.sigmas_of(t))
        return x_t - sigma * backbone(x_t, t, prompt)

    def _teacher_x0(self, prompt, x_t, t):
        """Real score: the frozen teacher base, the critic's LoRA switched off."""
        with self.critic_lora.disabled():
            return self._x0(self.teacher, prompt, x_t, t)

    def generator_loss(self, micro: int = 0) -> torch.Tensor:
        """Self rollout with one exit step shared by all chunks, then DMD on the whole video (after a prompt switch:
        on the frames after it, under the new prompt)."""
        gens = self.sample_generators("generator", micro)
        text, switch = self._prompts_for("generator", micro, gens)
        self.last_exit_step = self.exit_step("generator", micro)
        text, video = self._judged(text, self.rollout(text, self.last_exit_step, gens, switch=switch), switch)
        with torch.no_grad():
            with self.critic_lora.disabled():
                cond = self.teacher.encode_text(text)
                uncond = self.teacher.encode_text(self.negative.expand(text.shape[0], -1, -1))
            fake_prompt = self.teacher.encode_text(text)
        loss, _ = dmd_loss(
            video,
            teacher_cond=lambda x_t, t: self._teacher_x0(cond, x_t, t),
            teacher_uncond=lambda x_t, t: self._teacher_x0(uncond, x_t, t),
            critic=lambda x_t, t: self._x0(self.teacher, fake_prompt, x_t, t),
            generator=gens,
            schedule=self.schedule,
            guidance=self.settings.guidance,
        )
        return loss

    def critic_loss(self, micro: int = 0) -> torch.Tensor:
        """Flow matching of the critic (teacher base + critic LoRA) on a no-grad generator rollout that exits
        at a random step too: the critic models the very samples DMD corrects."""
        gens = self.sample_generators("critic", micro)
        text, switch = self._prompts_for("critic", micro, gens)
        with torch.no_grad():
            video = self.rollout(text, self.exit_step("critic", micro), gens, grad=False, switch=switch)
        text, video = self._judged(text, video, switch)
        prompt = self.teacher.encode_text(text)
        return critic_loss(video, lambda x_t, t: self.teacher(x_t, t, prompt), gens, self.schedule)

    def _update(self, loss_fn: Callable[[int], torch.Tensor], lora: LoRA, opt: torch.optim.Optimizer) -> float:
        """One optimiser step over grad_accum x batch samples per rank; gradients and the reported loss are
        averaged over the ranks (one all-reduce), so every rank takes the same step."""
        opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for micro in range(self.settings.grad_accum):
            loss = loss_fn(micro) / self.settings.grad_accum
            loss.backward()
            total += loss.detach().float()
        params = list(lora.parameters())
        total = self.world.average_gradients(params, total)
        torch.nn.utils.clip_grad_norm_(params, self.settings.grad_clip)
        opt.step()
        return float(total)  # one host sync per optimiser step, for the progress report

    def _update_ema(self) -> None:
        s = self.settings
        if s.ema is None or self.iteration < s.ema_start:
            return
        if self.ema is None:
            self.ema = copy.deepcopy(self.gen_lora).requires_grad_(False)
            return
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.gen_lora.parameters()):
                e.lerp_(p, 1 - s.ema)

    # ---- the loop ----------------------------------------------------------------------------
    def train_step(self) -> dict:
        """One iteration: maybe a generator step, then a critic step. Returns the progress record."""
        start = time.perf_counter()
        info: dict = {"iteration": self.iteration + 1}
        if self.iteration % self.settings.critic_ratio == 0:
            info["generator_loss"] = self._update(self.generator_loss, self.gen_lora, self.gen_opt)
            info["exit_step"] = self.last_exit_step
            self.generator_steps += 1
            self._update_ema()
        info["critic_loss"] = self._update(self.critic_loss, self.critic_lora, self.critic_opt)
        self.iteration += 1
        info["seconds"] = time.perf_counter() - start
        return info

    def train(
        self,
        checkpoint: str | Path | None = None,
        on_step: Callable[[dict], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[dict]:
        """Run until `settings.iterations`; checkpoint every `save_every` and when stopped early."""
        history = []
        if checkpoint is not None and self.world.is_main:
            check_writable(checkpoint)
        while self.iteration < self.settings.iterations:
            # a signal may reach the ranks at different iterations: all stop at the first that any saw it
            if self.world.any(should_stop is not None and should_stop()):
                break
            info = self.train_step()
            history.append(info)
            if on_step is not None:
                on_step(info)
            if checkpoint is not None and self.iteration % self.settings.save_every == 0:
                self.save_checkpoint(checkpoint)
        if checkpoint is not None:
            self.save_checkpoint(checkpoint)
        return history

    # ---- state -------------------------------------------------------------------------------
    def final_lora(self) -> LoRA:
        """The LoRA to ship: the EMA once it has started, else the raw generator LoRA."""
        return self.ema if self.ema is not None else self.gen_lora

    def state_dict(self) -> dict:
        return {
            "iteration": self.iteration,
            "generator_steps": self.generator_steps,
            "gen_lora": self.gen_lora.state_dict(),
            "critic_lora": self.critic_lora.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "gen_opt": self.gen_opt.state_dict(),
            "critic_opt": self.critic_opt.state_dict(),
            "settings": dataclasses.asdict(self.settings),
            "world_size": self.world.size,
        }

    def load_state_dict(self, state: dict) -> None:
        check_state(state, self.settings, path="this checkpoint", world_size=self.world.size)
        self.gen_lora.load_state_dict(state["gen_lora"])
        self.critic_lora.load_state_dict(state["critic_lora"])
        self.gen_opt.load_state_dict(state["gen_opt"])
        self.critic_opt.load_state_dict(state["critic_opt"])
        self.ema = None
        if state["ema"] is not None:
            self.ema = copy.deepcopy(self.gen_lora).requires_grad_(False)
            self.ema.load_state_dict(state["ema"])
        self.iteration, self.generator_steps = state["iteration"], state["generator_steps"]

    def save_checkpoint(self, path: str | Path) -> None:
        """Written once, by rank 0, atomically; every rank waits until it is in place."""
        if self.world.is_main:
            with atomic_path(path) as tmp:
                torch.save(self.state_dict(), tmp)
        self.world.barrier()

    def resume(self, path: str | Path) -> None:
        """Continue from a checkpoint (the learning rates of these settings apply from here on). Rank 0 reads
        it and hands it to the others, so only rank 0 needs to see the file."""
        state = self.world.broadcast_object(read_state(path) if self.world.is_main else None)  # CPU tensors
        check_state(state, self.settings, path=path, world_size=self.world.size)
        self.load_state_dict(state)
        for opt, lr in ((self.gen_opt, self.settings.lr), (self.critic_opt, self.settings.critic_lr)):
            for group in opt.param_groups:
                group["lr"] = lr

    def close(self) -> None:
        """Take the LoRAs off: the handed-in models are as they were found."""
        self.gen_lora.remove()
        self.critic_lora.remove()


@torch.no_grad()
def evaluate(trainer: Trainer, seed: int = 1234, timesteps=(250.0, 500.0, 750.0)) -> dict:
    """Fixed-noise progress measures, comparable across steps (their own generator, fixed timesteps):

    teacher_distance: mean |x - real(x_t)| between a generator rollout x and the teacher's CFG denoising
    of it; critic_loss: the critic's flow-matching loss on that rollout. Both averaged over `timesteps`.
    """
    s = trainer.settings
    g = torch.Generator(device="cpu").manual_seed(seed)
    text = trainer.prompts[:1].expand(s.batch, -1, -1)
    stream = Stream(trainer.student, text, latent_height=s.latent_height, latent_width=s.latent_width,
                    num_frames=s.latent_frames, batch=s.batch, settings=trainer.stream_settings, generator=g)
    x = torch.cat([c.latents for c in stream], dim=2)
    with trainer.critic_lora.disabled():
        cond_kv = trainer.teacher.encode_text(text)
        uncond_kv = trainer.teacher.encode_text(trainer.negative.expand(s.batch, -1, -1))
    critic_kv = trainer.teacher.encode_text(text)
    distance = loss = 0.0
    for tv in timesteps:
        t = torch.full((s.batch, x.shape[2]), tv, device=x.device)
        eps = torch.randn(x.shape, generator=g).to(x.device)
        sigma = frame_sigma(trainer.schedule.sigmas_of(t))
        x_t = (1 - sigma) * x + sigma * eps
        with trainer.critic_lora.disabled():
            cond = trainer._x0(trainer.teacher, cond_kv, x_t, t)
            uncond = trainer._x0(trainer.teacher, uncond_kv, x_t, t)
        distance += float((x - (cond + s.guidance * (cond - uncond))).abs().mean())
        loss += float(((trainer.teacher(x_t, t, critic_kv) - (eps - x)) ** 2).mean())
    return {"teacher_distance": distance / len(timesteps), "critic_loss": loss / len(timesteps)}


@torch.no_grad()
def sample(trainer: Trainer, seed: int = 0, prompt: int = 0) -> torch.Tensor:
    """A full-step rollout of the current generator (its LoRA on) for training previews: the first batch item
    of prompt `prompt`, normalised latents [1, C, F, h, w]. Its own generator: the run's random draws, and so
    resuming, are unaffected."""
    s = trainer.settings
    text = trainer.prompts[prompt % trainer.prompts.shape[0]][None]
    stream = Stream(trainer.student, text, latent_height=s.latent_height, latent_width=s.latent_width,
                    num_frames=s.latent_frames, settings=trainer.stream_settings,
                    generator=torch.Generator(device="cpu").manual_seed(seed))
    try:
        return torch.cat([c.latents for c in stream], dim=2)
    finally:
        stream.close()
