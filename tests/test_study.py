"""The study command (seeds x variants x splits) and the world's split seed."""

import json
import os

import pytest

from gridclip.data.world import (
    generate_world,
    register_world,
    world_categories,
    world_params,
    world_prefix,
)
from gridclip_tools import embedded_demo, study


def test_split_seed_redraws_novel_classes_keeping_names_and_ids():
    base = world_categories()
    for k in (1, 2, 7):
        other = world_categories(k)
        assert [c["name"] for c in other] == [c["name"] for c in base]  # same ids, same names
        novel = [c for c in other if c["frequency"] == "r"]
        assert len(novel) == 10
        assert sum(c["frequency"] == "f" for c in other) == 20
        # a novel class is a new composition of attributes seen in base classes
        base_attrs = [c for c in other if c["frequency"] != "r"]
        for c in novel:
            assert any(b["colour"] == c["colour"] for b in base_attrs)
            assert any(b["shape"] == c["shape"] for b in base_attrs)
    novel_sets = {
        k: {c["name"] for c in world_categories(k) if c["frequency"] == "r"} for k in (0, 1, 2)
    }
    assert novel_sets[0] != novel_sets[1] and novel_sets[1] != novel_sets[2]
    # split 0 is the fixed default (worlds generated before split seeds stay valid)
    assert "split_seed" not in world_params("ci")
    assert world_params("ci", split_seed=1)["split_seed"] == 1
    with pytest.raises(ValueError, match="split_seed"):
        world_params("ci", split_seed=-1)
    assert world_prefix("demo", 1) == "gridclip_world_split1"


def test_world_registered_with_another_split_is_refused(tmp_path):
    root = str(tmp_path / "w")
    generate_world(root, preset="ci", split_seed=1, num_train=3, num_val=2, image_size=64)
    train = json.load(open(os.path.join(root, "annotations", "train.json")))
    novel = {c["name"] for c in train["categories"] if c["frequency"] == "r"}
    assert novel == {c["name"] for c in world_categories(1) if c["frequency"] == "r"}
    from detectron2.data import DatasetCatalog

    register_world(root, prefix="test_split_right", split_seed=1)
    assert DatasetCatalog.get("test_split_right_val")
    register_world(root, prefix="test_split_wrong", split_seed=0)
    with pytest.raises(ValueError, match="split seed 0.*split seed 1"):
        DatasetCatalog.get("test_split_wrong_val")


def test_parse_variant_and_schedule():
    name, model = study.parse_variant("ila2=MODEL.GRIDCLIP.IMAGE_ALIGN_WEIGHT 2.0")
    assert name == "ila2" and model.opts == ("MODEL.GRIDCLIP.IMAGE_ALIGN_WEIGHT", "2.0")
    assert model.config == study.DEFAULT_CONFIG
    _, model = study.parse_variant("v@embedded/ViLD_world.yaml=SOLVER.BASE_LR 0.02")
    assert model.config == "embedded/ViLD_world.yaml"
    for bad in ("noequals", "=A 1", "x=ONLY_KEY", "../x=A 1"):
        with pytest.raises(Exception):
            study.parse_variant(bad)
    assert study.schedule_opts(None) == []
    opts = study.schedule_opts(900)
    assert opts[opts.index("SOLVER.MAX_ITER") + 1] == "900"
    assert opts[opts.index("SOLVER.STEPS") + 1] == "(660, 810)"  # the configs' 220/270 of 300


def test_plan_runs_names_the_split_and_the_oracle_training_set(tmp_path):
    variants = {k: embedded_demo.MODELS[k] for k in ("gridclip", "gridclip_oracle")}
    runs = study.plan_runs(variants, [1, 2], [0, 1], 60, [], str(tmp_path))
    assert len(runs) == 8
    by = {(m["variant"], m["split"], m["seed"]): run for run, m in runs}
    opts = by[("gridclip_oracle", 1, 2)][3]
    assert opts[opts.index("DATASETS.TRAIN") + 1] == "('gridclip_world_split1_train_full',)"
    assert opts[opts.index("DATASETS.TEST") + 1] == "('gridclip_world_split1_val',)"
    assert opts[opts.index("SEED") + 1] == "2"
    assert by[("gridclip", 0, 1)][4].endswith(os.path.join("split0", "gridclip", "s1"))
    assert by[("gridclip", 0, 1)][5] == 60


def test_variant_values_take_the_run_seed_and_split(tmp_path):
    name, model = study.parse_variant(
        "r2=MODEL.GRIDCLIP.PAIRS_PSEUDO_BOXES out/split{split}/labels_s{seed}.json"
    )
    runs = study.plan_runs({name: model}, [2, 3], [1], 60, [], str(tmp_path))
    files = {m["seed"]: run[3][run[3].index("MODEL.GRIDCLIP.PAIRS_PSEUDO_BOXES") + 1]
             for run, m in runs}  # fmt: skip
    assert files == {2: "out/split1/labels_s2.json", 3: "out/split1/labels_s3.json"}


def test_a_pairs_variant_generates_its_world_pairs_first(tmp_path, monkeypatch):
    """A variant trained on the world's image-text pairs gets them generated before training
    (a fresh machine has only the world), once per world; box-only variants need none."""
    made = []
    monkeypatch.setattr(study, "generate_world_pairs", lambda root, **kw: made.append(root))
    box_only = study.plan_runs({"gridclip": embedded_demo.MODELS["gridclip"]}, [1], [0], 60, [],
                               str(tmp_path))  # fmt: skip
    assert study.generate_run_pairs(box_only) == [] and made == []
    name, model = study.parse_variant("pairs@embedded/GridCLIP_world_pairs.yaml=")
    runs = study.plan_runs({name: model}, [1, 2], [0], 60, [], str(tmp_path))
    roots = study.generate_run_pairs(runs)
    assert roots == made == [study.default_world_root("demo", 0)]


def test_aggregate_mean_std_and_paired_differences():
    def rec(v, seed, ap, apr):
        return {
            "variant": v,
            "split": 0,
            "seed": seed,
            "bbox": dict(AP=ap, APr=apr, APc=ap, APf=ap),
        }

    records = [rec("a", 1, 30, 20), rec("a", 2, 32, 22), rec("b", 1, 31, 19), rec("b", 2, 35, 25)]
    agg = study.aggregate(records, "a")
    a = next(e for e in agg["summary"] if e["variant"] == "a")
    assert a["AP"]["mean"] == pytest.approx(31.0) and a["AP"]["std"] == pytest.approx(2**0.5)
    (paired,) = agg["paired"]
    assert paired["APr"]["mean"] == pytest.approx(1.0)  # (-1 + 3) / 2
    assert paired["APr"]["ahead"] == 1 and paired["AP"]["ahead"] == 2


def test_study_end_to_end_with_a_fake_trainer(tmp_path, monkeypatch):
    """Every run is launched with its seed and dataset, and the report reads every result."""
    fake = tmp_path / "fake_train_net.py"
    fake.write_text(
        "import json, os, sys\n"
        "out = sys.argv[sys.argv.index('OUTPUT_DIR') + 1]\n"
        "seed = int(sys.argv[sys.argv.index('SEED') + 1])\n"
        "ila = 'MODEL.GRIDCLIP.IMAGE_ALIGN_WEIGHT' in sys.argv\n"
        "m = {k: 10.0 * seed + (0 if ila else 2) for k in"
        " ('AP', 'APr', 'APc', 'APf', 'AP50', 'APs', 'APm', 'APl')}\n"
        "json.dump({'results': {'bbox': m}}, open(os.path.join(out, 'results.json'), 'w'))\n"
    )
    monkeypatch.setattr(embedded_demo, "TRAIN_NET", str(fake))
    out = tmp_path / "study"
    result = study.main(
        [
            "--preset",
            "ci",
            "--variants",
            "gridclip",
            "gridclip_no_ila",
            "--seeds",
            "1",
            "2",
            "--output-dir",
            str(out),
            "--jobs",
            "1",
        ]
    )
    assert len(result["runs"]) == 4
    (paired,) = result["paired"]
    assert paired["variant"] == "gridclip_no_ila"
    assert paired["APr"]["mean"] == pytest.approx(-2.0) and paired["APr"]["ahead"] == 0
    md = open(out / "study.md").read()
    assert "gridclip_no_ila - gridclip" in md and "(0/2 ahead)" in md
    assert os.path.getsize(out / "study.png") > 0
    assert json.load(open(out / "study.json"))["runs"][0]["seed"] == 1
