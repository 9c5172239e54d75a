"""Bar chart of a `benchmarks/read.py` result: samples/s per layout in each (workers, page cache) cell, with
dinofeat's ratios to the raw flat file (the limit) and to .npy under each cell. Pillow only.

    python benchmarks/plot_read.py benchmarks/results-read-cpu.json docs/images/read-benchmark.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLORS = {
    "dinofeat": (46, 117, 182),
    "dinofeat_unverified": (140, 180, 220),
    "npy": (237, 125, 49),
    "raw": (150, 150, 150),
}


def plot(result: dict, out: Path) -> None:
    rows = result["results"]
    cells = list(dict.fromkeys((r["workers"], r["page_cache"]) for r in rows))
    layouts = list(dict.fromkeys(r["layout"] for r in rows))
    value = {(r["workers"], r["page_cache"], r["layout"]): r["samples_s"] for r in rows}
    top = max(value.values()) * 1.1
    w, h, left, bottom, head = 900, 460, 70, 60, 60
    im = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(im)
    font = ImageFont.load_default()
    plot_h = h - bottom - head
    d.text(
        (left, 15),
        f"Random reads, {result['images']} images x {result['bytes_per_image'] / 2**10:.0f} KiB, "
        f"DataLoader batch {result['batch']} (median samples/s; higher is better)",
        fill="black",
        font=font,
    )
    for k in range(6):  # y grid
        v = top * k / 5
        y = h - bottom - plot_h * k / 5
        d.line((left, y, w - 20, y), fill=(225, 225, 225))
        d.text((5, y - 6), f"{v:,.0f}", fill="black", font=font)
    cell_w = (w - left - 20) / len(cells)
    bar_w = cell_w / (len(layouts) + 1)
    for c, (workers, state) in enumerate(cells):
        x0 = left + c * cell_w + bar_w / 2
        for j, name in enumerate(layouts):
            v = value[(workers, state, name)]
            y = h - bottom - plot_h * v / top
            d.rectangle((x0 + j * bar_w, y, x0 + (j + 1) * bar_w - 4, h - bottom), fill=COLORS.get(name, "black"))
            d.text((x0 + j * bar_w, y - 13), f"{v:,.0f}", fill="black", font=font)
        ratio = result["ratios"].get(f"{workers}w_{state}", {})
        label = f"{workers} workers, {state}"
        d.text((x0, h - bottom + 8), label, fill="black", font=font)
        d.text(
            (x0, h - bottom + 22),
            f"{ratio.get('over_raw', 0):.2f}x raw, {ratio.get('over_npy', 0):.2f}x npy",
            fill="black",
            font=font,
        )
    for j, name in enumerate(layouts):
        x = w - 260 + j * 85
        d.rectangle((x, 38, x + 12, 50), fill=COLORS.get(name, "black"))
        d.text((x + 16, 38), name, fill="black", font=font)
    out.parent.mkdir(parents=True, exist_ok=True)
    im.save(out)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("result", type=Path)
    ap.add_argument("out", type=Path)
    a = ap.parse_args()
    plot(json.loads(a.result.read_text()), a.out)
    print(a.out)
