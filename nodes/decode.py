"""Self-Forcing Streaming Decode: LATENT -> IMAGE chunk by chunk (Wan2.1 VAE or TAEHV), with previews."""

from __future__ import annotations

import torch

import comfy.model_management as mm
import folder_paths
from comfy_api.latest import io

from ..sf_core.errors import SelfForcingError
from ..sf_core.toy.models import check_shipped
from ..sf_core.vae import load_decoder
from ..sf_core.video import to_uint8_frames
from . import bridge
from .common import CATEGORY

NONE = "none"
TOY_AE = "toy world (embedded)"


class StreamingDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SelfForcingStreamingDecode",
            display_name="Self-Forcing Streaming Decode",
            category=CATEGORY,
            description="Decodes a video latent a few latent frames at a time with a causal cache that carries over: "
                        "the same frames as a whole decode, constant memory, frames shown as they appear.",
            inputs=[
                io.Latent.Input("samples", tooltip="A Wan2.1 video latent (e.g. from the Self-Forcing Stream Sampler)."),
                io.Vae.Input("vae", optional=True, tooltip="Wan2.1 VAE (full quality)."),
                io.Combo.Input("tiny_decoder", options=[NONE] + folder_paths.get_filename_list("vae_approx") + [TOY_AE],
                               default=NONE, tooltip="TAEHV (taew2_1.pth in models/vae_approx): much faster, lower quality. "
                                                     "Used when set, instead of the VAE."),
                io.Int.Input("latent_frames_per_step", default=3, min=1, max=64, tooltip="Latent frames decoded per step."),
            ],
            outputs=[io.Image.Output(tooltip="Every decoded frame, [frames, height, width, 3], as one IMAGE batch.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, samples, latent_frames_per_step, vae=None, tiny_decoder=NONE) -> io.NodeOutput:
        z = bridge.from_latent(samples)
        if tiny_decoder != NONE:
            path = check_shipped()["autoencoder"] if tiny_decoder == TOY_AE else \
                folder_paths.get_full_path_or_raise("vae_approx", tiny_decoder)
            decoder = load_decoder(path, device=mm.get_torch_device(), dtype=torch.float32)
        elif vae is not None:
            decoder = bridge.stream_decoder(vae)
        else:
            raise SelfForcingError("connect a VAE or choose a tiny decoder to decode with")
        stream = decoder.stream_decoder()
        steps = range(0, z.shape[2], latent_frames_per_step)
        live = bridge.LiveProgress(cls.hidden.unique_id, len(steps))
        frames = []
        with torch.inference_mode():
            for i, s in enumerate(steps, 1):
                mm.throw_exception_if_processing_interrupted()
                part = z[:, :, s : s + latent_frames_per_step].to(decoder.device)
                pixels = stream.decode_normalized(part)  # [B, 3, n, H, W]
                frames.append(((pixels.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 4, 1).cpu())
                live.frames(i, to_uint8_frames(pixels)[-1:])
        images = torch.cat(frames, dim=1)  # [B, T, H, W, 3]
        return io.NodeOutput(images.reshape(-1, *images.shape[2:]))
