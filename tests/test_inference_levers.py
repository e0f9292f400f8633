"""GridCLIP's inference levers (issue 13): objectness-gated text product, reduced-precision text
product, batched prediction. Each is checked against the exact path it replaces.

Tiny models from ``test_gridclip`` (random CLIP, 64-d joint space, 5 classes), CPU, fixed seeds.
"""

import math
from unittest import mock

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K
from detectron2.structures import Boxes
from test_gridclip import (
    D,
    K,
    _random_head,
    assert_same_detections,
    dense_inputs,
    make_cfg,
    make_inputs,
    make_tiny_clip,
    train_losses,
)

from gridclip.engine.predictor import OpenVocabularyPredictor
from gridclip.modeling.box_refinement import BoxRefiner
from gridclip.modeling.box_voting import box_voting
from gridclip.modeling.embedding_rows import EmbeddingRowsOnDemand, bilinear_rows
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


def _gated_model(assets, k, *opts, max_det=10, score_thresh=0.05, offset_std=0.3):
    model = build_model(make_cfg(assets, "MODEL.GRIDCLIP.TEST_TOPK_LOCATIONS", k, *opts)).eval()
    _random_head(model)
    with torch.no_grad():
        model.head.anchor_offset.weight.normal_(0, offset_std)
    model.test_topk_candidates = model.head.num_anchors * 20
    model.test_score_thresh = score_thresh
    model.max_detections_per_image = max_det
    return model


def _smallest_exact_k(model, features, predictions, ungated, ranks):
    """The smallest K whose gate keeps every location that feeds an ungated detection: the
    largest rank (under ``ranks``, per level (N, Hi*Wi)) of such a location, + 1."""
    num_anchors = model.head.num_anchors
    anchors = model.anchor_generator(features)
    needed = 0
    for img, det in enumerate(ungated):
        assert len(det) == model.max_detections_per_image  # the cap binds (module argument)
        for box in det.pred_boxes.tensor:
            for level, deltas in enumerate(predictions[1]):
                deltas = permute_to_N_HWA_K(deltas, 4)[img]
                decoded = model.box2box_transform.apply_deltas(deltas, anchors[level].tensor)
                hit = (decoded == box).all(dim=1).nonzero().flatten()
                if hit.numel():
                    needed = max(needed, int(ranks[level][img, hit[0] // num_anchors]) + 1)
                    break
            else:
                raise AssertionError("a detection matched no decoded anchor")
    return needed


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
    ranks = _objectness_ranks(predictions, model.head.num_anchors)
    needed = _smallest_exact_k(model, features, predictions, ungated, ranks)
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


@pytest.mark.parametrize("with_offsets", [True, False])
def test_row_block_scoring_gives_the_whole_level_detections(assets, with_offsets):
    """The text product in blocks of rows (bounded memory at 21,000 classes), each block keeping
    its own top candidates, gives the detections of one product over every location; the blocks
    really are smaller than the largest level."""
    model = _gated_model(assets, 0, max_det=50, score_thresh=0.05)
    images, features = dense_inputs(model, n=2, size=(2, 96, 112), seed=21)
    with torch.no_grad():
        predictions = list(model.head.forward_embeddings(features))
    if not with_offsets:
        predictions[2] = None
    whole, rows_whole = _infer(model, images, features, predictions)
    block = 7  # rows per block: K classes x 7 logits at most
    with mock.patch.object(model, "SCORE_BLOCK_ELEMENTS", block * K):
        blocked, rows_blocked = _infer(model, images, features, predictions)
    assert max(rows_whole) > 3 * block and max(rows_blocked) == block
    assert sum(rows_blocked) == sum(rows_whole)  # every location scored once
    for a, b in zip(whole, blocked):
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


# ------------------------------------------------------------- detached objectness ranker
def _ranker_model(assets, k=0, **kw):
    model = _gated_model(assets, k, "MODEL.GRIDCLIP.OBJECTNESS_RANKER", True, **kw)
    with torch.no_grad():
        model.head.objectness.weight.normal_(0, 0.5)
    return model


def _ranker_ranks(predictions):
    """Per level, (N, Hi*Wi) rank of each location by the ranker's logit (0 = highest)."""
    ranks = []
    for logits in predictions[3]:
        order = logits.flatten(1).argsort(dim=1, descending=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(order.shape[1]).expand_as(order).contiguous())
        ranks.append(rank)
    return ranks


def test_objectness_ranker_loss_on_a_hand_built_case(assets):
    model = _ranker_model(assets)
    num_classes = 3  # 3 trained classes (background = 3), 2 anchors per location
    # 4 locations: positive (one anchor of class 1), negative (all background),
    # ignored (an ignored anchor and a background one), positive (class 0 + ignored)
    labels = torch.tensor([[3, 1, 3, 3, -1, 3, 0, -1]])
    z = torch.tensor([[0.5, -1.0, 2.0, -0.3]], requires_grad=True)
    loss = model.objectness_loss(z, labels, num_classes)

    def focal(x, t, alpha=0.25, gamma=2.0):
        p = 1 / (1 + math.exp(-x))
        pt = p if t else 1 - p
        return (alpha if t else 1 - alpha) * (1 - pt) ** gamma * -math.log(pt)

    want = (focal(0.5, 1) + focal(-1.0, 0) + focal(-0.3, 1)) / 2  # 2 positive locations
    assert float(loss.detach()) == pytest.approx(want, rel=1e-6)
    loss.backward()
    assert z.grad[0, 2] == 0  # the ignored location gets no gradient
    assert z.grad[0, 0] < 0 < z.grad[0, 1]
    # no positive location: divided by 1, not 0
    empty = model.objectness_loss(z[:, :1].detach(), torch.tensor([[3, 3]]), num_classes)
    assert float(empty) == pytest.approx(focal(0.5, 0), rel=1e-6)


def _built(assets, *opts):
    # The first build of a process loads (and memoises) the CLIP, which draws from the global
    # random state: build once before seeding, so both builds compared start alike.
    build_model(make_cfg(assets, *opts))
    torch.manual_seed(123)
    model = build_model(make_cfg(assets, *opts))
    return model, torch.get_rng_state()


def test_objectness_ranker_leaves_the_detectors_init_and_training_unchanged(assets):
    """Same seed: the same detector weights and the same global random state after building;
    then the same losses, gradients and weights over a few SGD steps; the ranker alone learns
    from its loss (its input is detached)."""
    plain, plain_rng = _built(assets)
    ranked, ranked_rng = _built(assets, "MODEL.GRIDCLIP.OBJECTNESS_RANKER", True)
    assert plain.head.objectness is None and ranked.head.objectness is not None
    assert torch.equal(plain_rng, ranked_rng)  # nothing built or sampled later shifts
    detector = plain.state_dict()
    extra = {k: v for k, v in ranked.state_dict().items() if k not in detector}
    assert sorted(extra) == ["head.objectness.bias", "head.objectness.weight"]
    for name, value in detector.items():
        assert torch.equal(value, ranked.state_dict()[name]), name
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in (plain, ranked)]
    ranker_before = ranked.head.objectness.weight.detach().clone()
    for step in range(3):
        losses = []
        for model, optimizer in zip((plain, ranked), optimizers):
            optimizer.zero_grad()
            out, _ = train_losses(model, make_inputs())
            sum(out.values()).backward()
            optimizer.step()
            losses.append(out)
        assert set(losses[1]) == set(losses[0]) | {"loss_objectness_ranker"}
        assert torch.isfinite(losses[1]["loss_objectness_ranker"])
        for name, value in losses[0].items():
            assert torch.equal(value, losses[1][name]), (step, name)
        ranked_params = dict(ranked.named_parameters())
        for name, p in plain.named_parameters():
            q = ranked_params[name]
            assert (p.grad is None) == (q.grad is None), name
            if p.grad is not None:
                assert torch.equal(p.grad, q.grad), (step, name)
            assert torch.equal(p, q), (step, name)
    assert not torch.equal(ranked.head.objectness.weight, ranker_before)  # the ranker learned


def test_objectness_ranker_loss_sends_no_gradient_into_the_detector(assets):
    model, _ = _built(assets, "MODEL.GRIDCLIP.OBJECTNESS_RANKER", True)
    losses, _ = train_losses(model, make_inputs())
    losses["loss_objectness_ranker"].backward()
    for name, p in model.named_parameters():
        if name.startswith("head.objectness."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None or not bool(p.grad.any()), name


def test_objectness_ranker_fitted_alone_onto_a_trained_detector(assets):
    """TRAIN_OBJECTNESS_RANKER_ONLY: only the ranker's loss, only the ranker learns; every other
    weight and buffer stays the checkpoint's, bit for bit."""
    model, _ = _built(
        assets,
        "MODEL.GRIDCLIP.OBJECTNESS_RANKER", True,
        "MODEL.GRIDCLIP.TRAIN_OBJECTNESS_RANKER_ONLY", True,
        "MODEL.GRIDCLIP.IMAGE_ALIGN_WEIGHT", 1.0,  # skipped too (no teacher forward)
    )  # fmt: skip
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["head.objectness.weight", "head.objectness.bias"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        losses, _ = train_losses(model, make_inputs())
        assert set(losses) == {"loss_objectness_ranker"}
        losses["loss_objectness_ranker"].backward()
        optimizer.step()
    for name, value in model.state_dict().items():
        if name.startswith("head.objectness."):
            assert not torch.equal(value, before[name]), name
        else:
            assert torch.equal(value, before[name]), name
    with pytest.raises(ValueError, match="OBJECTNESS_RANKER True"):
        build_model(make_cfg(assets, "MODEL.GRIDCLIP.TRAIN_OBJECTNESS_RANKER_ONLY", True))


def test_objectness_ranker_ranks_the_gate_and_is_exact_when_k_covers_every_location(assets):
    model = _ranker_model(assets, k=0, max_det=100, score_thresh=0.0)
    images, features = dense_inputs(model, n=2, size=(2, 80, 112), seed=3)
    with torch.no_grad():
        predictions = model.predict(features)
    assert len(predictions) == 4 and predictions[3] is not None
    ungated, rows_all = _infer(model, images, features, predictions, k=0)
    largest = max(f.shape[2] * f.shape[3] for f in features)
    covered, rows = _infer(model, images, features, predictions, k=largest)
    assert rows == rows_all
    for a, b in zip(covered, ungated):
        assert len(a) > 0
        assert_same_detections(a, b)
    # K smaller: the K locations of highest *ranker* logit are scored (not of the offsets)
    k = 7
    gated, rows = _infer(model, images, features, predictions, k=k)
    sizes = [f.shape[2] * f.shape[3] for f in features]
    assert rows == [min(k, s) for s in sizes] * 2
    masked_offsets = []
    for rank, offsets in zip(_ranker_ranks(predictions), predictions[2]):
        n, a, h, w = offsets.shape
        dropped = (rank >= k).view(n, 1, h, w).expand(n, a, h, w)
        masked_offsets.append(offsets.masked_fill(dropped, -1e4))
    oracle, _ = _infer(model, images, features, predictions[:2] + [masked_offsets], k=0)
    for a, b in zip(gated, oracle):
        assert len(a) > 0
        assert_same_detections(a, b)
    # the ranking by the offsets alone selects other locations here (the test discriminates)
    by_offsets, _ = _infer(model, images, features, predictions[:3], k=k)
    assert any(
        not torch.equal(x.pred_boxes.tensor.sort(0).values, y.pred_boxes.tensor.sort(0).values)
        for x, y in zip(by_offsets, gated)
    )


def test_objectness_ranker_gate_is_exact_when_k_covers_the_detections(assets):
    """The exactness bound with the ranker's ranking: K = the largest ranker rank of a location
    that feeds a detection (+1) gives the ungated detections."""
    model = _ranker_model(assets, 0, offset_std=1.0)
    images, features = dense_inputs(model, n=2, size=(2, 96, 120), seed=7)
    with torch.no_grad():
        predictions = model.predict(features)
    ungated, rows_all = _infer(model, images, features, predictions, k=0)
    ranks = _ranker_ranks(predictions)
    needed = _smallest_exact_k(model, features, predictions, ungated, ranks)
    assert needed < max(rows_all), "K would cover a whole level: the test checks nothing"
    gated, rows_gated = _infer(model, images, features, predictions, k=needed)
    assert max(rows_gated) <= needed
    for a, b in zip(gated, ungated):
        assert_same_detections(a, b)
    # one less can lose a detection (the bound is tight for some level), never gain one
    fewer, _ = _infer(model, images, features, predictions, k=needed - 1)
    assert any(len(a) != len(b) or not torch.equal(a.pred_boxes.tensor.sort(0).values,
               b.pred_boxes.tensor.sort(0).values) for a, b in zip(fewer, ungated))  # fmt: skip


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


# ------------------------------------------------------------------------------ box voting
def test_box_voting_hand_example():
    boxes = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],  # kept, class 0
            [1.0, 1.0, 11.0, 11.0],  # class 0, IoU 0.68 with box 0: votes
            [0.0, 0.0, 10.0, 10.0],  # same box, class 1: never votes for a class-0 box
            [30.0, 30.0, 40.0, 40.0],  # class 0, far away: does not vote
            [5.0, 5.0, 15.0, 15.0],  # class 0, IoU 0.14: below the threshold
        ]
    )
    scores = torch.tensor([0.6, 0.2, 0.9, 0.5, 0.4])
    classes = torch.tensor([0, 0, 1, 0, 0])
    keep = torch.tensor([2, 0, 3])
    voted = box_voting(boxes, scores, classes, keep, 0.5)
    expected_0 = (0.6 * boxes[0] + 0.2 * boxes[1]) / 0.8
    torch.testing.assert_close(voted, torch.stack([boxes[2], expected_0, boxes[3]]))
    # threshold 1: only identical same-class boxes vote, i.e. nothing moves
    torch.testing.assert_close(box_voting(boxes, scores, classes, keep, 1.0), boxes[keep])
    assert box_voting(boxes, scores, classes, keep[:0], 0.5).shape == (0, 4)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="box voting IoU threshold"):
            box_voting(boxes, scores, classes, keep, bad)


def test_model_box_voting_moves_boxes_only(assets):
    """Voting keeps the detections (scores, classes, order) and only moves boxes, each to a
    convex combination of candidates; with threshold 1 nothing moves."""
    model = build_model(make_cfg(assets, "MODEL.GRIDCLIP.TEST_BOX_VOTING_IOU", 0.6)).eval()
    assert model.test_box_voting_iou == 0.6
    _random_head(model)
    model.test_topk_candidates = model.head.num_anchors * 20
    model.test_score_thresh = 0.05
    model.max_detections_per_image = 30
    images, features = dense_inputs(model, n=1, size=(2, 96, 72), seed=2)
    outputs = {}
    for iou in (0.0, 0.6, 1.0):
        model.test_box_voting_iou = iou
        with torch.no_grad():
            outputs[iou] = model.forward_inference(
                images, features, list(model.head.forward_embeddings(features))
            )[0]
    plain, voted, strict = outputs[0.0], outputs[0.6], outputs[1.0]
    assert len(plain) > 5
    assert torch.equal(voted.scores, plain.scores) and torch.equal(
        voted.pred_classes, plain.pred_classes
    )
    torch.testing.assert_close(strict.pred_boxes.tensor, plain.pred_boxes.tensor)
    moved = (voted.pred_boxes.tensor - plain.pred_boxes.tensor).abs().amax(dim=1) > 1e-3
    assert moved.any(), "no kept box had a same-class neighbour at IoU >= 0.6"
    assert torch.isfinite(voted.pred_boxes.tensor).all()
    with pytest.raises(ValueError, match="TEST_BOX_VOTING_IOU"):
        build_model(make_cfg(assets, "MODEL.GRIDCLIP.TEST_BOX_VOTING_IOU", 1.5))


# ---------------------------------------------------------------------- box refinement
REFINE = ["MODEL.GRIDCLIP.BOX_REFINE", True]


def test_box_refiner_leaves_the_detector_init_unchanged(assets):
    plain, plain_rng = _built(assets)
    refined, refined_rng = _built(assets, *REFINE)
    assert torch.equal(plain_rng, refined_rng)
    extra = set(refined.state_dict()) - set(plain.state_dict())
    assert extra and all(k.startswith("box_refiner.") for k in extra)
    for name, value in plain.state_dict().items():
        assert torch.equal(value, refined.state_dict()[name]), name


def test_box_refiner_loss_on_a_hand_built_case():
    torch.manual_seed(0)
    refiner = BoxRefiner(4, [8, 16], pooler_resolution=2, fc_dim=8, samples_per_image=2)
    with torch.no_grad():
        refiner.deltas.weight.normal_(0, 0.1)
    features = [torch.randn(1, 4, 8, 8), torch.randn(1, 4, 4, 4)]
    boxes = torch.tensor([[4.0, 4, 20, 24], [10, 10, 11.5, 30], [30, 30, 30.5, 40]])  # 3rd: < 1 px
    targets = torch.tensor([[5.0, 5, 22, 24], [8, 12, 12, 28], [0, 0, 9, 9]])
    loss = refiner.losses(features, [boxes], [targets])
    deltas = refiner(features, [Boxes(boxes[:2])])
    want = refiner.transform.get_deltas(boxes[:2], targets[:2])
    assert float(loss) == pytest.approx(float((deltas - want).abs().sum() / 2), rel=1e-5)
    # at most samples_per_image boxes per image, drawn from the usable ones
    many = boxes[:1].repeat(5, 1)
    capped = refiner.losses(features, [many], [targets[:1].repeat(5, 1)])
    one = refiner.losses(features, [boxes[:1]], [targets[:1]])
    assert float(capped) == pytest.approx(float(one), rel=1e-5)
    # nothing usable: a zero that still backpropagates
    empty = refiner.losses(features, [boxes[2:]], [targets[2:]])
    assert float(empty) == 0.0 and empty.requires_grad
    # refine() applies the predicted deltas to the boxes
    refined = refiner.refine(features, [boxes[:2]])[0]
    torch.testing.assert_close(refined, refiner.transform.apply_deltas(deltas, boxes[:2]))
    # steps > 1: each step refines the previous one's boxes (per image, order kept)
    again = refiner.transform.apply_deltas(refiner(features, [Boxes(refined)]), refined)
    three = [f.repeat(3, 1, 1, 1) for f in features]  # three images, the same features
    twice = refiner.refine(three, [boxes[:2], boxes[:0], boxes[:1]], steps=2)
    torch.testing.assert_close(twice[0], again)
    assert twice[1].shape == (0, 4)
    torch.testing.assert_close(twice[2], again[:1])
    assert not torch.allclose(again, refined)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="whole number"):
            refiner.refine(features, [boxes[:2]], steps=bad)


def test_box_refinement_trains_on_the_dense_boxes_and_moves_only_boxes(assets):
    torch.manual_seed(2)
    model = build_model(make_cfg(assets, *REFINE))
    _random_head(model)
    with torch.no_grad():
        model.box_refiner.deltas.weight.normal_(0, 0.05)
    losses, _ = train_losses(model, make_inputs())
    loss = losses["loss_box_refine"]
    assert torch.isfinite(loss) and loss > 0
    model.zero_grad()
    loss.backward()
    # the dense boxes are detached: the refiner and the FPN learn, not the dense regressor
    assert model.box_refiner.fc1.weight.grad.abs().sum() > 0
    assert model.head.bbox_pred.weight.grad is None or not model.head.bbox_pred.weight.grad.any()
    model.eval()
    model.test_topk_candidates = model.head.num_anchors * 20
    model.test_score_thresh = 0.05
    model.max_detections_per_image = 30
    images, features = dense_inputs(model, n=2, size=(2, 96, 72), seed=4)
    with torch.no_grad():
        predictions = list(model.head.forward_embeddings(features))
        refined = model.forward_inference(images, features, predictions)
        refiner, model.box_refiner = model.box_refiner, None
        plain = model.forward_inference(images, features, predictions)
        model.box_refiner = refiner
        expected = refiner.refine(features, [p.pred_boxes.tensor for p in plain])
        model.test_box_refine_steps = 2  # MODEL.GRIDCLIP.TEST_BOX_REFINE_STEPS
        refined_twice = model.forward_inference(images, features, predictions)
        expected_twice = refiner.refine(features, expected)
    for r, p, e in zip(refined, plain, expected):
        assert len(p) > 5
        assert torch.equal(r.scores, p.scores) and torch.equal(r.pred_classes, p.pred_classes)
        torch.testing.assert_close(r.pred_boxes.tensor, e)
        assert not torch.allclose(r.pred_boxes.tensor, p.pred_boxes.tensor)
    for r, e in zip(refined_twice, expected_twice):
        torch.testing.assert_close(r.pred_boxes.tensor, e)
    with pytest.raises(ValueError, match="TEST_BOX_REFINE_STEPS"):
        build_model(make_cfg(assets, *REFINE, "MODEL.GRIDCLIP.TEST_BOX_REFINE_STEPS", 0))


# ------------------------------------------------- grid embeddings made only where scored
@pytest.mark.parametrize(
    "size_in,size_out", [((4, 6), (4, 6)), ((3, 5), (13, 17)), ((4, 4), (16, 8))]
)
def test_bilinear_rows_follow_interpolate(size_in, size_out):
    torch.manual_seed(0)
    feature = torch.randn(7, *size_in)
    full = torch.nn.functional.interpolate(
        feature[None], size=size_out, mode="bilinear", align_corners=False
    )[0]
    locations = torch.randperm(size_out[0] * size_out[1])[:11]
    rows = bilinear_rows(feature, size_out, locations)
    expected = full.reshape(7, -1).t()[locations]
    torch.testing.assert_close(rows, expected, rtol=1e-5, atol=1e-6)


def _dense_clip_model(assets, *opts):
    model = build_model(make_cfg(assets, "MODEL.GRIDCLIP.DENSE_CLIP", True, *opts)).eval()
    _random_head(model)
    return model


def test_embedding_rows_on_demand_equal_the_full_maps(assets):
    """Every level (upsampled, same size as res5, pooled below it) and image: the rows made on
    demand equal the full grid embeddings' rows, for chosen locations and for all."""
    model = _dense_clip_model(assets)
    assert model.head.embeds_per_location
    inputs = make_inputs()
    with torch.no_grad():
        images = model.preprocess_image(inputs)
        backbone = model.backbone(images.tensor)
        features = [backbone[f] for f in model.head_in_features]
        full = model.predict(features, backbone["res5"])
        on_demand = model.predict(features, backbone["res5"], rows_on_demand=True)
    res5_size = tuple(backbone["res5"].shape[-2:])
    sizes = set()
    for level, (grid, lazy) in enumerate(zip(full[0], on_demand[0])):
        assert isinstance(lazy, EmbeddingRowsOnDemand)
        sizes.add((grid.shape[-2] > res5_size[0]) - (grid.shape[-2] < res5_size[0]))
        rows = model.head.embedding_rows(grid)
        for img in range(len(inputs)):
            torch.testing.assert_close(lazy.rows(img), rows[img], rtol=1e-5, atol=1e-5)
            locations = torch.randperm(rows.shape[1])[: max(1, rows.shape[1] // 3)]
            torch.testing.assert_close(
                lazy.rows(img, locations), rows[img][locations], rtol=1e-5, atol=1e-5
            )
    assert sizes == {-1, 0, 1}, "levels above, at and below res5's size are all checked"
    for a, b in zip(full[1:], on_demand[1:]):  # the other outputs are the same tensors' values
        for x, y in zip(a, b):
            assert torch.equal(x, y)


@pytest.mark.parametrize("k", [0, 7])
def test_model_inference_with_rows_on_demand_gives_the_full_detections(assets, k):
    """The whole model at inference (gate off and on, dense CLIP term on): the same detections
    as with the full grid embeddings."""
    model = _dense_clip_model(assets, "MODEL.GRIDCLIP.TEST_TOPK_LOCATIONS", k)
    model.test_score_thresh = 0.0
    inputs = make_inputs()
    with torch.no_grad():
        on_demand = model(inputs)
        with mock.patch.object(type(model.head), "embeds_per_location", False):
            full = model(inputs)
    for a, b in zip(on_demand, full):
        assert len(a["instances"]) > 0
        assert_same_detections(a["instances"], b["instances"])


def test_a_3x3_embedding_conv_computes_the_full_maps(assets):
    model = _dense_clip_model(assets, "MODEL.GRIDCLIP.EMBED_KERNEL_SIZE", 3)
    assert not model.head.embeds_per_location


@pytest.mark.parametrize("iou", [0.3, 0.6, 1.0])
def test_same_class_box_voting_equals_the_dense_form(iou):
    """Eager voting meets only same-class pairs; an exported graph keeps the dense IoU matrix:
    the same boxes (many classes, overlapping clusters, a zero-area box, zero scores)."""
    torch.manual_seed(0)
    centres = torch.rand(40, 2) * 200
    boxes = torch.cat([centres, centres + 5 + torch.rand(40, 2) * 60], dim=1)
    boxes = boxes.repeat(8, 1) + torch.randn(320, 4) * 3
    boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2])
    boxes[5, 2:] = boxes[5, :2]  # zero area
    scores = torch.rand(320)
    scores[::17] = 0.0
    classes = torch.randint(0, 12, (320,))
    keep = torch.randperm(320)[:60]
    keep[0] = 5
    voted = box_voting(boxes, scores, classes, keep, iou)
    with mock.patch("gridclip.modeling.box_voting.is_exporting", return_value=True):
        dense = box_voting(boxes, scores, classes, keep, iou)
    torch.testing.assert_close(voted, dense, rtol=1e-5, atol=1e-4)
    assert not torch.equal(voted, boxes[keep]) or iou == 1.0  # votes moved boxes
