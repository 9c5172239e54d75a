"""A stand-in encoder that costs nothing: the pipeline's ceiling, measured on any machine.

`StubEncoder` has `Encoder`'s interface and returns, for each batch, preallocated hidden states of the real model's
shapes (tokens = 1 + registers + h*w, hidden size, every captured block) in the compute dtype on the device. With it,
`dinofeat bench` times decode, batching, the copy to the host, statistics and shard writes at the rates they reach
when the model is free, so a slow writer shows on a 2-core CPU as plainly as on an H200. Its features are noise: a
cache made with it is only ever a benchmark's temporary cache. Imports torch only (benchmarks load it by path into
older trees to measure the before of a change).
"""

from __future__ import annotations

from typing import Any

import torch

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class StubEncoder:
    """`Encoder(info, device, dtype, compile, shapes, layers, layer_norm)` without weights or compute."""

    def __init__(
        self,
        info: Any,
        device: torch.device,
        dtype: str,
        compile: bool = False,
        shapes: int = 8,
        layers: tuple[int, ...] | None = None,
        layer_norm: bool = True,
    ) -> None:
        self.info = info
        self.device = device
        self.dtype = _DTYPES[dtype]
        self.layers = tuple(layers) if layers else (int(info.config.get("num_hidden_layers", 1)),)
        self._outputs: dict[int, torch.Tensor] = {}

    def _output(self, batch: int, tokens: int) -> torch.Tensor:
        """[B, T, D]: one preallocated image's worth per token count, expanded over the batch (no copy), so the stub
        costs nothing inside the timed run while every later copy of its output is a real one. Values vary by token
        and channel, so statistics and checksums work on realistic bytes rather than zeros."""
        if tokens not in self._outputs:
            dim = int(self.info.hidden_size)
            channel = torch.randn(dim, generator=torch.Generator().manual_seed(dim))
            ramp = torch.linspace(-1, 1, tokens)
            self._outputs[tokens] = (channel[None, None, :] + ramp[None, :, None]).to(self.device, self.dtype)
        return self._outputs[tokens].expand(batch, tokens, -1)

    @torch.inference_mode()
    def encode_variants(
        self, u8: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], flip: bool = False
    ) -> dict[tuple[int, bool], torch.Tensor]:
        """[B, H, W, 3] uint8 -> {(block, mirrored): [B, T, D]}; the pixels still travel to the device."""
        u8.to(self.device, non_blocking=True)
        patch = int(self.info.patch_size)
        tokens = 1 + int(self.info.num_register_tokens) + (u8.shape[1] // patch) * (u8.shape[2] // patch)
        out = self._output(u8.shape[0], tokens)
        states = {(k, False): out for k in self.layers}
        if flip:
            states |= {(k, True): out for k in self.layers}
        return states
