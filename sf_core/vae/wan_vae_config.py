"""The Wan2.1 VAE's architecture (`WanVAEConfig`) and how it is read off the weight shapes of a file."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import torch

from ..errors import CheckpointError
from ..weights import not_a


@dataclass(frozen=True)
class WanVAEConfig:
    """Architecture of a Wan-style VAE. Defaults: the real Wan2.1 VAE."""

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    has_encoder: bool = True

    def __post_init__(self):
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError("temporal_downsample needs one entry per level transition (len(dim_mult) - 1)")

    @property
    def latent_channels(self) -> int:
        return self.z_dim

    @property
    def spatial_stride(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_stride(self) -> int:
        return 2 ** sum(bool(t) for t in self.temporal_downsample)

    @property
    def temporal_upsample(self) -> tuple[bool, ...]:
        return tuple(self.temporal_downsample[::-1])




_REQUIRED = ("conv2.weight", "decoder.conv1.weight", "decoder.head.2.weight")


def _not_a_wan_vae(sd: Mapping[str, torch.Tensor], source: str, why: str) -> CheckpointError:
    return not_a(source, f"a Wan2.1 VAE ({why})", list(sd), "the Wan VAE names, e.g. 'decoder.conv1.weight' "
                 "[384, 16, 3, 3, 3], 'decoder.upsamples.0.residual.0.gamma', 'encoder.conv1.weight' [96, 3, 3, 3, 3] "
                 "(Wan2.1_VAE.pth or ComfyUI's wan_2.1_vae.safetensors)", sd)


def infer_wan_vae_config(sd: Mapping[str, torch.Tensor], source: str = "state dict") -> WanVAEConfig:
    """Read dim, z_dim, dim_mult, num_res_blocks and the temporal levels off the weight shapes."""
    missing = [k for k in _REQUIRED if k not in sd]
    if missing:
        raise _not_a_wan_vae(sd, source, f"no {', '.join(repr(k) for k in missing)}")
    w = sd["decoder.conv1.weight"]
    if w.ndim != 5:
        raise _not_a_wan_vae(sd, source, f"'decoder.conv1.weight' has shape {tuple(w.shape)}, expected 5 dimensions")
    z_dim = int(w.shape[1])
    if z_dim != 16:
        raise _not_a_wan_vae(sd, source, f"{z_dim} latent channels; the Wan2.1 VAE has 16")

    # decoder.upsamples.N.* -> kind of block N
    kinds: dict[int, str] = {}
    rx = re.compile(r"^decoder\.upsamples\.(\d+)\.(.+)$")
    for k in sd:
        m = rx.match(k)
        if not m:
            continue
        i, rest = int(m.group(1)), m.group(2)
        if rest.startswith(("residual.", "shortcut.")):
            kinds.setdefault(i, "res")
        elif rest.startswith("time_conv."):
            kinds[i] = "up3d"
        elif rest.startswith("resample."):
            if kinds.get(i) != "up3d":
                kinds[i] = "up2d"
        else:
            kinds[i] = "other:" + rest
    if not kinds or sorted(kinds) != list(range(len(kinds))):
        raise _not_a_wan_vae(sd, source, "no consecutive 'decoder.upsamples.N' blocks")
    odd = [f"decoder.upsamples.{i}.{v[6:]}" for i, v in kinds.items() if v.startswith("other:")]
    if odd:
        raise _not_a_wan_vae(sd, source, f"unsupported blocks such as {odd[0]!r}")

    groups: list[list[int]] = [[]]
    temporal_up: list[bool] = []
    for i in range(len(kinds)):
        if kinds[i] == "res":
            groups[-1].append(i)
        else:
            temporal_up.append(kinds[i] == "up3d")
            groups.append([])
    sizes = {len(g) for g in groups}
    if len(sizes) != 1 or 0 in sizes:
        raise _not_a_wan_vae(sd, source, f"uneven residual blocks per level {[len(g) for g in groups]}")
    num_res_blocks = sizes.pop() - 1
    if num_res_blocks < 1:
        raise _not_a_wan_vae(sd, source, "fewer than 2 residual blocks per decoder level")

    outs = []
    for g in groups:
        key = f"decoder.upsamples.{g[-1]}.residual.6.weight"
        if key not in sd:
            raise _not_a_wan_vae(sd, source, f"no {key!r}")
        outs.append(int(sd[key].shape[0]))
    has_encoder = "encoder.conv1.weight" in sd
    dim = int(sd["encoder.conv1.weight"].shape[0]) if has_encoder else outs[-1]
    if any(o % dim for o in outs) or int(w.shape[0]) % dim:
        raise _not_a_wan_vae(sd, source, f"channel counts {outs} are not multiples of the base dim {dim}")
    dim_mult = tuple(o // dim for o in reversed(outs))
    if int(w.shape[0]) != dim * dim_mult[-1]:
        raise _not_a_wan_vae(sd, source, f"decoder.conv1 gives {int(w.shape[0])} channels, expected {dim * dim_mult[-1]}")
    return WanVAEConfig(
        dim=dim,
        z_dim=z_dim,
        dim_mult=dim_mult,
        num_res_blocks=num_res_blocks,
        temporal_downsample=tuple(reversed(temporal_up)),
        has_encoder=has_encoder,
    )

