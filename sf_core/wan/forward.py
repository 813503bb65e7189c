"""The Wan2.1 DiT forward, written once over any module tree with Wan names.

`WanBackbone(dit)` runs sf_core's own `WanModel` and ComfyUI's loaded WanModel alike: it only calls the
submodules by their Wan names (patch_embedding, time_embedding, blocks.N.self_attn.q, ...). Which keys a
query sees is decided by an attention plan: bidirectional (teacher, critic), block-causal over a whole
video (training reference), or a KV-cache plan (streaming; see `sf_core.cache`).

Precision follows Wan: the residual stream, time embedding and modulation are fp32; linear layers and
attention run in the compute dtype (bf16 on GPU, fp32 on CPU).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.utils.checkpoint
from torch import nn

from ..config import WanConfig
from .attention import resolve_backend
from .block import PromptKV, modulate
from .compile import block_kernels
from .layers import feed
from .plans import Bidirectional
from .rope import rope_angles


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """Timesteps t [N] -> [N, dim] = [cos | sin] (Wan's order), fp32."""
    half = dim // 2
    dt = torch.float32 if t.device.type == "mps" else torch.float64
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=dt, device=t.device) / half)
    args = t.to(dt)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1).float()


def infer_config(dit: nn.Module) -> WanConfig:
    cfg = getattr(dit, "config", None)
    if isinstance(cfg, WanConfig):
        return cfg
    shapes = {n: p for n, p in dit.named_parameters()}
    return WanConfig.from_state_dict(shapes, name=type(dit).__name__)


class WanBackbone:
    """Forward passes of a Wan DiT module tree.

    dit: module with Wan parameter names. dtype: compute dtype of matmuls and attention (default fp32 on
    CPU, bf16 elsewhere). attn: "auto" | "sdpa" | "flash2" | "flash3". checkpointing: recompute each block
    in backward (training). device: where activations live (default: the patch embedding's device; give it
    when weights are partly offloaded, as ComfyUI does in low-VRAM mode). compile: run each transformer
    block's two pure regions through torch.compile (see `wan.compile`; eager is the reference). graphs: run
    the forwards of a chunk with a full window as one captured CUDA graph (see `wan.graphs`).
    """

    def __init__(
        self,
        dit: nn.Module,
        config: WanConfig | None = None,
        dtype: torch.dtype | None = None,
        attn: str = "auto",
        checkpointing: bool = False,
        device: torch.device | str | None = None,
        compile: bool = False,
        graphs: bool = False,
    ):
        self.dit = dit
        self.config = config or infer_config(dit)
        self.device = torch.device(device) if device is not None else dit.patch_embedding.weight.device
        if dtype is None:
            dtype = torch.float32 if self.device.type == "cpu" else torch.bfloat16
        self.dtype = dtype
        self.attn_backend, self.attn = resolve_backend(attn, self.device)
        self.checkpointing = checkpointing
        self.kernels = block_kernels(compile, self.device)
        self.graphs = None
        if graphs:
            from .graphs import ChunkGraphs

            self.graphs = ChunkGraphs(self)
        self._rope: dict = {}  # (frames, h, w) -> (cos, sin): the steps of a chunk share their angles

    # ---- text ------------------------------------------------------------------------------
    def encode_text(self, text: torch.Tensor) -> PromptKV:
        """Text-encoder output [B, Lt, text_dim] -> per-layer cross-attention K/V (computed once per prompt).

        Shorter contexts are zero-padded to the model's text_len, as Wan does.
        """
        cfg = self.config
        if text.ndim != 3 or text.shape[-1] != cfg.text_dim:
            raise ValueError(
                f"text embeddings must be [batch, tokens, {cfg.text_dim}] for this model, got {tuple(text.shape)}; "
                "use the text encoder that matches the model (UMT5-XXL for Wan2.1)"
            )
        if text.shape[1] < cfg.text_len:
            text = torch.cat([text, text.new_zeros(text.shape[0], cfg.text_len - text.shape[1], text.shape[2])], 1)
        ctx = self.dit.text_embedding(feed(self.dit.text_embedding[0], text.to(self.device), self.dtype))
        B, L, _ = ctx.shape
        H, D = cfg.num_heads, cfg.head_dim
        kv = []
        for block in self.dit.blocks:
            m = block.cross_attn
            kv.append((m.norm_k(m.k(ctx)).view(B, L, H, D), m.v(ctx).view(B, L, H, D)))
        return PromptKV(kv)

    # ---- forward ---------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        prompt: PromptKV | torch.Tensor,
        frames: Sequence[int] | None = None,
        plan=None,
    ) -> torch.Tensor:
        """Flow prediction v = eps - x0.

        x: [B, C, F, H, W] normalised latents. t: timesteps [B, F] (per frame), [B] or a scalar.
        prompt: PromptKV or text embeddings [B, Lt, text_dim]. frames: absolute latent-frame index of each
        input frame (RoPE positions; default 0..F-1). plan: attention plan (default bidirectional).
        Returns [B, C, F, H, W] fp32.
        """
        cfg, dit = self.config, self.dit
        B, C, F, H, W = x.shape
        pf, ph, pw = cfg.patch_size
        if C != cfg.in_dim:
            raise ValueError(f"latent has {C} channels, the model expects {cfg.in_dim}")
        h, w = H // ph, W // pw
        if h * ph != H or w * pw != W:
            raise ValueError(f"latent size {H}x{W} is not divisible by the patch {ph}x{pw}")
        if not isinstance(prompt, PromptKV):
            prompt = self.encode_text(prompt)
        if prompt.batch != B:
            raise ValueError(f"prompt batch {prompt.batch} does not match latent batch {B}")
        frames = range(F) if frames is None else frames
        plan = plan or Bidirectional()
        if self.graphs is not None:
            out = self.graphs.run(x, t, prompt, frames, plan)
            if out is not None:
                return out
        return self._run(x, t, prompt, self._angles(frames, h, w), plan)

    __call__ = forward

    def _run(self, x, t, prompt: PromptKV, rope, plan) -> torch.Tensor:
        """The forward proper, on checked inputs; rope = (cos, sin) [F*h*w, head_dim/2] of the input frames."""
        cfg, dit = self.config, self.dit
        B, C, F, H, W = x.shape
        pf, ph, pw = cfg.patch_size
        h, w = H // ph, W // pw
        tokens = dit.patch_embedding(feed(dit.patch_embedding, x.to(self.device), self.dtype))  # [B, dim, F, h, w]
        tokens = tokens.flatten(2).transpose(1, 2).float()  # [B, F*h*w, dim], fp32 residual
        t = torch.as_tensor(t, device=self.device, dtype=torch.float32)
        t = t.reshape(-1, 1).expand(B, F) if t.ndim < 2 or t.shape[1] == 1 else t.expand(B, F)
        sin = sinusoidal_embedding(cfg.freq_dim, t.reshape(-1))
        e = dit.time_embedding(feed(dit.time_embedding[0], sin, torch.float32)).view(B, F, cfg.dim).float()
        e0 = dit.time_projection(feed(dit.time_projection[1], e, torch.float32)).unflatten(-1, (6, cfg.dim)).float()

        for i, block in enumerate(dit.blocks):
            if self.checkpointing and torch.is_grad_enabled():
                tokens = torch.utils.checkpoint.checkpoint(
                    self._block, i, block, tokens, e0, prompt.kv[i], rope, plan, F, use_reentrant=False
                )
            else:
                tokens = self._block(i, block, tokens, e0, prompt.kv[i], rope, plan, F)

        head = dit.head
        shift, scale = (head.modulation.to(self.device, torch.float32)[None] + e[:, :, None]).unsqueeze(3).unbind(2)
        y = modulate(head.norm(tokens), shift, scale, F)
        out = head.head(y.to(self.dtype)).float()  # [B, F*h*w, pf*ph*pw*C]
        out = out.view(B, F, h, w, pf, ph, pw, cfg.out_dim).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(B, cfg.out_dim, F * pf, H, W)

    def _angles(self, frames, h: int, w: int):
        key = (frames.start, frames.stop, h, w) if isinstance(frames, range) and frames.step == 1 else None
        if key is not None and key in self._rope:
            return self._rope[key]
        angles = rope_angles(frames, h, w, self.config.head_dim, self.config.rope_theta, self.device)
        if key is not None:
            if len(self._rope) >= 4:  # the current chunk, its clean pass, the next chunk
                self._rope.pop(next(iter(self._rope)))
            self._rope[key] = angles
        return angles

    def _block(self, i, block, x, e0, cross_kv, rope, plan, frames):
        """One transformer block: two pure regions (compiled when `compile` is on) around the attention plan,
        which reads and writes the cache and so stays eager."""
        H, dt = self.config.num_heads, self.dtype
        q, k, v, mod = self.kernels.pre(block, x, e0, rope, frames, H, dt)
        y = plan.attend(i, q, k, v, self.attn)
        return self.kernels.post(block, x, y, mod, cross_kv, frames, H, dt, self.attn)
