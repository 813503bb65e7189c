"""Graph-captured chunk steps (opt-in `graphs`; CUDA graphs on CUDA).

Once a stream's rolling window is full, every forward of a chunk - each denoising step and the clean pass -
has the same shapes and can read and write the same memory:
- the input x [B, C, F, h, w] and timesteps t [B, F]: static buffers the inputs are copied into;
- the prompt's cross-attention K/V: a static copy, refreshed when the prompt changes;
- RoPE angles (cos, sin) [F*h*w, head_dim/2] of the chunk's frames: static buffers, filled once per chunk;
- the chunk's cache slots: a static index tensor (K/V written with index_copy_), attention over all slots;
- the attention sink: moved for the chunk before its first forward (eager, once per chunk), so the step
  itself only reads the cache's fixed storage.
`StaticStep` is that forward. On CUDA it is captured once as a CUDA graph and replayed for every later
forward of the stream (steps and clean passes alike: only the buffers' contents change); elsewhere the same
static step runs eagerly (what the CPU tests check: fixed addresses, no host sync, allocations that do not
depend on the chunk).

Forwards that cannot be static run eagerly, with the same result: the window still filling (the attended
length grows), a chunk that writes sink slots, re-cache and training plans, grad enabled, weights not all on
the device, forward hooks or ComfyUI weight functions (LoRA patches applied at run time, low-VRAM casting).
A module tree whose modules or weights changed since capture is captured again; a capture that fails is
logged once and the backbone runs eagerly from then on.
"""

from __future__ import annotations

import logging
import weakref
from collections import Counter
from typing import Callable

import torch
from torch import nn
from torch.nn.modules import module as M

from ..cache import CacheWrite, KVCache
from .block import PromptKV

log = logging.getLogger(__name__)
WARMUP = 2  # eager runs on a side stream before capture (allocator, cuBLAS and compile warm-up)


class StaticWrite:
    """A CacheWrite whose slots are an index tensor [F*tokens_per_frame] (long): this forward's K/V are written
    with index_copy_ and every slot is attended to (the window is full)."""

    def __init__(self, cache: KVCache, index: torch.Tensor):
        self._cache = weakref.ref(cache)
        self.index = index

    def attend(self, layer, q, k, v, attn):
        c = self._cache()
        kc, vc = c.k[layer], c.v[layer]  # [B, slots*tokens, H, D]
        kc.index_copy_(1, self.index, k.to(kc.dtype))
        vc.index_copy_(1, self.index, v.to(vc.dtype))
        return attn(q, kc, vc, None)


def unsupported(dit: nn.Module, device: torch.device) -> str | None:
    """Why the module tree cannot run as a captured graph (None when it can)."""
    if M._global_forward_hooks or M._global_forward_pre_hooks:
        return "global forward hooks are registered"
    for name, m in dit.named_modules():
        if m._forward_hooks or m._forward_pre_hooks:
            return f"{name or 'the model'} has forward hooks"
        if getattr(m, "weight_function", None) or getattr(m, "bias_function", None):
            return f"{name} patches its weights at run time (LoRA hooks or low-VRAM casting)"
    for name, p in dit.named_parameters():
        if p.device != device:
            return f"{name} is on {p.device}, not {device} (partly offloaded weights)"
    return None


def signature(dit: nn.Module) -> tuple:
    """Identity of the modules and the storage of the weights a captured graph reads."""
    return tuple(id(m) for m in dit.modules()) + tuple(p.data_ptr() for p in dit.parameters())


class StaticStep:
    """Preallocated inputs and output of the chunk forward of one shape on one cache (see the module doc)."""

    def __init__(self, backbone, cache: KVCache, x: torch.Tensor, prompt):
        dev, cfg = backbone.device, backbone.config
        B, C, F, H, W = x.shape
        tokens = F * cache.tokens_per_frame
        self.shape, self.cache = tuple(x.shape), weakref.ref(cache)
        self.x = torch.zeros(x.shape, dtype=x.dtype, device=dev)
        self.t = torch.zeros(B, F, dtype=torch.float32, device=dev)
        self.cos = torch.zeros(tokens, cfg.head_dim // 2, device=dev)
        self.sin = torch.zeros(tokens, cfg.head_dim // 2, device=dev)
        self.index = torch.zeros(tokens, dtype=torch.long, device=dev)
        self.prompt = PromptKV([(k.clone(), v.clone()) for k, v in prompt.kv])
        self.plan = StaticWrite(cache, self.index)
        self.out: torch.Tensor | None = None  # the captured graph's output, or filled by copy
        self.graph: Callable[[], None] | None = None  # replays the captured forward
        self.signature = signature(backbone.dit)
        self._prompt_src = weakref.ref(prompt)
        self._rope_src = None
        self._runs = None
        self._arange = torch.arange(tokens, device=dev)

    def buffers(self) -> dict[str, torch.Tensor]:
        """Every tensor the step reads or writes besides the weights (for address checks)."""
        c = self.cache()
        out = {"x": self.x, "t": self.t, "cos": self.cos, "sin": self.sin, "index": self.index,
               "cache_k": c.k, "cache_v": c.v}
        out.update({f"prompt_k{i}": k for i, (k, _) in enumerate(self.prompt.kv)})
        if self.out is not None:
            out["out"] = self.out
        return out

    def fits(self, x: torch.Tensor, cache: KVCache) -> bool:
        return self.cache() is cache and tuple(x.shape) == self.shape and x.dtype == self.x.dtype

    def load(self, x, t, prompt, rope, plan: CacheWrite) -> None:
        """Copy one forward's inputs into the static buffers (device-to-device; no host sync)."""
        c = plan.cache
        if rope is not self._rope_src:  # a new chunk
            self.cos.copy_(rope[0])
            self.sin.copy_(rope[1])
            self._rope_src = rope
        if plan.runs != self._runs:  # ring slots of the chunk's tokens, in place: sink + (first + j) mod ring
            tpf, sink = c.tokens_per_frame, c.sink * c.tokens_per_frame
            first = plan.runs[0][0] * tpf - sink
            torch.add(self._arange, first, out=self.index)
            self.index.remainder_(c.capacity * tpf - sink).add_(sink)
            self._runs = plan.runs
        for layer in range(c.k.shape[0]):  # the sink moved for this chunk (a no-op once placed)
            c.place_sink(layer, plan.sink_shift)
        if self._prompt_src() is not prompt:
            for (k, v), (k2, v2) in zip(self.prompt.kv, prompt.kv):
                k.copy_(k2)
                v.copy_(v2)
            self._prompt_src = weakref.ref(prompt)
        self.x.copy_(x)
        self.t.copy_(t)


def cuda_capture(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[Callable[[], None], torch.Tensor]:
    """Capture fn() as a CUDA graph after WARMUP eager runs on a side stream; returns (replay, output buffer).
    fn must read and write only fixed memory (a StaticStep); replay() recomputes into the output buffer."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(WARMUP):  # same inputs: the cache writes are the same values each time
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # other threads (decoders) keep working
        out = fn()
    return graph.replay, out


class ChunkGraphs:
    """Runs a backbone's full-window chunk forwards through a StaticStep, captured once and replayed.

    capture(fn, device) -> (replay, output): `cuda_capture` on CUDA; elsewhere None (the static step runs
    eagerly). `run` returns the forward's output, or None when this forward must run eagerly (`last_reason`
    says why). `stats` counts static and eager forwards, static steps built and captures.
    """

    def __init__(self, backbone, capture: Callable | None = None):
        self.backbone = backbone
        self.capture = capture or (cuda_capture if backbone.device.type == "cuda" else None)
        self.step: StaticStep | None = None
        self.disabled: str | None = None
        self.last_reason: str | None = None
        self.stats: Counter = Counter()

    def _why_not(self, x, t, frames, plan) -> str | None:
        if self.disabled:
            return self.disabled
        if torch.is_grad_enabled():
            return "grad is enabled (training)"
        if not isinstance(plan, CacheWrite):
            return "not a chunk forward on the cache"
        c = plan.cache
        if not c.rolling or plan.valid != c.capacity:
            return "the cache is still filling"
        if any(s < c.sink for s, _, _ in plan.runs):
            return "the chunk writes sink slots"
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (x.shape[0], x.shape[2]) or t.device != x.device:
            return "timesteps are not a [B, F] tensor on the device"
        if not isinstance(frames, range):
            return "frames are not a range"
        return None

    def run(self, x, t, prompt, frames, plan) -> torch.Tensor | None:
        bb = self.backbone
        reason = self._why_not(x, t, frames, plan)
        if reason is None:
            rope = bb._angles(frames, x.shape[3] // bb.config.patch_size[1], x.shape[4] // bb.config.patch_size[2])
            step = self.step
            new_chunk = step is None or rope is not step._rope_src
            if step is None or not step.fits(x, plan.cache) or (new_chunk and step.signature != signature(bb.dit)):
                reason = unsupported(bb.dit, bb.device)
                if reason is None:
                    step = self.step = StaticStep(bb, plan.cache, x, prompt)
                    self.stats["steps"] += 1
        if reason is not None:
            self.last_reason = reason
            self.stats["eager"] += 1
            return None
        step.load(x, t, prompt, rope, plan)
        self.stats["static"] += 1
        forward = lambda: bb._run(step.x, step.t, step.prompt, (step.cos, step.sin), step.plan)  # noqa: E731
        if self.capture is None:
            out = forward()
            if step.out is None:
                step.out = torch.empty_like(out)
            step.out.copy_(out)
            return step.out.clone()
        if step.graph is None:
            try:
                step.graph, step.out = self.capture(forward, bb.device)
            except Exception as e:  # e.g. an op that cannot be captured: eager from now on, same result
                self.disabled = f"graph capture failed ({type(e).__name__}: {e})"
                self.step = None
                log.warning("%s; running the chunk steps eagerly", self.disabled)
                self.stats["static"] -= 1
                self.stats["eager"] += 1
                return None
            self.stats["captures"] += 1
        step.graph()
        return step.out.clone()
