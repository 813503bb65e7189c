"""Random draws from one generator, or from one generator per sample of a batch.

With one generator per sample, sample b's values come from generator b alone, so a sample's randomness does
not depend on which batch (or which process) it is drawn in: a batch of 2 equals two batches of 1 drawn
with the same generators. `keyed_generator` makes such generators from a key (seed, step, sample index).
"""

from __future__ import annotations

import hashlib
from typing import Sequence, Union

import torch

Generators = Union[torch.Generator, Sequence[torch.Generator]]


def keyed_generator(*key, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator seeded by a stable hash of `key` (ints/strings): the same key gives the same stream in
    every process and Python run (no dependence on PYTHONHASHSEED or on earlier draws)."""
    digest = hashlib.blake2b(":".join(map(str, key)).encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def per_sample(generators: Generators) -> bool:
    return not isinstance(generators, torch.Generator)


def device_of(generators: Generators) -> torch.device:
    return (generators[0] if per_sample(generators) else generators).device


def randn(shape: Sequence[int], generators: Generators, dim: int = 0) -> torch.Tensor:
    """Standard normal fp32 tensor of `shape` on the generators' device. With a list of generators,
    shape[dim] must equal its length and slice b along `dim` comes from generator b."""
    if not per_sample(generators):
        return torch.randn(tuple(shape), generator=generators, device=generators.device)
    one = list(shape)
    _check(shape[dim], generators)
    one[dim] = 1
    return torch.cat([torch.randn(one, generator=g, device=g.device) for g in generators], dim=dim)


def randint(high: int, batch: int, generators: Generators) -> torch.Tensor:
    """[batch] integers in [0, high): one per sample (from its own generator when given a list)."""
    if not per_sample(generators):
        return torch.randint(0, high, (batch,), generator=generators, device=generators.device)
    _check(batch, generators)
    return torch.cat([torch.randint(0, high, (1,), generator=g, device=g.device) for g in generators])


def split(generators: Generators) -> Generators:
    """A new generator (or one per sample) seeded from draws of the given one(s): a separate stream."""

    def child(g: torch.Generator) -> torch.Generator:
        seed = int(torch.randint(0, 2**62, (1,), generator=g, device=g.device))
        return torch.Generator(device=g.device).manual_seed(seed)

    return [child(g) for g in generators] if per_sample(generators) else child(generators)


def _check(batch: int, generators: Sequence[torch.Generator]) -> None:
    if len(generators) != batch:
        raise ValueError(f"{len(generators)} per-sample generators for a batch of {batch}")
