"""The benchmark suite's plumbing on the tiny model (1 frame, 2 steps): records, tables, chart. No timing asserted."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dreampose.utils import DreamPoseError


def _numbers(obj, path=""):
    """Every int / float leaf of a JSON object, with its path (booleans excluded)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield path, obj


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    from benchmarks.cli import main

    out = tmp_path_factory.mktemp("bench")
    argv = ["--device", "cpu", "--model", "tiny", "--frames", "2", "--baseline-frames", "1", "--steps", "2",
            "--repeats", "2",
            "--warmup", "0", "--backends", "baseline,torch,tensorrt", "--micro-rounds", "1", "--out-dir", str(out),
            "--quiet"]  # fmt: skip
    assert main(argv) == 0
    files = sorted(out.iterdir())
    return out, files


def test_bench_writes_json_markdown_and_png(bench_run):
    out, files = bench_run
    names = [f.name for f in files]
    assert [f.suffix for f in files] == [".json", ".md", ".png"], names
    assert all(f.stem.startswith("bench_cpu_tiny_") for f in files), names
    from PIL import Image

    with Image.open(files[2]) as img:
        assert img.format == "PNG" and img.width > 100 and img.height > 100
    md = files[1].read_text()
    for name in ("baseline", "torch"):
        assert f"| {name} |" in md
    assert "tensorrt" in md  # listed as not measured, with the reason


def test_bench_json_fields_and_positive_numbers(bench_run):
    _, files = bench_run
    rec = json.loads(files[0].read_text())
    for key in ("date", "device", "versions", "settings", "model", "flops", "variants", "unavailable", "micro",
                "memory_kind", "timing"):  # fmt: skip
        assert key in rec, key
    assert rec["device"]["type"] == "cpu" and rec["device"]["name"]
    # --baseline-frames 1: the baseline renders one frame in its batched mode, the runtime both
    assert rec["variants"]["baseline"]["batched"]["frames"] == 1
    assert rec["variants"]["torch"]["batched"]["frames"] == 2
    assert rec["versions"]["torch"] == torch.__version__
    assert rec["settings"]["sampling"]["steps"] == 2 and rec["settings"]["frames"] == 2
    assert rec["memory_kind"] in ("process_rss_peak", "process_rss_lifetime_peak")
    assert set(rec["variants"]) == {"baseline", "torch"}
    assert "tensorrt" in rec["unavailable"] and rec["unavailable"]["tensorrt"]
    for name, v in rec["variants"].items():
        for mode in ("one_frame", "batched"):
            m = v[mode]
            for key in ("seconds_per_frame", "frames_per_second", "breakdown_per_frame", "unet_ms_per_call",
                        "guidance_update_ms_per_step", "peak_memory_bytes", "flops_per_frame", "achieved_tflops",
                        "speedup_vs_baseline"):  # fmt: skip
                assert key in m, (name, mode, key)
            assert set(m["breakdown_per_frame"]) == {"encode_s", "unet_s", "guidance_update_s", "decode_s", "other_s"}
            # PNDM at 2 steps (skip_prk_steps): 3 UNet calls, each followed by one update
            assert m["calls"]["unet"] == m["calls"]["guidance_update"] == 3
            assert m["seconds_per_frame"]["p95"] >= m["seconds_per_frame"]["median"] >= m["seconds_per_frame"]["min"]
    assert rec["variants"]["baseline"]["one_frame"]["speedup_vs_baseline"] == 1.0
    bad = [(p, x) for p, x in _numbers({k: rec[k] for k in ("variants", "flops", "micro")})
           if not (math.isfinite(x) and x > 0)]  # fmt: skip
    assert not bad, bad
    assert "skipped" in rec["micro"]["fused_step"]  # CUDA only
    assert set(rec["micro"]["unet_call"]["median_ms_per_call"]) == {"baseline", "torch"}


def test_flop_count_matches_performance_doc_for_sd15():
    """On a meta copy, the SD 1.5-size UNet at 80 x 64 costs ~1.04 TFLOP per sample (performance.md: ~1.05)."""
    from dreampose.model import DreamPoseModel
    from benchmarks.measure import dreampose_flops

    with torch.device("meta"):
        model = DreamPoseModel.sd15_random()
    f = dreampose_flops(model)
    assert 0.95e12 < f["unet_per_sample"] < 1.15e12
    assert 2.9e12 < f["vae_decode_per_frame"] < 3.5e12


def test_flop_count_includes_attention_and_uses_a_meta_copy(tiny_model):
    """Attention is counted on meta (4 B H L^2 D for QK^T and PV), and the copy leaves the model untouched."""
    from benchmarks.measure import count_flops, meta_copy

    b, heads, length, d = 2, 4, 96, 16
    q = torch.empty(b, heads, length, d, device="meta")
    assert count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q)) == 4 * b * heads * length**2 * d
    meta = meta_copy(tiny_model)
    assert all(p.device.type == "meta" for p in meta.parameters())
    assert all(p.device.type == "cpu" for p in tiny_model.parameters())


def test_peak_table_and_settings_checks():
    from benchmarks.measure import device_peak_tflops
    from benchmarks.suite import BenchSettings

    assert device_peak_tflops("NVIDIA H100 80GB HBM3")[0] == 800.0
    assert device_peak_tflops("NVIDIA H100 PCIe")[0] == 756.0
    assert device_peak_tflops("NVIDIA A100-SXM4-80GB")[0] == 312.0
    assert device_peak_tflops("Some Future GPU")[0] is None
    with pytest.raises(DreamPoseError, match="unknown backend"):
        BenchSettings(backends=["torch", "tensorflow"])
    with pytest.raises(DreamPoseError, match="frames_per_batch"):
        BenchSettings(frames=2, frames_per_batch=3)
    with pytest.raises(DreamPoseError, match="baseline_frames must be in 1..frames"):
        BenchSettings(frames=2, baseline_frames=3)


def test_bench_unet_times_each_variant_and_rejects_a_wrong_one(tiny_model, monkeypatch, tmp_path):
    """bench_unet on the CPU (tiny model): every variant checked against the fp32 call before it is timed."""
    from benchmarks import bench_unet

    rec = bench_unet.bench(tiny_model, ["fp32", "fp32-cl", "bf16-cl"], [3, 6], torch.device("cpu"), rounds=1,
                           replays=1)  # fmt: skip
    assert set(rec["results"]) == {f"{v}@{b}" for v in ("fp32", "fp32-cl", "bf16-cl") for b in (3, 6)}
    for key, r in rec["results"].items():
        assert r["ms_per_call"] > 0 and r["tflops"] > 0 and r["batch"] in (3, 6), key
    assert rec["results"]["fp32@3"]["rel_err_vs_fp32"] == 0.0
    assert rec["results"]["fp32-cl@3"]["rel_err_vs_fp32"] < 1e-5
    assert 1e-4 < rec["results"]["bf16-cl@3"]["rel_err_vs_fp32"] < 8e-2
    assert rec["flops_per_sample"] > 0 and not rec["rejected"]

    # a variant whose output is off is listed with its error, not timed
    monkeypatch.setitem(bench_unet.REL_TOL, torch.bfloat16, 1e-6)
    rec = bench_unet.bench(tiny_model, ["fp32", "bf16"], [3], torch.device("cpu"), rounds=1, replays=1)
    assert list(rec["results"]) == ["fp32@3"]
    assert "bf16@3" in rec["rejected"] and "tolerance" in rec["rejected"]["bf16@3"]
    with pytest.raises(ValueError, match="unknown variant 'fp8'"):
        bench_unet.VariantSpec.parse("fp8")
    for bad in ("fp16-flash-math", "fp16-cl-cl", "fp16-xl"):
        with pytest.raises(ValueError, match="unknown variant"):
            bench_unet.VariantSpec.parse(bad)
    assert bench_unet.VariantSpec.parse("bf16-cl-cudnnattn").attention == "cudnnattn"

    # attention kernels pinned: math and flash run on the CPU; the CUDA-only one fails and is listed
    rec = bench_unet.bench(tiny_model, ["fp32", "fp32-math", "fp32-flash", "fp32-efficient"], [3],
                           torch.device("cpu"), rounds=1, replays=1)  # fmt: skip
    assert set(rec["results"]) == {"fp32@3", "fp32-math@3", "fp32-flash@3"}
    assert rec["results"]["fp32-math@3"]["rel_err_vs_fp32"] < 1e-5
    assert rec["rejected"]["fp32-efficient@3"].startswith("failed: ")
    for kwargs, message in ((dict(variants=["fp32", "fp32"]), "named twice"), (dict(rounds=0), "rounds and replays"),
                            (dict(batches=[0]), "batches must be"), (dict(compile_mode="reduce-overhead"), "captures CUDA graphs")):
        args = dict(variants=["fp32"], batches=[3], rounds=1) | kwargs
        with pytest.raises(ValueError, match=message):
            bench_unet.bench(tiny_model, args.pop("variants"), args.pop("batches"), torch.device("cpu"), **args)


@pytest.mark.gpu
def test_bench_unet_on_cuda_compares_what_the_graph_computes(tiny_model):
    """On CUDA each variant is a captured graph: its output must be what a replay writes, and match fp32."""
    from benchmarks import bench_unet

    rec = bench_unet.bench(tiny_model, ["fp32", "fp16-cl", "bf16"], [3], torch.device("cuda"), rounds=1, replays=1)
    assert not rec["rejected"], rec["rejected"]
    assert set(rec["results"]) == {"fp32@3", "fp32-eager@3", "fp16-cl@3", "bf16@3"}
    assert 1e-5 < rec["results"]["fp16-cl@3"]["rel_err_vs_fp32"] < 2e-2


def test_scheduler_warmup_times_every_step_index(tmp_path):
    from benchmarks import scheduler_warmup

    for pause in scheduler_warmup.PAUSES:
        med = scheduler_warmup.per_step(pause, runs=1, frames=1, steps=5)
        assert len(med) == 6 and all(v > 0 for v in med), pause  # PLMS: 5 steps + the repeated first
    assert scheduler_warmup.main(["--runs", "0", "--out", str(tmp_path / "w.json")]) == 2
    assert not (tmp_path / "w.json").exists()
