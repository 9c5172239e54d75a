"""`dinofeat bench`: the FLOP model against torch's own counter, and the command end to end on a tiny model."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from dinofeat.cli import app
from dinofeat.inspection.bench import bench, vit_flops


def _configs():
    from transformers import Dinov2Config, Dinov2WithRegistersConfig, DINOv3ViTConfig

    small = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    return [
        (DINOv3ViTConfig(patch_size=16, num_register_tokens=4, intermediate_size=128, **small), (4, 6), 4),
        (
            DINOv3ViTConfig(
                patch_size=16,
                num_register_tokens=4,
                intermediate_size=96,
                use_gated_mlp=True,
                hidden_act="silu",
                **small,
            ),
            (5, 3),
            4,
        ),
        (Dinov2Config(patch_size=14, image_size=56, mlp_ratio=2, **small), (4, 4), 0),
        (Dinov2Config(patch_size=14, image_size=56, mlp_ratio=4, use_swiglu_ffn=True, **small), (3, 5), 0),
        (
            Dinov2WithRegistersConfig(patch_size=14, image_size=56, mlp_ratio=2, num_register_tokens=4, **small),
            (2, 7),
            4,
        ),
    ]


@pytest.mark.parametrize("case", range(5))
def test_vit_flops_equal_torch_flop_counter(case):
    from transformers import AutoModel

    cfg, grid, registers = _configs()[case]
    model = AutoModel.from_config(cfg, attn_implementation="eager").eval()  # eager: the counter sees attention
    p = cfg.patch_size
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(pixel_values=torch.randn(1, 3, grid[0] * p, grid[1] * p))
    assert vit_flops(cfg.to_dict(), grid, registers) == counter.get_total_flops()


def test_bench_on_a_tiny_model(dinov3_path):
    r = bench(
        str(dinov3_path), area=64, device="cpu", dtype="fp32", count=6, megapixels=0.05, workers=0, progress=False
    )
    assert r.images == 6 and r.buckets >= 1 and r.device == "cpu" and r.dtype == "fp32"
    assert r.model_only_img_s > 0 and r.end_to_end_img_s > 0 and r.end_to_end_wall_img_s > 0
    assert r.peak_tflops > 0 and r.utilization > 0
    assert r.eta_s(2000) == pytest.approx(2 * r.eta_s(1000)) == pytest.approx(4 * r.eta_s(1000, processes=2))
    assert set(r.to_dict()) >= {"model_only_img_s", "end_to_end_over_model_only", "utilization", "writes_over_dropped"}
    # the pipeline's ceiling: a stub encoder with writes, and without; where the writes' time went
    assert r.pipeline_img_s > 0 and r.pipeline_dropped_img_s > 0 and r.pipeline_shards >= 1
    assert {"loader_wait", "encode", "host_copy", "writer_stats", "writer_write", "writer_marker"} <= set(
        r.pipeline_timings
    )


def test_bench_command(dinov3_path, tmp_path):
    from tests.helpers import write_images

    write_images(tmp_path / "imgs", [(64, 48)] * 4)
    args = ["bench", "--model", str(dinov3_path), "--area", "64", "--device", "cpu", "--dtype", "fp32"]
    out = CliRunner().invoke(app, [*args, "--images", str(tmp_path / "imgs"), "--eta-images", "1000000"])
    assert out.exit_code == 0, out.output
    assert "model-only" in out.output and "end-to-end" in out.output and "1,000,000 images" in out.output
    assert "with a stub model" in out.output and "write + fsync" in out.output
    bad = CliRunner().invoke(app, ["bench", "--model", "random:nope"])
    assert bad.exit_code == 1 and "unknown random model" in bad.output


def _folder_with_bad_files(d):
    """Four good images, a truncated JPEG (its header reads, its pixels do not) and a .png that is no image."""
    from tests.helpers import write_images

    write_images(d, [(64, 48)] * 3 + [(48, 64)])
    (full,) = write_images(d / "tmp", [(256, 192)], fmt="jpg")  # its header, but not its pixels, in the first half
    data = full.read_bytes()
    (d / "cut.jpg").write_bytes(data[: len(data) // 2])
    full.unlink()
    (d / "tmp").rmdir()
    (d / "notes.png").write_bytes(b"not an image at all")
    return d


def test_bench_skips_and_counts_bad_files_as_precompute_does(dinov3_path, tmp_path):
    """Issue 30.5: a truncated JPEG among good ones ended bench in a traceback (its model-only pass decoded every
    planned image). Now both are skipped and counted, with precompute's reasons, and the good ones are timed."""
    imgs = _folder_with_bad_files(tmp_path / "imgs")
    lines: list[str] = []
    r = bench(
        str(dinov3_path), area=64, device="cpu", dtype="fp32", images=imgs, workers=0, progress=False, say=lines.append
    )
    assert r.images == 4 and r.failed == 2, r
    assert r.failures_by_reason == {"corrupt or truncated": 1, "not an image (unidentified format)": 1}
    assert r.model_only_img_s > 0 and r.end_to_end_img_s > 0
    # the up-front estimate says how rough it is; a measured one follows the warm-up pass
    assert "rough guess" in lines[0] and any(line.startswith("bench: measured: the rest takes about") for line in lines)

    args = ["bench", "--model", str(dinov3_path), "--area", "64", "--device", "cpu", "--dtype", "fp32"]
    out = CliRunner().invoke(app, [*args, "--images", str(imgs), "--workers", "0"])
    assert out.exit_code == 0, out.output
    assert "skipped 2 unreadable images, as precompute skips them (corrupt or truncated 1, not an image" in out.output
    assert "Traceback" not in out.output


def test_bench_on_a_folder_of_only_bad_files_says_so(dinov3_path, tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    (d / "a.png").write_bytes(b"no image")
    data = _folder_with_bad_files(tmp_path / "other")
    (d / "cut.jpg").write_bytes((data / "cut.jpg").read_bytes())
    out = CliRunner().invoke(app, ["bench", "--model", str(dinov3_path), "--area", "64", "--images", str(d)])
    assert out.exit_code == 1 and "none of the 2 images could be read (2 unreadable)" in out.output, out.output
