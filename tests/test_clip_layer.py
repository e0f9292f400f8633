"""The CLIP layer (gridclip.clip): loading, dense features, text embeddings + cache, teacher.

Everything runs on tiny random CLIP models built here (OpenAI's architecture, ModifiedResNet
vision tower), CPU only.
"""

import copy
import logging
import os
import subprocess
import sys
import warnings

import clip
import numpy as np
import pytest
import tiny_models
import torch
import torch.nn.functional as F

from gridclip import get_gridclip_cfg
from gridclip.clip import (
    CLIP_PIXEL_MEAN,
    CLIP_PIXEL_MEAN_255,
    CLIP_PIXEL_STD,
    CLIP_PIXEL_STD_255,
    PROMPT_TEMPLATES,
    CLIPImageTeacher,
    CLIPWeightsError,
    attnpool_dense,
    attnpool_pooled,
    build_clip_teacher_from_cfg,
    clean_class_name,
    clear_clip_memo,
    clip_model_key,
    encode_text_embeddings,
    encode_text_tokens,
    get_text_embeddings,
    interpolate_positional_embedding,
    load_clip,
    load_clip_from_cfg,
    load_prompts,
    load_text_embeddings,
)
from gridclip.clip import loading as clip_loading
from gridclip.clip import modified_resnet_features, resolve_clip_weights, save_text_embeddings
from gridclip.clip import text as clip_text
from gridclip.clip import text_embeddings_from_cfg, tokenize_for_model
from gridclip.utils.cache import load_cache

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOT = 49407


def make_tiny_clip(embed_dim=64, image_resolution=64, vision_width=16, seed=0):
    return tiny_models.make_tiny_clip(
        embed_dim, image_resolution, vision_width, seed=seed,
        random_bn_stats=("running_mean", "running_var"),
    )  # fmt: skip


class _ScriptableCLIP(torch.nn.Module):
    """Holds CLIP's modules under CLIP's own names (identical state-dict keys) plus OpenAI's
    non-tensor entries, and traces: a stand-in for OpenAI's released TorchScript .pt files."""

    def __init__(self, model):
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, p in model.named_parameters(recurse=False):
            self.register_parameter(name, p)
        self.register_buffer("input_resolution", torch.tensor(model.visual.input_resolution))
        self.register_buffer("context_length", torch.tensor(model.context_length))
        self.register_buffer("vocab_size", torch.tensor(model.vocab_size))

    def forward(self, image):
        return self.visual(image)


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_clip()


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory, tiny):
    d = tmp_path_factory.mktemp("clip_weights")
    torch.save(tiny.state_dict(), d / "tiny_state_dict.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings from multi_head_attention_forward
        traced = torch.jit.trace(_ScriptableCLIP(copy.deepcopy(tiny)), torch.randn(1, 3, 64, 64))
    traced.save(str(d / "tiny_torchscript.pt"))
    return d


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), f"{k} differs"


def tiny_cfg(weights_path, tmp_path, *extra):
    return get_gridclip_cfg(
        None,
        [
            "MODEL.CLIP.WEIGHTS",
            str(weights_path),
            "MODEL.CLIP.EMBED_DIM",
            "64",
            "MODEL.CLIP.TEXT_CACHE_DIR",
            str(tmp_path / "text_cache"),
            "MODEL.CLIP.TEACHER_INPUT_SIZE",
            "64",
            "MODEL.DEVICE",
            "cpu",
            *extra,
        ],
    )


# ------------------------------------------------------------------------------------ loading
def test_load_plain_state_dict_is_exact(tiny, weights_dir):
    model = load_clip(str(weights_dir / "tiny_state_dict.pt"), expected_embed_dim=64)
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert_same_weights(model, tiny)


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_load_wrapped_and_fp16_state_dicts(tiny, tmp_path, wrapper):
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in tiny.state_dict().items()}
    path = tmp_path / "wrapped.pt"
    torch.save({wrapper: half, "epoch": 3}, path)
    model = load_clip(str(path))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    w = model.visual.attnpool.c_proj.weight
    assert torch.equal(w, tiny.visual.attnpool.c_proj.weight.half().float())


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_load_torchscript_archive_like_openai(tiny, weights_dir):
    path = weights_dir / "tiny_torchscript.pt"
    archive_keys = set(torch.jit.load(str(path)).state_dict())
    assert {"input_resolution", "context_length", "vocab_size"} <= archive_keys
    model = load_clip(str(path))
    assert_same_weights(model, tiny)
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(model.encode_image(x), tiny.encode_image(x))


def test_missing_file_error_says_how_to_get_weights(tmp_path):
    missing = tmp_path / "nope" / "RN50.pt"
    with pytest.raises(CLIPWeightsError) as e:
        load_clip(str(missing))
    msg = str(e.value)
    assert str(missing) in msg and "MODEL.CLIP.WEIGHTS" in msg and "RN50.pt" in msg
    # empty weights: looks the name up in the cache dir under OpenAI's file name
    with pytest.raises(CLIPWeightsError) as e:
        load_clip("", name="RN50", cache_dir=str(tmp_path))
    assert str(tmp_path / "RN50.pt") in str(e.value)


def test_cache_dir_lookup_uses_openai_file_names(tiny, weights_dir, tmp_path):
    (tmp_path / "ViT-B-32.pt").write_bytes((weights_dir / "tiny_state_dict.pt").read_bytes())
    path = resolve_clip_weights("", "ViT-B/32", str(tmp_path))
    assert path == str(tmp_path / "ViT-B-32.pt")
    assert_same_weights(load_clip("", name="ViT-B/32", cache_dir=str(tmp_path)), tiny)


@pytest.mark.parametrize("fname", ["tiny_state_dict.pt", "tiny_torchscript.pt"])
def test_truncated_file_error_names_file(weights_dir, tmp_path, fname):
    data = (weights_dir / fname).read_bytes()
    path = tmp_path / fname
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CLIPWeightsError) as e:
        load_clip(str(path))
    assert str(path) in str(e.value) and "corrupt" in str(e.value)


@pytest.mark.parametrize(
    "drop",
    ["text_projection", "visual.attnpool.c_proj.weight", "transformer.resblocks.0.ln_1.bias"],
)
def test_wrong_architecture_raises(tiny, tmp_path, drop):
    sd = dict(tiny.state_dict())
    del sd[drop]
    path = tmp_path / "broken.pt"
    torch.save(sd, path)
    with pytest.raises(CLIPWeightsError) as e:
        load_clip(str(path))
    assert str(path) in str(e.value)


def test_not_a_clip_state_dict_raises(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 3, 3)}, path)
    with pytest.raises(CLIPWeightsError, match="not an OpenAI CLIP state dict"):
        load_clip(str(path))
    torch.save([1, 2, 3], path)
    with pytest.raises(CLIPWeightsError, match="not a CLIP state dict"):
        load_clip(str(path))


def test_embed_dim_mismatch_raises(weights_dir):
    with pytest.raises(CLIPWeightsError) as e:
        load_clip(str(weights_dir / "tiny_state_dict.pt"), expected_embed_dim=1024)
    assert (
        "64" in str(e.value) and "1024" in str(e.value) and "MODEL.CLIP.EMBED_DIM" in str(e.value)
    )


def test_embedded_clip_resolution(weights_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(clip_loading, "EMBEDDED_CLIP_PATH", str(tmp_path / "world_clip.pt"))
    for kwargs in ({"name": "embedded"}, {"weights": "embedded"}):
        with pytest.raises(CLIPWeightsError, match="train_small_clip.py"):
            resolve_clip_weights(**kwargs)
    (tmp_path / "world_clip.pt").write_bytes((weights_dir / "tiny_state_dict.pt").read_bytes())
    assert resolve_clip_weights("", "embedded") == str(tmp_path / "world_clip.pt")


def test_clip_model_key_is_stable_and_content_sensitive(weights_dir, tmp_path):
    a = weights_dir / "tiny_state_dict.pt"
    b = tmp_path / "copy.pt"
    b.write_bytes(a.read_bytes())
    assert clip_model_key(str(a)) == clip_model_key(str(b))
    assert len(clip_model_key(str(a))) == 16
    other = tmp_path / "other.pt"
    torch.save(make_tiny_clip(seed=1).state_dict(), other)
    assert clip_model_key(str(other)) != clip_model_key(str(a))


def test_load_clip_from_cfg_is_memoised(tiny, weights_dir, tmp_path, monkeypatch):
    clear_clip_memo()
    path = tmp_path / "w.pt"
    path.write_bytes((weights_dir / "tiny_state_dict.pt").read_bytes())
    calls = []
    real = clip_loading.load_clip
    monkeypatch.setattr(clip_loading, "load_clip", lambda *a, **k: calls.append(a) or real(*a, **k))
    cfg = tiny_cfg(path, tmp_path)
    m1, m2 = load_clip_from_cfg(cfg), load_clip_from_cfg(cfg)
    assert len(calls) == 1
    assert m1 is not m2  # copies: one caller freezing/moving its model cannot affect another
    assert_same_weights(m1, tiny)
    assert load_clip_from_cfg(cfg, copy_model=False) is load_clip_from_cfg(cfg, copy_model=False)
    os.utime(path, ns=(1, 1))  # replaced weights (new mtime) are re-read
    load_clip_from_cfg(cfg)
    assert len(calls) == 2
    bad = tiny_cfg(path, tmp_path, "MODEL.CLIP.EMBED_DIM", "32")
    with pytest.raises(CLIPWeightsError, match="EMBED_DIM"):
        load_clip_from_cfg(bad)
    clear_clip_memo()


# -------------------------------------------------------------------------------------- dense
def test_pixel_constants():
    assert CLIP_PIXEL_MEAN_255 == pytest.approx([m * 255 for m in CLIP_PIXEL_MEAN])
    assert CLIP_PIXEL_STD_255 == pytest.approx([s * 255 for s in CLIP_PIXEL_STD])
    assert CLIP_PIXEL_MEAN_255[0] == pytest.approx(122.77, abs=0.01)


def test_interpolate_positional_embedding():
    pos = torch.randn(1 + 2 * 2, 8)
    assert interpolate_positional_embedding(pos, 2, 2) is pos
    out = interpolate_positional_embedding(pos, 3, 5)
    assert out.shape == (1 + 15, 8)
    assert torch.equal(out[0], pos[0])
    const = torch.cat([torch.zeros(1, 4), torch.full((9, 4), 0.7)])
    assert torch.allclose(interpolate_positional_embedding(const, 4, 6)[1:], torch.tensor(0.7))
    with pytest.raises(AssertionError, match="square"):
        interpolate_positional_embedding(torch.randn(7, 4), 2, 2)


@pytest.mark.parametrize("vision_width,resolution", [(16, 64), (8, 224)])
def test_attnpool_pooled_equals_encode_image_at_native_size(vision_width, resolution):
    model = make_tiny_clip(image_resolution=resolution, vision_width=vision_width)
    x = torch.randn(2, 3, resolution, resolution)
    with torch.no_grad():
        feats = modified_resnet_features(model.visual, x)
        pooled = attnpool_pooled(model.visual.attnpool, feats["res5"])
        ref = model.encode_image(x)
    assert pooled.shape == (2, 64)
    torch.testing.assert_close(pooled, ref, atol=1e-5, rtol=1e-5)


def test_modified_resnet_features_at_odd_size(tiny):
    with torch.no_grad():
        feats = modified_resnet_features(tiny.visual, torch.randn(1, 3, 96, 160))
    shapes = {k: tuple(v.shape) for k, v in feats.items()}
    assert shapes == {
        "res2": (1, 64, 24, 40),
        "res3": (1, 128, 12, 20),
        "res4": (1, 256, 6, 10),
        "res5": (1, 512, 3, 5),
    }
    with torch.no_grad():
        pooled = attnpool_pooled(tiny.visual.attnpool, feats["res5"])
    assert pooled.shape == (1, 64) and torch.isfinite(pooled).all()


def test_attnpool_dense_shape_and_per_location_value(tiny):
    pool = tiny.visual.attnpool
    x = torch.randn(2, 512, 3, 5)
    with torch.no_grad():
        dense = attnpool_dense(pool, x)
        assert dense.shape == (2, 64, 3, 5)
        pos = interpolate_positional_embedding(pool.positional_embedding, 3, 5)
        i, j = 2, 3
        ref = pool.c_proj(pool.v_proj(x[1, :, i, j] + pos[1 + i * 5 + j]))
    torch.testing.assert_close(dense[1, :, i, j], ref, atol=1e-5, rtol=1e-5)


def test_attnpool_dense_matches_pooled_on_uniform_features(tiny):
    """With no positional embedding and identical features everywhere, attention averages
    identical values: the pooled embedding equals the dense one at every location."""
    pool = copy.deepcopy(tiny.visual.attnpool)
    with torch.no_grad():
        pool.positional_embedding.zero_()
        x = torch.randn(1, 512, 1, 1).expand(1, 512, 4, 3).contiguous()
        dense = attnpool_dense(pool, x)
        pooled = attnpool_pooled(pool, x)
    torch.testing.assert_close(
        dense, pooled[:, :, None, None].expand_as(dense), atol=1e-5, rtol=1e-4
    )


def test_attnpool_dense_is_differentiable(tiny):
    pool = copy.deepcopy(tiny.visual.attnpool)
    x = torch.randn(1, 512, 2, 3, requires_grad=True)
    attnpool_dense(pool, x).sum().backward()
    assert x.grad is not None and pool.v_proj.weight.grad is not None


# --------------------------------------------------------------------------------------- text
def test_clean_class_name():
    assert clean_class_name("bow_(weapon)") == "bow (weapon)"
    assert clean_class_name("hair_dryer") == "hair dryer"
    assert clean_class_name("  Red__square ") == "Red square"
    assert clean_class_name("car_(automobile)_part") == "car (automobile) part"


def test_prompt_templates_and_files(tmp_path):
    assert load_prompts("single") == ["a photo of a {}."]
    vild = load_prompts("vild")
    assert 10 <= len(vild) <= 20 and all(t.count("{}") == 1 for t in vild)
    assert len(set(vild)) == len(vild)
    assert load_prompts("vild") is not PROMPT_TEMPLATES["vild"]  # callers cannot mutate the set
    good = tmp_path / "p.txt"
    good.write_text("# my prompts\na {} on a table.\n\nthe {}.\n")
    assert load_prompts(str(good)) == ["a {} on a table.", "the {}."]
    bad = tmp_path / "bad.txt"
    bad.write_text("a {} on a table.\na photo of something\n")
    with pytest.raises(ValueError, match=r"bad\.txt, line 2"):
        load_prompts(str(bad))
    braces = tmp_path / "braces.txt"
    braces.write_text("a {} in {the} scene.\n")
    with pytest.raises(ValueError, match="line 1"):
        load_prompts(str(braces))
    with pytest.raises(ValueError, match="no-such-set"):
        load_prompts("no-such-set")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match="no templates"):
        load_prompts(str(empty))


def test_tokenize_for_short_context_keeps_eot(tiny):
    long_text = "a photo of a " + "very " * 30 + "long thing."
    tokens = tokenize_for_model(tiny, ["a photo of a dog.", long_text])
    assert tokens.shape == (2, 16)
    assert torch.equal(tokens[0], clip.tokenize(["a photo of a dog."], context_length=16)[0])
    assert tokens[1, -1] == EOT and tokens[1].argmax() == 15
    assert (tokens[1, 1:15] != 0).all()


def test_encode_text_tokens_matches_encode_text(tiny):
    tokens = tokenize_for_model(tiny, ["a photo of a dog.", "cat", "a blurry photo of a red ring."])
    assert tokens.argmax(-1).max() < 15  # the shortened path is really taken
    with torch.no_grad():
        torch.testing.assert_close(
            encode_text_tokens(tiny, tokens), tiny.encode_text(tokens), atol=1e-5, rtol=1e-5
        )


def test_encode_text_embeddings_is_normalised_prompt_mean(tiny):
    templates = ["a photo of a {}.", "a {} in the scene."]
    emb = encode_text_embeddings(tiny, ["dog", "red ring"], templates, batch_size=3, progress=False)
    assert emb.shape == (2, 64) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))
    with torch.no_grad():
        per_prompt = tiny.encode_text(clip.tokenize([t.format("red ring") for t in templates], 16))
    ref = F.normalize(F.normalize(per_prompt, dim=-1).mean(0), dim=0)
    torch.testing.assert_close(emb[1], ref, atol=1e-5, rtol=1e-5)


def test_encode_text_embeddings_batches_equal_one_forward(tiny):
    """Bounded-memory batches (a 21k-class vocabulary is embedded batch by batch) give the
    embeddings of one forward over every prompt, whatever the batch size."""
    templates = ["a photo of a {}.", "a {} in the scene.", "{}"]
    names = ["dog", "red ring", "cat", "blue box", "tree", "lamp", "x"]
    whole = encode_text_embeddings(tiny, names, templates, batch_size=1000, progress=False)
    for batch_size in (1, 3, 7):  # 1 class per forward (batch < templates), 1, 2 classes
        batched = encode_text_embeddings(tiny, names, templates, batch_size, progress=False)
        torch.testing.assert_close(batched, whole, atol=1e-5, rtol=1e-5)


class CountingLoader:
    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self):
        self.calls += 1
        return self.model


def test_text_embedding_cache_hit_miss_and_corruption(tiny, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(clip_text, "PER_NAME_CACHE_MAX_NAMES", 1)  # one file per vocabulary
    cache = tmp_path / "cache"
    loader = CountingLoader(tiny)
    names = ["red square", "blue ring", "bow (weapon)"]
    kw = dict(model_key="tiny0", prompts="single", cache_dir=str(cache), progress=False)
    first = get_text_embeddings(names, clip_loader=loader, **kw)
    assert loader.calls == 1 and first.shape == (3, 64)
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"  # no temporary files left
    tensors, provenance = load_cache(str(files[0]), "text_embeddings")
    assert torch.equal(tensors["text_embeddings"], first)
    assert provenance["clip"] == "tiny0" and provenance["num_classes"] == 3
    assert provenance["prompts"] == load_prompts("single")
    second = get_text_embeddings(names, clip_loader=loader, **kw)
    assert loader.calls == 1, "a cache hit must not load CLIP"
    assert torch.equal(first, second)
    # another vocabulary, prompt set or model is another entry
    get_text_embeddings(names[:2], clip_loader=loader, **kw)
    get_text_embeddings(names, clip_loader=loader, **{**kw, "prompts": "vild"})
    get_text_embeddings(names, clip_loader=loader, **{**kw, "model_key": "tiny1"})
    assert loader.calls == 4 and len(list(cache.iterdir())) == 4
    # corrupt entries are recomputed with a warning, never used
    zeros = torch.zeros(3, 64)
    for corruption in ("garbage", "zero rows", "other provenance", "old .npy format"):
        if corruption == "garbage":
            files[0].write_bytes(b"garbage")
        elif corruption == "zero rows":  # readable, right header, unusable values
            save_text_embeddings(str(files[0]), zeros, provenance)
        elif corruption == "other provenance":
            save_text_embeddings(str(files[0]), first, dict(provenance, clip="another"))
        else:
            np.save(open(files[0], "wb"), first.numpy())
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="gridclip.clip.text"):
            again = get_text_embeddings(names, clip_loader=loader, **kw)
        assert "corrupt" in caplog.text and str(files[0]) in caplog.text
        torch.testing.assert_close(again, first)
    assert loader.calls == 8
    save_text_embeddings(str(files[0]), torch.ones(2, 64), provenance)  # wrong class count
    get_text_embeddings(names, clip_loader=loader, **kw)
    assert loader.calls == 9
    assert torch.equal(load_text_embeddings(str(files[0])), first)  # rewritten correctly


def test_small_vocabularies_are_cached_name_by_name(tiny, tmp_path):
    """Grounding prompts make one small vocabulary per caption: the cache holds one file per
    distinct name, not one per caption, and any caption over seen names needs no CLIP."""
    cache = tmp_path / "cache"
    loader = CountingLoader(tiny)
    kw = dict(model_key="tiny0", prompts="single", cache_dir=str(cache), progress=False)
    names = ["red star", "blue ring", "yellow heart"]
    first = get_text_embeddings(names, clip_loader=loader, **kw)
    assert loader.calls == 1 and len(list(cache.iterdir())) == 3
    whole = encode_text_embeddings(tiny, names, load_prompts("single"), progress=False)
    torch.testing.assert_close(first, whole)
    # other captions over the same phrases, in any order, repeated: cache hits only
    for vocabulary in (names[::-1], names[:2], ["blue ring", "red star", "blue ring"]):
        emb = get_text_embeddings(vocabulary, clip_loader=loader, **kw)
        torch.testing.assert_close(emb, torch.stack([first[names.index(n)] for n in vocabulary]))
    assert loader.calls == 1 and len(list(cache.iterdir())) == 3
    # a new phrase adds one file; only it is encoded
    get_text_embeddings(["red star", "green cross"], clip_loader=loader, **kw)
    assert loader.calls == 2 and len(list(cache.iterdir())) == 4
    # a name's file is that of a one-name vocabulary
    one = get_text_embeddings(["red star"], clip_loader=loader, **kw)
    assert loader.calls == 2 and torch.equal(one[0], first[0])
    # a vocabulary above the bound keeps one file
    big = [f"class {i}" for i in range(clip_text.PER_NAME_CACHE_MAX_NAMES + 1)]
    get_text_embeddings(big, clip_loader=loader, **kw)
    assert len(list(cache.iterdir())) == 5


def test_text_embeddings_without_model_or_loader_or_cache(tiny, tmp_path):
    with pytest.raises(ValueError, match="clip_loader"):
        get_text_embeddings(["dog"], model_key="k", cache_dir=str(tmp_path), progress=False)
    emb = get_text_embeddings(["dog"], tiny, model_key="k", cache_dir=None, progress=False)
    assert emb.shape == (1, 64) and not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="empty"):
        get_text_embeddings([], tiny, model_key="k", cache_dir=None)


@pytest.mark.parametrize("ext", [".npy", ".pt", ".safetensors"])
def test_save_and_load_text_embeddings(tmp_path, ext):
    emb = torch.randn(5, 8)
    path = save_text_embeddings(str(tmp_path / "sub" / f"emb{ext}"), emb)
    assert os.listdir(tmp_path / "sub") == [f"emb{ext}"]
    assert torch.equal(load_text_embeddings(path), emb)


def test_text_embeddings_from_cfg_file(tmp_path, weights_dir):
    names = ["red_square", "blue_ring"]
    path = tmp_path / "emb.npy"
    emb = F.normalize(torch.randn(2, 64), dim=-1)
    save_text_embeddings(str(path), emb)
    cfg = tiny_cfg(
        weights_dir / "tiny_state_dict.pt", tmp_path, "MODEL.CLIP.TEXT_EMBEDDINGS", str(path)
    )
    torch.testing.assert_close(text_embeddings_from_cfg(cfg, names), emb)
    with pytest.raises(ValueError, match=r"emb\.npy.*3 classes|2 class embeddings.*3 classes"):
        text_embeddings_from_cfg(cfg, names + ["green_cone"])
    cfg.MODEL.CLIP.EMBED_DIM = 32
    with pytest.raises(ValueError, match="EMBED_DIM"):
        text_embeddings_from_cfg(cfg, names)
    cfg.MODEL.CLIP.TEXT_EMBEDDINGS = str(tmp_path / "missing.npy")
    with pytest.raises(ValueError, match="missing.npy"):
        text_embeddings_from_cfg(cfg, names)
    (tmp_path / "broken.npy").write_bytes(b"\x93NUMPY garbage")
    cfg.MODEL.CLIP.TEXT_EMBEDDINGS = str(tmp_path / "broken.npy")
    with pytest.raises(ValueError, match="broken.npy"):
        text_embeddings_from_cfg(cfg, names)


def test_text_embeddings_from_cfg_computes_and_caches(tiny, weights_dir, tmp_path):
    clear_clip_memo()
    cfg = tiny_cfg(weights_dir / "tiny_state_dict.pt", tmp_path, "MODEL.CLIP.PROMPTS", "single")
    emb = text_embeddings_from_cfg(cfg, ["red_square", "bow_(weapon)"])
    ref = encode_text_embeddings(
        tiny, ["red square", "bow (weapon)"], ["a photo of a {}."], progress=False
    )
    torch.testing.assert_close(emb, ref, atol=1e-5, rtol=1e-5)
    assert len(list((tmp_path / "text_cache").iterdir())) == 2  # a small vocabulary: per name
    clear_clip_memo()


# ------------------------------------------------------------------------------------ teacher
@pytest.fixture(scope="module")
def teacher(tiny):
    return CLIPImageTeacher(copy.deepcopy(tiny), input_size=64)


def test_teacher_is_frozen(teacher):
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not teacher.visual.training
    out = teacher.embed_images(torch.rand(1, 3, 64, 64) * 255)
    assert not out.requires_grad


def test_teacher_embed_images_equals_clip_at_native_size(teacher, tiny):
    images = torch.rand(2, 3, 64, 64) * 255
    mean = torch.tensor(CLIP_PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_PIXEL_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = F.normalize(tiny.encode_image((images / 255 - mean) / std), dim=-1)
    out = teacher.embed_images(images)
    assert out.shape == (2, 64)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_teacher_embed_boxes(teacher):
    image = torch.rand(3, 80, 96) * 255
    boxes = torch.tensor(
        [[0.0, 0.0, 96.0, 80.0], [10.0, 12.0, 40.0, 30.0], [50.0, 40.0, 50.0, 41.0]]
    )
    emb = teacher.embed_boxes(image, boxes)
    assert emb.shape == (3, 64) and torch.isfinite(emb).all()
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    whole = teacher.embed_boxes(image, boxes[:1], scales=(1.0,))
    torch.testing.assert_close(whole, teacher.embed_images(image[None]), atol=1e-5, rtol=1e-4)
    # a black box on white: the 1.5x crop sees white margins, the 1x crop does not
    framed = torch.full((3, 80, 96), 255.0)
    framed[:, 12:30, 10:40] = 0.0
    one = teacher.embed_boxes(framed, boxes[1:2], scales=(1.0,))
    wide = teacher.embed_boxes(framed, boxes[1:2], scales=(1.5,))
    both = teacher.embed_boxes(framed, boxes[1:2], scales=(1.0, 1.5))
    black = teacher.embed_images(torch.zeros(1, 3, 64, 64))
    assert (one - wide).abs().max() > 1e-3
    assert (one - black).abs().max() < 0.1 * (wide - black).abs().max()
    torch.testing.assert_close(both, F.normalize(one + wide, dim=-1), atol=1e-5, rtol=1e-4)
    # chunking does not change results; no boxes gives an empty (0, D)
    torch.testing.assert_close(
        teacher.embed_boxes(image, boxes, chunk_size=1), emb, atol=1e-5, rtol=1e-4
    )
    assert teacher.embed_boxes(image, torch.zeros(0, 4)).shape == (0, 64)
    from detectron2.structures import Boxes

    torch.testing.assert_close(teacher.embed_boxes(image, Boxes(boxes)), emb)


def test_teacher_embed_tiles(teacher):
    images = torch.rand(2, 3, 64, 96) * 255
    g1, g2 = teacher.embed_tiles(images, grids=(1, 2))
    assert g1.shape == (2, 1, 64) and g2.shape == (2, 4, 64)
    torch.testing.assert_close(g1[:, 0], teacher.embed_images(images), atol=1e-5, rtol=1e-4)
    # tile 1 of image 1 (row-major: top-right) is the box (48, 0, 96, 32)
    top_right = teacher.embed_boxes(
        images[1], torch.tensor([[48.0, 0.0, 96.0, 32.0]]), scales=(1.0,)
    )
    torch.testing.assert_close(g2[1, 1], top_right[0], atol=1e-5, rtol=1e-4)


def test_teacher_runs_at_other_input_size(tiny):
    teacher = CLIPImageTeacher(copy.deepcopy(tiny), input_size=96, chunk_size=2)
    emb = teacher.embed_boxes(torch.rand(3, 50, 70) * 255, torch.tensor([[0.0, 0, 30, 30]] * 3))
    assert emb.shape == (3, 64) and torch.isfinite(emb).all()


def test_build_clip_teacher_from_cfg(weights_dir, tmp_path):
    clear_clip_memo()
    cfg = tiny_cfg(
        weights_dir / "tiny_state_dict.pt", tmp_path, "MODEL.CLIP.TEACHER_INPUT_SIZE", "96"
    )
    teacher = build_clip_teacher_from_cfg(cfg)
    assert teacher.input_size == 96 and teacher.embed_dim == 64
    # the teacher froze its own copy, not the memoised model others receive
    assert all(p.requires_grad for p in load_clip_from_cfg(cfg).parameters())
    clear_clip_memo()


# ------------------------------------------------------------------------------------- tool
def test_dump_text_embeddings_tool(weights_dir, tmp_path, tiny):
    out = tmp_path / "vocab.npy"
    cmd = [
        sys.executable,
        os.path.join(REPO_ROOT, "tools", "dump_text_embeddings.py"),
        "--names",
        "red_square,blue ring",
        "--output",
        str(out),
        "--prompts",
        "single",
        "MODEL.CLIP.WEIGHTS",
        str(weights_dir / "tiny_state_dict.pt"),
        "MODEL.CLIP.EMBED_DIM",
        "64",
        "MODEL.CLIP.TEXT_CACHE_DIR",
        str(tmp_path / "cache"),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=str(tmp_path))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "(2, 64)" in res.stdout + res.stderr and str(out) in res.stdout + res.stderr
    emb = np.load(out)
    ref = encode_text_embeddings(
        tiny, ["red square", "blue ring"], ["a photo of a {}."], progress=False
    )
    np.testing.assert_allclose(emb, ref.numpy(), atol=1e-5)
    # a wrong EMBED_DIM fails with a message naming the key
    bad_dim = ["MODEL.CLIP.EMBED_DIM", "1024", "MODEL.CLIP.TEXT_CACHE_DIR", str(tmp_path / "c2")]
    res = subprocess.run(cmd[:-4] + bad_dim, capture_output=True, text=True, timeout=240)
    assert res.returncode != 0 and "EMBED_DIM" in res.stderr
