"""GridCLIP's background-relative class logits (``MODEL.GRIDCLIP.BACKGROUND_EMBEDDING``)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model
from test_gridclip import D, K, _random_head, make_cfg, make_tiny_clip


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("background_assets")
    clip_path = str(root / "tiny_clip.pt")
    torch.save(make_tiny_clip().state_dict(), clip_path)
    text_path = str(root / "text5.npy")
    rng = np.random.RandomState(0)
    common = rng.randn(1, D)  # text embeddings sharing a large common direction, as CLIP's
    np.save(text_path, (3 * common + rng.randn(K, D)).astype("float32"))
    return {"clip": clip_path, "text": text_path, "root": root}


def test_logits_are_relative_to_the_background_and_it_starts_at_the_mean_text(assets):
    model = build_model(make_cfg(assets, "MODEL.GRIDCLIP.BACKGROUND_EMBEDDING", True))
    head = model.head
    text = head.classifier.text_embeddings
    mean = F.normalize(text.mean(dim=0), dim=0)
    assert torch.allclose(F.normalize(head.background.detach(), dim=0), mean, atol=1e-6)
    assert head.background.requires_grad
    x = torch.randn(7, D)
    scale, bias = float(head.classifier.logit_scale), float(head.classifier.bias)
    cos = F.normalize(x, dim=-1) @ text.t()
    cos_bg = F.normalize(x, dim=-1) @ mean
    expected = scale * (cos - cos_bg[:, None]) + bias
    assert torch.allclose(head.logits(x), expected, atol=1e-5)
    sub = torch.tensor([3, 1])
    assert torch.allclose(head.logits(x, sub), expected[:, sub], atol=1e-5)
    # an embedding along the common direction: without the background every class is far above
    # the prior; with it, the logits are about the prior's
    plain = build_model(make_cfg(assets)).head
    assert (plain.logits(mean[None]) > bias + 0.5 * scale).all()
    rel = head.logits(mean[None])
    assert rel.abs().max() < abs(bias) + 0.5 * scale and (rel < bias + 0.5 * scale).all()
    assert head.max_background_shift == pytest.approx(scale)
    assert plain.max_background_shift == 0.0


def test_exact_pruning_stays_exact_with_the_background(assets):
    """Threshold pruning bounds the best logit; with the background term it may be up to one
    scale higher, so no detection may be lost."""
    torch.manual_seed(0)
    model = build_model(make_cfg(assets, "MODEL.GRIDCLIP.BACKGROUND_EMBEDDING", True)).eval()
    _random_head(model)
    head = model.head
    scale = float(head.classifier.logit_scale)
    with torch.no_grad():
        # every location embeds class 0's text; the background is its opposite, so
        # logit_0 = scale * (1 + 1) + bias: above the threshold only thanks to the background
        text0 = head.classifier.text_embeddings[0]
        head.grid_embed.weight.zero_()
        head.grid_embed.bias.copy_(text0)
        head.background.copy_(-text0)
        head.classifier.bias.fill_(-1.5 * scale)
    model.test_score_thresh = 0.05
    model.max_detections_per_image = 50
    image = torch.randint(0, 255, (3, 64, 80)).float()
    with torch.no_grad():
        pruned = model([{"image": image, "height": 64, "width": 80}])[0]["instances"]
        model.test_score_thresh = 0.0  # nothing pruned; keep the same detections above 0.05
        full = model([{"image": image, "height": 64, "width": 80}])[0]["instances"]
    full = full[full.scores > 0.05]
    assert len(full) > 0
    assert len(pruned) == len(full)
    assert torch.allclose(pruned.scores.sort().values, full.scores.sort().values)
