"""Self-Forcing Train LoRA: DMD self-rollout fine-tuning from a workflow, saved where LoraLoader finds it."""

from __future__ import annotations

from pathlib import Path

import torch

import comfy.model_management as mm
import comfy.sd
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..sf_core.errors import SelfForcingError
from ..sf_core.latents import TIME_STRIDE, latent_frames_for, latent_size_for
from ..sf_core.train.cli import WAN_NEGATIVE_PROMPT
from ..sf_core.paths import check_paths
from ..sf_core.train.plot import loss_curve
from ..sf_core.train.session import run_session
from ..sf_core.pipeline import to_uint8_frames
from ..sf_core.train.state import check_state, read_state
from ..sf_core.train.trainer import Trainer, check_prompt_count, sample
from . import bridge
from .common import CATEGORY, check_size, size_inputs, train_settings, training_inputs


class TrainLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SelfForcingTrainLoRA",
            display_name="Self-Forcing Train LoRA",
            category=CATEGORY,
            description="Self Forcing DMD fine-tuning: the generator rolls out whole videos with its KV cache and a "
                        "frozen teacher (real score) plus a critic (fake score, teacher + its own LoRA) supervise them. "
                        "Trains a LoRA, saves it to models/loras, and returns the model with it applied.",
            inputs=[
                io.Model.Input("model", tooltip="Generator: the Self Forcing model to adapt."),
                io.Model.Input("teacher", tooltip="Real score: a bidirectional Wan2.1 T2V model (e.g. wan2.1_t2v_1.3B), frozen."),
                io.Clip.Input("clip", tooltip="CLIPLoader type 'wan'; prompts are encoded once."),
                io.String.Input("prompts", multiline=True, default="", tooltip="One training prompt per line."),
                io.String.Input("negative_prompt", multiline=True, default=WAN_NEGATIVE_PROMPT,
                                tooltip="The teacher's unconditional prompt (Wan's negative prompt)."),
                io.String.Input("lora_name", default="self_forcing_lora", tooltip="File name in models/loras (.safetensors)."),
                *training_inputs(),  # iterations, rank, learning_rate, critic_learning_rate, critic_ratio, guidance
                *size_inputs(),
                io.Int.Input("length", default=81, min=1, max=1001, step=TIME_STRIDE, tooltip="Video frames per rollout (1 + 4k)."),
                io.Int.Input("frames_per_chunk", default=3, min=1, max=21, tooltip="Latent frames per chunk of the rollout (as at inference)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, tooltip="Seed of every random draw of the run (resumable, reproducible)."),
                io.Boolean.Input("gradient_checkpointing", default=True, tooltip="Recompute activations in backward: much less memory, about 30% slower."),
                io.Boolean.Input("resume", default=True, tooltip="Continue from this LoRA's saved training checkpoint if one exists."),
                io.Int.Input("save_every", default=50, min=1, max=100000, tooltip="Write a resumable training checkpoint every N iterations (to output/self_forcing_training)."),
                io.Boolean.Input("overwrite", default=False, optional=True,
                                 tooltip="Start afresh over this name's existing checkpoint and replace an existing LoRA of the same name (refused otherwise)."),
                io.Vae.Input("vae", optional=True, tooltip="Wan2.1 VAE: decode the preview rollouts (without it the "
                                                           "previews show the latents' colours)."),
                io.Int.Input("preview_every", default=25, min=0, max=100000, optional=True,
                             tooltip="Every N iterations, roll out the current generator on the first prompt (fixed "
                                     "seed, all steps) and show a few of its frames on this node. 0 = no previews."),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="The generator with the trained LoRA applied (the LoRA "
                                     "is also saved in models/loras under lora_name)."),
                     io.Image.Output(display_name="loss", tooltip="The critic and generator loss curves of the run, as an image.")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, width=None, height=None):
        return check_size(width, height)

    @classmethod
    def execute(cls, model, teacher, clip, prompts, negative_prompt, lora_name, width, height, length, frames_per_chunk,
                seed, gradient_checkpointing, resume, save_every, overwrite=False, vae=None, preview_every=25,
                **dmd) -> io.NodeOutput:
        lines = [ln.strip() for ln in prompts.splitlines() if ln.strip()]
        if not lines:
            raise SelfForcingError("no prompts to train on: write one prompt per line")
        if not lora_name.strip() or "/" in lora_name or "\\" in lora_name:
            raise SelfForcingError("lora_name must be a plain file name (no folders)")
        if model.get_model_object("diffusion_model") is teacher.get_model_object("diffusion_model"):
            raise SelfForcingError("the teacher must be a separate model (load the Wan2.1 base model for it)")
        h, w = latent_size_for(height, width)
        settings = train_settings(
            dmd, latent_frames=latent_frames_for(length), latent_height=h, latent_width=w, frames_per_chunk=frames_per_chunk,
            seed=seed, checkpointing=gradient_checkpointing, save_every=save_every)
        check_prompt_count(len(lines), settings)
        name = lora_name.strip().removesuffix(".safetensors")
        lora_path = Path(folder_paths.get_folder_paths("loras")[0]) / f"{name}.safetensors"
        ckpt_dir = Path(folder_paths.get_output_directory()) / "self_forcing_training"
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        checkpoint = ckpt_dir / f"{name}.ckpt.pt"
        resuming = resume and checkpoint.is_file() and not overwrite
        _, cfg = bridge.wan_dit(model)
        _, teacher_cfg = bridge.wan_dit(teacher)
        check_outputs(lora_path, checkpoint, resume=resuming, overwrite=overwrite)
        state = read_state(checkpoint) if resuming else None
        if state is not None:
            check_state(state, settings, cfg, teacher_cfg, checkpoint.name)
        texts = torch.cat([bridge.text_from_conditioning(_encode(clip, p), cfg.text_dim, cfg.text_len) for p in lines])
        negative = bridge.text_from_conditioning(_encode(clip, negative_prompt), cfg.text_dim, cfg.text_len)
        decoder = bridge.stream_decoder(vae) if vae is not None and preview_every else None
        latent_format = model.model.latent_format
        with torch.inference_mode(False), torch.enable_grad():
            bridge.load([model, teacher], full=True)  # both resident: training cannot stream weights
            generator_dit, teacher_dit = bridge.wan_dit(model)[0], bridge.wan_dit(teacher)[0]
            for dit in (generator_dit, teacher_dit):
                _make_trainable(dit)
            trainer = Trainer(generator_dit, teacher_dit, texts, negative, settings, dtype=bridge.compute_dtype(model))
            iterations = settings.iterations
            live = bridge.LiveProgress(cls.hidden.unique_id, iterations)

            def on_step(info):
                seen.append(info)
                gl = next((h["generator_loss"] for h in reversed(seen) if "generator_loss" in h), None)
                live.status(f"iteration {info['iteration']}/{iterations} · critic {info['critic_loss']:.3e}"
                            + (f" · generator {gl:.3e}" if gl is not None else "") + f" · {info['seconds']:.1f} s/it")
                live.bar.update_absolute(info["iteration"], iterations)  # raises when cancelled
                if preview_every and info["iteration"] % preview_every == 0:
                    live.frames(info["iteration"], _preview_strip(trainer, decoder, latent_format)[None])

            seen: list[dict] = []
            try:
                result = run_session(trainer, checkpoint, lora_path, resume=resuming, metadata={"base": "self-forcing"},
                                     on_step=on_step, should_stop=mm.processing_interrupted,
                                     interrupts=(mm.InterruptProcessingException,), log=live.status)
                if not result.finished:  # the checkpoint keeps what was learned: resume later
                    raise mm.InterruptProcessingException()
                weights = {k: v.detach().clone() for k, v in result.lora.to_comfy().items()}
            finally:
                trainer.close()
        patched, _ = comfy.sd.load_lora_for_models(model, None, weights, 1.0, 0)
        curve = torch.from_numpy(loss_curve(result.history)).float()[None] / 255.0
        return io.NodeOutput(patched, curve)


def check_outputs(lora_path: Path, checkpoint: Path, *, resume: bool, overwrite: bool) -> None:
    """The CLI's rules for the LoRA and its checkpoint: a run never silently replaces another run's
    checkpoint, nor a LoRA it did not make; both places are proven writable before any model loads."""
    if checkpoint.exists() and not (resume or overwrite):
        raise SelfForcingError(
            f"a training checkpoint for {lora_path.stem!r} already exists ({checkpoint}); turn resume on to continue "
            "it, turn overwrite on to start afresh, or choose another lora_name"
        )
    ours = resume or checkpoint.exists()  # the LoRA of the run being continued may be replaced
    if lora_path.exists() and not (ours or overwrite):
        raise SelfForcingError(
            f"{lora_path.name} already exists in {lora_path.parent} and no training checkpoint made it; choose "
            "another lora_name, or turn overwrite on to replace it"
        )
    check_paths({}, {"lora_name": lora_path, "checkpoint": checkpoint}, overwrite=True)


PREVIEW_FRAMES = 4


def _preview_strip(trainer, decoder, latent_format) -> torch.Tensor:
    """A few frames of the current generator's rollout side by side: uint8 [H, n * W, 3]."""
    with torch.inference_mode():
        z = sample(trainer, seed=0)
        if decoder is not None:
            frames = to_uint8_frames(decoder.stream_decoder().decode_normalized(z.to(decoder.device)))
        else:
            frames = bridge.latent_preview(z, latent_format)
    picks = torch.linspace(0, frames.shape[0] - 1, min(PREVIEW_FRAMES, frames.shape[0])).round().long()
    return torch.cat(list(frames[picks].cpu()), dim=1)


def _encode(clip, text: str):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def _make_trainable(dit: torch.nn.Module) -> None:
    """Weights loaded under ComfyUI's inference mode cannot be saved for backward: give them normal storage
    (same values; the module tree is otherwise untouched)."""
    with torch.no_grad():
        for module in dit.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                if p.is_inference():
                    module._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=p.requires_grad)
