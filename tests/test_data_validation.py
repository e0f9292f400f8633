"""Bad annotations and bad images give clear errors naming the file; odd images are handled."""

import json

import numpy as np
import pytest
from detectron2.data import DatasetCatalog
from PIL import Image

from gridclip.config import get_gridclip_cfg
from gridclip.data import register_lvis_format_dataset
from gridclip.data.mapper import CheckedDatasetMapper, ImageReadError

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
