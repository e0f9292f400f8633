"""Bad annotations and bad images give clear errors naming the file; odd images are handled."""

import json
import os

import numpy as np
import pytest
from detectron2.data import DatasetCatalog
from PIL import Image

from gridclip.config import get_gridclip_cfg
from gridclip.data import (
    register_dataset_file,
    register_datasets_from_cfg,
    register_lvis_format_dataset,
)
from gridclip.data.mapper import CheckedDatasetMapper, ImageReadError
from gridclip.data.validation import DatasetValidationError
from gridclip.engine import Trainer

_counter = iter(range(10**6))


def _register_modified(tiny_lvis_json, modify):
    json_file, image_root = tiny_lvis_json
    data = json.load(open(json_file))
    modify(data)
    path = json_file.replace(".json", f"_mod{next(_counter)}.json")
    json.dump(data, open(path, "w"))
    name = f"tiny_mod_{next(_counter)}"
    register_lvis_format_dataset(name, path, image_root)
    return name, path


def test_out_of_range_category_id(tiny_lvis_json):
    def modify(d):
        d["annotations"][0]["category_id"] = 7

    name, path = _register_modified(tiny_lvis_json, modify)
    with pytest.raises(ValueError, match=r"_mod\d+\.json.*annotation 1: category id 7 outside"):
        DatasetCatalog.get(name)


def test_negative_box(tiny_lvis_json):
    def modify(d):
        d["annotations"][1]["bbox"] = [10, 10, -5, 4]

    name, _ = _register_modified(tiny_lvis_json, modify)
    with pytest.raises(ValueError, match="annotation 2: negative box size"):
        DatasetCatalog.get(name)


def test_nan_box(tiny_lvis_json):
    def modify(d):
        d["annotations"][0]["bbox"] = [float("nan"), 1, 2, 3]

    name, _ = _register_modified(tiny_lvis_json, modify)
    with pytest.raises(ValueError, match="non-finite bbox"):
        DatasetCatalog.get(name)


def test_zero_size_boxes_dropped_with_warning(tiny_lvis_json, caplog):
    def modify(d):
        d["annotations"][0]["bbox"] = [10, 10, 0, 4]

    name, _ = _register_modified(tiny_lvis_json, modify)
    dicts = DatasetCatalog.get(name)
    assert sum(len(d["annotations"]) for d in dicts) == 2
    assert "dropped 1 zero-size boxes" in caplog.text


def test_missing_field(tiny_lvis_json):
    def modify(d):
        del d["annotations"][0]["bbox"]

    name, _ = _register_modified(tiny_lvis_json, modify)
    with pytest.raises((ValueError, KeyError), match="bbox"):
        DatasetCatalog.get(name)


def _mapper():
    cfg = get_gridclip_cfg(opts=["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "128"])
    return CheckedDatasetMapper(cfg, is_train=False)


def _record(path, h, w):
    return {"file_name": str(path), "image_id": 1, "height": h, "width": w, "annotations": []}


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_grayscale_rgba_palette_images_become_3_channels(tmp_path, mode):
    path = tmp_path / f"img_{mode}.png"
    Image.new(mode, (40, 30)).save(path)
    out = _mapper()(_record(path, 30, 40))
    assert out["image"].shape[0] == 3


def test_exif_rotation_applied(tmp_path):
    path = tmp_path / "rot.jpg"
    img = Image.fromarray(np.zeros((30, 40, 3), np.uint8))
    exif = img.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    img.save(path, exif=exif)
    out = _mapper()(_record(path, 40, 30))
    _, h, w = out["image"].shape
    assert h > w  # a 40x30 landscape file displayed as portrait


def test_truncated_image_names_the_file(tmp_path):
    path = tmp_path / "cut.jpg"
    Image.fromarray(np.random.randint(0, 255, (64, 64, 3), np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageReadError, match="cut.jpg"):
        _mapper()(_record(path, 64, 64))


def test_unreadable_image_names_the_file(tmp_path):
    path = tmp_path / "notanimage.png"
    path.write_text("hello")
    with pytest.raises(ImageReadError, match="notanimage.png"):
        _mapper()(_record(path, 10, 10))


# ------------------------------------------------- datasets checked up front (issue 14, item 2)
def _write_modified(tiny_lvis_json, modify):
    json_file, image_root = tiny_lvis_json
    data = json.load(open(json_file))
    modify(data)
    path = json_file.replace(".json", f"_mod{next(_counter)}.json")
    json.dump(data, open(path, "w"))
    return path, image_root


def _to_coco(data):
    """The tiny LVIS set as a COCO-format file (no frequencies, file_name relative to images/)."""
    for c in data["categories"]:
        del c["frequency"]
    for a in data["annotations"]:
        a["iscrowd"] = 0


@pytest.mark.parametrize("fmt", ["lvis", "coco"])
def test_duplicate_image_ids_name_both_images(tiny_lvis_json, fmt):
    def modify(d):
        d["images"][1]["id"] = d["images"][0]["id"]  # img2.png claims img1's id (and boxes)
        if fmt == "coco":
            _to_coco(d)

    path, root = _write_modified(tiny_lvis_json, modify)
    name = f"dup_images_{fmt}_{next(_counter)}"
    register_dataset_file(name, path, os.path.join(root, "images") if fmt == "coco" else root)
    with pytest.raises(DatasetValidationError, match=r"_mod\d+\.json: image id 1 is used by two "
                       r"images, 'img1.png' and 'img2.png'"):  # fmt: skip
        DatasetCatalog.get(name)


@pytest.mark.parametrize("fmt", ["lvis", "coco"])
def test_duplicate_annotation_ids_are_named(tiny_lvis_json, fmt):
    def modify(d):
        d["annotations"][2]["id"] = d["annotations"][0]["id"]
        if fmt == "coco":
            _to_coco(d)

    path, root = _write_modified(tiny_lvis_json, modify)
    name = f"dup_anns_{fmt}_{next(_counter)}"
    register_dataset_file(name, path, os.path.join(root, "images") if fmt == "coco" else root)
    with pytest.raises(DatasetValidationError, match=r"annotation id 1 is used twice \(image 1 "
                       r"'img1.png' and image 2 'img2.png'\)"):  # fmt: skip
        DatasetCatalog.get(name)


@pytest.mark.parametrize("fmt", ["lvis", "coco"])
def test_missing_image_files_are_counted_and_named_up_front(tiny_lvis_json, fmt):
    def modify(d):
        if fmt == "coco":
            _to_coco(d)

    path, root = _write_modified(tiny_lvis_json, modify)
    os.remove(os.path.join(root, "images", "img2.png"))
    name = f"missing_files_{fmt}_{next(_counter)}"
    register_dataset_file(name, path, os.path.join(root, "images") if fmt == "coco" else root)
    with pytest.raises(FileNotFoundError, match=r"1 of 2 image files do not exist: '.*img2.png' "
                       r"\(image 2\)"):  # fmt: skip
        DatasetCatalog.get(name)


def test_boxes_outside_their_image_are_counted_and_a_split_without_instances_fails(
    tiny_lvis_json, caplog
):
    def one_outside(d):
        d["annotations"][0]["bbox"] = [200, 10, 30, 20]  # image is 96 x 80

    name, _ = _register_modified(tiny_lvis_json, one_outside)
    dicts = DatasetCatalog.get(name)
    assert sum(len(d["annotations"]) for d in dicts) == 2
    assert "dropped 1 boxes that lie outside their image" in caplog.text
    assert "annotation 1 bbox [200, 10, 30, 20]" in caplog.text

    def all_outside(d):
        for a in d["annotations"]:
            a["bbox"] = [-50, -50, 20, 20]

    name, _ = _register_modified(tiny_lvis_json, all_outside)
    match = r"no usable instance in 2 images \(3 boxes outside their images were dropped\)"
    with pytest.raises(DatasetValidationError, match=match):
        DatasetCatalog.get(name)


def test_empty_annotation_list_fails_for_training_and_evaluation(tiny_lvis_json, tmp_path):
    def modify(d):
        d["annotations"] = []

    name, path = _register_modified(tiny_lvis_json, modify)
    with pytest.raises(DatasetValidationError, match=r"_mod\d+\.json: no usable instance in 2"):
        DatasetCatalog.get(name)
    # what the trainer's loaders call (was "No valid data found" / results {} with exit 0)
    cfg = get_gridclip_cfg(opts=["DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", f"('{name}',)"])
    cfg.MODEL.META_ARCHITECTURE = "GridCLIP"
    cfg.MODEL.RETINANET.NUM_CLASSES = 2
    cfg.OUTPUT_DIR = str(tmp_path)
    with pytest.raises(DatasetValidationError, match="no usable instance"):
        Trainer.build_test_loader(cfg, name)
    with pytest.raises(DatasetValidationError, match="no usable instance"):
        Trainer.build_train_loader(cfg)


def test_malformed_json_names_the_file_and_position(tiny_lvis_json):
    name, path = _register_modified(tiny_lvis_json, lambda d: None)  # metadata read: file fine
    text = open(path).read()  # then the file is damaged (a truncated copy)
    open(path, "w").write(text[: len(text) // 2])
    with pytest.raises(DatasetValidationError, match=r"_mod\d+\.json: malformed JSON at line 1, "
                       r"column \d+ \(character \d+\)"):  # fmt: skip
        DatasetCatalog.get(name)
    broken = os.path.join(os.path.dirname(path), "broken.json")
    open(broken, "w").write('{"categories": [}')
    with pytest.raises(DatasetValidationError, match=r"broken.json: malformed JSON at line 1"):
        register_lvis_format_dataset(f"broken_{next(_counter)}", broken, "")


def test_dataset_with_another_class_count_than_the_model(tiny_lvis_json, tmp_path):
    json_file, root = tiny_lvis_json
    entry = f"classes_{next(_counter)}={json_file}:{root}"
    name = entry.split("=")[0]
    cfg = get_gridclip_cfg(opts=["DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", "()"])
    cfg.DATASETS.FILES = (entry,)
    cfg.MODEL.META_ARCHITECTURE = "RetinaNet"  # closed-set: its class count is the config's
    cfg.MODEL.RETINANET.NUM_CLASSES = 80
    match = rf"training dataset '{name}' .* has 2 categories .*fewer than the model's "
    with pytest.raises(DatasetValidationError, match=match + "MODEL.RETINANET.NUM_CLASSES = 80"):
        register_datasets_from_cfg(cfg)
    cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 1
    with pytest.raises(DatasetValidationError, match="more than the model's MODEL.ROI_HEADS"):
        register_datasets_from_cfg(cfg)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 2
    register_datasets_from_cfg(cfg)
    cfg.DATASETS.TRAIN = ()
    cfg.DATASETS.TEST = (name,)  # test sets: evaluated with their own class names
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 80
    register_datasets_from_cfg(cfg)


@pytest.mark.parametrize("image_format", ["RGB", "BGR"])
@pytest.mark.parametrize("is_train", [True, False])
def test_16_bit_and_float_images_follow_the_image_rule_in_training_and_test(
    tmp_path, image_format, is_train
):
    """A 16-bit gray PNG and a float TIFF reach the model scaled to 8 bits by the project's image
    rule (gridclip/data/images.py); Detectron2's read_image clipped every value above 255 to
    white (issue 14). An 8-bit file is still read by Detectron2 as before."""
    from gridclip.data.images import read_image_bgr

    gray16 = (np.arange(30 * 40, dtype=np.uint32).reshape(30, 40) * 54).astype(np.uint16)
    Image.fromarray(gray16).save(tmp_path / "gray16.png")
    gray_f = np.linspace(0, 1, 30 * 40, dtype=np.float32).reshape(30, 40)
    Image.fromarray(gray_f, mode="F").save(tmp_path / "float.tif")
    cfg = get_gridclip_cfg(
        opts=[
            "INPUT.MIN_SIZE_TRAIN", "(30,)", "INPUT.MAX_SIZE_TRAIN", "1000",
            "INPUT.MIN_SIZE_TEST", "30", "INPUT.MAX_SIZE_TEST", "1000",
            "INPUT.RANDOM_FLIP", "none", "INPUT.FORMAT", image_format,
        ]
    )  # fmt: skip
    mapper = CheckedDatasetMapper(cfg, is_train=is_train)
    for name in ("gray16.png", "float.tif"):
        out = mapper(_record(tmp_path / name, 30, 40))["image"].numpy().transpose(1, 2, 0)
        expected = read_image_bgr(str(tmp_path / name))
        expected = expected[:, :, ::-1] if image_format == "RGB" else expected
        assert out.shape == (30, 40, 3), name
        np.testing.assert_array_equal(out, expected, err_msg=name)
        assert out.max() > 200 and out.min() < 50, name  # the full range, not clipped
    Image.fromarray(np.full((30, 40, 3), (10, 20, 30), np.uint8)).save(tmp_path / "rgb.png")
    out = mapper(_record(tmp_path / "rgb.png", 30, 40))["image"].numpy()
    assert out[:, 0, 0].tolist() == ([10, 20, 30] if image_format == "RGB" else [30, 20, 10])


def _coco_json(tmp_path, stem, modify=None):
    """A 2-image COCO file (images on disk) registered with Detectron2's own
    ``register_coco_instances``; ``modify(data)`` breaks it."""
    from detectron2.data.datasets import register_coco_instances

    root = tmp_path / stem
    root.mkdir()
    images = []
    for image_id in (1, 2):
        Image.new("RGB", (96, 80), (128, 128, 128)).save(root / f"img{image_id}.png")
        images.append(
            {"id": image_id, "file_name": f"img{image_id}.png", "height": 80, "width": 96}
        )
    annotations = [
        {"id": i, "image_id": i, "category_id": i, "bbox": box, "area": 600, "iscrowd": 0}
        for i, box in ((1, [10, 10, 30, 20]), (2, [5, 5, 40, 40]))
    ]
    data = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }
    if modify is not None:
        modify(data)
    path = root / "instances.json"
    path.write_text(json.dumps(data))
    name = f"d2_coco_{stem}_{next(_counter)}"
    register_coco_instances(name, {}, str(path), str(root))
    return name, str(path)


def _duplicate_image_id(d):
    d["images"][1]["id"] = 1
    d["annotations"][1]["image_id"] = 1


def _missing_file(d):
    d["images"][1]["file_name"] = "gone.png"


def _outside(d):
    for a in d["annotations"]:
        a["bbox"] = [200, 10, 30, 20]


def _negative_box(d):
    d["annotations"][0]["bbox"] = [10, 10, -5, 4]


@pytest.mark.parametrize(
    "modify, error, match",
    [
        (_duplicate_image_id, DatasetValidationError, r"image id 1 is used by two images"),
        (_missing_file, FileNotFoundError, r"1 of 2 image files do not exist: .*gone.png"),
        (_outside, DatasetValidationError, r"no usable instance in 2 images \(2 boxes outside"),
        (_negative_box, ValueError, r"image 1 .*annotation #1 of the image: negative box size"),
    ],
)
@pytest.mark.parametrize("split", ["TRAIN", "TEST"])
def test_detectron2_registrations_are_validated_before_the_first_iteration(
    tmp_path, modify, error, match, split
):
    """A set registered with Detectron2's own register_coco_instances gets the checks of the
    project's registrations when the trainer builds its loaders (issue 14: it was loaded
    unchecked: a repeated image id trained one image's pixels with another's boxes)."""
    name, path = _coco_json(tmp_path, modify.__name__.strip("_"), modify)
    other, _ = _coco_json(tmp_path, "ok")
    train, test = (name, other) if split == "TRAIN" else (other, name)
    cfg = get_gridclip_cfg(
        "Base-GridCLIP.yaml",
        [
            "DATASETS.TRAIN", f"('{train}',)", "DATASETS.TEST", f"('{test}',)",
            "MODEL.RETINANET.NUM_CLASSES", "2", "SOLVER.IMS_PER_BATCH", "1",
            "DATALOADER.NUM_WORKERS", "0",
        ],
    )  # fmt: skip
    build = Trainer.build_train_loader if split == "TRAIN" else Trainer.build_test_loader
    args = (cfg,) if split == "TRAIN" else (cfg, name)
    with pytest.raises(error, match=match) as e:
        build(*args)
    assert "instances.json" in str(e.value)
    assert register_datasets_from_cfg(cfg) == []  # idempotent: wrapped once
    # the sound set loads as Detectron2 loads it
    assert [d["image_id"] for d in DatasetCatalog.get(other)] == [1, 2]
