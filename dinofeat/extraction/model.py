"""The encoder: the only module that imports transformers.

`load_model_info` reads just the config (cheap, used to validate settings before any work); `Encoder` holds the
weights on a device in eval mode and turns uint8 batches into `last_hidden_state`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from dinofeat.errors import ConfigError
from dinofeat.paths import model_ref

SUPPORTED_TYPES = ("dinov3_vit", "dinov2", "dinov2_with_registers")
RANDOM_PREFIX = "random:"
RANDOM_SEED = 0

# Published DINOv3 ViT shapes (patch 16, 4 registers). Random weights, real architecture and cost.
_DINOV3_BASE: dict[str, Any] = {
    "patch_size": 16,
    "num_register_tokens": 4,
    "layer_norm_eps": 1e-5,
    "rope_theta": 100.0,
    "layerscale_value": 1.0,
    "key_bias": False,
    "pos_embed_rescale": 2.0,
}
RANDOM_ARCHS: dict[str, dict[str, Any]] = {
    "vits16": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "intermediate_size": 1536},
    "vits16plus": {
        "hidden_size": 384,
        "num_hidden_layers": 12,
        "num_attention_heads": 6,
        "intermediate_size": 1536,
        "use_gated_mlp": True,
        "hidden_act": "silu",
    },
    "vitb16": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
    "vitl16": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096},
    "vith16plus": {
        "hidden_size": 1280,
        "num_hidden_layers": 32,
        "num_attention_heads": 20,
        "intermediate_size": 5120,
        "use_gated_mlp": True,
        "hidden_act": "silu",
    },
    "vit7b16": {
        "hidden_size": 4096,
        "num_hidden_layers": 40,
        "num_attention_heads": 32,
        "intermediate_size": 8192,
        "use_gated_mlp": True,
        "hidden_act": "silu",
    },
}

TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class ModelInfo:
    """What the rest of the pipeline needs to know about a model, read from its config."""

    id: str
    revision: str | None
    model_type: str
    patch_size: int
    num_register_tokens: int
    hidden_size: int
    config: dict[str, Any]
    random: bool
    local_only: bool = False  # the hub is unreachable: weights come from the local hub cache (not stored anywhere)

    @property
    def num_layers(self) -> int:
        return int(self.config.get("num_hidden_layers", 1))

    @property
    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.config, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "revision": self.revision,
            "model_type": self.model_type,
            "patch_size": self.patch_size,
            "num_register_tokens": self.num_register_tokens,
            "hidden_size": self.hidden_size,
            "config_hash": self.config_hash,
            "random_weights": self.random,
            "config": self.config,
        }


def _random_config(spec: str) -> Any:
    from transformers import DINOv3ViTConfig

    arch = spec[len(RANDOM_PREFIX) :]
    if arch not in RANDOM_ARCHS:
        raise ConfigError(
            f"unknown random model {spec!r}; choose one of: " + ", ".join(RANDOM_PREFIX + a for a in RANDOM_ARCHS)
        )
    return DINOv3ViTConfig(**_DINOV3_BASE, **RANDOM_ARCHS[arch])


def _load_config(spec: str, revision: str | None) -> tuple[Any, bool]:
    """The model's config, and whether its files must come from the local hub cache (the hub is unreachable)."""
    if spec.startswith(RANDOM_PREFIX):
        return _random_config(spec), False
    from transformers import AutoConfig

    local = os.path.isdir(spec)
    if not local and (spec.startswith((".", "/", "~")) or os.sep + os.sep in spec):
        raise ConfigError(f"model {spec!r} is neither a local directory (it does not exist) nor a hub id")
    offline = None if local else hub_unreachable()
    try:
        cfg = AutoConfig.from_pretrained(spec, revision=revision, local_files_only=local or offline is not None)
        return cfg, offline is not None
    except Exception as e:  # hub errors, missing dirs, bad json: all configuration problems
        if offline is not None:
            todo = (
                "unset it to download"
                if "HF_HUB_OFFLINE" in offline
                else "connect to download it (set HF_HUB_OFFLINE=1 to skip the hub check)"
            )
            raise ConfigError(
                f"cannot reach the Hugging Face hub ({offline}) and {spec!r} is not in the local hub cache: {todo}, "
                "or pass a local model directory (made with save_pretrained) as --model"
            ) from None
        where = "local directory" if local else "hub id"
        raise ConfigError(f"cannot load model config from {where} {spec!r}: {_first_line(e)}") from e


# what save_pretrained writes (one file, or an index of several): a directory with none of them has no weights
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def _check_weights(spec: str) -> None:
    """A local model directory must hold weights: checked with the config, before a cache is made for it."""
    if os.path.isdir(spec) and not any(os.path.isfile(os.path.join(spec, f)) for f in WEIGHT_FILES):
        raise ConfigError(
            f"local model directory {spec!r} has a config but no weights (looked for {', '.join(WEIGHT_FILES)})"
        )
    if os.path.isdir(spec):
        for name in sorted(os.listdir(spec)):
            if name.endswith(".safetensors"):
                why = safetensors_damage(os.path.join(spec, name))
                if why:
                    raise ConfigError(
                        f"model weights {os.path.join(spec, name)!r} are damaged ({why}): copy them again"
                    )


def safetensors_damage(path: str) -> str | None:
    """Why a .safetensors file cannot be whole (a truncated copy or download), from its header alone: 8 bytes of
    header length, a JSON header, then the tensors' bytes, the last ending exactly at the end of the file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{size} bytes, shorter than its header"
        n = int.from_bytes(head, "little")
        if 8 + n > size:
            return f"its header says {8 + n} bytes or more, the file has {size}"
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return "its header is not JSON"
    ends = [int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)]
    if 8 + n + max(ends, default=0) != size:
        return f"its tensors need {8 + n + max(ends, default=0)} bytes, the file has {size}"
    return None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def hub_unreachable(timeout_s: float = 3.0) -> str | None:
    """Why the hub cannot be reached (None if it answers a TCP connect within `timeout_s`, or HF_HUB_OFFLINE is set
    and the hub is not to be asked at all). Checked once before loading, so a machine without network fails in
    seconds with one line instead of a minute of the hub client's retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        return f"{host}:{port}: {e.strerror or e}"
    return None


def _info_from_config(spec: str, revision: str | None, cfg: Any) -> ModelInfo:
    model_type = getattr(cfg, "model_type", "?")
    if model_type not in SUPPORTED_TYPES:
        raise ConfigError(f"model type {model_type!r} is not supported; dinofeat reads {', '.join(SUPPORTED_TYPES)}")
    patch = cfg.patch_size
    if not isinstance(patch, int):
        if len(set(patch)) != 1:
            raise ConfigError(f"non-square patch size {patch} is not supported")
        patch = int(patch[0])
    d = cfg.to_dict()
    for volatile in ("transformers_version", "_name_or_path", "_commit_hash", "torch_dtype", "dtype", "architectures"):
        d.pop(volatile, None)
    return ModelInfo(
        id=spec,
        revision=revision or getattr(cfg, "_commit_hash", None),
        model_type=model_type,
        patch_size=int(patch),
        num_register_tokens=int(getattr(cfg, "num_register_tokens", 0) or 0),
        hidden_size=int(cfg.hidden_size),
        config=d,
        random=spec.startswith(RANDOM_PREFIX),
    )


def load_model_info(spec: str, revision: str | None = None) -> ModelInfo:
    """Config only: fast, and raises ConfigError before any image is touched."""
    cfg, local_only = _load_config(spec, revision)
    _check_weights(spec)
    return replace(_info_from_config(model_ref(spec), revision, cfg), local_only=local_only)


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"bad device {device!r}: {e}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda requested but CUDA is not available")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """'auto' -> fp16 on CUDA, bf16 on a CPU with native bf16 (AVX512-BF16 or AMX), else fp32."""
    if dtype != "auto":
        return dtype
    if device.type == "cuda":
        return "fp16"
    native = [getattr(torch.cpu, f, lambda: False) for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if device.type == "cpu" and any(check() for check in native):  # both probes are private: absent means no
        return "bf16"
    return "fp32"


def normalize_on_device(u8: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], dtype: torch.dtype):
    """[B, H, W, 3] uint8 -> [B, 3, H, W] in `dtype`: x/255, (x - mean)/std, computed in fp32 then cast."""
    x = u8.permute(0, 3, 1, 2).float()
    m = torch.tensor(mean, device=x.device, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    s = torch.tensor(std, device=x.device, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    return ((x - m) / s).to(dtype)


def _blocks_and_norm(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.LayerNorm]:
    """The module holding the transformer blocks (its `.layer` list) and the final LayerNorm, per architecture."""
    if hasattr(model, "norm") and hasattr(model, "model"):  # DINOv3ViTModel: model.model.layer, model.norm
        return model.model, model.norm
    return model.encoder, model.layernorm  # Dinov2Model, Dinov2WithRegistersModel


def _raise_recompile_limits(shapes: int) -> None:
    """Room for one compiled graph per bucket shape. torch 2.6 renamed dynamo's limits (`cache_size_limit` ->
    `recompile_limit`); older releases have the old names only."""
    import torch._dynamo.config as dynamo_config

    for new, old, want in (
        ("recompile_limit", "cache_size_limit", shapes),
        ("accumulated_recompile_limit", "accumulated_cache_size_limit", 2 * shapes),
    ):
        name = new if hasattr(dynamo_config, new) else old
        setattr(dynamo_config, name, max(int(getattr(dynamo_config, name)), want))


@contextlib.contextmanager
def _no_loading_bar() -> Iterator[None]:
    """transformers 5 draws a bar of its own while it copies weights into the model (not a download: those bars are
    huggingface_hub's and stay). It ignored --quiet and wrote `\\r` frames into batch logs; dinofeat's own bars
    (dinofeat.progress) say where a run is."""
    from transformers.utils import logging as hf_logging

    hook = getattr(hf_logging, "set_tqdm_hook", None)  # transformers >= 5
    if hook is None:
        yield
        return
    previous = hook(lambda factory, args, kwargs: factory(*args, **{**kwargs, "disable": True}))
    try:
        yield
    finally:
        hook(previous)


RANDOM_CACHE_MAX_PARAMS = 500_000_000  # random weights kept on disk up to ViT-L/H size (2 GB in fp32), not 7B


def random_model(spec: str) -> torch.nn.Module:
    """A `random:` model's seeded weights (the same every time, so validate --recompute can rebuild them). Drawing
    them is slow (ViT-L/16: ~10 s of CPU initialisation, most of a benchmark's start-up), so the first draw is saved
    under `random_weights_dir()` and later runs load it (bit-identical), keyed by the config and the torch and
    transformers versions whose initialisers drew it."""
    from transformers import AutoModel

    cfg = _random_config(spec)
    cfg._attn_implementation = "sdpa"
    folder = random_weights_dir() / _random_key(cfg)
    if folder.exists():
        try:
            return AutoModel.from_pretrained(folder, attn_implementation="sdpa", local_files_only=True)
        except Exception:  # a damaged or partial copy: draw again, and save a fresh one in its place
            shutil.rmtree(folder, ignore_errors=True)
    state = torch.random.get_rng_state()
    torch.manual_seed(RANDOM_SEED)
    try:
        model = AutoModel.from_config(cfg, attn_implementation="sdpa")
    finally:
        torch.random.set_rng_state(state)
    if sum(p.numel() for p in model.parameters()) <= RANDOM_CACHE_MAX_PARAMS:
        _save_quietly(model, folder)
    return model


def random_weights_dir() -> Path:
    """$DINOFEAT_CACHE_DIR/random, else $XDG_CACHE_HOME/dinofeat/random, else ~/.cache/dinofeat/random."""
    base = os.environ.get("DINOFEAT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dinofeat"
    )
    return Path(base) / "random"


def _random_key(cfg: Any) -> str:
    import transformers

    doc = json.dumps([cfg.to_dict(), RANDOM_SEED, torch.__version__, transformers.__version__], sort_keys=True)
    return f"{cfg.model_type}-{hashlib.sha256(doc.encode()).hexdigest()[:16]}"


def _save_quietly(model: torch.nn.Module, folder: Path) -> None:
    """Saved into a temp folder, fsynced, renamed into place (a concurrent saver's rename wins; a reader sees all or
    none); a cache that cannot be written (read-only home, full disk) only costs the next run its draw again."""
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    try:
        model.save_pretrained(tmp)
        for f in tmp.iterdir():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, folder)
    except Exception:  # never the run's failure: the weights in memory are the ones drawn
        shutil.rmtree(tmp, ignore_errors=True)


class Encoder:
    """Weights on a device, eval mode (DINOv3's RoPE jitters positions in train mode), SDPA attention.

    `layers` (block numbers, ascending; default the last) are captured with forward hooks on those blocks; blocks
    after the deepest one are dropped from the model, so `--layers 8` on a 24-block model costs a third. With
    `layer_norm` the final LayerNorm is applied to every captured layer (the last one then equals HF's
    `last_hidden_state`, the default path)."""

    def __init__(
        self,
        info: ModelInfo,
        device: torch.device,
        dtype: str,
        compile: bool = False,
        shapes: int = 8,
        layers: tuple[int, ...] | None = None,
        layer_norm: bool = True,
    ) -> None:
        self.info = info
        self.device = device
        self.dtype_name = dtype
        self.dtype = TORCH_DTYPES[dtype]
        self.layers = tuple(layers) if layers else (info.num_layers,)
        self.layer_norm = layer_norm
        self.model = self._build()
        self.model.eval()
        self._captured: dict[int, torch.Tensor] = {}
        self._hooked = self.layers != (info.num_layers,) or not layer_norm
        if self._hooked:
            self._install_hooks()
        if compile:
            # one graph per bucket shape; past dynamo's recompile limit (8) it would silently fall back to eager
            _raise_recompile_limits(shapes)
            self.model = torch.compile(self.model, dynamic=False)

    def _install_hooks(self) -> None:
        holder, self._norm = _blocks_and_norm(self.model)
        blocks = holder.layer
        if not all(1 <= k <= len(blocks) for k in self.layers):
            raise ConfigError(f"layers {list(self.layers)} outside the model's blocks 1..{len(blocks)}")
        holder.layer = torch.nn.ModuleList(list(blocks)[: self.layers[-1]])  # later blocks would be wasted work
        for k in self.layers:
            holder.layer[k - 1].register_forward_hook(self._capture(k))

    def _capture(self, k: int) -> Any:
        def hook(_module: torch.nn.Module, _args: Any, output: Any) -> None:
            self._captured[k] = output[0] if isinstance(output, tuple) else output

        return hook

    def _build(self) -> torch.nn.Module:
        with _no_loading_bar():
            return self._load()

    def _load(self) -> torch.nn.Module:
        from transformers import AutoModel

        if self.info.random:
            model = random_model(self.info.id)
        else:
            try:
                model = AutoModel.from_pretrained(
                    self.info.id,
                    revision=self.info.revision,
                    attn_implementation="sdpa",
                    local_files_only=self.info.local_only,
                )
            except Exception as e:
                raise ConfigError(f"cannot load model weights {self.info.id!r}: {e}") from e
        return model.to(device=self.device, dtype=self.dtype)

    @torch.inference_mode()
    def hidden_states(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] normalised input -> last_hidden_state [B, T, D] (of the full model only)."""
        if self._hooked:
            raise RuntimeError("this encoder captures chosen layers; use layer_states()")
        return self.model(pixel_values=pixel_values.to(self.device, self.dtype)).last_hidden_state

    @torch.inference_mode()
    def layer_states(self, pixel_values: torch.Tensor) -> dict[int, torch.Tensor]:
        """[B, 3, H, W] normalised input -> {block: [B, T, D]} for every chosen block."""
        x = pixel_values.to(self.device, self.dtype)
        if not self._hooked:
            return {self.layers[0]: self.model(pixel_values=x).last_hidden_state}
        self._captured.clear()
        self.model(pixel_values=x)
        out = {k: self._captured.pop(k) for k in self.layers}
        return {k: self._norm(v) for k, v in out.items()} if self.layer_norm else out

    @torch.inference_mode()
    def encode_uint8(self, u8: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
        """[B, H, W, 3] uint8 (CPU, possibly pinned) -> last_hidden_state [B, T, D] on the device."""
        x = u8.to(self.device, non_blocking=True)
        return self.hidden_states(normalize_on_device(x, mean, std, self.dtype))

    @torch.inference_mode()
    def encode_variants(
        self, u8: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], flip: bool = False
    ) -> dict[tuple[int, bool], torch.Tensor]:
        """[B, H, W, 3] uint8 -> {(block, mirrored): [B, T, D]}. With `flip` the mirrored images (width axis
        reversed, on the device) run in the same forward pass as the originals."""
        x = u8.to(self.device, non_blocking=True)
        if flip:
            x = torch.cat([x, x.flip(2)])
        states = self.layer_states(normalize_on_device(x, mean, std, self.dtype))
        n = u8.shape[0]
        out = {(k, False): v[:n] for k, v in states.items()}
        if flip:
            out |= {(k, True): v[n:] for k, v in states.items()}
        return out
