"""The DiT integration example in docs/ runs as written."""

from __future__ import annotations

import math
import re
from pathlib import Path

from dinofeat.precompute import extract
from tests.helpers import FAST, write_images

DOC = Path(__file__).resolve().parents[1] / "docs" / "dit-integration.md"


def test_dit_integration_example_runs(tmp_path, dinov3_path):
    imgs = tmp_path / "imgs"
    write_images(imgs, [(64, 48)] * 5 + [(48, 64)] * 4)
    extract(imgs, tmp_path / "cache", model=str(dinov3_path), area=64, **FAST)
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    ns: dict = {}
    exec(compile(code, str(DOC), "exec"), ns)
    loss = ns["train_steps"](str(tmp_path / "cache"), steps=2)
    assert math.isfinite(loss) and loss > 0
