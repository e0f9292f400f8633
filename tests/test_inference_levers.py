"""GridCLIP's inference levers (issue 13): objectness-gated text product, reduced-precision text
product, batched prediction. Each is checked against the exact path it replaces.

Tiny models from ``test_gridclip`` (random CLIP, 64-d joint space, 5 classes), CPU, fixed seeds.
"""

from unittest import mock

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K
from test_gridclip import (
    D,
    K,
    _random_head,
    assert_same_detections,
    dense_inputs,
    make_cfg,
    make_tiny_clip,
)

from gridclip.engine.predictor import OpenVocabularyPredictor
from gridclip.modeling.gridclip import GridCLIP
from gridclip.modeling.text_classifier import TextEmbeddingClassifier


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """test_gridclip's tiny CLIP and 5-class text embeddings."""
    root = tmp_path_factory.mktemp("levers_assets")
    clip_path = str(root / "tiny_clip.pt")
    torch.save(make_tiny_clip().state_dict(), clip_path)
    text_path = str(root / "text5.npy")
    np.save(text_path, np.random.RandomState(0).randn(K, D).astype("float32"))
    return {"clip": clip_path, "text": text_path, "root": root}


def _gated_model(assets, k, max_det=10, score_thresh=0.05, offset_std=0.3):
    model = build_model(make_cfg(assets, "MODEL.GRIDCLIP.TEST_TOPK_LOCATIONS", k)).eval()
    _random_head(model)
    with torch.no_grad():
        model.head.anchor_offset.weight.normal_(0, offset_std)
    model.test_topk_candidates = model.head.num_anchors * 20
    model.test_score_thresh = score_thresh
    model.max_detections_per_image = max_det
    return model


def _infer(model, images, features, predictions, k=None):
    """forward_inference with test_topk_locations = k (None: the model's), and the number of
    rows of every text product (per image and level)."""
    seen_rows = []
    logits_fn = model.head.logits
    saved = model.test_topk_locations
    if k is not None:
        model.test_topk_locations = k
    try:
        with (
            torch.no_grad(),
            mock.patch.object(
                model.head,
                "logits",
                lambda rows, idx=None: seen_rows.append(rows.shape[-2]) or logits_fn(rows, idx),
            ),
        ):
            results = model.forward_inference(images, features, predictions)
    finally:
        model.test_topk_locations = saved
    return results, seen_rows


def _objectness_ranks(predictions, num_anchors):
    """Per level, (N, Hi*Wi) rank of each location by objectness (0 = highest)."""
    ranks = []
    for offsets in predictions[2]:
        objectness = permute_to_N_HWA_K(offsets, num_anchors).max(dim=2).values
        order = objectness.argsort(dim=1, descending=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(order.shape[1]).expand_as(order).contiguous())
        ranks.append(rank)
    return ranks


def test_gating_is_exact_when_k_covers_the_detections(assets):
    """K = the largest objectness rank of a location that feeds a detection (+1): the gated
    detections equal the ungated ones, with a text product of K rows per level."""
    model = _gated_model(assets, 0, offset_std=1.0)  # offsets matter: detections are ranked
    images, features = dense_inputs(model, n=2, size=(2, 96, 120), seed=7)
    with torch.no_grad():
        predictions = list(model.head.forward_embeddings(features))
    ungated, rows_all = _infer(model, images, features, predictions, k=0)
    num_anchors = model.head.num_anchors
    anchors = model.anchor_generator(features)
    ranks = _objectness_ranks(predictions, num_anchors)
    needed = 0
    for img, det in enumerate(ungated):
        assert len(det) == model.max_detections_per_image  # the cap binds (module argument)
        for box in det.pred_boxes.tensor:
            found = False
            for level, deltas in enumerate(predictions[1]):
                deltas = permute_to_N_HWA_K(deltas, 4)[img]
                decoded = model.box2box_transform.apply_deltas(deltas, anchors[level].tensor)
                hit = (decoded == box).all(dim=1).nonzero().flatten()
                if hit.numel():
                    needed = max(needed, int(ranks[level][img, hit[0] // num_anchors]) + 1)
                    found = True
                    break
            assert found, "a detection matched no decoded anchor"
    largest_level = max(rows_all)
    assert needed < largest_level, "K would cover a whole level: the test checks nothing"
    gated, rows_gated = _infer(model, images, features, predictions, k=needed)
    assert max(rows_gated) <= needed  # K bounds the product
    assert sum(rows_gated) < sum(rows_all)
    for a, b in zip(gated, ungated):
        assert_same_detections(a, b)


@pytest.mark.parametrize("k", [1, 7, 40])
def test_gated_subset_equals_ungated_with_the_others_masked(assets, k):
    """Scoring the top-K locations = scoring all, with the others unable to score (oracle)."""
    model = _gated_model(assets, k, max_det=100, score_thresh=0.0)
    images, features = dense_inputs(model, n=2, size=(2, 80, 112), seed=3)
    with torch.no_grad():
        predictions = list(model.head.forward_embeddings(features))
    gated, rows = _infer(model, images, features, predictions)
    sizes = [f.shape[2] * f.shape[3] for f in features]
    assert rows == [min(k, s) for s in sizes] * 2  # per image and level: K bounds the product
    masked_offsets = []
    for rank, offsets in zip(
        _objectness_ranks(predictions, model.head.num_anchors), predictions[2]
    ):
        n, a, h, w = offsets.shape
        dropped = (rank >= k).view(n, 1, h, w).expand(n, a, h, w)
        masked_offsets.append(offsets.masked_fill(dropped, -1e4))  # sigmoid -> 0, not > 0
    oracle, _ = _infer(model, images, features, predictions[:2] + [masked_offsets], k=0)
    for a, b in zip(gated, oracle):
        assert len(a) > 0
        assert_same_detections(a, b)


def test_threshold_pruning_is_exact_and_skips_hopeless_locations(assets):
    model = _gated_model(assets, 0, max_det=50, score_thresh=0.05)
    images, features = dense_inputs(model, n=1, size=(2, 96, 96), seed=11)
    with torch.no_grad():
        predictions = list(model.head.forward_embeddings(features))
    hopeless = []  # every other location of every level: far below any reachable logit
    for offsets in predictions[2]:
        o = offsets.clone()
        o[..., ::2, :] = -60.0  # scale 20 + bias ~ -4.6 - 60 << logit(0.05)
        hopeless.append(o)
    predictions = predictions[:2] + [hopeless, None]
    pruned, rows = _infer(model, images, features, predictions)
    with mock.patch.object(model, "_scored_locations", lambda offsets, objectness=None: None):
        full, rows_full = _infer(model, images, features, predictions)
    assert sum(rows) < sum(rows_full)
    assert len(full[0]) > 0
    assert_same_detections(pruned[0], full[0])
    # nothing can pass: no text product at all, no detections, no error
    model.test_score_thresh = 0.999999
    none, rows = _infer(model, images, features, [predictions[0], predictions[1], [
        torch.full_like(o, -60.0) for o in hopeless
    ]])  # fmt: skip
    assert rows == [] and len(none[0]) == 0


def test_gpu_decoding_path_gives_the_cpu_detections(assets):
    """On a GPU the decoding skips the exact pruning and ranks pairs with one top-k (no host
    syncs); forced here on the CPU, it must give the default path's detections."""
    model = _gated_model(assets, 0, max_det=50, score_thresh=0.05)
    images, features = dense_inputs(model, n=2, size=(2, 96, 112), seed=13)
    with torch.no_grad():
        predictions = list(model.head.forward_embeddings(features))
    default, _ = _infer(model, images, features, predictions)
    top_pairs = GridCLIP._top_pairs

    def exhaustive(logits, row_bonus, k, exhaustive=None):
        return top_pairs(logits, row_bonus, k, exhaustive=True)

    with (
        mock.patch.object(model, "_scored_locations", lambda offsets, objectness=None: None),
        mock.patch.object(model, "_top_pairs", exhaustive),
    ):
        gpu_like, _ = _infer(model, images, features, predictions)
    for a, b in zip(default, gpu_like):
        assert len(a) > 0
        assert_same_detections(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_detections_equal_cpu(assets):
    model = _gated_model(assets, 0, max_det=50, score_thresh=0.05)
    images, features = dense_inputs(model, n=2, size=(2, 96, 112), seed=13)
    with torch.no_grad():
        predictions = list(model.head.forward_embeddings(features))
    reference, _ = _infer(model, images, features, predictions)
    # The same head outputs decoded on the GPU (recomputing them there would add cuDNN's TF32
    # rounding, which moves scores near the threshold: a numerics question, not decoding's).
    model.to("cuda")
    images, features = images.to("cuda"), [f.to("cuda") for f in features]
    predictions = [[p.to("cuda") for p in level] if level else level for level in predictions]
    got, _ = _infer(model, images, features, predictions)
    for a, b in zip(reference, got):
        assert len(a) > 0
        assert_same_detections(a, b.to("cpu"))


def test_gating_needs_anchor_offsets(assets):
    with pytest.raises(ValueError, match="ANCHOR_OFFSET"):
        build_model(
            make_cfg(
                assets,
                "MODEL.GRIDCLIP.TEST_TOPK_LOCATIONS", 10,
                "MODEL.GRIDCLIP.ANCHOR_OFFSET", False,
            )  # fmt: skip
        )


# ------------------------------------------------------------------------- reduced precision
# CPU always; CUDA where the machine has one (CI has none: a GPU session runs these there).
DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
    ),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_text_product_within_its_bound(dtype, device):
    g = torch.Generator().manual_seed(0)
    text = torch.randn(300, 128, generator=g)
    rows = (torch.randn(500, 128, generator=g) * 3).to(device)
    rows[:5] = text[:5].to(device) * 2  # cosines near 1 (the largest rounding)
    classifier = TextEmbeddingClassifier(text, logit_scale=20.0, bias=-4.6, learn_bias=True)
    classifier.to(device)
    with torch.no_grad():
        reference = classifier(rows)
    classifier.set_product_dtype(dtype)
    bound = classifier.product_error_bound
    assert 0 < bound < 0.05
    with torch.no_grad():
        low = classifier(rows)
    assert low.dtype == torch.float32
    error = (low - reference).abs().max().item()
    assert error <= 20.0 * bound + 1e-5, (error, 20.0 * bound)
    assert error > 0  # it did run in low precision
    # training (gradients on) keeps the fp32 product
    assert torch.equal(classifier(rows), reference)
    with pytest.raises(ValueError, match="float64"):
        classifier.set_product_dtype("float64")


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_model_detections_close_to_fp32(assets, device):
    model = _gated_model(assets, 0, max_det=30).to(device)
    images, features = dense_inputs(model, n=1, size=(2, 80, 96), seed=5)
    images, features = images.to(device), [f.to(device) for f in features]
    with torch.no_grad():
        predictions = list(model.head.forward_embeddings(features))
    reference, _ = _infer(model, images, features, predictions)
    model.head.classifier.set_product_dtype("bfloat16")
    low, _ = _infer(model, images, features, predictions)
    assert len(low[0]) == len(reference[0]) > 0
    # the best detection is the same, its score within the logit bound's effect on a sigmoid
    assert int(low[0].pred_classes[0]) == int(reference[0].pred_classes[0])
    slack = 20.0 * model.head.classifier.product_error_bound / 4  # |d sigmoid| <= |d logit| / 4
    assert abs(float(low[0].scores[0]) - float(reference[0].scores[0])) <= slack + 1e-6


# ------------------------------------------------------------------------------ batch predict
def test_predictor_batch_equals_sequential(assets, tmp_path):
    cfg = make_cfg(assets, "INPUT.MIN_SIZE_TEST", 96, "INPUT.MAX_SIZE_TEST", 160)
    cfg.MODEL.DEVICE = "cpu"
    predictor = OpenVocabularyPredictor(cfg)
    _random_head(predictor.model)
    rng = np.random.RandomState(0)
    images = [rng.randint(0, 256, (90, 120, 3), dtype=np.uint8) for _ in range(3)]
    batched = predictor(images)
    assert isinstance(batched, list) and len(batched) == 3
    for image, out in zip(images, batched):
        single = predictor(image)
        assert single["instances"].image_size == out["instances"].image_size == (90, 120)
        assert len(single["instances"]) > 0
        assert_same_detections(out["instances"], single["instances"])
    assert predictor([]) == []
