"""The few places where ComfyUI objects meet the engine: MODEL -> backbone, CONDITIONING -> text,
VAE -> streaming decoder, LATENT <-> normalised latents, and live progress on a node."""

from __future__ import annotations

import sys
import time

import torch
from PIL import Image

import comfy.model_management as mm
import comfy.utils

from ..sf_core.errors import SelfForcingError
from ..sf_core.latents import denormalize, normalize
from ..sf_core.vae import decoder_from_state_dict, load_encoder, vae_from_state_dict
from ..sf_core.wan.forward import WanBackbone, infer_config

SUPPORTED_DIT = ("WanModel", "CausalWanModel")


def wan_dit(model):
    """The Wan DiT module tree of a stock MODEL (not loaded yet) and its config; a clear error otherwise."""
    dm = model.get_model_object("diffusion_model")
    name = type(dm).__name__
    if name not in SUPPORTED_DIT or not hasattr(dm, "blocks") or getattr(dm, "in_dim", 16) != 16:
        raise SelfForcingError(
            f"this MODEL is a {name}, not a Wan2.1 text-to-video DiT; load a Self Forcing / Wan2.1 T2V "
            "checkpoint with 'Load Self-Forcing Model' or the stock 'Load Diffusion Model'"
        )
    return dm, infer_config(dm)


def compute_dtype(model) -> torch.dtype:
    dtype = model.model.manual_cast_dtype or model.model.get_dtype()
    return dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.bfloat16


def load(models: list, memory_required: int = 0, full: bool = False) -> None:
    """Have ComfyUI place the models (LoRA patches applied) with room for `memory_required` bytes more:
    call it once, after all text/VAE work, right before the loop."""
    mm.load_models_gpu(models, memory_required=memory_required, force_full_load=full)


def wan_backbone(model, attn: str = "auto", compile: bool = False, graphs: bool = False) -> WanBackbone:
    """The engine's view of a loaded stock MODEL (see `load`); compile: regional torch.compile of the blocks;
    graphs: CUDA-graph the full-window chunk steps."""
    dm, config = wan_dit(model)
    return WanBackbone(dm, config, dtype=compute_dtype(model), attn=attn, device=model.load_device, compile=compile,
                       graphs=graphs)


def text_from_conditioning(conditioning, text_dim: int, text_len: int = 512) -> torch.Tensor:
    """Stock CONDITIONING ([[cond [1, n, 4096], {...}]]) -> [1, min(n, 512), 4096] (Wan truncates at 512)."""
    if not conditioning:
        raise SelfForcingError("the conditioning is empty; connect a CLIP Text Encode (CLIPLoader type 'wan')")
    if len(conditioning) > 1 or conditioning[0][0].shape[0] > 1:
        raise SelfForcingError(
            "this conditioning holds several prompts (combined or batched); the sampler follows one prompt at a "
            "time: use a Self-Forcing Prompt Timeline to change prompts over time"
        )
    cond = conditioning[0][0]
    if cond.ndim != 3 or cond.shape[-1] != text_dim:
        raise SelfForcingError(
            f"the conditioning is {cond.shape[-1]} wide but this model reads {text_dim}-wide UMT5 embeddings; "
            "encode the prompt with CLIPLoader type 'wan' (umt5_xxl) + CLIP Text Encode"
        )
    return cond[:1, :text_len].float()


def stream_decoder(vae, device=None, encoder: bool = False):
    """A streaming decoder over the weights of a stock VAE (Wan2.1 VAE), on the compute device; with `encoder`
    the whole VAE (it streams encodes too)."""
    device = device or mm.get_torch_device()
    dtype = getattr(vae, "vae_dtype", torch.float32)
    sd = vae.get_sd()
    build = vae_from_state_dict if encoder else decoder_from_state_dict
    try:
        decoder = build(sd, device=device, dtype=dtype, source="the connected VAE")
    except Exception as e:
        raise SelfForcingError(f"the connected VAE cannot stream Wan2.1 latents: {e}") from e
    return decoder


AUTOENCODER = "self_forcing_autoencoder"  # a MODEL attachment: the path of the video autoencoder its latents need


def attach_autoencoder(model, path) -> None:
    """Record on a MODEL the autoencoder file whose latent space it generates (the toy model's: no stock VAE loader
    reads it); clones (LoRA loaders) keep it."""
    model.set_attachments(AUTOENCODER, str(path))


def has_autoencoder(model) -> bool:
    return model.get_attachment(AUTOENCODER) is not None


def attached_autoencoder(model, device=None):
    """The autoencoder a MODEL carries (see `attach_autoencoder`), encoder and decoder, on the compute device; None
    for other models."""
    path = model.get_attachment(AUTOENCODER)
    if path is None:
        return None
    return load_encoder(path, device=device or mm.get_torch_device())


def check_room(backbone: WanBackbone, need: int, what: str) -> None:
    """After loading: refuse clearly when `need` bytes (cache, decoder) do not fit next to the weights."""
    free = mm.get_free_memory(backbone.device)
    if need > free:
        raise SelfForcingError(
            f"{what} needs {need / 2**30:.1f} GiB but only {free / 2**30:.1f} GiB is free next to the model; "
            "set a window (e.g. 12, sink 3), a smaller size, or use a smaller weight dtype"
        )


def module_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def to_latent(z: torch.Tensor) -> dict:
    """Normalised latents [B, 16, T, h, w] -> a stock LATENT (un-normalised, CPU float32)."""
    return {"samples": denormalize(z.float()).cpu()}


def from_latent(latent: dict) -> torch.Tensor:
    samples = latent["samples"]
    if samples.ndim != 5 or samples.shape[1] != 16:
        raise SelfForcingError(f"expected a Wan2.1 video LATENT [B, 16, T, h, w], got {tuple(samples.shape)}")
    return normalize(samples.float())


def latent_preview(z: torch.Tensor, latent_format) -> torch.Tensor:
    """Cheap RGB of normalised latents [B,16,n,h,w] -> uint8 [n, h, w, 3] with the format's rgb factors."""
    mu = denormalize(z[:1].float())
    factors = torch.tensor(latent_format.latent_rgb_factors, dtype=torch.float32, device=mu.device)  # [16, 3]
    bias = torch.tensor(latent_format.latent_rgb_factors_bias or [0, 0, 0], dtype=torch.float32, device=mu.device)
    rgb = torch.einsum("bcthw,cr->bthwr", mu, factors) + bias
    return ((rgb[0] + 1) * 127.5).clamp(0, 255).to(torch.uint8).cpu()


PREVIEW_MODES = ("auto", "live", "latent", "off")


def preview_mode(mode: str) -> str:
    """The sampler's preview switch -> "live", "latent" or "off": auto is live unless ComfyUI was asked for no
    previews (see `previews_refused`); the other modes are what the node asks for explicitly."""
    if mode not in PREVIEW_MODES:
        raise SelfForcingError(f"preview must be one of {PREVIEW_MODES}, got {mode!r}")
    if mode != "auto":
        return mode
    return "off" if previews_refused() else "live"


def previews_refused() -> bool:
    """True when ComfyUI was asked for no previews: the running prompt says preview_method "none" (the frontend's
    preview setting), or the server was started with --preview-method none. (ComfyUI's own default is also
    "none", but unasked; then the stream is shown.)"""
    from comfy.cli_args import LatentPreviewMethod, args

    if args.preview_method != LatentPreviewMethod.NoPreviews:
        return False  # the server or this prompt asked for previews
    asked = _prompt_preview_method()
    if asked not in (None, "", "default"):
        return asked == "none"
    return any(a == "--preview-method" or a.startswith("--preview-method=") for a in sys.argv)


def _prompt_preview_method() -> str | None:
    """The preview_method the running prompt was queued with (extra_data), if any."""
    try:
        from comfy_execution.utils import get_executing_context
        from server import PromptServer

        context = get_executing_context()
        running, _ = PromptServer.instance.prompt_queue.get_current_queue_volatile()
    except Exception:
        return None
    for item in running:
        if context is not None and len(item) > 3 and item[1] == context.prompt_id and isinstance(item[3], dict):
            return item[3].get("preview_method")
    return None


class LiveProgress:
    """Progress bar, flip-book previews and a status line on one node. Frames of a chunk are shown one
    by one at the video's frame rate while later chunks are generated; when generation is ahead of
    playback, only the newest frame of a chunk is shown so the preview stays live."""

    def __init__(self, node_id, total: int, fps: float = 16.0, max_size: int | None = None):
        self.node_id, self.total, self.fps, self.max_size = node_id, total, fps, max_size
        self.bar = comfy.utils.ProgressBar(total, node_id=node_id)
        self.next_at = 0.0

    def status(self, text: str) -> None:
        from server import PromptServer

        if self.node_id is not None and PromptServer.instance is not None:
            PromptServer.instance.send_progress_text(text, self.node_id)

    def frames(self, done: int, frames: torch.Tensor, behind=lambda: False) -> None:
        """Show frames [n, H, W, 3] uint8 one by one; `behind()` True means newer frames are waiting, so
        skip to this chunk's last frame at once."""
        for i, frame in enumerate(frames):
            if i < len(frames) - 1 and behind():
                continue
            delay = self.next_at - time.perf_counter()
            if delay > 0 and not behind():
                time.sleep(delay)
            self.bar.update_absolute(done, self.total, ("JPEG", Image.fromarray(frame.numpy()), self.max_size))
            self.next_at = time.perf_counter() + 1.0 / self.fps
