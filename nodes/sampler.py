"""Self-Forcing Stream Sampler: chunk-by-chunk generation with a rolling KV cache and live previews."""

from __future__ import annotations

import logging
import time
import uuid
from contextlib import nullcontext
from pathlib import Path

import torch

import comfy.model_management as mm
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..sf_core.errors import SelfForcingError
from ..sf_core.latents import TIME_STRIDE, latent_frames_for, latent_size_for, normalize
from ..sf_core.pipeline import Background, decode_stream
from ..sf_core.sources import EncodedVideo, frame_batches
from ..sf_core.steering import PromptInbox
from ..sf_core.stream import PromptSegment, PromptTimeline, Stream
from ..sf_core.timeline import format_timeline, resolve
from ..sf_core.video import VideoWriter
from . import bridge, steering
from .common import CATEGORY, Timeline, check_size, sampling_inputs, size_inputs, stream_inputs, stream_settings
from .video_output import StreamedVideo

log = logging.getLogger(__name__)
FAST_PATHS = ("eager", "compile", "compile + CUDA graphs")


class StreamSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SelfForcingStreamSampler",
            display_name="Self-Forcing Stream Sampler",
            category=CATEGORY,
            description="Generates the video chunk by chunk with a KV cache (Self Forcing): each chunk is denoised in "
                        "a few steps and, with a VAE, decoded and shown on this node while later chunks are generated.",
            inputs=[
                io.Model.Input("model", tooltip="A Wan2.1 T2V-family model (Self Forcing, CausVid, ...), LoRAs allowed."),
                io.Conditioning.Input("positive", optional=True,
                                      tooltip="Prompt from CLIP Text Encode (CLIPLoader type wan). Ignored when a timeline is connected."),
                Timeline.Input("timeline", optional=True, tooltip="Prompts that change over time (Self-Forcing Prompt Timeline)."),
                io.Vae.Input("vae", optional=True, tooltip="Wan2.1 VAE: decode each chunk as it is ready (live preview, IMAGE/VIDEO)."),
                io.Image.Input("start_image", optional=True, tooltip="Image-to-video: the first frame (needs the VAE)."),
                io.Image.Input("input_video", optional=True,
                               tooltip="Video-to-video: frames to restyle (e.g. from Load Video), encoded chunk by chunk "
                                       "as the stream goes (needs the VAE). They must have the node's width and height "
                                       "(they are not resized); a shorter video ends the stream."),
                io.Clip.Input("clip", optional=True,
                              tooltip="The CLIP (type wan) that encodes prompts typed into this node's live prompt box "
                                      "while it streams; without it the node takes no live prompts."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed: the same seed and inputs give the same video."),
                *size_inputs(),
                io.Int.Input("length", default=81, min=1, max=1_000_001, step=TIME_STRIDE, tooltip="Video frames (1 + 4k)."),
                *sampling_inputs(),
                io.Float.Input("fps", default=16.0, min=1.0, max=120.0, tooltip="Frame rate of the VIDEO output and of timeline times."),
                io.Boolean.Input("return_all", default=True, optional=True,
                                 tooltip="Return every frame as IMAGE (about 4.8 MB per 832x480 frame) and every latent frame "
                                         "as LATENT. Turn off for long streams: VIDEO, written to disk as it streams, has the "
                                         "whole video, while IMAGE and LATENT hold only the last chunk, so memory stays flat."),
                io.Combo.Input("fast_path", options=list(FAST_PATHS), default="eager", optional=True,
                               tooltip="compile: torch.compile each transformer block (same video, faster chunks; the first "
                                       "run pays the compile). + CUDA graphs: also replay each chunk's steps as one captured "
                                       "graph once the window is full (needs a window; CUDA). For fp8 matmuls use the "
                                       "loader's fp8_e4m3fn_fast."),
                *stream_inputs(),
                io.Combo.Input("preview", options=list(bridge.PREVIEW_MODES), default="auto", optional=True,
                               tooltip="What the node shows while it streams. auto: the decoded frames, unless ComfyUI "
                                       "was asked for no previews (--preview-method none, or the frontend's preview "
                                       "setting 'none'); live: the decoded frames always; latent: a cheap colour "
                                       "preview of the latents; off: only the progress bar and status line."),
            ],
            outputs=[
                io.Latent.Output(display_name="LATENT", tooltip="The video's latents (Wan2.1 VAE space): every latent frame, "
                                 "or the last chunk's with return_all off. For VAE Decode or Save Latent."),
                io.Image.Output(display_name="IMAGE", tooltip="Decoded frames (a latent preview when no VAE is connected): "
                                "every frame, or the last chunk's with return_all off."),
                io.Video.Output(display_name="VIDEO", tooltip="The whole video as H.264 MP4, written while it streamed, at "
                                "the fps set here. Connect Save Video: the saved file is then the only copy on disk."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, width=None, height=None):
        return check_size(width, height)

    @classmethod
    def execute(cls, model, seed, width, height, length, fps, positive=None, timeline=None, vae=None, start_image=None,
                input_video=None, clip=None, return_all=True, fast_path="eager", preview="auto",
                **sampling) -> io.NodeOutput:
        settings = stream_settings(sampling, timeline["switch"] if timeline else "recache")
        frames_per_chunk = settings.frames_per_chunk
        h, w = latent_size_for(height, width)
        total = latent_frames_for(length)
        _, config = bridge.wan_dit(model)
        # the connected VAE, else the autoencoder the model carries (the toy model's), else latent previews only
        has_codec = vae is not None or bridge.has_autoencoder(model)
        if input_video is not None:
            total = min(total, _input_latent_frames(has_codec, input_video, start_image, width, height))
        decoder = bridge.stream_decoder(vae, encoder=input_video is not None) if vae is not None else \
            bridge.attached_autoencoder(model)
        prefix_frames = 0 if start_image is None else 1
        prompts = _timeline(timeline, positive, config, fps, frames_per_chunk,
                            -(-(total - prefix_frames) // frames_per_chunk))
        prefix = _start_latent(vae, decoder, start_image, width, height) if start_image is not None else None
        capacity = settings.cache_frames(total)
        cache_bytes = settings.cache_bytes(config, h, w, total, dtype=bridge.compute_dtype(model))
        bridge.load([model], memory_required=cache_bytes + (bridge.module_bytes(decoder) if decoder else 0))
        backbone = bridge.wan_backbone(model, compile=fast_path != "eager",
                                       graphs=fast_path == FAST_PATHS[2] and model.load_device.type == "cuda")
        what = f"a KV cache of {capacity} latent frames" + ("" if settings.window else " (the whole video)")
        bridge.check_room(backbone, cache_bytes, what)
        generated = total - (0 if prefix is None else prefix.shape[2])
        video = None
        if input_video is not None:
            video = EncodedVideo(frame_batches(input_video), decoder.stream_encoder())
        inbox = PromptInbox(encode=_clip_encoder(clip, config), no_encoder=(
            "this Stream Sampler has no CLIP connected: connect the CLIP (type wan) to its 'clip' input to steer it live"))
        stream = Stream(backbone, prompts, latent_height=h, latent_width=w, num_frames=generated, settings=settings,
                        generator=torch.Generator().manual_seed(seed), prefix=prefix, video=video, inbox=inbox)
        decoder = decoder.stream_decoder() if decoder is not None else None
        n = stream.num_chunks + (prefix is not None)
        live = bridge.LiveProgress(cls.hidden.unique_id, n, fps)
        show = bridge.preview_mode(preview)
        latents, frames, count, note = [], [], 0, ""
        path = Path(folder_paths.get_temp_directory()) / f"self_forcing_{uuid.uuid4().hex[:12]}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        try:
            with _live_prompts(cls.hidden.unique_id, inbox), VideoWriter(path, fps=fps) as writer, Background(
                    lambda: decode_stream(stream, decoder, overlap=backbone.device.type == "cuda")) as steps:
                for i, step in enumerate(steps, 1):
                    mm.throw_exception_if_processing_interrupted()
                    log.debug("self-forcing chunk %d/%d clean at monotonic %.6f", i, n, step.clean_at)
                    if not return_all:
                        latents.clear()
                        frames.clear()
                    latents.append(step.chunk.latents.float().cpu())
                    shown = step.frames if step.frames is not None else _upscale(
                        bridge.latent_preview(step.chunk.latents, model.model.latent_format), width, height)
                    writer.write(shown.numpy())
                    frames.append(shown)
                    count += shown.shape[0]
                    note = _switch_note(step.chunk.switch, note)
                    live.status(status_line(i, n, step.chunk.prompt, step.chunk.label, count,
                                            time.perf_counter() - start) + note)
                    if show == "off":
                        live.bar.update_absolute(i, n)
                    elif show == "latent" and step.frames is not None:
                        live.frames(i, bridge.latent_preview(step.chunk.latents, model.model.latent_format),
                                    behind=lambda: steps.pending() > 0)
                    else:
                        live.frames(i, shown, behind=lambda: steps.pending() > 0)
        finally:
            stream.close()
        if any(sw.source == "live" for sw in stream.switches):
            segments = [s if s.label else PromptSegment(s.start_chunk, s.text, "<the prompt connected to 'positive'>")
                        for s in stream.replay_timeline().segments]
            log.info("Self-Forcing node %s: live prompts applied; this Prompt Timeline (same seed and settings) "
                     "replays the run:\n%s", cls.hidden.unique_id, format_timeline(segments))
        images = torch.cat(frames).float() / 255.0
        return io.NodeOutput(bridge.to_latent(torch.cat(latents, dim=2)), images, StreamedVideo(path))


def _upscale(frames: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """uint8 [n, h, w, 3] latent preview -> the video's size (nearest), uint8."""
    up = comfy.utils.common_upscale(frames.movedim(-1, 1).float(), width, height, "nearest-exact", "disabled")
    return up.movedim(1, -1).round().clamp(0, 255).to(torch.uint8)


def status_line(chunk: int, chunks: int, prompt: int, label: str, frames: int, seconds: float) -> str:
    """'chunk 3/7 · prompt 2 "the fox stops and lo…" · 36 frames · 12.1 FPS': the timeline prompt in effect and
    its text (when known) shortened."""
    quoted = f' "{label[:PROMPT_CHARS - 1]}…"' if len(label) > PROMPT_CHARS else (f' "{label}"' if label else "")
    fps = frames / seconds if seconds > 0 else 0.0
    return f"chunk {chunk}/{chunks} · prompt {prompt + 1}{quoted} · {frames} frames · {fps:.1f} FPS"


PROMPT_CHARS = 32  # the active prompt is shortened to this many characters on the status line


def _timeline(timeline, positive, config, fps, frames_per_chunk, num_chunks) -> PromptTimeline:
    if timeline is not None:
        starts = resolve(timeline["entries"], fps, frames_per_chunk, num_chunks)
        return PromptTimeline([
            PromptSegment(c, bridge.text_from_conditioning(cond, config.text_dim, config.text_len), e.prompt)
            for c, e, cond in zip(starts, timeline["entries"], timeline["conditionings"])
        ])
    if positive is None:
        raise SelfForcingError("connect a prompt: 'positive' (CLIP Text Encode) or a Self-Forcing Prompt Timeline")
    return PromptTimeline.single(bridge.text_from_conditioning(positive, config.text_dim, config.text_len))


def _switch_note(switch, note: str) -> str:
    """Status-line text of the latest prompt change (kept until the next one)."""
    if switch is None or not switch.begins:
        return note
    label = " ".join(switch.label.split())
    label = label if len(label) <= 48 else label[:47] + "…"
    return f" · switched to '{label}' at chunk {switch.chunk + 1}" + (" (live)" if switch.source == "live" else "")


def _live_prompts(node_id, inbox):
    """While the sampler runs, prompts posted to the pack's route for this node reach `inbox`."""
    from comfy_execution.utils import get_executing_context
    from server import PromptServer

    ctx = get_executing_context()
    server = PromptServer.instance
    if ctx is None or server is None:
        return nullcontext()
    return steering.RUNNING.register(ctx.prompt_id, node_id, server.client_id, inbox)


def _clip_encoder(clip, config):
    """text -> embeddings [1, tokens, text_dim] with the connected CLIP, as CLIP Text Encode does (None: no CLIP)."""
    if clip is None:
        return None

    def encode(text: str) -> torch.Tensor:
        cond = clip.encode_from_tokens_scheduled(clip.tokenize(text))
        return bridge.text_from_conditioning(cond, config.text_dim, config.text_len)

    return encode


def _input_latent_frames(has_codec: bool, frames, start_image, width, height) -> int:
    """Check the input video (IMAGE [N, H, W, C]) before heavy work; its length in latent frames."""
    if not has_codec:
        raise SelfForcingError("an input video needs the VAE input to encode it")
    if start_image is not None:
        raise SelfForcingError("give either a start image or an input video, not both")
    if frames.ndim != 4 or frames.shape[0] < 1:
        raise SelfForcingError(f"the input video must be IMAGE frames [N, H, W, 3], got {tuple(frames.shape)}")
    n, fh, fw = frames.shape[:3]
    if (fw, fh) != (width, height):
        raise SelfForcingError(
            f"the input video is {fw}x{fh} but the sampler makes {width}x{height}; frames are not resized: set width "
            f"and height to {fw}x{fh}, or resize the frames first (e.g. the stock Upscale Image node to {width}x{height})"
        )
    return 1 + (n - 1) // 4


def _start_latent(vae, codec, image, width, height) -> torch.Tensor:
    """The start image, resized and centre-cropped, as one normalised latent frame [1, 16, 1, h, w]: encoded by the
    connected VAE, else by the autoencoder the model carries."""
    if vae is None and codec is None:
        raise SelfForcingError("a start image needs the VAE input to encode it")
    img = comfy.utils.common_upscale(image[:1].movedim(-1, 1), width, height, "bilinear", "center").movedim(1, -1)
    if vae is None:
        frames = img[:, :, :, :3].movedim(-1, 1).unsqueeze(2) * 2 - 1  # [1, 3, 1, H, W] in [-1, 1]
        return codec.encode_normalized(frames.to(codec.device, codec.dtype)).float().cpu()
    mu = vae.encode(img[:, :, :, :3])  # [1, 16, 1, h, w], un-normalised
    return normalize(mu.float())
