"""The KV cache of a stream: self-attention keys/values of generated latent frames, per layer.

Storage is a fixed set of latent-frame slots allocated once ([layers, B, slots*tokens_per_frame, H, D]),
so memory is planned up front and per-chunk cost is flat in video length:
- whole-video cache: one slot per frame of the video (the default of the paper's code);
- rolling cache: `window` slots (L frames, including the current chunk) of which the first `sink` (S)
  hold the first frames forever; the other L - S form a ring, so a new chunk overwrites the oldest
  frames in place - nothing is shifted or copied.
Keys are stored after RoPE at their absolute frame index, so attention over the slots is order-free.
With `sink_positions="adjacent"` (LongLive's window-relative positions) the sink frames are seen as if
they came right before the window: their keys are moved once per chunk, from a pristine copy, by
R(delta) with delta = first window frame - sink size (only the frame pairs of RoPE; exact, no drift).
All slot arithmetic is host-side Python on integers: no cache operation waits for the device.

A cache plan (`CacheWrite`, `CacheRead`, `Recache`) tells the backbone what one forward reads and writes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import WanConfig
from .wan.rope import shift_frames

SINK_POSITIONS = ("adjacent", "absolute")


class KVCache:
    """Self-attention K/V (and the clean latents, for re-cache) of the frames a stream may attend to.

    capacity: number of latent-frame slots (the window L, or the whole video's length).
    sink: frames at the start of the (current) segment that are never evicted; rolling: evict the
    oldest non-sink frame when full (otherwise writing past capacity is an error).
    """

    def __init__(
        self,
        config: WanConfig,
        batch: int,
        latent_height: int,
        latent_width: int,
        capacity: int,
        *,
        sink: int = 0,
        rolling: bool = False,
        sink_positions: str = "adjacent",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        self.config = config
        self.capacity, self.sink, self.rolling = capacity, sink, rolling
        self.adjacent_sink = rolling and sink > 0 and sink_positions == "adjacent"
        self.tokens_per_frame = config.tokens_per_frame(latent_height, latent_width)
        tokens = capacity * self.tokens_per_frame
        shape = (config.num_layers, batch, tokens, config.num_heads, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.latents = torch.zeros(batch, config.in_dim, capacity, latent_height, latent_width, device=device)
        if self.adjacent_sink:  # the sink's keys at their own positions, and the shift each layer holds now
            self.sink_k = torch.zeros(shape[:2] + (sink * self.tokens_per_frame,) + shape[3:], dtype=dtype, device=device)
            self.sink_shift = [0] * config.num_layers
        self.segment_start = 0
        self.slot_frame = [-1] * capacity  # absolute frame held by each slot (-1: empty)
        self.slot_block_end = [-1] * capacity  # end frame of the chunk that frame was generated in

    @staticmethod
    def estimate_bytes(config: WanConfig, batch: int, latent_height: int, latent_width: int, capacity: int,
                       dtype: torch.dtype = torch.bfloat16, sink_copy: int = 0) -> int:
        """Memory a cache of `capacity` frames takes once built (`nbytes`): K, V, the clean latents (fp32), and
        the pristine keys of `sink_copy` frames (an adjacent sink)."""
        frame = config.num_layers * batch * config.tokens_per_frame(latent_height, latent_width) * config.dim
        kv = (2 * capacity + sink_copy) * frame * torch.empty(0, dtype=dtype).element_size()
        return kv + batch * config.in_dim * capacity * latent_height * latent_width * 4

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + self.latents.nbytes + (self.sink_k.nbytes if self.adjacent_sink else 0)

    def sink_shift_for(self, end: int) -> int:
        """Frames the sink is moved for a chunk ending at `end`: window start - sink size (0: no move)."""
        if not self.adjacent_sink:
            return 0
        return max(0, end - self.segment_start - self.capacity)

    # ---- slots -----------------------------------------------------------------------------
    def slot(self, frame: int) -> int:
        r = frame - self.segment_start
        if r < 0:
            raise ValueError(f"frame {frame} is before the current segment (starts at {self.segment_start})")
        if not self.rolling:
            if r >= self.capacity:
                raise ValueError(
                    f"frame {frame} does not fit a whole-video cache of {self.capacity} latent frames; "
                    "set a window (rolling cache) to generate longer videos"
                )
            return r
        if r < self.sink:
            return r
        return self.sink + (r - self.sink) % (self.capacity - self.sink)

    def runs(self, start: int, count: int) -> list[tuple[int, int, int]]:
        """Contiguous (slot, input offset, length) runs that frames [start, start+count) occupy."""
        runs: list[tuple[int, int, int]] = []
        for i in range(count):
            s = self.slot(start + i)
            if runs and runs[-1][0] + runs[-1][2] == s:
                runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
            else:
                runs.append((s, i, 1))
        return runs

    def valid_slots(self, end: int) -> int:
        """Slots holding frames of this segment once frames before `end` are written (always a prefix)."""
        return min(end - self.segment_start, self.capacity)

    def cut(self, frame: int) -> None:
        """Hard cut: forget everything; frame `frame` starts a new segment (and a new sink)."""
        self.segment_start = frame
        self.slot_frame = [-1] * self.capacity
        self.slot_block_end = [-1] * self.capacity

    def _claim(self, start: int, count: int, block_end: int) -> list[tuple[int, int, int]]:
        runs = self.runs(start, count)
        for s, off, n in runs:
            for j in range(n):
                self.slot_frame[s + j] = start + off + j
                self.slot_block_end[s + j] = block_end
        return runs

    def _tok(self, slots: int) -> int:
        return slots * self.tokens_per_frame

    def _write_kv(self, layer: int, runs, k: torch.Tensor, v: torch.Tensor) -> None:
        for s, off, n in runs:
            dst, src = slice(self._tok(s), self._tok(s + n)), slice(self._tok(off), self._tok(off + n))
            self.k[layer, :, dst] = k[:, src]
            self.v[layer, :, dst] = v[:, src]
            if self.adjacent_sink and s < self.sink:  # a sink frame: keep its keys as written
                m = min(s + n, self.sink) - s
                self.sink_k[layer, :, self._tok(s) : self._tok(s + m)] = k[:, self._tok(off) : self._tok(off + m)]
                self.sink_shift[layer] = 0

    def place_sink(self, layer: int, shift: int) -> None:
        """Make the sink slots of `layer` hold the sink keys moved by `shift` frames (once per chunk)."""
        if self.adjacent_sink and self.sink_shift[layer] != shift:

            n = self._tok(self.sink)
            self.k[layer, :, :n] = shift_frames(self.sink_k[layer], shift, self.config.head_dim, self.config.rope_theta)
            self.sink_shift[layer] = shift

    # ---- plans -----------------------------------------------------------------------------
    def write_plan(self, start: int, count: int) -> "CacheWrite":
        """Forward of frames [start, start+count) (one chunk): write their K/V, attend to all valid slots."""
        return CacheWrite(self, self._claim(start, count, start + count), self.valid_slots(start + count),
                          self.sink_shift_for(start + count))

    def read_plan(self, start: int, count: int) -> "CacheRead":
        """Like write_plan but does not store this chunk's K/V (a forward that builds a graph for backward).
        Keys are read by concatenating the valid slots with the fresh ones: a copy per layer, fine for
        training (one such forward per chunk and iteration) and never used at inference."""
        return CacheRead(self, self.runs(start, count), self.valid_slots(start + count), self.sink_shift_for(start + count))

    def store_latents(self, start: int, latents: torch.Tensor) -> None:
        """Keep the clean latents [B, C, n, h, w] of frames [start, start+n) for a later re-cache."""
        for s, off, n in self.runs(start, latents.shape[2]):
            self.latents[:, :, s : s + n] = latents[:, :, off : off + n].to(self.latents)

    def recache_plan(self) -> tuple["Recache", torch.Tensor, list[int]]:
        """Plan re-encoding every cached frame (sink included) in time order; returns (plan, latents, frames).

        Causality inside the window is kept: each frame attends only to cached frames of its own chunk and
        earlier ones, as when it was generated.
        """
        slots = sorted((f, s) for s, f in enumerate(self.slot_frame) if f >= 0)
        frames = [f for f, _ in slots]
        order = [s for _, s in slots]
        latents = self.latents[:, :, order]
        return Recache(self, order, [self.slot_block_end[s] for s in order]), latents, frames


@dataclass
class CacheWrite:
    cache: KVCache
    runs: list[tuple[int, int, int]]
    valid: int
    sink_shift: int = 0

    def attend(self, layer, q, k, v, attn):
        c = self.cache
        c._write_kv(layer, self.runs, k, v)
        c.place_sink(layer, self.sink_shift)
        n = c._tok(self.valid)
        return attn(q, c.k[layer, :, :n], c.v[layer, :, :n], None)


@dataclass
class CacheRead:
    cache: KVCache
    runs: list[tuple[int, int, int]]
    valid: int
    sink_shift: int = 0
    _mask: torch.Tensor | None = None

    def key_mask(self, new_tokens: int, device) -> torch.Tensor:
        """Valid slots minus this chunk's own (stale) slots, then the chunk's fresh tokens; built once."""
        if self._mask is None:
            c = self.cache
            n = c._tok(self.valid)
            mask = torch.ones(n + new_tokens, dtype=torch.bool, device=device)
            for s, _, cnt in self.runs:
                if s < self.valid:
                    mask[c._tok(s) : c._tok(min(s + cnt, self.valid))] = False
            self._mask = mask
        return self._mask

    def attend(self, layer, q, k, v, attn):
        c = self.cache
        n = c._tok(self.valid)
        c.place_sink(layer, self.sink_shift)
        kk = torch.cat([c.k[layer, :, :n], k.to(c.k.dtype)], dim=1)
        vv = torch.cat([c.v[layer, :, :n], v.to(c.v.dtype)], dim=1)
        return attn(q, kk, vv, self.key_mask(k.shape[1], k.device))


@dataclass
class Recache:
    cache: KVCache
    slots: list[int]  # slot of each input frame, in time order
    block_ends: list[int]  # chunk end of each input frame
    _groups: list | None = None

    def groups(self, device) -> list[tuple[int, int, torch.Tensor]]:
        """(first frame, end frame, key mask) per chunk of the input: a chunk sees its own and earlier chunks."""
        if self._groups is None:
            tpf, n = self.cache.tokens_per_frame, len(self.slots)
            self._groups = []
            i = 0
            while i < n:
                j = i
                while j < n and self.block_ends[j] == self.block_ends[i]:
                    j += 1
                mask = torch.zeros(n * tpf, dtype=torch.bool, device=device)
                for s, end in zip(self.slots, self.block_ends):
                    if end <= self.block_ends[i]:
                        mask[s * tpf : (s + 1) * tpf] = True
                self._groups.append((i, j, mask))
                i = j
        return self._groups

    def attend(self, layer, q, k, v, attn):
        c = self.cache
        tpf = c.tokens_per_frame
        c._write_kv(layer, [(s, i, 1) for i, s in enumerate(self.slots)], k, v)
        n = c._tok(len(self.slots))
        outs = []
        for i, j, mask in self.groups(k.device):
            c.place_sink(layer, c.sink_shift_for(self.block_ends[i]))
            outs.append(attn(q[:, i * tpf : j * tpf], c.k[layer, :, :n], c.v[layer, :, :n], mask))
        return torch.cat(outs, dim=1)
