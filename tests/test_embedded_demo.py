"""The CI-sized run of `make demo`'s pipeline: world -> train_net.py x3 -> LVISEval -> outputs."""

import json
import math
import os
import pathlib
import shutil

import pytest

from gridclip.config import get_gridclip_cfg
from gridclip_tools import embedded_demo as demo

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ci_demo_writes_every_output(ci_demo):
    out = ci_demo["output_dir"]
    for name in ("summary.json", "comparison.md", "comparison.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    on_disk = json.load(open(os.path.join(out, "summary.json")))
    assert [m["name"] for m in on_disk["models"]] == list(demo.MODELS)
    assert any("oracle" in m["name"] for m in on_disk["models"])
    # models train concurrently on 2+ cores, each logging to its own file
    assert on_disk["train_jobs"] == (2 if (os.cpu_count() or 1) >= 2 else 1)
    if on_disk["train_jobs"] > 1:
        for m in on_disk["models"]:
            log = open(os.path.join(out, m["name"], "train_stdout.log")).read()
            assert "Evaluation results for bbox" in log, m["name"]
    table = open(os.path.join(out, "comparison.md")).read()
    for m in on_disk["models"]:
        assert m["label"] in table
        for key in ("AP", "APr", "APc", "APf"):
            value = m["bbox"][key]
            assert math.isnan(value) or 0.0 <= value <= 100.0, (m["name"], key, value)
        assert m["train_s_per_iter"] > 0 and math.isfinite(m["train_s_per_iter"])
        assert m["inference_ms_per_img"] > 0
        assert m["predictions"] and all(os.path.getsize(p) > 0 for p in m["predictions"])
        assert os.path.isfile(os.path.join(out, m["name"], "model_final.pth"))
        assert os.path.isfile(os.path.join(out, m["name"], "metrics.json"))


def test_ci_demo_ablation_really_disables_image_alignment(ci_demo):
    by_name = {m["name"]: m for m in ci_demo["models"]}
    assert by_name["gridclip"]["teacher_forwards_per_image"] != "0"
    assert by_name["gridclip_no_ila"]["teacher_forwards_per_image"] == "0"
    metrics = [
        json.loads(line)
        for line in open(os.path.join(ci_demo["output_dir"], "gridclip_no_ila", "metrics.json"))
    ]
    assert not any("loss_image_align" in r for r in metrics)
    metrics = [
        json.loads(line)
        for line in open(os.path.join(ci_demo["output_dir"], "gridclip", "metrics.json"))
    ]
    assert any("loss_image_align" in r for r in metrics)


def test_ci_demo_oracle_and_clip_free_rows_train_what_they_say(ci_demo):
    """The oracle trains on every box with the novel classes in its loss; the CLIP-free row has
    neither the dense CLIP term nor image-level alignment."""
    import yaml

    out = ci_demo["output_dir"]
    oracle = yaml.safe_load(open(os.path.join(out, "gridclip_oracle", "config.yaml")))
    assert oracle["DATASETS"]["TRAIN"] == ["gridclip_world_ci_train_full"]
    assert oracle["MODEL"]["GRIDCLIP"]["IGNORE_NOVEL_IN_TRAINING"] is False
    default = yaml.safe_load(open(os.path.join(out, "gridclip", "config.yaml")))
    assert default["DATASETS"]["TRAIN"] == ["gridclip_world_ci_train"]
    free = yaml.safe_load(open(os.path.join(out, "gridclip_clip_free", "config.yaml")))
    assert free["MODEL"]["GRIDCLIP"]["DENSE_CLIP"] is False
    assert free["MODEL"]["GRIDCLIP"]["IMAGE_ALIGN_WEIGHT"] == 0.0
    lines = demo.headline_comparisons(ci_demo["models"])
    assert any("oracle" in line for line in lines) or not any(
        m["bbox"]["APr"] > 0 for m in ci_demo["models"] if m["name"] == "gridclip_oracle"
    )


def test_ci_demo_reuses_trained_models(ci_demo, capsys, tmp_path):
    out = str(tmp_path / "copy")  # a copy: the shared fixture's outputs stay as they are
    shutil.copytree(ci_demo["output_dir"], out)
    before = os.path.getmtime(os.path.join(out, "vild", "model_final.pth"))
    demo.main(
        [
            "--preset",
            "ci",
            "--output-dir",
            out,
            "--models",
            "vild",
            "--timing-images",
            "1",
            "--num-vis",
            "1",
        ]
    )
    assert "reusing" in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(out, "vild", "model_final.pth")) == before


def test_demo_progress_reads_metrics(tmp_path):
    assert demo._progress(str(tmp_path), 300) == "0/300"
    with open(tmp_path / "metrics.json", "w") as f:
        f.write(json.dumps({"iteration": 19, "total_loss": 1.0}) + "\n")
        f.write(json.dumps({"iteration": 39}) + "\n{truncated")
    assert demo._progress(str(tmp_path), 300) == "40/300"
    (tmp_path / "model_final.pth").write_bytes(b"")
    assert demo._progress(str(tmp_path), 300) == "evaluating"


def test_demo_never_resumes_a_run_of_another_config(tmp_path, monkeypatch):
    """A changed config must not `--resume` from the old checkpoints (another model); a killed
    run of the same config must."""
    fake = tmp_path / "fake_train_net.py"  # records its argv, writes what train_net.py writes
    fake.write_text(
        "import json, os, sys\n"
        "out = sys.argv[sys.argv.index('OUTPUT_DIR') + 1]\n"
        "json.dump({'results': {'bbox': {'AP': 1.0}}, 'argv': sys.argv},"
        " open(os.path.join(out, 'results.json'), 'w'))\n"
    )
    monkeypatch.setattr(demo, "TRAIN_NET", str(fake))
    out = tmp_path / "gridclip"
    out.mkdir()
    (out / "last_checkpoint").write_text("model_0000099.pth")  # an old run, other config
    config = "embedded/GridCLIP_world.yaml"
    proc = demo._launch("gridclip", config, ["SOLVER.MAX_ITER", "7"], str(out), False)
    proc.wait()
    demo._finish(proc)
    assert (tmp_path / "gridclip.previous" / "last_checkpoint").is_file()
    assert not (out / "last_checkpoint").exists()
    # same config, killed before the end (no results.json): resumes in place
    (out / "results.json").unlink()
    (out / "last_checkpoint").write_text("model_0000003.pth")
    proc = demo._launch("gridclip", config, ["SOLVER.MAX_ITER", "7"], str(out), False)
    proc.wait()
    demo._finish(proc)
    assert (out / "last_checkpoint").read_text() == "model_0000003.pth"
    assert "--resume" in json.load(open(out / "results.json"))["argv"]


def test_demo_run_key_follows_the_resolved_config(tmp_path):
    """A change anywhere in the _BASE_ chain retrains; the output folder does not matter."""
    base = ROOT / "projects/GridCLIP/configs/Base-GridCLIP.yaml"
    (tmp_path / "base.yaml").write_text(f'_BASE_: "{base}"\nSOLVER:\n  MAX_ITER: 7\n')
    leaf = tmp_path / "leaf.yaml"
    leaf.write_text('_BASE_: "base.yaml"\nMODEL:\n  WEIGHTS: ""\n')
    key = demo._run_key(str(leaf), [])
    assert demo._run_key(str(leaf), ["OUTPUT_DIR", "elsewhere"]) == key
    assert demo._run_key(str(leaf), ["MODEL.GRIDCLIP.EMBED_KERNEL_SIZE", "3"]) != key
    (tmp_path / "base.yaml").write_text(f'_BASE_: "{base}"\nSOLVER:\n  MAX_ITER: 8\n')
    assert demo._run_key(str(leaf), []) != key


def test_demo_run_keys_separate_training_from_evaluation_settings(tmp_path):
    """A setting at its default value does not change the keys (a key the project adds or removes
    with its default keeps finished runs reusable); an evaluation-only setting changes the run
    key, not the training key; a training setting changes both."""
    config = "embedded/GridCLIP_world.yaml"
    key, train_key = demo._run_keys(config, [])
    default_scale = get_gridclip_cfg().MODEL.GRIDCLIP.LOGIT_SCALE
    assert demo._run_keys(config, ["MODEL.GRIDCLIP.LOGIT_SCALE", str(default_scale)]) == (
        key,
        train_key,
    )
    for opts, trains in (
        (["MODEL.GRIDCLIP.TEST_CLIP_ENSEMBLE", "False"], False),
        (["MODEL.RETINANET.SCORE_THRESH_TEST", "0.2"], False),
        (["TEST.DETECTIONS_PER_IMAGE", "300"], False),
        (["DATASETS.TEST", "('gridclip_world_train',)"], False),
        (["MODEL.GRIDCLIP.IMAGE_ALIGN_WEIGHT", "2.0"], True),
        (["SOLVER.MAX_ITER", "301"], True),
        (["INPUT.MIN_SIZE_TRAIN", "(224,)"], True),
        (["DATASETS.TRAIN", "('gridclip_world_train_full',)"], True),
        (["MODEL.GRIDCLIP.TEST_CLIP_ENSEMBLE_WEIGHTS", "[0.35, 0.9]"], False),
        # the pseudo-box search of pair training has its own weight: a training setting
        (["MODEL.GRIDCLIP.PAIRS_PSEUDO_CLIP_WEIGHT", "0.35"], True),
    ):
        other, other_train = demo._run_keys(config, opts)
        assert other != key and (other_train != train_key) == trains, opts


def _fake_train_net(tmp_path, monkeypatch):
    """A train_net.py stand-in: writes model_final.pth and results.json (AP 1.0), or with
    --eval-only eval_results.json (AP 2.0), each with its argv."""
    fake = tmp_path / "fake_train_net.py"
    fake.write_text(
        "import json, os, sys\n"
        "out = sys.argv[sys.argv.index('OUTPUT_DIR') + 1]\n"
        "os.makedirs(out, exist_ok=True)\n"
        "ev = '--eval-only' in sys.argv\n"
        "open(os.path.join(out, 'model_final.pth'), 'w').write('w')\n"
        "json.dump({'results': {'bbox': {'AP': 2.0 if ev else 1.0}}, 'datasets_test': ['v'],"
        " 'argv': sys.argv}, open(os.path.join(out, 'eval_results.json' if ev else"
        " 'results.json'), 'w'))\n"
    )
    monkeypatch.setattr(demo, "TRAIN_NET", str(fake))


def _trained_fake_run(tmp_path, monkeypatch):
    """(folder, config) of a GridCLIP world run finished by :func:`_fake_train_net`."""
    _fake_train_net(tmp_path, monkeypatch)
    out, config = tmp_path / "gridclip", "embedded/GridCLIP_world.yaml"
    proc = demo._launch("gridclip", config, [], str(out), False)
    proc.wait()
    demo._finish(proc)
    return out, config


def test_demo_reevaluates_a_run_whose_evaluation_settings_changed(tmp_path, monkeypatch):
    """Same training settings, other evaluation settings: `--eval-only` on the final weights
    (into a subfolder, the training's config.yaml kept), not a retraining; results.json gets the
    new metrics and keeps the training's wall time."""
    out, config = _trained_fake_run(tmp_path, monkeypatch)
    trained = json.load(open(out / "results.json"))
    assert trained["results"]["bbox"]["AP"] == 1.0 and "--eval-only" not in trained["argv"]
    assert demo._launch("gridclip", config, [], str(out), False) is None  # same: reused

    opts = ["MODEL.GRIDCLIP.TEST_CLIP_ENSEMBLE", "False"]
    proc = demo._launch("gridclip", config, opts, str(out), False)
    proc.wait()
    demo._finish(proc)
    results = json.load(open(out / "results.json"))
    assert results["results"]["bbox"]["AP"] == 2.0
    assert results["train_wall_s"] == trained["train_wall_s"]
    argv = json.load(open(out / "evaluation" / "eval_results.json"))["argv"]
    assert "--eval-only" in argv and argv[argv.index("MODEL.WEIGHTS") + 1] == str(
        out / "model_final.pth"
    )
    assert not (tmp_path / "gridclip.previous").exists()
    assert demo._launch("gridclip", config, opts, str(out), False) is None  # now up to date
    # a training setting retrains (the old run kept aside)
    proc = demo._launch("gridclip", config, ["SOLVER.MAX_ITER", "7"], str(out), False)
    proc.wait()
    demo._finish(proc)
    assert (tmp_path / "gridclip.previous" / "evaluation").is_dir()
    assert "--eval-only" not in json.load(open(out / "results.json"))["argv"]


def test_demo_reevaluates_a_run_evaluated_under_another_default(tmp_path, monkeypatch):
    """A default evaluation setting changed in gridclip/config.py leaves the run keys as they
    were (only non-default settings are hashed); the evaluation settings a run recorded, defaults
    included, notice it: the run is evaluated again, not reused. A setting the run did not
    record (added since) and a run recorded before the file existed are reused."""
    out, config = _trained_fake_run(tmp_path, monkeypatch)
    path = out / demo.EVALUATION_SETTINGS
    recorded = json.loads(path.read_text())
    assert recorded["MODEL.GRIDCLIP.TEST_CLIP_ENSEMBLE"] is True
    assert recorded["TEST.DETECTIONS_PER_IMAGE"] == 100  # the default too
    assert "SOLVER.MAX_ITER" not in recorded
    del recorded["MODEL.RETINANET.NMS_THRESH_TEST"]  # as if the project added it since
    path.write_text(json.dumps(recorded))
    assert demo._launch("gridclip", config, [], str(out), False) is None
    path.unlink()  # recorded before the file existed
    assert demo._launch("gridclip", config, [], str(out), False) is None
    recorded["TEST.DETECTIONS_PER_IMAGE"] = 300  # evaluated under another default
    path.write_text(json.dumps(recorded))
    proc = demo._launch("gridclip", config, [], str(out), False)
    assert proc is not None and "--eval-only" in proc.args
    proc.wait()
    demo._finish(proc)
    assert json.loads(path.read_text())["TEST.DETECTIONS_PER_IMAGE"] == 100
    assert demo._launch("gridclip", config, [], str(out), False) is None


def test_demo_retrains_a_run_trained_under_another_training_default(tmp_path, monkeypatch):
    """A training default changed in gridclip/config.py leaves the run keys as they were; the
    training settings a run recorded when it started (defaults included) notice it: the run is
    trained again from scratch (its folder kept aside, never resumed or re-evaluated), not
    reused. A setting it did not record (added since) and a run recorded before the file
    existed are reused."""
    out, config = _trained_fake_run(tmp_path, monkeypatch)
    path = out / demo.TRAINING_SETTINGS
    recorded = json.loads(path.read_text())
    assert recorded["SOLVER.MAX_ITER"] == 300 and "OUTPUT_DIR" not in recorded
    assert recorded["MODEL.GRIDCLIP.LOGIT_SCALE"] == get_gridclip_cfg().MODEL.GRIDCLIP.LOGIT_SCALE
    assert "MODEL.GRIDCLIP.TEST_CLIP_ENSEMBLE" not in recorded  # an evaluation setting
    del recorded["MODEL.GRIDCLIP.IMAGE_ALIGN_WEIGHT"]  # as if the project added it since
    path.write_text(json.dumps(recorded))
    assert demo._launch("gridclip", config, [], str(out), False) is None
    path.unlink()  # recorded before the file existed: reused, and today's settings adopted
    assert demo._launch("gridclip", config, [], str(out), False) is None
    assert json.loads(path.read_text())["MODEL.GRIDCLIP.IMAGE_ALIGN_WEIGHT"] == 1.0
    recorded["MODEL.GRIDCLIP.LOGIT_SCALE"] = -1.0  # trained under another default
    path.write_text(json.dumps(recorded))
    # an evaluation change too: still a training, not an --eval-only of the old weights
    proc = demo._launch("gridclip", config, ["TEST.DETECTIONS_PER_IMAGE", "50"], str(out), False)
    assert proc is not None and "--eval-only" not in proc.args
    proc.wait()
    demo._finish(proc)
    previous = tmp_path / "gridclip.previous"
    assert (
        json.loads((previous / demo.TRAINING_SETTINGS).read_text())["MODEL.GRIDCLIP.LOGIT_SCALE"]
        == -1.0
    )
    assert json.loads(path.read_text())["MODEL.GRIDCLIP.LOGIT_SCALE"] != -1.0
    opts = ["TEST.DETECTIONS_PER_IMAGE", "50"]
    assert demo._launch("gridclip", config, opts, str(out), False) is None


def test_demo_reevaluates_a_legacy_run_from_its_config_dump(tmp_path, monkeypatch):
    """A run recorded before training keys (run_key.txt only) is evaluated again, not
    retrained, when the config.yaml train_net.py dumped there (nested tuples read back as
    lists) has today's training settings; a dump naming a setting since removed retrains."""
    import yaml

    _fake_train_net(tmp_path, monkeypatch)
    config = "embedded/GridCLIP_world.yaml"
    opts = ["MODEL.GRIDCLIP.TEST_CLIP_ENSEMBLE", "False"]  # an evaluation setting changed
    dump = get_gridclip_cfg(config, []).dump()
    stale = yaml.safe_load(dump)
    stale["MODEL"]["GRIDCLIP"]["A_REMOVED_SETTING"] = 1
    for name, text, eval_only in (
        ("legacy", dump, True),
        ("stale", yaml.safe_dump(stale), False),
    ):
        out = tmp_path / name
        out.mkdir()
        (out / "config.yaml").write_text(text)
        (out / "model_final.pth").write_text("w")
        (out / "run_key.txt").write_text("0123456789abcdef")  # a whole-dump key of old
        (out / "results.json").write_text(json.dumps({"results": {"bbox": {"AP": 1.0}}}))
        proc = demo._launch(name, config, opts, str(out), False)
        proc.wait()
        demo._finish(proc)
        assert (out / "evaluation").is_dir() == eval_only, name
        assert (tmp_path / f"{name}.previous").is_dir() == (not eval_only), name


def test_demo_rows_follow_the_schedule_and_vild_teacher_options():
    """``--iters`` stretches every row's schedule (steps at 73% / 90%); the ViLD teacher's
    overrides reach the ViLD row only; the command line's overrides come last (they win)."""
    names = list(demo.MODELS)
    default = demo.plan_rows(names, demo.PRESETS["demo"])
    expected = demo.PRESETS["demo"]["iters"] or 300  # None: the configs' 300 iterations
    assert all(run[5] == expected for run in default)
    teacher = ["MODEL.VILD.TEACHER", "cache", "MODEL.VILD.TEACHER_CACHE", "/tmp/c"]
    runs = demo.plan_rows(
        names, demo.PRESETS["demo"], 600, teacher, ["SOLVER.MAX_ITER", "7"], "out"
    )
    for name, _, config, opts, out_dir, max_iter in runs:
        assert out_dir == os.path.join("out", name)
        assert max_iter == 7  # the command line's override wins
        assert opts[opts.index("SOLVER.STEPS") + 1] == "(440, 540)"
        assert ("MODEL.VILD.TEACHER_CACHE" in opts) == (name == "vild")
    cfg = demo.get_gridclip_cfg(runs[-1][2], runs[-1][3])
    assert cfg.MODEL.VILD.TEACHER == "cache" and tuple(cfg.SOLVER.STEPS) == (440, 540)


@pytest.mark.slow
def test_demo_with_cached_vild_teacher_builds_the_cache_once(tmp_path, capsys):
    """``--vild-teacher cache``: the cache is built before training (one entry per training
    image), ViLD trains from it, a second run reuses both."""
    out = str(tmp_path / "demo")
    argv = ["--preset", "ci", "--output-dir", out, "--models", "vild", "--iters", "10"]
    argv += ["--vild-teacher", "cache", "--timing-images", "1", "--num-vis", "1", "--jobs", "1"]
    summary = demo.main(argv)
    cache = os.path.join(out, "vild_teacher")
    entries = [f for f in os.listdir(cache) if f != "meta.safetensors"]
    assert entries and summary["vild_teacher"] == "cache"
    assert summary["vild_teacher_cache_wall_s"] > 0 and summary["iters"] == 10
    import yaml

    cfg = yaml.safe_load(open(os.path.join(out, "vild", "config.yaml")))
    assert cfg["MODEL"]["VILD"]["TEACHER"] == "cache"
    assert cfg["MODEL"]["VILD"]["TEACHER_CACHE"] == os.path.abspath(cache)
    assert cfg["SOLVER"]["MAX_ITER"] == 10
    capsys.readouterr()
    demo.main(argv)
    assert "reusing" in capsys.readouterr().out
