"""Which feature arrays a cache holds: chosen layers x variants (the image, its mirror) x token kinds. Pure.

The deepest chosen layer is the primary one and keeps the plain names `cls` / `patches` / `registers`, so a default
cache (last layer, no flip) looks exactly as before. Another chosen block k adds `_l{k}`; the features of the
horizontally mirrored image add `_flip` (`patches_l8_flip`). Blocks are numbered 1..num_layers, as in HF's
`output_hidden_states[k]` (index 0 there is the patch embedding, which is not offered).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dinofeat.errors import ConfigError

BASES = ("cls", "patches", "registers")
FLIP_SUFFIX = "_flip"


def parse_layers(spec: str | Sequence[int], num_layers: int) -> tuple[int, ...]:
    """'8,16,-1' -> (8, 16, num_layers): negative counts from the end (-1 = last block), ascending, no repeats."""
    if isinstance(spec, str):
        try:
            raw = [int(p) for p in spec.replace(" ", "").split(",") if p]
        except ValueError:
            raise ConfigError(f"layers must be comma-separated block numbers like 8,16,-1; got {spec!r}") from None
    else:
        raw = [int(p) for p in spec]
    if not raw:
        raise ConfigError("at least one layer is needed (-1 is the last block)")
    if num_layers == 0 and raw == [-1]:
        return (0,)  # a block-less model (a test fixture): its output is the patch embedding
    out = set()
    for k in raw:
        block = num_layers + 1 + k if k < 0 else k
        if not 1 <= block <= num_layers:
            raise ConfigError(f"layer {k} does not exist: the model has blocks 1..{num_layers} (or -1..-{num_layers})")
        out.add(block)
    return tuple(sorted(out))


def base_of(name: str) -> str:
    """'patches_l8_flip' -> 'patches': what decides an array's shape."""
    return name.split("_", 1)[0]


def ndim_of(name: str) -> int:
    """Dimensions of a feature array by its kind: rows, then (h, w, hidden), (registers, hidden) or (hidden,)."""
    return {"cls": 2, "patches": 4, "registers": 3}[base_of(name)]


def unflipped(name: str) -> str:
    return name[: -len(FLIP_SUFFIX)] if name.endswith(FLIP_SUFFIX) else name


@dataclass(frozen=True)
class ArraySet:
    """The arrays of one cache. `layer_norm`: the model's final LayerNorm is applied to every stored layer (as to
    `last_hidden_state`), so all layers share one scale and the last equals HF's output exactly."""

    layers: tuple[int, ...]
    flip: bool = False
    registers: bool = False
    layer_norm: bool = True

    def __post_init__(self) -> None:
        if not self.layers or list(self.layers) != sorted(set(self.layers)) or self.layers[0] < 0:
            raise ConfigError(f"layers must be ascending distinct block numbers, got {self.layers}")

    @property
    def primary(self) -> int:
        return self.layers[-1]

    def name(self, base: str, layer: int | None = None, flip: bool = False) -> str:
        """The array holding `base` tokens of block `layer` (None: the primary) of the image or its mirror."""
        if base not in BASES:
            raise KeyError(f"unknown token kind {base!r}; one of {BASES}")
        layer = self.primary if layer is None else layer
        if layer not in self.layers:
            raise KeyError(f"layer {layer} is not stored; stored layers: {list(self.layers)}")
        if flip and not self.flip:
            raise KeyError("the mirrored image's features are not stored (precompute with --flip)")
        return base + ("" if layer == self.primary else f"_l{layer}") + (FLIP_SUFFIX if flip else "")

    @property
    def variants(self) -> tuple[bool, ...]:
        return (False, True) if self.flip else (False,)

    @property
    def bases(self) -> tuple[str, ...]:
        return BASES if self.registers else BASES[:2]

    def names(self) -> list[str]:
        return [self.name(b, k, f) for f in self.variants for k in self.layers for b in self.bases]

    def extra_layer_names(self, flip: bool = False, layers: tuple[int, ...] | None = None) -> dict[str, str]:
        """Non-primary layers (all, or those in `layers`): sample key ('patches_l8') -> array holding it for the
        chosen variant. KeyError for a layer that is not stored."""
        for k in layers or ():
            self.name("cls", k)
        chosen = [k for k in self.layers if k != self.primary and (layers is None or k in layers)]
        return {self.name(b, k): self.name(b, k, flip) for k in chosen for b in self.bases}

    def is_default(self, num_layers: int) -> bool:
        """The last block of the image with the final norm (registers or not): the only feature set of dinofeat
        <= 0.3, whose caches are format 3 and whose fingerprints lack `features`."""
        return self.layers == (num_layers,) and self.layer_norm and not self.flip

    @property
    def copies(self) -> int:
        """How many (layer, variant) feature sets each image stores: the factor on bytes per image."""
        return len(self.layers) * len(self.variants)

    def stat_names(self) -> list[str]:
        """Arrays whose per-channel statistics are recorded: cls and patches of every layer; the two variants of a
        layer are pooled under the unflipped name, so a mirrored sample is normalised like its original."""
        return [self.name(b, k) for k in self.layers for b in ("cls", "patches")]

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers),
            "primary_layer": self.primary,
            "flip": self.flip,
            "registers": self.registers,
            "layer_norm": self.layer_norm,
            "names": self.names(),
        }

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> ArraySet:
        """The cache's arrays; caches written before `arrays` was recorded hold the last layer only."""
        rec = meta.get("arrays")
        if rec:
            return cls(tuple(rec["layers"]), bool(rec["flip"]), bool(rec["registers"]), bool(rec["layer_norm"]))
        return cls((cls.last_layer(meta),), False, bool(meta.get("registers_stored")), True)

    @staticmethod
    def last_layer(meta: dict[str, Any]) -> int:
        """The model's last block: the one layer a cache holds by default."""
        return int(meta.get("model", {}).get("config", {}).get("num_hidden_layers", 1))
