"""The DiT integration example in docs/ runs as written, on a tied, flipped cache, and its grid mapping is right."""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from dinofeat.precompute import extract
from tests.helpers import FAST, write_images

DOC = Path(__file__).resolve().parents[1] / "docs" / "dit-integration.md"


def _example() -> dict:
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    ns: dict = {}
    exec(compile(code, str(DOC), "exec"), ns)
    return ns


def test_dit_integration_example_runs(tmp_path, dinov3_path):
    imgs = tmp_path / "imgs"
    write_images(imgs, [(128, 64)] * 5 + [(64, 128)] * 4 + [(96, 96)] * 3)
    s = extract(
        imgs, tmp_path / "cache", model=str(dinov3_path), area=128, dit_scale="1/2", flip=True, num_buckets=5, **FAST
    )
    assert s.done == 12
    loss = _example()["train_steps"](str(tmp_path / "cache"), epochs=3)
    assert math.isfinite(loss) and loss > 0


def test_dit_token_ij_gets_dino_patch_i_div_k():
    spread = _example()["dino_on_dit_grid"]
    patches = torch.randn(2, 3, 5, 7)
    for k in (1, 2, 3):
        out = spread(patches, k)
        assert out.shape == (2, 3 * k, 5 * k, 7)
        for i in range(3 * k):
            for j in range(5 * k):
                assert torch.equal(out[:, i, j], patches[:, i // k, j // k])
