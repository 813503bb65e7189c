"""LoRA on any module tree with Wan names: inject (reversible), merge, save in ComfyUI's layout, load.

A LoRA adds ``scale * B @ A`` to the weight ``W`` [out, in] of chosen Linear modules, with
``A`` [rank, in] (ComfyUI ``lora_down``, PEFT ``lora_A``), ``B`` [out, rank] (``lora_up`` /
``lora_B``) and ``scale = alpha / rank``. A fresh LoRA has ``B = 0`` and changes nothing.

The LoRA parameters live in their own module (`LoRA`), never inside the base model, so an optimizer
built from ``lora.parameters()`` sees only them. `LoRA.attach` adds a forward hook to each target
Linear (this works for ComfyUI's ``comfy.ops`` Linear subclasses, which cast fp8 weights inside their
own ``forward``): the hook adds ``scale * B(A(dropout(x)))``, computed in the LoRA dtype and cast to the
output dtype. `LoRA.remove` takes the hooks off and restores ``requires_grad`` flags: the model is left
exactly as it was found. One frozen base can serve a teacher (no LoRA, or ``lora.enabled = False``) and a
critic (the same base with the critic's LoRA attached).

    lora = LoRA.inject(model, rank=16)          # create + attach (base frozen while attached)
    opt = torch.optim.AdamW(lora.parameters())
    ...
    lora.save("my_lora.safetensors")            # loads in ComfyUI's stock LoraLoader
    lora.remove()                               # model as found

    lora = LoRA.load("longlive_lora.pt")        # ours, ComfyUI lora_up/down or lora_A/B, LongLive PEFT
    with lora.applied(model):
        ...
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import os
import time
import weakref
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SelfForcingError
from .lora_files import Pairs, parse_pairs, read_pairs, to_comfy, write_comfy

#: Every Linear of the DiT blocks (what LongLive trains): self-attn q/k/v/o, cross-attn q/k/v/o, FFN.
DEFAULT_TARGETS: tuple[str, ...] = tuple(
    [f"blocks.*.self_attn.{n}" for n in "qkvo"]
    + [f"blocks.*.cross_attn.{n}" for n in "qkvo"]
    + ["blocks.*.ffn.0", "blocks.*.ffn.2"]
)

INITS = ("kaiming", "normal")

class LoRALayer(nn.Module):
    """The low-rank pair of one target Linear.

    A: [rank, in_features], B: [out_features, rank]; delta(x) = scale * B(A(dropout(x))).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        self.A = nn.Parameter(torch.zeros(rank, in_features, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))
        self.alpha = float(alpha)
        self.dropout = float(dropout)

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        """x: [..., in_features] (any float dtype/device) -> delta [..., out_features] in the LoRA dtype."""
        A, B = self.A, self.B
        if A.device != x.device:  # ComfyUI may run the base on a device the LoRA is not on yet
            A, B = A.to(x.device), B.to(x.device)
        h = x.to(A.dtype)
        if self.dropout > 0.0:
            h = F.dropout(h, self.dropout, self.training)
        return F.linear(F.linear(h, A), B) * (self.scale * strength)

    def delta_weight(self, strength: float = 1.0) -> torch.Tensor:
        """scale * strength * B @ A: [out_features, in_features], float32 (or float64 for fp64 params)."""
        dt = torch.promote_types(self.A.dtype, torch.float32)
        return (self.B.detach().to(dt) @ self.A.detach().to(dt)) * (self.scale * strength)


@dataclass(eq=False)
class _Binding:
    """What one LoRA did to one model: hooks, frozen params, merged weights."""

    model_ref: weakref.ref
    order: int
    handles: list = field(default_factory=list)
    frozen: list | None = None  # params this LoRA set to requires_grad=False
    merged: bool = False
    merged_strength: float = 1.0
    backups: dict | None = None  # path -> original weight (CPU copy) when merged with backup=True


class _Hook:
    """Forward hook on one target Linear: output + LoRA delta (skipped when disabled or merged)."""

    __slots__ = ("lora", "key", "binding")

    def __init__(self, lora: "LoRA", key: str, binding: _Binding):
        self.lora, self.key, self.binding = lora, key, binding

    def __call__(self, module, args, kwargs, output):
        lora = self.lora
        if not lora.enabled or lora.strength == 0.0 or self.binding.merged:
            return None
        x = args[0] if args else kwargs["input"]
        return output + lora.layers[self.key](x, lora.strength).to(output.dtype)


class LoRA(nn.Module):
    """A set of LoRA pairs keyed by module path, attachable to any model with those paths.

    Attributes: ``paths`` (module paths, sorted), ``layers`` (ModuleDict; key = path with '.' -> '__'),
    ``enabled`` (hooks add the delta only when True), ``strength`` (multiplies every scale, default 1).
    ``state_dict()`` / ``load_state_dict()`` are the plain nn.Module ones (A/B tensors) for trainers.
    """

    def __init__(self, shapes: Mapping[str, tuple[int, int]], rank: int | Mapping[str, int],
                 alpha: float | Mapping[str, float] | None = None, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, dropout: float = 0.0, init: str = "kaiming",
                 generator: torch.Generator | None = None, targets: Sequence[str] | None = None):
        """shapes: path -> (in_features, out_features). rank/alpha: one value or one per path
        (alpha None = rank, i.e. scale 1). A is initialised by `init` ("kaiming" uniform as nn.Linear,
        or "normal" with std 1/rank) from `generator`; B is zero."""
        super().__init__()
        if not shapes:
            raise SelfForcingError("a LoRA needs at least one target module; none were given")
        if not dtype.is_floating_point or torch.empty(0, dtype=dtype).element_size() < 2:
            raise SelfForcingError(f"LoRA dtype must be float32, bfloat16, float16 or float64, not {dtype}")
        if not 0.0 <= dropout < 1.0:
            raise SelfForcingError(f"LoRA dropout must be in [0, 1), got {dropout}")
        if init not in INITS:
            raise SelfForcingError(f"unknown LoRA init {init!r}; choose one of {INITS}")
        self.layers = nn.ModuleDict()
        self.paths: list[str] = sorted(shapes)
        self._keys: dict[str, str] = {}
        self.targets = list(targets) if targets is not None else list(self.paths)
        self.enabled = True
        self.strength = 1.0
        self._bindings: dict[int, _Binding] = {}
        for path in self.paths:
            r = _check_rank(rank[path] if isinstance(rank, Mapping) else rank, path)
            a = alpha[path] if isinstance(alpha, Mapping) else alpha
            a = float(r) if a is None else float(a)
            if not math.isfinite(a):
                raise SelfForcingError(f"LoRA alpha for {path} must be a finite number, got {a}")
            fan_in, fan_out = (int(n) for n in shapes[path])
            layer = LoRALayer(fan_in, fan_out, r, a, dropout, dtype)  # init on CPU: generator-friendly
            with torch.no_grad():
                if init == "kaiming":
                    nn.init.kaiming_uniform_(layer.A, a=math.sqrt(5), generator=generator)
                else:
                    nn.init.normal_(layer.A, std=1.0 / r, generator=generator)
            key = path.replace(".", "__")
            if key in self.layers:
                raise SelfForcingError(f"module paths {path!r} and another one map to the same key {key!r}")
            self.layers[key] = layer.to(device) if device is not None else layer
            self._keys[path] = key

    # ---------------------------------------------------------------- building
    @classmethod
    def create(cls, model: nn.Module, rank: int, alpha: float | None = None, *,
               targets: Sequence[str] = DEFAULT_TARGETS, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None, dropout: float = 0.0, init: str = "kaiming",
               generator: torch.Generator | None = None) -> "LoRA":
        """A fresh (no-op) LoRA sized for the Linear modules of `model` matching `targets`.

        targets: module-path patterns; '*' matches one path component ("blocks.*.self_attn.q").
        device None: each pair goes to the device of its target weight. Does not attach.
        """
        rank = _check_rank(rank, "this LoRA")
        if alpha is not None and not (math.isfinite(float(alpha)) and float(alpha) > 0):
            raise SelfForcingError(f"LoRA alpha must be a positive number, got {alpha}")
        found = find_targets(model, targets)
        lora = cls({p: (_in_out(m)) for p, m in found.items()}, rank, alpha, dtype=dtype, device=device,
                   dropout=dropout, init=init, generator=generator, targets=targets)
        if device is None:
            for path, mod in found.items():
                dev = mod.weight.device
                if dev.type != "meta":
                    lora.layers[lora._keys[path]].to(dev)
        return lora

    @classmethod
    def inject(cls, model: nn.Module, rank: int, alpha: float | None = None, *,
               targets: Sequence[str] = DEFAULT_TARGETS, freeze_base: bool = True, **kwargs) -> "LoRA":
        """`create` + `attach`: returns a LoRA already hooked into `model` (undo with `remove`)."""
        lora = cls.create(model, rank, alpha, targets=targets, **kwargs)
        return lora.attach(model, freeze_base=freeze_base)

    # ---------------------------------------------------------------- introspection
    @property
    def rank(self) -> int:
        """The rank when all pairs share it (raises otherwise)."""
        ranks = {layer.rank for layer in self.layers.values()}
        if len(ranks) != 1:
            raise SelfForcingError(f"this LoRA has mixed ranks {sorted(ranks)}; use layer(path).rank")
        return ranks.pop()

    @property
    def alpha(self) -> float:
        """The alpha when all pairs share it (raises otherwise)."""
        alphas = {layer.alpha for layer in self.layers.values()}
        if len(alphas) != 1:
            raise SelfForcingError(f"this LoRA has mixed alphas {sorted(alphas)}; use layer(path).alpha")
        return alphas.pop()

    def layer(self, path: str) -> LoRALayer:
        """The pair for module path `path` (e.g. "blocks.0.self_attn.q")."""
        if path not in self._keys:
            raise KeyError(f"{path!r} is not a target of this LoRA")
        return self.layers[self._keys[path]]

    def __getstate__(self):
        # Copies (deepcopy for an EMA, pickling) start unattached: the hooks belong to the original.
        state = self.__dict__.copy()
        state["_bindings"] = {}
        return state

    def forward(self, *args, **kwargs):
        raise SelfForcingError("a LoRA is not called directly: attach it to a model (lora.attach(model))")

    # ---------------------------------------------------------------- attach / remove
    def attach(self, model: nn.Module, *, freeze_base: bool = True) -> "LoRA":
        """Hook every target of `model`; with freeze_base, set all of `model`'s params to
        requires_grad=False until `remove` (which restores the flags). Validates paths and shapes first."""
        modules = self._resolve(model)
        b = self._binding(model)
        if b is not None and b.handles:
            raise SelfForcingError("this LoRA is already attached to that model; remove() it first")
        if b is None:
            b = self._new_binding(model)
        for path, mod in modules.items():
            b.handles.append(mod.register_forward_hook(_Hook(self, self._keys[path], b), with_kwargs=True))
        if freeze_base:
            b.frozen = [p for p in model.parameters() if p.requires_grad]
            for p in b.frozen:
                p.requires_grad_(False)
        return self

    def remove(self, model: nn.Module | None = None) -> None:
        """Undo everything this LoRA did to `model` (default: to every model): unmerge, take the hooks
        off, restore requires_grad. The LoRA itself stays usable (attach it again later)."""
        if model is not None:
            b = self._binding(model)
            items = [(b, model)] if b is not None else []
        else:
            items = [(b, b.model_ref()) for b in list(self._bindings.values())]
        for b, m in items:
            if m is not None:
                if b.merged:
                    self._unmerge(b, m)
                for h in b.handles:
                    h.remove()
                b.handles.clear()
                self._restore_flags(b, m)
            self._bindings.pop(id(m) if m is not None else _key_of(self._bindings, b), None)

    def attached_to(self, model: nn.Module) -> bool:
        """Whether this LoRA's hooks are on `model`."""
        b = self._binding(model)
        return b is not None and bool(b.handles)

    @contextlib.contextmanager
    def applied(self, model: nn.Module, *, freeze_base: bool = True) -> Iterator["LoRA"]:
        """Attach for the duration of a `with` block (no-op if already attached), then remove."""
        if self.attached_to(model):
            yield self
            return
        self.attach(model, freeze_base=freeze_base)
        try:
            yield self
        finally:
            self.remove(model)

    @contextlib.contextmanager
    def disabled(self) -> Iterator["LoRA"]:
        """Run the hooked model without this LoRA's delta inside the block (e.g. as the teacher)."""
        before = self.enabled
        self.enabled = False
        try:
            yield self
        finally:
            self.enabled = before

    # ---------------------------------------------------------------- merge
    def merge(self, model: nn.Module, *, backup: bool = False) -> None:
        """Add strength * scale * B @ A into each target weight of `model` (in its own dtype; rounded
        once). While merged, this LoRA's hooks on `model` add nothing. backup=True keeps a CPU copy of
        the original weights so `unmerge`/`remove` restore them bitwise; otherwise unmerge subtracts
        (exact up to rounding of the weight dtype). fp8 weights cannot be merged (use the hooks)."""
        modules = self._resolve(model)
        b = self._binding(model)
        if b is not None and b.merged:
            raise SelfForcingError("this LoRA is already merged into that model; unmerge() it first")
        for path, mod in modules.items():
            w = mod.weight
            if not w.is_floating_point() or w.element_size() < 2:
                raise SelfForcingError(
                    f"cannot merge a LoRA into {path}: its weight is {w.dtype}; merging into fp8/quantized "
                    "weights is not supported - attach the LoRA with hooks instead (lora.attach(model)), or "
                    "load the model in bf16/fp16")
        if b is None:
            b = self._new_binding(model)
        b.backups = {} if backup else None
        with torch.no_grad():
            for path, mod in modules.items():
                w = mod.weight
                if backup:
                    b.backups[path] = w.detach().to("cpu", copy=True)
                delta = self.layers[self._keys[path]].delta_weight(self.strength).to(w.device)
                w.copy_((w.to(delta.dtype) + delta).to(w.dtype))
        b.merged, b.merged_strength = True, self.strength

    def unmerge(self, model: nn.Module) -> None:
        """Take a merged LoRA back out of `model`'s weights."""
        b = self._binding(model)
        if b is None or not b.merged:
            raise SelfForcingError("this LoRA is not merged into that model; nothing to unmerge")
        self._unmerge(b, model)
        if not b.handles and b.frozen is None:
            self._bindings.pop(id(model), None)

    def _unmerge(self, b: _Binding, model: nn.Module) -> None:
        modules = self._resolve(model)
        with torch.no_grad():
            for path, mod in modules.items():
                w = mod.weight
                if b.backups is not None:
                    w.copy_(b.backups[path].to(w.device))
                else:
                    delta = self.layers[self._keys[path]].delta_weight(b.merged_strength).to(w.device)
                    w.copy_((w.to(delta.dtype) - delta).to(w.dtype))
        b.merged, b.backups = False, None

    # ---------------------------------------------------------------- files (layouts: sf_core.lora_files)
    def pairs(self) -> Pairs:
        """The pairs by module path (the tensors themselves, not copies)."""
        layers = {p: self.layers[k] for p, k in self._keys.items()}
        return Pairs({p: m.A for p, m in layers.items()}, {p: m.B for p, m in layers.items()},
                     {p: m.alpha for p, m in layers.items()})

    def to_comfy(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The LoRA in ComfyUI's LoraLoader layout (see `lora_files.to_comfy`), CPU copies."""
        return to_comfy(self.pairs(), dtype)

    def save(self, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
             metadata: Mapping[str, str] | None = None) -> None:
        """Write a .safetensors file that ComfyUI's stock LoraLoader applies to a Wan model (atomic)."""
        write_comfy(self.pairs(), path, self.targets, dtype, metadata)

    @classmethod
    def load(cls, path: str | os.PathLike, *, alpha: float | None = None, key: str | None = None,
             dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> "LoRA":
        """Read a LoRA file: ours / ComfyUI (``lora_down``/``lora_up`` or ``lora_A``/``lora_B``, with
        ``.alpha``), or PEFT as LongLive saves it (``base_model.model.<path>.lora_A.weight``, possibly in
        a .pt under ``generator_lora``; pick another entry with `key`). `alpha` is used where the file
        stores none (PEFT); default = the module's rank. Not attached: call `attach(model)`."""
        return cls._from_pairs(read_pairs(path, alpha, key), dtype, device)

    @classmethod
    def from_weights(cls, sd: Mapping[str, torch.Tensor], *, alpha: float | None = None,
                     dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> "LoRA":
        """Build a LoRA from a flat dict in any layout `load` reads (see there)."""
        return cls._from_pairs(parse_pairs(sd, alpha), dtype, device)

    @classmethod
    def _from_pairs(cls, pairs: Pairs, dtype: torch.dtype, device) -> "LoRA":
        lora = cls(pairs.shapes, pairs.ranks, pairs.alpha, dtype=dtype, device=device)
        with torch.no_grad():
            for p in lora.paths:
                lora.layer(p).A.copy_(pairs.A[p])
                lora.layer(p).B.copy_(pairs.B[p])
        return lora

    # ---------------------------------------------------------------- internals
    def _resolve(self, model: nn.Module) -> dict[str, nn.Module]:
        """path -> Linear of `model` for every target; a clear error if any is missing or mis-shaped."""
        named = dict(model.named_modules())
        missing = [p for p in self.paths if p not in named]
        found, problems = {}, []
        for p in self.paths:
            if p in missing:
                continue
            mod = named[p]
            if not isinstance(mod, nn.Linear):
                problems.append(f"{p} is a {type(mod).__name__}, not a Linear")
                continue
            layer = self.layers[self._keys[p]]
            want = (layer.A.shape[1], layer.B.shape[0])
            if _in_out(mod) != want:
                problems.append(f"{p}: model has (in, out) = {_in_out(mod)}, LoRA expects {want}")
                continue
            found[p] = mod
        if missing or problems:
            msg = []
            if missing:
                msg.append(f"{len(missing)} of {len(self.paths)} LoRA module paths are missing from the model: "
                           + ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
                           + " (pass the Wan DiT itself; in ComfyUI that is model.model.diffusion_model)")
            if problems:
                msg.append("incompatible modules: " + "; ".join(problems[:10])
                           + (" ..." if len(problems) > 10 else "") + " (a LoRA for another model size?)")
            raise SelfForcingError(". ".join(msg))
        return found

    def _binding(self, model: nn.Module) -> _Binding | None:
        b = self._bindings.get(id(model))
        if b is not None and b.model_ref() is not model:  # a dead model's id was reused
            del self._bindings[id(model)]
            return None
        return b

    def _new_binding(self, model: nn.Module) -> _Binding:
        b = _Binding(weakref.ref(model), time.monotonic_ns())  # orders attachments to one model
        self._bindings[id(model)] = b
        return b

    @staticmethod
    def _restore_flags(b: _Binding, model: nn.Module) -> None:
        """Give back requires_grad=True to what this binding froze. If other LoRAs still sit on the model
        and this one came first, the oldest remaining one inherits the duty (restores when it leaves)."""
        if not b.frozen:
            b.frozen = None
            return
        others = {id(h.binding): h.binding for m in model.modules() for h in m._forward_hooks.values()
                  if isinstance(h, _Hook) and h.binding is not b}
        older = [o for o in others.values() if o.order < b.order]
        if others and not older:
            heir = min(others.values(), key=lambda o: o.order)
            heir.frozen = b.frozen + (heir.frozen or [])
        else:
            for p in b.frozen:
                p.requires_grad_(True)
        b.frozen = None


def find_targets(model: nn.Module, targets: Sequence[str] = DEFAULT_TARGETS) -> dict[str, nn.Linear]:
    """path -> Linear for every Linear of `model` whose path matches a pattern in `targets`
    ('*' = one path component; non-Linear matches such as ``ffn.1`` (GELU) are skipped).
    Raises if a pattern matches no Linear (a typo, or the wrong model)."""
    if isinstance(targets, str):
        targets = [targets]
    if not targets:
        raise SelfForcingError("no LoRA targets given")
    pats = [t.split(".") for t in targets]
    found: dict[str, nn.Linear] = {}
    used: set[int] = set()
    others: dict[int, list[str]] = {}
    for path, mod in model.named_modules():
        if not path:
            continue
        parts = path.split(".")
        for i, pat in enumerate(pats):
            if len(pat) == len(parts) and all(fnmatch.fnmatchcase(a, b) for a, b in zip(parts, pat)):
                if isinstance(mod, nn.Linear):
                    found[path] = mod
                    used.add(i)
                else:
                    others.setdefault(i, []).append(f"{path} ({type(mod).__name__})")
    unused = [i for i in range(len(targets)) if i not in used]
    if unused:
        lines = [f"{targets[i]!r}" + (f" (matches only non-Linear modules: {others[i][:3]})" if i in others else "")
                 for i in unused]
        raise SelfForcingError("LoRA target patterns matched no Linear module of the model: " + ", ".join(lines)
                               + "; targets must be Linear layers (pass the Wan DiT itself; in ComfyUI that is "
                               "model.model.diffusion_model)")
    return found


def _check_rank(rank, what: str) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise SelfForcingError(f"LoRA rank for {what} must be a positive integer, got {rank!r}")
    return rank


def _in_out(mod: nn.Module) -> tuple[int, int]:
    w = mod.weight
    return (getattr(mod, "in_features", w.shape[1]), getattr(mod, "out_features", w.shape[0]))


def _key_of(d: dict, value) -> int | None:
    return next((k for k, v in d.items() if v is value), None)
