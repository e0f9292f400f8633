"""What a Detectron2 user runs, on the embedded world's CI-sized trained models (``ci_demo``):
the open-vocabulary predictor, ``tools/demo.py``, the notebook (headless) and
``tools/compare_eval.py`` (``--eval-only`` comparison with expected-results regressions)."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from gridclip_tools import compare_eval as compare
from gridclip_tools import demo

ROOT = pathlib.Path(__file__).resolve().parents[1]
#: subprocesses run single-threaded: on a busy shared CPU, intra-op threads only contend
SUBPROCESS_ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
NOTEBOOK = ROOT / "projects/GridCLIP/notebooks/GridCLIP_demo.ipynb"


def _run(ci_demo, name):
    """(config, weights, opts) of one trained model of the CI demo."""
    run = next(m for m in ci_demo["models"] if m["name"] == name)
    weights = os.path.join(ci_demo["output_dir"], name, "model_final.pth")
    return run["config"], weights, list(run["opts"])


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The models here are tiny: one thread is as fast and does not fight other processes."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world_predictor(ci_demo):
    from gridclip.engine.predictor import OpenVocabularyPredictor

    config, weights, opts = _run(ci_demo, "gridclip")
    return OpenVocabularyPredictor.from_config_file(config, weights, opts)


@pytest.fixture(scope="module")
def val_image(world_predictor):
    """(BGR image, its dataset dict): a val image of the world with a novel object."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data import detection_utils as utils

    name = world_predictor.cfg.DATASETS.TEST[0]
    freqs = MetadataCatalog.get(name).class_frequencies
    dicts = DatasetCatalog.get(name)
    d = next(d for d in dicts if any(freqs[a["category_id"]] == "r" for a in d["annotations"]))
    return utils.read_image(d["file_name"], format="BGR"), d


# ------------------------------------------------------------------------------- vocabularies
def test_builtin_and_typed_vocabularies(tmp_path):
    from gridclip.engine.predictor import parse_vocabulary

    sizes = {"lvis": 1203, "lvis_base": 866, "lvis_novel": 337}
    sizes.update({"world": 48, "world_base": 38, "world_novel": 10})
    for name, size in sizes.items():
        names, description = parse_vocabulary(name)
        assert len(names) == size and name in description, name
    assert "aerosol_can" in parse_vocabulary("lvis")[0]
    world = set(parse_vocabulary("world")[0])
    base, novel = set(parse_vocabulary("WORLD_BASE")[0]), set(parse_vocabulary("world_novel")[0])
    assert base | novel == world and not base & novel and "red_star" in world

    assert parse_vocabulary(" red star, blue ring ,")[0] == ["red star", "blue ring"]
    assert parse_vocabulary("purple heart")[0] == ["purple heart"]
    assert parse_vocabulary(("a", "b"))[0] == ["a", "b"]
    txt = tmp_path / "classes.txt"
    txt.write_text("# my classes\nred star\n\n  blue ring  \n")
    assert parse_vocabulary(str(txt))[0] == ["red star", "blue ring"]
    assert parse_vocabulary(txt)[0] == ["red star", "blue ring"]

    for empty in ("", " , ,", []):
        with pytest.raises(ValueError, match="empty"):
            parse_vocabulary(empty)
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="empty.txt"):
        parse_vocabulary(str(tmp_path / "empty.txt"))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        parse_vocabulary(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="duplicate"):
        parse_vocabulary("red star, Red Star")
    with pytest.raises(TypeError):
        parse_vocabulary(["red star", 3])


def test_vocabulary_metadata_never_collides():
    from detectron2.data import MetadataCatalog

    from gridclip.engine.predictor import vocabulary_metadata

    seen = {}
    for i in range(30):  # switching back and forth many times in one process
        names = [f"class {i % 7}", "shared"] if i % 2 else ["shared", f"class {i % 7}"]
        metadata = vocabulary_metadata(names)
        assert list(metadata.thing_classes) == names
        assert seen.setdefault(tuple(names), metadata.name) == metadata.name
    assert len(set(seen.values())) == len(seen) == 14
    assert all(list(MetadataCatalog.get(n).thing_classes) == list(k) for k, n in seen.items())


# ---------------------------------------------------------------------------------- predictor
def test_predictor_detects_base_novel_and_typed_vocabularies(world_predictor, val_image):
    from gridclip.engine.predictor import builtin_vocabulary

    predictor = world_predictor
    image, _ = val_image
    assert predictor.class_names == builtin_vocabulary("world")  # the trained vocabulary
    assert predictor.model.num_classes == 48
    metadata_names = {}
    for vocabulary, expected in [
        ("world_base", builtin_vocabulary("world_base")),
        ("world_novel", builtin_vocabulary("world_novel")),
        ("yellow star, blue ring", ["yellow star", "blue ring"]),
        ("world_base", builtin_vocabulary("world_base")),  # back again: same entry, no clash
    ]:
        assert predictor.set_vocabulary(vocabulary) == expected
        assert predictor.class_names == expected
        assert list(predictor.metadata.thing_classes) == expected
        assert predictor.model.num_classes == len(expected)
        if tuple(expected) in metadata_names:  # seen before: its entry again, nothing to re-test
            assert predictor.metadata.name == metadata_names[tuple(expected)]
            continue
        metadata_names[tuple(expected)] = predictor.metadata.name

        outputs = predictor(image)
        instances = outputs["instances"]
        assert len(instances) > 0, vocabulary
        classes = set(instances.pred_classes.tolist())
        assert classes <= set(range(len(expected))), (vocabulary, classes)
        if len(expected) > 2:
            assert max(classes) >= 2, "the outputs should span the larger vocabulary"
        h, w = image.shape[:2]
        boxes = instances.pred_boxes.tensor
        assert boxes.min() >= 0 and boxes[:, 2].max() <= w and boxes[:, 3].max() <= h

        detections = predictor.detections_to_json(outputs, threshold=0.0)
        assert len(detections) == len(instances)
        assert {d["class_name"] for d in detections} <= set(expected)
        assert [d["score"] for d in detections] == sorted(
            (d["score"] for d in detections), reverse=True
        )
        assert len(detections[0]["box"]) == 4
        json.dumps(detections)  # JSON-ready
        cut = float(np.median([d["score"] for d in detections]))
        assert all(d["score"] >= cut for d in predictor.detections_to_json(outputs, cut))

        top3 = detections[min(2, len(detections) - 1)]["score"]  # draw a few: drawing is slow
        drawing = predictor.visualize(image, outputs, threshold=top3)
        assert drawing.dtype == np.uint8 and drawing.ndim == 3 and drawing.shape[2] == 3
        assert drawing.shape[0] >= 2 * h  # small images are drawn enlarged
        assert drawing.shape[0] / drawing.shape[1] == pytest.approx(h / w, rel=0.02)
        if vocabulary == "world_novel":
            blank = predictor.visualize(image, outputs, threshold=1.01, scale=1.0)
            assert np.array_equal(blank, image[:, :, ::-1])  # RGB; nothing drawn above 1
            drawn = predictor.visualize(image, outputs, threshold=top3, scale=1.0)
            assert drawn.shape == blank.shape and not np.array_equal(drawn, blank)
    assert len(set(metadata_names.values())) == 3 and predictor.model.num_classes == 38


def test_predictor_rejects_outputs_of_another_vocabulary(world_predictor, val_image):
    import torch
    from detectron2.structures import Boxes, Instances

    image, _ = val_image
    outputs = {"instances": Instances(image.shape[:2])}
    outputs["instances"].pred_boxes = Boxes(torch.tensor([[1.0, 2.0, 30.0, 40.0]]))
    outputs["instances"].scores = torch.tensor([0.9])
    outputs["instances"].pred_classes = torch.tensor([5])  # class 5 of a larger vocabulary
    world_predictor.set_vocabulary("a, b")
    with pytest.raises(ValueError, match="vocabulary"):
        world_predictor.detections_to_json(outputs)
    with pytest.raises(ValueError, match="set_vocabulary"):
        world_predictor.visualize(image, outputs, threshold=0.0)
    world_predictor.set_vocabulary("world")
    assert world_predictor.detections_to_json(outputs) == [
        {
            "box": [1.0, 2.0, 30.0, 40.0],
            "score": 0.9,
            "class_id": 5,
            "class_name": world_predictor.class_names[5],
        }
    ]


def test_vild_predictor_keeps_trained_base_classes(ci_demo, val_image):
    from gridclip.data.world import world_categories
    from gridclip.engine.predictor import OpenVocabularyPredictor

    config, weights, opts = _run(ci_demo, "vild")
    predictor = OpenVocabularyPredictor.from_config_file(
        config, weights, opts, vocabulary="world_novel"
    )
    novel_mask = predictor.model.roi_heads.box_predictor.novel_class_mask
    assert novel_mask.tolist() == [True] * 10
    # After a novel-only vocabulary, the full one still knows which classes had boxes in training.
    predictor.set_vocabulary("world")
    novel_mask = predictor.model.roi_heads.box_predictor.novel_class_mask
    assert novel_mask.tolist() == [c["frequency"] == "r" for c in world_categories()]
    predictor.set_vocabulary(["blue ring", "purple heart"])
    outputs = predictor(val_image[0])
    assert set(outputs["instances"].pred_classes.tolist()) <= {0, 1}
    assert predictor.model.num_classes == 2


# -------------------------------------------------------------------------------- tools/demo.py
def test_demo_tool_writes_pngs_and_json(ci_demo, val_image, tmp_path):
    config, weights, opts = _run(ci_demo, "gridclip")
    folder = os.path.abspath(os.path.dirname(val_image[1]["file_name"]))
    images = sorted(f for f in os.listdir(folder) if f.endswith((".jpg", ".png")))[:2]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for f in images:
        os.symlink(os.path.join(folder, f), inputs / f)
    (inputs / "broken.png").write_text("not an image")
    vocab = tmp_path / "my_classes.txt"
    vocab.write_text("yellow star\nblue ring\nwhite square\n")
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "tools/demo.py"), "--config-file", config]
    cmd += ["--input", str(inputs / "*.jpg"), str(inputs), "--output", str(out)]
    cmd += ["--custom-vocabulary", str(vocab), "--confidence-threshold", "0.01"]
    cmd += ["--weights", weights, "--skip-unreadable"] + opts  # trailing config overrides
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, env=SUBPROCESS_ENV, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "detections.json").read_text())
    assert result["vocabulary"]["class_names"] == ["yellow star", "blue ring", "white square"]
    assert [os.path.basename(r["file_name"]) for r in result["images"]] == images  # each once
    assert [os.path.basename(p) for p in result["skipped"]] == ["broken.png"]
    for record in result["images"]:
        png = out / record["visualization"]
        assert png.stat().st_size > 0
        for d in record["detections"]:
            assert d["score"] >= 0.01 and d["class_name"] in result["vocabulary"]["class_names"]
            x0, y0, x1, y1 = d["box"]
            assert 0 <= x0 <= x1 <= record["width"] and 0 <= y0 <= y1 <= record["height"]
    assert sum(len(r["detections"]) for r in result["images"]) > 0
    assert "demo: 100%" in proc.stderr  # the progress bar


def test_demo_tool_errors_are_clear(ci_demo, tmp_path, capsys):
    config, weights, opts = _run(ci_demo, "gridclip")
    image_dir = tmp_path / "imgs"
    image_dir.mkdir()

    def fails(args, code, *needles):
        with pytest.raises(SystemExit) as e:
            demo.main(args)
        assert e.value.code == code, args
        err = capsys.readouterr().err
        for needle in needles:
            assert needle in err, (needle, err)

    base = ["--config-file", config, "--weights", weights]
    fails(base + ["--input", str(tmp_path / "*.png")], 2, "matched no file")
    fails(base + ["--input", str(image_dir)], 2, "holds no image")
    (image_dir / "broken.png").write_text("not an image")
    ok_input = ["--input", str(image_dir / "broken.png")]
    fails(base + ok_input + ["--custom-vocabulary", ""], 2, "empty")
    fails(base + ok_input + ["--custom-vocabulary", " , "], 2, "empty")
    fails(base + ok_input + ["--custom-vocabulary", str(tmp_path / "nope.txt")], 2, "nope.txt")
    # trailing KEY VALUE pairs after --input are config overrides, not inputs
    fails(base + ok_input + ["MODEL.NO_SUCH_KEY", "1"], 2, "MODEL.NO_SUCH_KEY")
    for bad in ("nan", "inf", "-0.1", "1.5"):
        fails(base + ok_input + ["--confidence-threshold", bad], 2, "between 0 and 1")
    fails(base + ok_input + ["--confidence-threshold", "high"], 2, "not a number")
    fails(["--config-file", config] + ok_input, 2, "--weights")
    fails(base[:2] + ["--weights", str(tmp_path / "x.pth")] + ok_input, 2, "x.pth")
    # An unreadable image stops the run and is named.
    fails(base + ok_input + ["--vocabulary", "world_novel"] + opts, 1, "broken.png", "cannot read")


# ---------------------------------------------------------------------------------- notebook
def _execute_notebook(nb, env, tmp_path):
    import jupyter_client.kernelspec
    from nbclient import NotebookClient

    try:
        jupyter_client.kernelspec.KernelSpecManager().get_kernel_spec("python3")
    except jupyter_client.kernelspec.NoSuchKernel:  # register into this venv only
        import ipykernel.kernelspec

        ipykernel.kernelspec.install(prefix=sys.prefix)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        client = NotebookClient(
            nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(tmp_path)}}
        )
        return client.execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_notebook_runs_headless(ci_demo, tmp_path):
    import nbformat

    nb = nbformat.read(str(NOTEBOOK), as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "strip outputs"
    env = {
        "GRIDCLIP_DEMO_DIR": ci_demo["output_dir"],
        "GRIDCLIP_DEMO_NUM_IMAGES": "1",
        "MPLBACKEND": "Agg",
        "OMP_NUM_THREADS": "1",
    }
    nb = _execute_notebook(nb, env, tmp_path)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    # ground truth, base, novel, typed vocabulary, grounded caption, ViLD, comparison plot
    assert len(images) == 7, len(images)
    text = "".join(o.get("text", "") for o in outputs)
    assert "GridCLIP: trained vocabulary, 48 classes" in text, text
    assert "caption: a" in text and "embedded as" in text, text  # the grounding cell
    table = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    assert len(table) == 1 and "APr (novel)" in table[0] and "ViLD" in table[0]


def test_notebook_says_how_to_make_missing_models(tmp_path):
    import nbformat
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(str(NOTEBOOK), as_version=4)
    first_code = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")
    nb.cells = nb.cells[: first_code + 1]
    with pytest.raises(CellExecutionError, match="make demo"):
        _execute_notebook(nb, {"GRIDCLIP_DEMO_DIR": str(tmp_path / "nothing")}, tmp_path)


# --------------------------------------------------------------------------- compare_eval.py
def _small_val_world(ci_demo, root, num_images=2):
    """$DETECTRON2_DATASETS/gridclip_world_ci with the first val images of the demo's world
    (one with a novel object): the same registration and evaluation, less to evaluate."""
    world = pathlib.Path(ci_demo["world_root"]).resolve()  # may be relative to the cwd
    val = json.loads((world / "annotations/val.json").read_text())
    rare_ids = {c["id"] for c in val["categories"] if c["frequency"] == "r"}
    with_novel = [a["image_id"] for a in val["annotations"] if a["category_id"] in rare_ids]
    keep = list(dict.fromkeys(with_novel[:1] + [im["id"] for im in val["images"]]))[:num_images]
    val["images"] = [im for im in val["images"] if im["id"] in keep]
    val["annotations"] = [a for a in val["annotations"] if a["image_id"] in keep]
    small = root / "gridclip_world_ci"
    (small / "annotations").mkdir(parents=True)
    (small / "annotations/val.json").write_text(json.dumps(val))
    os.symlink(world / "annotations/train.json", small / "annotations/train.json")
    for folder in ("train", "val"):
        os.symlink(world / folder, small / folder)


def test_compare_eval_table_and_expected_results_regression(ci_demo, tmp_path):
    datasets = tmp_path / "datasets"
    _small_val_world(ci_demo, datasets)
    out = tmp_path / "compare"
    cmd = [sys.executable, str(ROOT / "tools/compare_eval.py"), "--output-dir", str(out)]
    for name in ("gridclip", "vild"):
        config, weights, opts = _run(ci_demo, name)
        cmd += ["--run", name, config, weights, "--run-opts", name] + opts
    # A loose expectation that holds and an impossible one (a regression) for ViLD.
    cmd += ["--run-opts", "gridclip", "TEST.EXPECTED_RESULTS", "[['bbox', 'AP', 50.0, 51.0]]"]
    cmd += ["--run-opts", "vild", "TEST.EXPECTED_RESULTS", "[['bbox', 'AP', 1000.0, 0.01]]"]
    cmd += ["--dataset", "gridclip_world_ci_val", "--jobs", "2", "DATALOADER.NUM_WORKERS", "0"]
    env = dict(SUBPROCESS_ENV, DETECTRON2_DATASETS=str(datasets))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)

    assert proc.returncode != 0, "a missed expectation must fail the comparison"
    assert "run 'vild': expected results not met" in proc.stderr, proc.stderr[-3000:]
    assert "run 'gridclip'" not in proc.stderr
    result = json.loads((out / "comparison.json").read_text())
    assert result["datasets"] == ["gridclip_world_ci_val"]
    status = {r["name"]: r["status"] for r in result["runs"]}
    assert status == {"gridclip": "ok", "vild": "expected results not met"}, proc.stderr[-3000:]
    for run in result["runs"]:  # both were really evaluated on the small set
        assert 0.0 <= run["results"]["bbox"]["AP"] <= 100.0
        assert "--eval-only" in run["command"]
    table = (out / "comparison.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| run"))
    assert header.split("|")[2:6] == [" AP ", " APr ", " APc ", " APf "]
    rows = [line for line in table.splitlines() if line.startswith(("| gridclip", "| vild"))]
    assert len(rows) == 2 and rows[0] in proc.stdout and rows[1] in proc.stdout


def test_compare_eval_table_and_argument_errors(tmp_path, capsys):
    records = [
        {
            "name": "a",
            "eval_s": 3.0,
            "status": "ok",
            "results": {"bbox": {"APf": -100.0, "AP50": 9.0, "AP": 1.234, "APr": float("nan")}},
        },
        {"name": "b", "eval_s": 4.0, "status": "failed"},
    ]
    lines = compare.comparison_table(records).splitlines()
    assert lines[0] == "| run | AP | APr | APf | AP50 | eval s | status |"
    assert lines[2] == "| a | 1.2 | nan | n/a | 9.0 | 3 | ok |"
    assert lines[3] == "| b | - | - | - | - | 4 | failed |"

    weights = tmp_path / "m.pth"
    weights.write_bytes(b"")
    run = ["--run", "x", "embedded/GridCLIP_world.yaml", str(weights)]
    for args, needle in [
        (run + run, "twice"),
        (["--run", "x", "c.yaml", str(tmp_path / "none.pth")], "none.pth"),
        (run + ["--run-opts", "y", "K", "V"], "no --run of that name"),
        (run + ["--run-opts", "x", "K"], "KEY VALUE pairs"),
        (run + ["--dataset", "no_such_dataset"], "not registered"),
        (run + ["MODEL.NO_SUCH_KEY", "1"], "MODEL.NO_SUCH_KEY"),
        (["--run", "../outside", "embedded/GridCLIP_world.yaml", str(weights)], "plain name"),
        (["--run", "/tmp/abs", "embedded/GridCLIP_world.yaml", str(weights)], "plain name"),
    ]:
        with pytest.raises(SystemExit) as e:
            compare.main(args)
        assert e.value.code == 2
        assert needle in capsys.readouterr().err, args
