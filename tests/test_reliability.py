"""Reliability: interrupted runs, numerical faults, multi-process training, bad input.

Each test injects one fault and checks what the program does (see docs/RELIABILITY.md).
Subprocess tests run the real ``projects/GridCLIP/train_net.py`` on the CI world
(``gridclip_world_ci_*``) with a tiny CLIP; the slow ones (``-m slow``) train for a few
iterations, the others fail before training or only write checkpoints.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import clip
import numpy as np
import pytest
import tiny_models
import torch
from detectron2.data import MetadataCatalog
from detectron2.engine import HookBase
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from gridclip import get_gridclip_cfg
from gridclip.clip import CLIPImageTeacher, CLIPWeightsError, clear_clip_memo, load_clip_from_cfg
from gridclip.clip import loading as clip_loading
from gridclip.clip.teacher_cache import (
    TeacherCache,
    TeacherCacheError,
    TeacherEmbeddingCache,
    cache_entry_path,
    read_cache_entry,
    write_cache_entry,
    write_cache_meta,
)
from gridclip.data import datasets_root
from gridclip.data.world import generate_world
from gridclip.engine import AtomicCheckpointer, Trainer
from gridclip.engine.checkpoint import non_finite_entries
from gridclip.modeling.text_classifier import TextEmbeddingClassifier, l2_normalize

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_NET = os.path.join(REPO_ROOT, "projects", "GridCLIP", "train_net.py")
WORLD_CONFIG = "embedded/GridCLIP_world.yaml"
D, K = 64, 5  # tiny CLIP joint space, classes of the tiny vocabulary
VILD_DATASET = "reliability_vild_tiny"
MetadataCatalog.get(VILD_DATASET).set(
    thing_classes=["red square", "blue ring", "green star", "gray disk", "pink heart"],
    class_frequencies=["f", "c", "r", "f", "c"],
)


# ------------------------------------------------------------------------------------ fixtures
def make_clip(embed_dim=D, context_length=16, text_layers=1, seed=0):
    """OpenAI's CLIP architecture with a ModifiedResNet of width 16 (random weights)."""
    return tiny_models.make_tiny_clip(
        embed_dim, context_length=context_length, text_layers=text_layers, seed=seed
    )


def gridclip_cfg(assets, *opts):
    """Base-GridCLIP.yaml on the tiny CLIP: 32-channel FPN, one-conv towers, K classes."""
    # fmt: off
    return get_gridclip_cfg("Base-GridCLIP.yaml", tiny_models.tiny_clip_opts(assets, D) + [
        "MODEL.CLIP_RESNET.FREEZE_AT", 1,
        "MODEL.FPN.OUT_CHANNELS", 32,
        "MODEL.RETINANET.NUM_CONVS", 1,
        "MODEL.RETINANET.NUM_CLASSES", K,
        "MODEL.GRIDCLIP.IMAGE_ALIGN_WEIGHT", 0.5,
        "DATASETS.TRAIN", "()",
        "DATASETS.TEST", "()",
    ] + list(opts))
    # fmt: on


def vild_cfg(assets, *opts):
    """Base-ViLD.yaml on the tiny CLIP with tiny RPN/ROI heads."""
    # fmt: off
    return get_gridclip_cfg("Base-ViLD.yaml", tiny_models.tiny_clip_opts(assets, D) + [
        "MODEL.CLIP_RESNET.FREEZE_AT", 0,
        "MODEL.FPN.OUT_CHANNELS", 32,
        "MODEL.ANCHOR_GENERATOR.SIZES", "[[16], [32], [64], [128], [256]]",
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", 64,
        "MODEL.RPN.POST_NMS_TOPK_TEST", 32,
        "MODEL.ROI_HEADS.NUM_CLASSES", K,
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32,
        "MODEL.ROI_BOX_HEAD.FC_DIM", 64,
        "MODEL.VILD.NUM_DISTILL_PROPOSALS", 8,
        "DATASETS.TRAIN", f"('{VILD_DATASET}',)",
        "DATASETS.TEST", f"('{VILD_DATASET}',)",
    ] + list(opts))
    # fmt: on


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """The CI world at its default root (where gridclip registers ``gridclip_world_ci_*``), a
    tiny CLIP for the world's configs, and a shared text-embedding cache."""
    root = os.path.join(datasets_root(), "gridclip_world_ci")
    generate_world(root, preset="ci")  # cached: no-op when already there
    work = tmp_path_factory.mktemp("reliability_world")
    weights = clip_loading.EMBEDDED_CLIP_PATH  # the shipped small CLIP, when it exists
    if not os.path.isfile(weights):
        weights = str(work / "random_world_clip.pt")
        clip_model = make_clip(embed_dim=256, context_length=32, text_layers=3)
        torch.save(clip_model.state_dict(), weights)
    embed_dim = clip_loading.load_clip_state_dict(weights)["text_projection"].shape[1]
    return {
        "datasets": os.path.abspath(datasets_root()),
        "weights": weights,
        "embed_dim": int(embed_dim),
        "text_cache": str(work / "text_cache"),
    }


def world_opts(world, *opts):
    """Overrides that make GridCLIP_world.yaml a few-second-per-iteration run on the CI world."""
    # fmt: off
    return [
        "DATASETS.TRAIN", "('gridclip_world_ci_train',)",
        "DATASETS.TEST", "()",
        "MODEL.DEVICE", "cpu",
        "MODEL.CLIP.WEIGHTS", world["weights"],
        "MODEL.CLIP.EMBED_DIM", str(world["embed_dim"]),
        "MODEL.CLIP.TEXT_CACHE_DIR", world["text_cache"],
        "MODEL.CLIP.PROMPTS", "single",
        "MODEL.GRIDCLIP.IMAGE_ALIGN_WEIGHT", "0.0",
        "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.WARMUP_ITERS", "2",
        "INPUT.MIN_SIZE_TRAIN", "(96,)",
        "INPUT.MAX_SIZE_TRAIN", "128",
        "INPUT.MIN_SIZE_TEST", "96",
        "INPUT.MAX_SIZE_TEST", "128",
        "DATALOADER.NUM_WORKERS", "0",
        "TEST.EVAL_PERIOD", "0",
    ] + list(opts)
    # fmt: on


def subprocess_env(world=None, threads=None):
    env = dict(os.environ, PYTHONWARNINGS="ignore", MPLBACKEND="Agg")
    if world is not None:
        env["DETECTRON2_DATASETS"] = world["datasets"]
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def train_net(args, env, timeout=300):
    return subprocess.run(
        [sys.executable, TRAIN_NET] + list(args),
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def load_pth(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def visible_checkpoints(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith(".pth"))


def temp_files(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith(".tmp"))


# ------------------------------------------------------------------------ interrupted runs
_CHECKPOINT_LOOP = """
import io, sys, time, torch
from gridclip.engine import AtomicCheckpointer

save_dir, pause_at = sys.argv[1], int(sys.argv[2])
model = torch.nn.Linear(256, 512)
checkpointer = AtomicCheckpointer(model, save_dir=save_dir)
torch_save = torch.save

def save_in_two_halves(obj, f, *args, **kwargs):
    buf = io.BytesIO()
    torch_save(obj, buf, *args, **kwargs)
    data = buf.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    if obj.get("iteration") == pause_at:
        print("HALF-WRITTEN", flush=True)  # the parent SIGKILLs us now
        time.sleep(300)
    f.write(data[len(data) // 2 :])

torch.save = save_in_two_halves  # what fvcore's Checkpointer.save calls
for iteration in range(pause_at + 2):
    with torch.no_grad():
        model.weight.fill_(float(iteration))
    checkpointer.save(f"model_{iteration:07d}", iteration=iteration)
"""


def test_sigkill_during_a_checkpoint_write_exposes_no_partial_file(tmp_path):
    """A process killed (SIGKILL) half-way through writing a checkpoint leaves the previous
    checkpoints intact and named by ``last_checkpoint``, never a truncated ``.pth``; resuming
    loads the last complete one and removes the orphaned temporary file."""
    script = tmp_path / "checkpoint_loop.py"
    script.write_text(textwrap.dedent(_CHECKPOINT_LOOP))
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(out), "2"],
        cwd=REPO_ROOT,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    watchdog = threading.Timer(120, proc.kill)  # never block the suite on a stuck child
    watchdog.start()
    try:
        line = proc.stdout.readline()  # blocks until the third save is half-written (or exit)
        assert line.strip() == "HALF-WRITTEN", f"checkpoint loop ended early: {line!r}"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # The interrupted write exists only as a hidden temporary file; model_0000002.pth does not.
    assert visible_checkpoints(out) == ["model_0000000.pth", "model_0000001.pth"]
    assert len(temp_files(out)) == 1 and temp_files(out)[0].startswith(".model_0000002.pth.")
    assert (out / "last_checkpoint").read_text() == "model_0000001.pth"
    for name in visible_checkpoints(out):  # every visible checkpoint is complete
        assert load_pth(out / name)["model"]["weight"].shape == (512, 256)

    model = torch.nn.Linear(256, 512)
    extra = AtomicCheckpointer(model, save_dir=str(out)).resume_or_load("", resume=True)
    assert extra["iteration"] == 1
    assert torch.all(model.weight == 1.0)
    assert temp_files(out) == []  # the orphan is cleaned up on resume


def test_checkpointer_refuses_non_finite_weights(tmp_path):
    model = torch.nn.Linear(3, 2)
    checkpointer = AtomicCheckpointer(model, save_dir=str(tmp_path))
    checkpointer.save("model_0000000", iteration=0)
    with torch.no_grad():
        model.bias[1] = float("nan")
    with pytest.raises(FloatingPointError, match=r"model_0000001.*\['bias'\].*--resume"):
        checkpointer.save("model_0000001", iteration=1)
    assert visible_checkpoints(tmp_path) == ["model_0000000.pth"] and temp_files(tmp_path) == []
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000000.pth"
    assert non_finite_entries({"a": torch.ones(2), "b": torch.tensor([1.0, float("inf")]),
                               "n": torch.tensor([3])}) == ["b"]  # fmt: skip


class _CallAt(HookBase):
    def __init__(self, iteration, fn):
        self.iteration, self.fn = iteration, fn

    def after_step(self):
        if self.trainer.iter == self.iteration:
            self.fn(self.trainer)


@pytest.mark.parametrize("fault", ["nan_loss", "inf_weight"])
def test_numerical_fault_stops_training_without_a_bad_checkpoint(world, tmp_path, fault):
    """A NaN loss term at iteration 2 stops training with Detectron2's FloatingPointError naming
    the term (before the optimizer step); weights that became inf after the step at iteration 1
    are refused by the checkpointer. Either way no checkpoint with NaN/inf is ever written."""
    cfg = get_gridclip_cfg(
        WORLD_CONFIG,
        world_opts(world, "OUTPUT_DIR", str(tmp_path), "SOLVER.MAX_ITER", "6",
                   "SOLVER.CHECKPOINT_PERIOD", "2", "INPUT.MIN_SIZE_TRAIN", "(64,)",
                   "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.RETINANET.NUM_CONVS", "1"),
    )  # fmt: skip
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    model = trainer.model
    if fault == "nan_loss":

        def nan_loss(module, inputs, losses):
            if module.training and trainer.iter == 2:
                return {**losses, "loss_cls": losses["loss_cls"] * float("nan")}

        model.register_forward_hook(nan_loss)
        expected = r"(?s)iteration=2!.*'loss_cls': (np\.float64\()?nan"
    else:

        def diverge(trainer):  # what a huge step does; runs before the checkpoint hook
            with torch.no_grad():
                model.head.grid_embed.bias.fill_(float("inf"))

        trainer._hooks.insert(0, _CallAt(1, diverge))
        trainer._hooks[0].trainer = trainer
        expected = r"model_0000001.*non-finite.*head\.grid_embed\.bias"
    with pytest.raises(FloatingPointError, match=expected):
        trainer.train()

    saved = visible_checkpoints(tmp_path)
    assert temp_files(tmp_path) == []
    if fault == "nan_loss":
        assert saved == ["model_0000001.pth"]  # nothing after the NaN
        assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
        assert non_finite_entries(load_pth(tmp_path / saved[0])["model"]) == []
    else:
        assert saved == [] and not (tmp_path / "last_checkpoint").exists()


@pytest.mark.slow
def test_train_net_killed_then_resumed_ends_at_max_iter(world, tmp_path):
    """SIGKILL a real train_net.py once a checkpoint exists; --resume continues from it and
    ends with model_final.pth at MAX_ITER (~60-90 s on 2 busy cores)."""
    out = tmp_path / "run"
    args = ["--config-file", WORLD_CONFIG] + world_opts(
        world, "OUTPUT_DIR", str(out), "SOLVER.MAX_ITER", "12", "SOLVER.CHECKPOINT_PERIOD", "4"
    )
    env = subprocess_env(world)
    log = open(tmp_path / "first_run.log", "w")
    proc = subprocess.Popen([sys.executable, TRAIN_NET] + args, cwd=REPO_ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.time() + 300
        while not (out / "last_checkpoint").exists():
            assert proc.poll() is None, open(tmp_path / "first_run.log").read()[-3000:]
            assert time.time() < deadline, "no checkpoint within 300 s"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert "model_final.pth" not in visible_checkpoints(out)
    for name in visible_checkpoints(out):  # nothing half-written is visible
        assert non_finite_entries(load_pth(out / name)["model"]) == []
    last = (out / "last_checkpoint").read_text()
    resumed_from = load_pth(out / last)["iteration"]
    assert resumed_from in (3, 7), last  # CHECKPOINT_PERIOD 4: iterations 3, 7 (0-based)

    proc = train_net(["--resume"] + args, env)  # options before the config overrides
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert f"Loading from {out / last}" in output
    assert f"Starting training from iteration {resumed_from + 1}" in output
    final = load_pth(out / "model_final.pth")
    assert final["iteration"] == 11  # MAX_ITER 12, as an uninterrupted run
    assert (
        "LRScheduler" in final["trainer"]["hooks"] and "optimizer" in final["trainer"]["_trainer"]
    )
    metrics = [json.loads(line) for line in open(out / "metrics.json")]
    assert metrics[-1]["iteration"] == 11
    assert temp_files(out) == []


# ------------------------------------------------------------------------- multi-process
@pytest.mark.slow
def test_train_net_two_processes_on_cpu_with_gloo(world, tmp_path):
    """``--num-gpus 2`` on a CPU machine: Detectron2's launch starts 2 processes (gloo), the
    model is wrapped in DDP, evaluation gathers every image's detections on rank 0."""
    out = tmp_path / "ddp"
    args = ["--num-gpus", "2", "--config-file", WORLD_CONFIG] + world_opts(
        world,
        "OUTPUT_DIR", str(out),
        "DATASETS.TEST", "('gridclip_world_ci_val',)",
        "SOLVER.MAX_ITER", "4",
        "SOLVER.CHECKPOINT_PERIOD", "100",
        "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0",  # detections on every image to gather
        "TEST.DETECTIONS_PER_IMAGE", "10",
    )  # fmt: skip
    proc = train_net(args, subprocess_env(world, threads=1), timeout=500)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "World size: 2" in output
    assert (out / "log.txt.rank1").is_file()  # the second process ran
    assert load_pth(out / "model_final.pth")["iteration"] == 3
    results = json.load(open(out / "results.json"))["results"]["bbox"]
    assert {"AP", "APr", "APc", "APf"} <= set(results)
    detections = json.load(
        open(out / "inference" / "gridclip_world_ci_val" / "lvis_instances_results.json")
    )
    val = json.load(open(os.path.join(world["datasets"], "gridclip_world_ci", "annotations",
                                      "val.json")))  # fmt: skip
    assert {d["image_id"] for d in detections} == {im["id"] for im in val["images"]}


# ---------------------------------------------------------------------------- numerical
def test_logit_scale_is_bounded():
    text = torch.randn(K, D)
    learned = TextEmbeddingClassifier(text, logit_scale=20.0, learn_logit_scale=True)
    with torch.no_grad():
        learned.log_logit_scale.fill_(50.0)  # a runaway learned temperature
    assert learned.logit_scale.item() == 100.0
    logits = learned(torch.randn(7, D))
    assert torch.isfinite(logits).all() and logits.abs().max() <= 100.0 + 1e-4
    with torch.no_grad():
        learned.log_logit_scale.fill_(-50.0)
    assert learned.logit_scale.item() == 1.0
    for bad in (0.0, -1.0, float("nan"), float("inf"), 0.5, 1000.0):
        with pytest.raises(ValueError, match="logit_scale must be in"):
            TextEmbeddingClassifier(text, logit_scale=bad)


def test_bad_logit_scale_in_config_is_an_early_error(assets):
    with pytest.raises(ValueError, match="MODEL.GRIDCLIP.LOGIT_SCALE.*got -1.0"):
        build_model(gridclip_cfg(assets, "MODEL.GRIDCLIP.LOGIT_SCALE", -1.0))


def test_l2_normalize_zero_vector_gives_zeros_and_finite_gradients():
    x = torch.zeros(3, D, requires_grad=True)
    y = l2_normalize(x)
    assert torch.equal(y, torch.zeros(3, D))
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    classifier = TextEmbeddingClassifier(torch.randn(K, D), logit_scale=20.0, bias=-4.0)
    logits = classifier(torch.zeros(2, D))  # a zero grid embedding: only the bias remains
    torch.testing.assert_close(logits, torch.full((2, K), -4.0))


def test_similarity_is_fp32_under_bfloat16_autocast():
    torch.manual_seed(0)
    classifier = TextEmbeddingClassifier(torch.randn(K, D), logit_scale=100.0)
    projection = torch.nn.Linear(32, D)
    x = torch.randn(50, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        embeddings = projection(x)
        logits = classifier(embeddings)
    assert embeddings.dtype == torch.bfloat16  # autocast is really on
    assert logits.dtype == torch.float32
    # the same bf16 embeddings scored in fp32 outside autocast: identical up to fp32 rounding
    torch.testing.assert_close(logits, classifier(embeddings.float()), rtol=0, atol=1e-4)
    # and a bf16 cosine would not be (the bound above is what the fp32 path buys)
    bf16 = 100.0 * (
        l2_normalize(embeddings) @ l2_normalize(classifier.text_embeddings).bfloat16().t()
    )
    assert (bf16.float() - logits).abs().max() > 1e-2


def _image_inputs(h, w, fill, with_box):
    inst = Instances((h, w))
    boxes = [[8.0, 10.0, 50.0, 60.0]] if with_box else []
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.tensor([1] * len(boxes), dtype=torch.long)
    image = fill.view(3, 1, 1).expand(3, h, w).clone()
    return {"image": image, "instances": inst, "height": h, "width": w, "image_id": 1}


@pytest.mark.parametrize("arch", ["gridclip", "vild"])
def test_zero_image_gives_finite_losses_and_detections(assets, arch):
    """A black image and an image equal to the pixel mean (all zeros after normalisation): zero
    features must give finite losses (with and without boxes) and finite detections."""
    torch.manual_seed(0)
    if arch == "gridclip":
        model = build_model(gridclip_cfg(assets))
        assert model.image_alignment is not None  # the teacher also sees the zero image
    else:
        model = build_model(vild_cfg(assets))
        model.set_clip_teacher(CLIPImageTeacher(make_clip(), input_size=64))
    assert non_finite_entries(model.state_dict()) == []
    mean = model.pixel_mean.detach().flatten().clone()
    # one batch: a black image with a box, and a pixel-mean image (zero after normalisation)
    inputs = [_image_inputs(70, 90, torch.zeros(3), True), _image_inputs(64, 64, mean, False)]
    model.train()
    with EventStorage():
        losses = model(inputs)
    for name, value in losses.items():
        assert torch.isfinite(value), (arch, name, value)
    sum(losses.values()).backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), (arch, name)
    model.eval()
    with torch.no_grad():
        outputs = model(inputs)
    for out in outputs:
        inst = out["instances"]
        assert torch.isfinite(inst.pred_boxes.tensor).all() and torch.isfinite(inst.scores).all()


def test_gridclip_inference_under_bfloat16_autocast_is_finite(assets):
    model = build_model(gridclip_cfg(assets, "MODEL.GRIDCLIP.IMAGE_ALIGN_WEIGHT", 0.0)).eval()
    model.test_score_thresh = 0.0
    inputs = [_image_inputs(70, 90, torch.tensor([120.0, 30.0, 200.0]), False)]
    inputs[0]["image"] = inputs[0]["image"] + 40 * torch.rand(3, 70, 90)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        rows = torch.randn(4, D).bfloat16()
        assert model.head.logits(rows).dtype == torch.float32
        inst = model(inputs)[0]["instances"]
    assert len(inst) > 0 and inst.scores.dtype == torch.float32
    assert torch.isfinite(inst.scores).all() and torch.isfinite(inst.pred_boxes.tensor).all()


# ---------------------------------------------------------------------------- bad input
def test_clip_embed_dim_mismatch_through_the_config(assets):
    clear_clip_memo()
    cfg = gridclip_cfg(assets, "MODEL.CLIP.EMBED_DIM", 1024)
    for build in (load_clip_from_cfg, build_model):
        with pytest.raises(CLIPWeightsError) as e:
            build(cfg)
        message = str(e.value)
        assert assets["clip"] in message and "MODEL.CLIP.EMBED_DIM" in message
        assert "64" in message and "1024" in message
    load_clip_from_cfg(gridclip_cfg(assets))  # memoised at 64-d: a later mismatch still raises
    with pytest.raises(CLIPWeightsError, match="MODEL.CLIP.EMBED_DIM is 1024"):
        load_clip_from_cfg(cfg)


def test_vit_clip_for_the_resnet_backbone(assets, tmp_path):
    torch.manual_seed(0)
    vit = clip.model.CLIP(
        embed_dim=D,
        image_resolution=32,
        vision_layers=1,  # an int: a ViT vision tower
        vision_width=64,
        vision_patch_size=16,
        context_length=16,
        vocab_size=49408,
        transformer_width=64,
        transformer_heads=1,
        transformer_layers=1,
    )
    torch.save(vit.state_dict(), tmp_path / "vit.pt")
    with pytest.raises(ValueError, match="not a ModifiedResNet CLIP"):
        build_model(gridclip_cfg(assets, "MODEL.CLIP.WEIGHTS", str(tmp_path / "vit.pt")))


@pytest.mark.parametrize(
    "shape, match, names",
    [
        ((K, D + 3), r"67", ["MODEL.CLIP.EMBED_DIM", "64"]),  # another CLIP's embeddings
        ((K + 2, D), r"\b7 class.*\b5\b", []),  # another vocabulary's
        ((0, D), r"empty", []),
    ],
)
@pytest.mark.parametrize("arch", ["gridclip", "vild"])
def test_text_embeddings_file_of_the_wrong_shape(assets, tmp_path, shape, match, names, arch):
    path = tmp_path / "text.npy"
    np.save(path, np.random.RandomState(1).randn(*shape).astype("float32"))
    before = sorted(os.listdir(tmp_path))
    make_cfg = gridclip_cfg if arch == "gridclip" else vild_cfg
    with pytest.raises(ValueError, match=match) as e:
        build_model(make_cfg(assets, "MODEL.CLIP.TEXT_EMBEDDINGS", str(path)))
    for name in [str(path)] + names:
        assert name in str(e.value)
    assert sorted(os.listdir(tmp_path)) == before  # nothing written next to it


@pytest.mark.parametrize("arch", ["gridclip", "vild"])
def test_bad_vocabulary_leaves_the_model_unchanged(assets, arch):
    model = build_model(gridclip_cfg(assets) if arch == "gridclip" else vild_cfg(assets))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    num_classes = model.num_classes
    cases = [
        (["red square", "Red Square "], "duplicate"),
        ([], "empty"),
        (["", "  "], "empty"),
        (torch.zeros(0, D), "empty"),
        (torch.randn(3, D + 1), "dimension"),
        (torch.tensor([[float("nan")] * D]), "non-finite"),
    ]
    for vocabulary, match in cases:
        with pytest.raises(ValueError, match=match):
            model.set_vocabulary(vocabulary)
        assert model.num_classes == num_classes
        after = model.state_dict()
        assert sorted(after) == sorted(state)
        assert all(torch.equal(after[k], state[k]) for k in state), vocabulary


def test_train_net_unknown_config_key_fails_early(world, tmp_path):
    out = tmp_path / "never_created"
    proc = train_net(
        ["--config-file", WORLD_CONFIG, "OUTPUT_DIR", str(out), "MODEL.GRIDCLIP.NO_SUCH_KEY", "1"],
        subprocess_env(world),
    )
    assert proc.returncode != 0
    assert "Non-existent key: MODEL.GRIDCLIP.NO_SUCH_KEY" in proc.stderr
    assert not out.exists()  # failed before writing anything


@pytest.mark.slow  # ~15 s: a subprocess that loads detectron2 and reads the world
def test_train_net_corrupt_clip_weights_fail_before_training(world, tmp_path):
    corrupt = tmp_path / "truncated_clip.pt"
    data = open(world["weights"], "rb").read()
    corrupt.write_bytes(data[: len(data) // 3])
    out = tmp_path / "run"
    proc = train_net(
        ["--config-file", WORLD_CONFIG]
        + world_opts(world, "OUTPUT_DIR", str(out), "MODEL.CLIP.WEIGHTS", str(corrupt)),
        subprocess_env(world),
    )
    assert proc.returncode != 0
    assert "CLIPWeightsError" in proc.stderr and str(corrupt) in proc.stderr
    # default_setup wrote the config and the log; no checkpoint or results exist
    assert visible_checkpoints(out) == [] and not (out / "last_checkpoint").exists()
    assert not (out / "results.json").exists() and temp_files(out) == []


# ------------------------------------------------------------------- teacher caches' format
def test_gridclip_teacher_cache_round_trip_and_provenance_refusal(tmp_path):
    cache = TeacherEmbeddingCache(8, [1, 2], {"clip": "aaaa", "teacher_input_size": 64})
    cache.add("7", [torch.randn(1, 8), torch.randn(4, 8)])
    path = cache.save(str(tmp_path / "teacher.safetensors"))
    loaded = TeacherEmbeddingCache.load(path, embed_dim=8, grids=[2], expected_provenance={
        "clip": "aaaa", "teacher_input_size": 64
    })  # fmt: skip
    assert loaded.keys() == ["7"] and loaded.provenance["grids"] == [1, 2]
    torch.testing.assert_close(loaded.get("7")[1], cache.get("7")[1])
    with pytest.raises(
        ValueError, match=r'provenance\[\'clip\'\] is "aaaa" in the file but "bbbb"'
    ):
        TeacherEmbeddingCache.load(path, expected_provenance={"clip": "bbbb"})
    torch.save({"format": "gridclip-teacher-cache", "version": 1}, str(tmp_path / "old.pt"))
    with pytest.raises(ValueError, match=r"old\.pt is not a GridCLIP teacher cache.*rebuilt"):
        TeacherEmbeddingCache.load(str(tmp_path / "old.pt"))


def test_vild_teacher_cache_format_old_layout_and_truncation(tmp_path):
    out = str(tmp_path / "vild")
    write_cache_meta(out, {"clip": "aaaa", "embed_dim": 8, "crop_scales": [1.0]})
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    entry = dict(image_id=3, file_name="x.png", height=20, width=30, boxes=boxes)
    entry["embeddings"] = torch.randn(1, 8)
    path = cache_entry_path(out, 3)
    write_cache_entry(path, entry)
    assert path.endswith(".safetensors")
    cache = TeacherCache(out, embed_dim=8)
    assert cache.meta["clip"] == "aaaa"
    got = cache.get(3, (20, 30))
    assert got["file_name"] == "x.png" and got["embeddings"].dtype == torch.float16
    with pytest.raises(TeacherCacheError, match="built for an image of 20x30"):
        cache.get(3, (21, 30))
    with open(path, "r+b") as f:
        f.truncate(60)
    with pytest.raises(TeacherCacheError, match=r"cannot read .*000000/3\.safetensors.*truncated"):
        read_cache_entry(path)
    old = tmp_path / "old"
    old.mkdir()
    (old / "meta.json").write_text(json.dumps({"format_version": 1}))
    with pytest.raises(
        TeacherCacheError, match="no longer read.*cache_vild_teacher.py --overwrite"
    ):
        TeacherCache(str(old))
