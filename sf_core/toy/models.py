"""The embedded default models: where they live in the package, loading them through the pack's real loaders,
and a small helper that streams a toy video (used by the evaluation, the tests and the demo).

    files = shipped_files()            # {"dit": Path, "autoencoder": Path, "text_encoder": Path}
    toy = Toy.load()                   # DiT (sf_core.checkpoints.load_dit), TAEHV, UMT5 (sf_core.text)
    video = toy.generate(["a red circle moves right on a grey background"], latent_frames=9)  # [3, 33, 64, 64]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..checkpoints import load_dit
from ..errors import SelfForcingError
from ..sources import EncodedVideo
from ..stream import PromptSegment, PromptTimeline, Stream, StreamSettings
from ..text import load_text_encoder
from ..vae.taehv import TAEHV
from ..wan.forward import WanBackbone
from .diffusion import FRAMES_PER_CHUNK, LATENT_FRAMES, SHIFT, STEPS

MODELS_DIR = Path(__file__).resolve().parent / "models"
FILES = {
    "dit": "toy_self_forcing_dit.safetensors",
    "autoencoder": "toy_taehv.safetensors",
    "text_encoder": "toy_umt5.safetensors",
}
REAL_WEIGHTS_HINT = (
    "real use: pass --model (Self Forcing self_forcing_dmd.pt or any Wan2.1-T2V-1.3B family DiT), --text-encoder "
    "(umt5_xxl_fp16.safetensors) and --vae (wan_2.1_vae.safetensors) or --taehv (taew2_1.pth); in ComfyUI they go in "
    "models/diffusion_models, models/text_encoders and models/vae"
)


def shipped_files(folder: Path = MODELS_DIR) -> dict[str, Path]:
    return {k: folder / v for k, v in FILES.items()}


def check_shipped(folder: Path = MODELS_DIR) -> dict[str, Path]:
    files = shipped_files(folder)
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise SelfForcingError(
            f"the embedded toy models are missing ({', '.join(missing)}); rebuild them with "
            f"`python -m sf_core.toy.recipe`, or {REAL_WEIGHTS_HINT}"
        )
    return files


def toy_defaults() -> dict:
    """`generate` defaults for the toy models: their size, schedule, a rolling window of the trained length, and
    prompt switches by cut (after a re-cache the shipped student mostly brings the new colour in elsewhere rather
    than recolouring the subject in place; see the model card)."""
    return {"decoder": "taehv", "width": 64, "height": 64, "shift": SHIFT, "window": LATENT_FRAMES,
            "sink": FRAMES_PER_CHUNK, "steps": ",".join(str(int(s)) for s in STEPS), "switch": "cut"}


def toy_settings(window: int | None = None, sink: int = 0, switch: str = "recache", strength: float = 1.0,
                 context: str = "generated") -> StreamSettings:
    return StreamSettings(frames_per_chunk=FRAMES_PER_CHUNK, steps=STEPS, shift=SHIFT, window=window, sink=sink,
                          switch=switch, strength=strength, context=context)


@dataclass
class Toy:
    backbone: WanBackbone
    autoencoder: object  # TAEHV with encoder
    text_encoder: object  # sf_core.text.TextEncoder

    @classmethod
    def load(cls, dit: str | Path | None = None, folder: Path = MODELS_DIR) -> "Toy":
        """The shipped files (or another toy DiT file, e.g. a student of the recipe) through the real loaders."""
        files = check_shipped(folder) if dit is None else {**shipped_files(folder), "dit": Path(dit)}
        model, _ = load_dit(files["dit"])
        ae = TAEHV.from_state_dict(load_file(str(files["autoencoder"])))
        te = load_text_encoder(files["text_encoder"])
        return cls(WanBackbone(model), ae, te)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Captions -> text embeddings [B, 512, 64]."""
        return self.text_encoder.encode(prompts).float()

    def stream(self, timeline: list[tuple[int, str]] | str, latent_frames: int | None, seed: int = 0,
               window: int | None = None, sink: int = 0, switch: str = "recache",
               prefix: torch.Tensor | None = None, video: torch.Tensor | None = None, strength: float = 1.0,
               context: str = "generated") -> Stream:
        """A stream of the toy DiT. video: an input video [1, 3, T, 64, 64] in [-1, 1] to restyle (encoded by the
        toy autoencoder as the stream reads it), with `strength` and `context` as in `StreamSettings`."""
        if isinstance(timeline, str):
            timeline = [(0, timeline)]
        emb = self.encode([p for _, p in timeline])
        tl = PromptTimeline([PromptSegment(c, emb[i : i + 1], p) for i, (c, p) in enumerate(timeline)])
        source = None
        if video is not None:
            source = EncodedVideo(iter([video[0].permute(1, 2, 3, 0).add(1).div(2)]), self.autoencoder.stream_encoder())
        return Stream(self.backbone, tl, latent_height=8, latent_width=8, num_frames=latent_frames,
                      settings=toy_settings(window, sink, switch, strength, context), generator=seed, prefix=prefix,
                      video=source)

    @torch.no_grad()
    def generate(self, timeline: list[tuple[int, str]] | str, latent_frames: int, seed: int = 0, **kw) -> torch.Tensor:
        """-> video [3, T, 64, 64] in [-1, 1] (streaming decode of each chunk as it comes)."""
        stream = self.stream(timeline, latent_frames, seed, **kw)
        dec = self.autoencoder.stream_decoder()
        frames = [dec.decode_normalized(c.latents) for c in stream]
        return torch.cat(frames, dim=2)[0]
