"""Nothing silent (issue 14): images of any kind given to the predictor and the demo, the demo
keeping what it did, missing weights and numeric options of the tools, pickled CLIP modules,
file modes. Each test injects a fault that ``main`` (ba4ce31) absorbed or reported confusingly
(see docs/RELIABILITY.md, test file ``N``)."""

import json
import os
import re
import stat
import tracemalloc

import numpy as np
import pytest
import tiny_models
import torch
import train_net
from detectron2.engine import default_argument_parser
from detectron2.modeling import build_model
from PIL import Image

from gridclip.clip import CLIPWeightsError, load_clip
from gridclip.clip.teacher_cache import META_FILE, write_cache_meta
from gridclip.clip.text import save_text_embeddings
from gridclip.config import get_gridclip_cfg
from gridclip.data.images import ImageInputError, read_image_bgr, to_bgr_uint8
from gridclip.data.world import generate_world
from gridclip.engine import AtomicCheckpointer, write_results
from gridclip.engine.predictor import MAX_DRAWING_SIDE, OpenVocabularyPredictor
from gridclip.utils import check_whole_number
from gridclip_tools import cache_teacher_embeddings, cache_vild_teacher
from gridclip_tools import compare_eval as compare
from gridclip_tools import demo, embedded_demo, make_world, small_clip_training
from gridclip_tools.benchmark import cli as benchmark_cli

D, K = 64, 5


def tiny_opts(assets):
    """Base-GridCLIP.yaml on the tiny CLIP, small test size, as strings (command lines)."""
    # fmt: off
    opts = tiny_models.tiny_clip_opts(assets, D) + [
        "MODEL.CLIP_RESNET.FREEZE_AT", 1, "MODEL.FPN.OUT_CHANNELS", 32,
        "MODEL.RETINANET.NUM_CONVS", 1, "MODEL.RETINANET.NUM_CLASSES", K,
        "MODEL.RETINANET.SCORE_THRESH_TEST", 0.0,
        "DATASETS.TRAIN", "()", "DATASETS.TEST", "()",
        "INPUT.MIN_SIZE_TEST", 64, "INPUT.MAX_SIZE_TEST", 128,
    ]
    # fmt: on
    return [str(v) for v in opts]


@pytest.fixture(scope="module")
def weights(assets, tmp_path_factory):
    """A randomly initialised tiny GridCLIP checkpoint (no training needed to test inputs)."""
    torch.manual_seed(0)
    model = build_model(get_gridclip_cfg("Base-GridCLIP.yaml", tiny_opts(assets)))
    folder = tmp_path_factory.mktemp("tiny_weights")
    AtomicCheckpointer(model, save_dir=str(folder)).save("model")
    return str(folder / "model.pth")


@pytest.fixture(scope="module")
def predictor(assets, weights):
    return OpenVocabularyPredictor.from_config_file(
        "Base-GridCLIP.yaml", weights, tiny_opts(assets)
    )


def _boxes(outputs):
    instances = outputs["instances"]
    return torch.cat([instances.pred_boxes.tensor, instances.scores[:, None]], 1)


# ------------------------------------------------------------------------- images: one rule
@pytest.fixture(scope="module")
def bgr():
    rng = np.random.RandomState(0)
    return (rng.rand(48, 60, 3) * 255).astype(np.uint8)


def test_every_kind_of_image_array_is_converted_by_the_documented_rule(predictor, bgr):
    gray = bgr[:, :, 1]
    alpha = np.full(gray.shape, 77, np.uint8)
    same = {  # each is the same picture as `reference`
        "uint16 (16-bit)": (bgr.astype(np.uint16) * 257, bgr),
        "float32 in [0, 1]": (bgr.astype(np.float32) / 255, bgr),
        "float64 in [0, 255]": (bgr.astype(np.float64), bgr),
        "int64 in 0..255": (bgr.astype(np.int64), bgr),
        "BGRA": (np.dstack([bgr, alpha]), bgr),
        "gray (H, W)": (gray, np.dstack([gray] * 3)),
        "gray (H, W, 1)": (gray[:, :, None], np.dstack([gray] * 3)),
        "gray + alpha": (np.dstack([gray, alpha]), np.dstack([gray] * 3)),
        "uint16 gray": (gray.astype(np.uint16) * 257, np.dstack([gray] * 3)),
        "bool": (gray > 128, np.dstack([(gray > 128).astype(np.uint8) * 255] * 3)),
        "non-contiguous": (bgr[:, ::-1][:, ::-1], bgr),
    }
    for kind, (image, reference) in same.items():
        converted = to_bgr_uint8(image)
        assert converted.dtype == np.uint8 and converted.shape == reference.shape, kind
        assert np.array_equal(converted, reference), kind
    # the predictor applies the rule (before: uint16/float/gray failed or were misread)
    expected = _boxes(predictor(bgr))
    for kind in ("uint16 (16-bit)", "float32 in [0, 1]", "BGRA"):
        assert torch.equal(_boxes(predictor(same[kind][0])), expected), kind
    batch = predictor.predict_batch([same["float32 in [0, 1]"][0], bgr])
    for out in batch:  # a batch is numerically close to one by one (batched convolutions)
        assert torch.allclose(_boxes(out), expected, atol=1e-3)
    gray3 = _boxes(predictor(np.dstack([gray] * 3)))
    assert torch.equal(_boxes(predictor(gray)), gray3)


@pytest.mark.parametrize(
    "image, needle",
    [
        (np.zeros((3, 48, 60), np.uint8), r"shape \(3, 48, 60\), dtype uint8.*channels first"),
        (np.zeros((48, 60, 5), np.uint8), r"shape \(48, 60, 5\)"),
        (np.zeros((2, 48, 60, 3), np.uint8), r"shape \(2, 48, 60, 3\)"),
        (np.zeros((0, 60, 3), np.uint8), "the image is empty"),
        (np.full((48, 60, 3), np.nan, np.float32), "dtype float32.*NaN"),
        (np.full((48, 60, 3), -0.5, np.float32), r"in \[0, 1\].*found -0.5"),
        (np.full((48, 60, 3), 300.0), r"found 300\.\.300"),
        (np.full((48, 60), 1000, np.int32), "dtype int32.*8-bit.*found 1000"),
        (np.zeros((48, 60, 3), np.complex64), r"dtype complex64\): not an image dtype"),
        ("image.png", "expected a numpy array"),
    ],
)
def test_images_the_rule_refuses_are_named_by_shape_and_dtype(predictor, image, needle):
    with pytest.raises(ImageInputError, match=needle):
        predictor(image) if not isinstance(image, str) else to_bgr_uint8(image)
    if isinstance(image, np.ndarray):
        with pytest.raises(ImageInputError, match=needle.split(".*")[0]):
            predictor.predict_batch([image])


def test_image_files_of_any_bit_depth_and_channel_count(tmp_path, bgr):
    gray16 = (np.arange(48 * 60).reshape(48, 60) * 20).astype(np.uint16)
    Image.fromarray(gray16).save(tmp_path / "gray16.png")
    expected = ((gray16.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    image = read_image_bgr(str(tmp_path / "gray16.png"))
    assert image.shape == (48, 60, 3) and np.array_equal(image[:, :, 0], expected)
    # Detectron2's reader clips 16-bit values to 255: almost all white
    Image.fromarray(bgr[:, :, ::-1].copy()).convert("LA").save(tmp_path / "la.png")
    assert read_image_bgr(str(tmp_path / "la.png")).shape == (48, 60, 3)
    Image.fromarray(bgr[:, :, 0].astype(np.float32) / 255).save(tmp_path / "float.tif")
    assert np.array_equal(read_image_bgr(str(tmp_path / "float.tif"))[:, :, 2], bgr[:, :, 0])
    Image.fromarray(bgr[:, :, ::-1].copy()).save(tmp_path / "rgb.png")
    assert np.array_equal(read_image_bgr(str(tmp_path / "rgb.png")), bgr)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ImageInputError, match="text.png"):
        read_image_bgr(str(tmp_path / "text.png"))


def test_a_very_large_image_is_predicted_and_drawn_in_bounded_memory(predictor):
    large = np.full((6000, 6000, 3), 90, np.uint8)
    large[1000:3000, 2000:5000] = (20, 200, 40)
    outputs = predictor(large)
    assert outputs["instances"].image_size == (6000, 6000)
    tracemalloc.start()
    try:
        drawing = predictor.visualize(large, outputs, threshold=0.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert max(drawing.shape[:2]) == MAX_DRAWING_SIDE and drawing.shape[2] == 3
    # Detectron2's Visualizer holds several float copies of its canvas: ~290 MB at 1600 x 1600,
    # ~4 GB for the full 6000 x 6000 drawing of ba4ce31
    assert peak < 400 * 2**20, peak / 2**20
    assert outputs["instances"].image_size == (6000, 6000)  # the outputs are left as they were


# --------------------------------------------------------------------------------- the demo
def _demo_args(assets, weights, inputs, out, *flags):
    args = ["--config-file", "Base-GridCLIP.yaml"] + (["--weights", weights] if weights else [])
    args += ["--input"] + [str(p) for p in inputs] + ["--output", str(out)]
    return args + ["--confidence-threshold", "0.0"] + list(flags) + tiny_opts(assets)


def test_demo_keeps_the_results_before_a_bad_image_and_converts_odd_files(
    assets, weights, tmp_path, bgr, capsys
):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(bgr[:, :, ::-1].copy()).save(folder / "a_rgb.png")
    Image.fromarray((bgr[:, :, 0].astype(np.uint16) * 257)).save(folder / "b_gray16.png")
    Image.fromarray(bgr[:, :, ::-1].copy()).convert("LA").save(folder / "c_gray_alpha.png")
    (folder / "d_broken.png").write_text("not an image")
    Image.fromarray(bgr).save(folder / "e_after.png")
    out = tmp_path / "out"
    inputs = sorted(folder.iterdir())
    with pytest.raises(SystemExit) as e:
        demo.main(_demo_args(assets, weights, inputs, out))
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "d_broken.png" in err and "the 3 images before it are in" in err
    result = json.loads((out / "detections.json").read_text())
    done = [os.path.basename(r["file_name"]) for r in result["images"]]
    assert done == ["a_rgb.png", "b_gray16.png", "c_gray_alpha.png"]
    assert result["status"].startswith("stopped at") and "d_broken.png" in result["status"]
    assert all((out / r["visualization"]).is_file() for r in result["images"])
    # with --skip-unreadable the bad image is reported and skipped
    result = demo.main(_demo_args(assets, weights, inputs, out, "--skip-unreadable"))
    assert [os.path.basename(p) for p in result["skipped"]] == ["d_broken.png"]
    assert len(result["images"]) == 4 and result["status"] == "complete"
    assert json.loads((out / "detections.json").read_text())["status"] == "complete"


def test_demo_refuses_an_output_file_and_missing_weights_before_building(
    assets, weights, tmp_path, bgr, capsys, monkeypatch
):
    image = tmp_path / "img.png"
    Image.fromarray(bgr).save(image)

    def never(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(demo, "OpenVocabularyPredictor", never)
    existing = tmp_path / "results.json"
    existing.write_text("{}")
    for args, needle in [
        (_demo_args(assets, weights, [image], existing), "is an existing file"),
        (
            _demo_args(assets, None, [image], tmp_path / "o")
            + ["MODEL.WEIGHTS", str(tmp_path / "no" / "such.pth")],
            "checkpoint '" + str(tmp_path / "no" / "such.pth") + "' does not exist",
        ),
    ]:
        with pytest.raises(SystemExit) as e:
            demo.main(args)
        assert e.value.code == 2
        assert needle in capsys.readouterr().err
    assert existing.read_text() == "{}"


def test_missing_weights_as_a_trailing_option_of_eval_only_and_compare_eval(
    assets, weights, tmp_path, capsys
):
    missing = str(tmp_path / "no" / "such.pth")
    args = default_argument_parser().parse_args(
        ["--config-file", "Base-GridCLIP.yaml", "--eval-only"]
        + tiny_opts(assets)
        + ["OUTPUT_DIR", str(tmp_path / "run"), "MODEL.WEIGHTS", missing]
    )
    with pytest.raises(FileNotFoundError, match=f"checkpoint '{missing}' does not exist"):
        train_net.main(args)
    assert not (tmp_path / "run").exists()  # nothing written
    run = ["--run", "a", "Base-GridCLIP.yaml", weights, "--dataset", "gridclip_world_ci_val"]
    run += ["--output-dir", str(tmp_path / "cmp")]
    for extra, needle in [
        (["MODEL.WEIGHTS", missing], f"checkpoint '{missing}' does not exist"),
        (["--run-opts", "a", "MODEL.WEIGHTS", missing], "MODEL.WEIGHTS override"),
        (["--jobs", "0"], "must be at least 1"),
    ]:
        with pytest.raises(SystemExit) as e:
            compare.main(run + extra)
        assert e.value.code == 2
        assert needle in capsys.readouterr().err


@pytest.mark.parametrize(
    "parse, args, needle",
    [
        (make_world.parse_args, ["--num-train", "0"], "must be at least 1"),
        (make_world.parse_args, ["--image-size", "-64"], "must be at least 1"),
        (benchmark_cli.parse_args, ["--iters", "0"], "must be at least 1"),
        (benchmark_cli.parse_args, ["--threads", "-1"], "must not be negative"),
        (benchmark_cli.parse_args, ["--sizes", "64", "nan"], "'nan' is not a whole number"),
        (benchmark_cli.parse_args, ["--image-size", "0", "64"], "must be at least 1"),
        (cache_teacher_embeddings.parse_args, ["--save-every", "0"], "at least 1"),
        (cache_vild_teacher.parse_args, ["--limit", "-3"], "must not be negative"),
        (small_clip_training.parse_args, ["--batch-size", "0"], "must be at least 1"),
        (small_clip_training.parse_args, ["--lr", "nan"], "not a finite number"),
        (small_clip_training.parse_args, ["--lr", "-0.001"], "must be greater than 0"),
        (embedded_demo.parse_args, ["--timing-images", "0"], "must be at least 1"),
    ],
)
def test_numeric_options_of_the_tools_are_checked(parse, args, needle, capsys):
    with pytest.raises(SystemExit) as e:
        parse(args)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize("bad", [0, -2, 1.5, 2.0, True, "3", None])
def test_whole_number_settings_name_the_key_and_value(bad):
    with pytest.raises(ValueError, match=rf"SOME.KEY = {re.escape(repr(bad))} \(steps\): .*>= 1"):
        check_whole_number(bad, "SOME.KEY", meaning="steps")
    assert check_whole_number(3, "SOME.KEY") == 3
    assert check_whole_number(0, "SOME.KEY", minimum=0) == 0


# ------------------------------------------------------------------------- CLIP weights files
def test_a_pickled_module_as_clip_weights_gets_its_own_message(assets, tmp_path):
    path = tmp_path / "clip_module.pt"
    torch.save(assets["model"], path)  # the whole module, not its state dict
    with pytest.raises(CLIPWeightsError) as e:
        load_clip(str(path))
    message = str(e.value)
    assert str(path) in message and "pickled model (torch.save(model)" in message
    assert "clip.model.CLIP" in message and "torch.save(model.state_dict()" in message
    assert "truncated or corrupt" not in message
    torch.save({"weights": torch.zeros(2), "optimizer": torch.optim.SGD}, tmp_path / "other.pt")
    with pytest.raises(CLIPWeightsError, match=r"holds pickled Python objects \(\['torch.optim"):
        load_clip(str(tmp_path / "other.pt"))


# ------------------------------------------------------------------------------- file modes
def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_files_the_tools_write_follow_the_umask(assets, weights, tmp_path, bgr):
    old = os.umask(0o022)
    try:
        written = {}
        model = build_model(get_gridclip_cfg("Base-GridCLIP.yaml", tiny_opts(assets)))
        AtomicCheckpointer(model, save_dir=str(tmp_path / "ckpt")).save("model_0000001")
        written["checkpoint"] = tmp_path / "ckpt" / "model_0000001.pth"
        written["last_checkpoint"] = tmp_path / "ckpt" / "last_checkpoint"
        cfg = get_gridclip_cfg("Base-GridCLIP.yaml", tiny_opts(assets))
        cfg.OUTPUT_DIR = str(tmp_path / "run")
        written["results"] = write_results(cfg, {"bbox": {"AP": 1.0}})
        written["text cache"] = save_text_embeddings(
            str(tmp_path / "t.safetensors"), torch.ones(2, 4)
        )
        written["text npy"] = save_text_embeddings(str(tmp_path / "t.npy"), torch.ones(2, 4))
        write_cache_meta(str(tmp_path / "vild"), {"clip": "aaaa", "embed_dim": 8})
        written["ViLD teacher cache"] = tmp_path / "vild" / META_FILE
        Image.fromarray(bgr).save(tmp_path / "img.png")
        out = tmp_path / "demo"
        demo.main(_demo_args(assets, weights, [tmp_path / "img.png"], out))
        written["demo json"] = out / "detections.json"
        written["demo png"] = out / "img.png"
        compare.write_outputs([], ["d"], str(tmp_path / "cmp"))
        written["compare_eval"] = tmp_path / "cmp" / "comparison.json"
        root = tmp_path / "world"
        generate_world(str(root), preset="ci", num_train=2, num_val=1, image_size=64)
        written["world json"] = root / "annotations" / "train.json"
        written["world image"] = next((root / "train").iterdir())
        modes = {kind: oct(_mode(path)) for kind, path in written.items()}
        assert modes == {kind: "0o644" for kind in written}
        folders = [root, root / "train", root / "annotations", out, tmp_path / "ckpt"]
        assert {oct(_mode(f)) for f in folders} == {"0o755"}  # the world was 0o700
    finally:
        os.umask(old)


class _Seen(Exception):
    """Raised by a stand-in teacher once it has seen the image a cache tool read."""


def test_teacher_cache_tools_read_images_by_the_image_rule(assets, tiny_lvis_json, monkeypatch):
    """Both teacher-cache tools give CLIP a 16-bit training image scaled to 8 bits by the
    project's rule (Detectron2's read_image clipped it to white: issue 14)."""
    from detectron2.data import DatasetCatalog

    from gridclip.data import register_lvis_format_dataset

    json_file, root = tiny_lvis_json
    gray16 = (np.arange(80 * 96, dtype=np.uint32).reshape(80, 96) * 8).astype(np.uint16)
    for name in ("img1.png", "img2.png"):
        Image.fromarray(gray16).save(os.path.join(root, "images", name))
    dataset = f"rule_{abs(hash(json_file))}"
    if dataset not in DatasetCatalog.list():
        register_lvis_format_dataset(dataset, json_file, root)
    expected = read_image_bgr(os.path.join(root, "images", "img1.png"))[:, :, ::-1]
    assert expected.max() > 200 and expected.min() == 0  # the full range survives

    seen = []

    class Teacher:
        def to(self, device):
            return self

        def _seen(self, image):
            seen.append(image[0] if image.dim() == 4 else image)
            raise _Seen

        def embed_tiles(self, image, grids):
            self._seen(image)

        def embed_boxes(self, image, boxes, scales):
            self._seen(image)

    opts = ["MODEL.CLIP.WEIGHTS", str(assets["clip"]), "MODEL.CLIP.EMBED_DIM", str(D)]
    opts += ["MODEL.CLIP.TEACHER_INPUT_SIZE", "64", "MODEL.DEVICE", "cpu"]
    for tool, config in (
        (cache_teacher_embeddings, "Base-GridCLIP.yaml"),
        (cache_vild_teacher, "ViLD_R50.yaml"),
    ):
        monkeypatch.setattr(tool, "build_clip_teacher_from_cfg", lambda cfg: Teacher())
        out = os.path.join(root, f"cache_{tool.__name__.rsplit('.', 1)[-1]}")
        argv = ["--config-file", config, "--dataset", dataset, "--output", out, "--no-progress"]
        with pytest.raises(_Seen):
            tool.main(argv + opts)
        image = seen.pop().permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(image, expected, err_msg=tool.__name__)
