"""gridclip_tools.benchmark (``tools/benchmark.py``): the quick mode end to end (what CI runs),
the ratio logic and the targets recorded in docs/BENCHMARKS.md."""

import dataclasses
import json
import logging
import math
import os
import re

import pytest
import torch

from gridclip.clip.loading import clear_clip_memo
from gridclip_tools.benchmark import cli
from gridclip_tools.benchmark.assets import (
    BenchmarkAssets,
    lvis_like_frequencies,
    synthetic_image,
)
from gridclip_tools.benchmark.measure import (
    Predictor,
    estimated_inference_bytes,
    num_anchor_locations,
)
from gridclip_tools.benchmark.models import build_benchmark_model, build_cfg
from gridclip_tools.benchmark.report import PAIRED_RATIOS, compute_paired_ratios, compute_ratios
from gridclip_tools.benchmark.specs import (
    INFERENCE_MODELS,
    TRAIN_MODELS,
    BenchmarkSettings,
    image_size_for_short_side,
    quick_settings,
)
from gridclip_tools.benchmark.suites import _ordered, _skip_reason
from gridclip_tools.export import missing_onnx_extras

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _positive_finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("benchmark")
    threads = torch.get_num_threads()
    results = cli.main(
        ["--quick", "--threads", "1", "--output-dir", str(out)]
        + ["--profile", "gridclip", "vild"]
        + ["--profile-train", "gridclip_online"]
    )
    assert torch.get_num_threads() == threads, "main() must restore the thread count"
    return out, results


def test_quick_mode_writes_every_output(quick_run):
    out, results = quick_run
    with open(out / "results.json") as f:
        saved = json.load(f)
    assert saved["format"] == "gridclip-benchmark" and saved["settings"]["quick"] is True
    for key in ("machine", "code", "settings", "inference", "costs", "train", "ratios"):
        assert key in saved, key
    assert "goals" not in saved  # targets live in docs/BENCHMARKS.md, not in a code table
    assert set(saved["code"]) == {"commit", "uncommitted_files"}  # what was measured
    md = (out / "results.md").read_text()
    assert "## Headline ratios" in md and "## Training" in md and "## Vocabulary scaling" in md
    assert "| `inference_speedup_gridclip_vs_vild` |" in md and "| met |" not in md
    assert not (out / "results.partial.json").exists()  # removed once the run completes
    with open(out / "benchmark.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert saved["ratios"] == pytest.approx(results["ratios"])


def test_quick_mode_measures_every_model_and_path(quick_run):
    _, results = quick_run
    s = results["settings"]
    main = {r["model"]: r for r in results["inference"] if r["suite"] == "main"}
    assert set(main) == set(INFERENCE_MODELS)
    assert main["retinanet_80"]["num_classes"] == 80 and main["gridclip"]["num_classes"] == 20
    for r in results["inference"]:
        if r["suite"] == "export" and r["runtime"] == "onnx" and _onnx_missing():
            continue  # the optional extras: test_quick_mode_times_the_exported_model
        assert "skipped" not in r, r
        iters = s["batch_iters"] if r["suite"] == "batch" else s["iters"]
        assert _positive_finite(r["median_ms"]) and _positive_finite(r["mean_ms"]), r
        assert len(r["times_ms"]) == iters and all(_positive_finite(t) for t in r["times_ms"])
        assert _positive_finite(r["cpu_median_ms"]) and len(r["cpu_times_ms"]) == iters, r
        assert r["peak_memory_mib"] is not None and r["peak_memory_mib"] >= 0
    # throughput: every batch model at every batch size, per-image times and images/s
    batch = {
        (r["model"], r["batch_size"]): r for r in results["inference"] if r["suite"] == "batch"
    }
    assert set(batch) == {(m, b) for m in s["batch_models"] for b in s["batch_sizes"]}
    assert set(s["batch_models"]) == {"gridclip", "vild"} and s["batch_sizes"] == [1, 2]
    for (m, b), r in batch.items():
        assert r["images_per_s"] == pytest.approx(b * 1000.0 / r["median_ms"])
        assert r["cpu_ms_per_image"] == pytest.approx(r["cpu_median_ms"] / b)
    assert _positive_finite(results["ratios"]["throughput_gridclip_batch2_over_batch1"])
    # the published-ViLD reference row runs on its own (square) input, shrunk in quick mode
    assert main["vild_published"]["image_size"] == [128, 128]
    assert main["gridclip"]["image_size"] == [128, 195]
    vocab = {(r["model"], r["num_classes"]) for r in results["inference"] if r["suite"] == "vocab"}
    assert vocab == {(m, k) for m in s["vocab_models"] for k in (20, 60)}
    sizes = {
        (r["model"], tuple(r["image_size"]))
        for r in results["inference"]
        if r["suite"] == "resolution"
    }
    assert sizes == {(m, sz) for m in s["resolution_models"] for sz in ((96, 146), (128, 195))}

    costs = {c["model"]: c for c in results["costs"]}
    assert set(costs) == set(INFERENCE_MODELS)
    for c in costs.values():
        assert _positive_finite(c["gflops"]), c
        assert c["params"] >= c["trainable_params"] > 0

    train = {r["model"]: r for r in results["train"]}
    assert set(train) == set(TRAIN_MODELS)
    for r in train.values():
        assert _positive_finite(r["median_s"]) and len(r["times_s"]) == s["train_iters"], r
        assert all(math.isfinite(v) for v in r["losses"].values()), r
    # the teacher is counted: online runs it every iteration, the caches never
    assert train["gridclip_online"]["teacher_calls_per_iter"] == 1
    assert train["gridclip_online"]["teacher_crops_per_image"] == 21  # grids [1, 2, 4]
    assert _positive_finite(train["gridclip_online"]["teacher_s"])
    assert train["vild_online"]["teacher_crops_per_image"] == 8 * 2  # 8 proposals x 2 scales
    assert "loss_image_align" in train["gridclip_cache"]["losses"]
    assert "loss_vild_image" in train["vild_cache"]["losses"]
    assert train["gridclip_cache"]["teacher_crops_per_image"] == 0

    for key, value in results["ratios"].items():
        if key == "inference_gridclip_onnx_over_eager" and _onnx_missing():
            assert value is None
            continue
        assert _positive_finite(value), (key, value)
        assert _positive_finite(results["ratios_cpu"][key]), (key, results["ratios_cpu"])
    paired = results["ratios_paired_cpu"]
    ran = {r["model"] for r in results["inference"] if r["suite"] == "main"}
    for key, (top, bottom) in PAIRED_RATIOS.items():
        assert _positive_finite(paired[key]) if {top, bottom} <= ran else paired[key] is None
    # the 1x1 variant is built from the config key, not patched; the dense CLIP term (on in
    # Base-GridCLIP) has parameters of its own
    assert costs["gridclip_1x1"]["params"] == costs["gridclip"]["params"]  # the configs' 1x1
    assert costs["gridclip_1x1"]["params"] < costs["gridclip_3x3"]["params"]
    assert costs["gridclip_no_dense_clip"]["params"] < costs["gridclip"]["params"]


def _onnx_missing():
    return bool(missing_onnx_extras())


def test_quick_mode_times_the_exported_model(quick_run):
    """The export suite: tools/export.py's graph of the configs' GridCLIP, timed against the
    same model run eagerly, with the exported detections checked against the eager ones."""
    out, results = quick_run
    rows = {r["runtime"]: r for r in results["inference"] if r["suite"] == "export"}
    assert set(rows) == {"eager", "pt2", "onnx"}
    assert {r["model"] for r in rows.values()} == {"gridclip"}
    formats = ["pt2"] if _onnx_missing() else ["pt2", "onnx"]
    if _onnx_missing():
        assert "setup_env.sh --export" in rows["onnx"]["skipped"]
    for name in ["eager"] + formats:
        r = rows[name]
        assert _positive_finite(r["median_ms"]) and _positive_finite(r["cpu_median_ms"]), r
        assert len(r["times_ms"]) == results["settings"]["iters"], r
    for fmt in formats:
        r = rows[fmt]
        assert _positive_finite(r["export_s"]) and _positive_finite(r["file_mib"]), r
        assert r["num_detections"] == rows["eager"]["num_detections"] > 0
        diff = r["vs_eager"]  # the bounds of tests/test_export.py
        assert diff["count_diff"] == 0 and diff["unmatched"] == 0, diff
        assert diff["max_box_diff"] < 1e-2 and diff["max_score_diff"] < 1e-4, diff
        ratio = results["ratios"][f"inference_gridclip_{fmt}_over_eager"]
        assert ratio == pytest.approx(r["median_ms"] / rows["eager"]["median_ms"])
    md = (out / "results.md").read_text()
    assert "## Export (the configs' GridCLIP" in md and "| pt2 |" in md


def test_export_suite_formats_from_the_command_line():
    args = cli.parse_args(["--quick", "--export-formats", "pt2"])
    assert cli.settings_from_args(args).export_formats == ["pt2"]
    args = cli.parse_args(["--quick", "--export-formats"])
    assert cli.settings_from_args(args).export_formats == []
    assert cli.settings_from_args(cli.parse_args(["--quick"])).export_formats == ("pt2", "onnx")


def test_quick_mode_profiles_inference_by_part(quick_run):
    out, results = quick_run
    grid, vild = results["profiles"]["gridclip"], results["profiles"]["vild"]
    assert (out / grid["file"]).exists() and (out / vild["file"]).exists()
    trunk, whole = "## trunk (CLIP ModifiedResNet)", "## whole inference (predictor)"
    for parts in (grid["parts"], vild["parts"]):
        assert parts[trunk]["calls"] == 1 and parts[trunk]["cpu_ms"] > 0
        assert parts["## backbone (trunk + FPN)"]["cpu_ms"] >= parts[trunk]["cpu_ms"]
        assert parts[whole]["cpu_ms"] >= parts["## backbone (trunk + FPN)"]["cpu_ms"]
    assert "## dense head (towers + output convs)" in grid["parts"]
    assert "## RPN (head, proposals, NMS)" in vild["parts"]
    assert "## dense head (towers + output convs)" not in vild["parts"]
    assert "## trunk (CLIP ModifiedResNet)" in (out / grid["file"]).read_text()


def test_quick_mode_profiles_training(quick_run):
    out, results = quick_run
    grid = (out / "profile_train_gridclip_online.txt").read_text()
    # the labelled parts are listed whatever their rank in the op table (which depends on load)
    assert "#   ## losses (focal loss + box loss): " in grid
    assert "#   ## GridCLIP image teacher (CLIP): " in grid
    assert set(results["profiles"]) == {
        "gridclip",
        "vild",
        "train_gridclip_online",
    }
    with pytest.raises(SystemExit, match="profile-train"):
        cli.settings_from_args(
            cli.parse_args(["--train-models", "vild_online", "--profile-train", "gridclip_cache"])
        )
    with pytest.raises(SystemExit, match="no-train"):
        cli.settings_from_args(cli.parse_args(["--no-train", "--profile-train", "vild_online"]))


def _fake_results(times, train=None, vocab=(10, 100), sizes=(100, 200)):
    main_size = list(image_size_for_short_side(200))
    inference = []
    for (model, k, size), ms in times.items():
        size = list(size)
        suite = (
            "main"
            if (k in (10, 80) and size == main_size)
            else ("vocab" if size == main_size else "resolution")
        )
        inference.append(
            {"suite": suite, "model": model, "num_classes": k, "image_size": size, "median_ms": ms}
        )
    return {
        "settings": {
            "num_classes": 10,
            "image_size": main_size,
            "vocab_sizes": list(vocab),
            "vocab_models": ["gridclip"],
            "image_sizes": list(sizes),
            "resolution_models": ["gridclip"],
        },
        "inference": inference,
        "train": [{"model": k, "median_s": v} for k, v in (train or {}).items()],
    }


def test_ratios_from_known_times():
    big, small = image_size_for_short_side(200), image_size_for_short_side(100)
    times = {
        ("gridclip", 10, big): 100.0,
        ("gridclip_1x1", 10, big): 88.0,
        ("vild", 10, big): 600.0,
        ("vild_ensemble", 10, big): 700.0,
        ("retinanet_80", 80, big): 80.0,
        ("retinanet", 10, big): 400.0,
        ("gridclip", 100, big): 180.0,
        ("gridclip", 10, small): 50.0,
        ("gridclip_head256x4", 10, big): 300.0,
        ("vild_fpn128", 10, big): 450.0,
    }
    results = _fake_results(times, train={"gridclip_online": 2.0, "vild_online": 30.0})
    r = compute_ratios(results)
    assert r["inference_speedup_gridclip_vs_vild"] == pytest.approx(6.0)
    assert r["inference_speedup_gridclip_vs_vild_ensemble"] == pytest.approx(7.0)
    assert r["inference_gridclip_over_retinanet_80"] == pytest.approx(1.25)
    assert r["inference_speedup_gridclip_head256x4_vs_vild"] == pytest.approx(2.0)
    assert r["inference_speedup_gridclip_vs_vild_fpn128"] == pytest.approx(4.5)
    assert r["inference_speedup_gridclip_vs_retinanet_10"] == pytest.approx(4.0)
    assert r["inference_gridclip_1x1_over_retinanet_80"] == pytest.approx(1.1)
    assert r["inference_gridclip_1x1_over_gridclip"] == pytest.approx(0.88)
    assert r["vocab_growth_gridclip_10_to_100"] == pytest.approx(1.8)
    assert r["resolution_growth_gridclip_100_to_200"] == pytest.approx(2.0)
    assert r["train_speedup_gridclip_online_vs_vild_online"] == pytest.approx(15.0)
    assert r["train_speedup_gridclip_cache_vs_vild_cache"] is None  # not measured


def test_paired_ratios_are_medians_of_each_rounds_ratio():
    """A noisy machine: the same two runs slow down together in round 2; each round's ratio is
    3, so the paired ratio is 3 where the ratio of the medians is not."""
    main = [
        {"suite": "main", "model": "vild", "cpu_times_ms": [300.0, 900.0, 330.0, 600.0]},
        {"suite": "main", "model": "gridclip", "cpu_times_ms": [100.0, 300.0, 110.0, 200.0]},
        {"suite": "main", "model": "retinanet_80", "cpu_times_ms": [50.0, 100.0, 100.0, 55.0]},
        {"suite": "vocab", "model": "vild", "cpu_times_ms": [1.0, 1.0, 1.0, 1.0]},
    ]
    paired = compute_paired_ratios({"inference": main})
    assert paired["inference_speedup_gridclip_vs_vild"] == pytest.approx(3.0)
    assert paired["inference_gridclip_over_retinanet_80"] == pytest.approx((2.0 + 3.0) / 2)
    assert paired["inference_speedup_gridclip_head128x2_objtop1000_vs_vild"] is None  # not run
    assert set(paired) == set(PAIRED_RATIOS)


def test_lvis_like_frequencies_match_lvis_mix():
    f = lvis_like_frequencies(1203)
    counts = {c: f.count(c) for c in "fcr"}
    assert (
        abs(counts["f"] - 405) <= 3 and abs(counts["c"] - 461) <= 3 and abs(counts["r"] - 337) <= 3
    )
    assert set(lvis_like_frequencies(20)) == {"f", "c", "r"}


def test_memory_estimate_skips_what_cannot_fit():
    # P3..P7 of an 800x1216 input (padded to 800x1216): 100*152 + 50*76 + 25*38 + 13*19 + 7*10
    assert num_anchor_locations(800, 1216) == 15200 + 3800 + 950 + 247 + 70
    per_anchor = estimated_inference_bytes(INFERENCE_MODELS["retinanet"], 10000, 800, 1216)
    per_location = estimated_inference_bytes(INFERENCE_MODELS["gridclip"], 10000, 800, 1216)
    # RetinaNet's decoding holds more per element than GridCLIP's scores (21 vs 12 bytes)
    assert per_anchor == 9 * 21 * per_location // 12 and per_anchor > 16 * 2**30
    assert estimated_inference_bytes(INFERENCE_MODELS["vild"], 10000, 800, 1216) == 0
    settings = BenchmarkSettings(memory_fraction=1e-9)
    reason = _skip_reason(
        INFERENCE_MODELS["retinanet"], 1203, (800, 1216), settings, torch.device("cpu")
    )
    assert reason is not None and reason.startswith("skipped")
    assert _skip_reason(INFERENCE_MODELS["vild"], 1203, (800, 1216), settings, "cpu") is None


def test_benchmark_models_are_seeded_whatever_was_built_before():
    """The first model of a process used to get other weights (loading the memoised CLIP
    draws from the RNG the first time only)."""
    settings = quick_settings()
    assets = BenchmarkAssets(settings.clip_architecture, settings.seed)
    try:
        cfg = build_cfg(TRAIN_MODELS["gridclip_online"], 20, assets, settings)
        clear_clip_memo()
        first = build_benchmark_model(cfg, settings.seed).state_dict()
        second = build_benchmark_model(cfg, settings.seed).state_dict()
    finally:
        assets.close()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("key", ["gridclip", "vild", "gridclip_head128x2_objtop1000"])
def test_benchmark_batch_predict_equals_one_by_one(key):
    """The throughput suite's batch forward gives each image the same detections as a
    batch of one (different images of one size: padding would change the border features)."""
    settings = quick_settings()
    assets = BenchmarkAssets(settings.clip_architecture, settings.seed)
    try:
        cfg = build_cfg(INFERENCE_MODELS[key], 20, assets, settings)
        model = build_benchmark_model(cfg, settings.seed).eval()
    finally:
        assets.close()
    if key.endswith("objtop1000"):  # the detached objectness ranker ranks the top-1000 gate
        assert model.head.objectness is not None and model.test_topk_locations == 1000
    predictor = Predictor(model, cfg.INPUT.FORMAT, 96, 200)
    images = [synthetic_image(96, 146, seed=0), synthetic_image(96, 146, seed=1)]
    batched = predictor.predict(images)
    for image, out in zip(images, batched):
        single = predictor(image)["instances"]
        out = out["instances"]
        assert len(single) == len(out) > 0
        torch.testing.assert_close(
            out.pred_boxes.tensor, single.pred_boxes.tensor, atol=1e-3, rtol=1e-5
        )
        torch.testing.assert_close(out.scores, single.scores, atol=1e-5, rtol=1e-4)
        assert torch.equal(out.pred_classes, single.pred_classes)


def test_cli_logging_reaches_the_suites_progress_logger():
    """The suites' and assets' loggers (``gridclip_tools.benchmark.*``) reach the console."""
    cli.setup_logging()
    for name in ("gridclip_tools.benchmark.suites", "gridclip_tools.benchmark.assets"):
        lg = logging.getLogger(name)
        assert lg.isEnabledFor(logging.INFO), name
        handlers = []
        while lg is not None:
            handlers += [h for h in lg.handlers if type(h) is logging.StreamHandler]
            lg = lg.parent if lg.propagate else None
        assert handlers, f"{name}: no console handler"


def test_bad_options_are_rejected():
    with pytest.raises(SystemExit):
        cli.parse_args(["--models", "no_such_model"])
    with pytest.raises(SystemExit, match="KEY VALUE"):
        cli.settings_from_args(cli.parse_args(["--quick", "MODEL.FPN.OUT_CHANNELS"]))
    with pytest.raises(ValueError, match="unknown inference models"):
        _ordered(["gridclip", "nope"])


def test_documented_targets_name_ratios_the_tool_reports():
    """docs/BENCHMARKS.md keeps the targets; each names a ratio that compute_ratios produces
    with the default (LVIS) settings, so a renamed ratio cannot leave a dead target behind."""
    with open(os.path.join(ROOT, "docs", "BENCHMARKS.md"), encoding="utf-8") as f:
        text = f.read()
    section = text.split("\n## Targets\n", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"^\|[^|\n]*\| `([a-z0-9_]+)` \| [<>]= [0-9.]+ \|$", section, re.M)
    assert len(documented) == 6, section
    settings = dataclasses.asdict(BenchmarkSettings())
    reported = compute_ratios({"settings": settings, "inference": [], "train": [], "costs": []})
    missing = [key for key in documented if key not in reported]
    assert not missing, f"targets name ratios the tool does not report: {missing}"
    for key in (
        "inference_speedup_gridclip_vs_vild",
        "vocab_growth_gridclip_1203_to_10000",
        "inference_gridclip_over_retinanet_80",
    ):
        assert key in reported and key in documented
