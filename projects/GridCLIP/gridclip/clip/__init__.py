"""The CLIP layer: loading OpenAI CLIP weights, dense grid features, text embeddings (+ cache),
the teacher and its caches.

(This package is ``gridclip.clip``; OpenAI's code is the top-level ``clip`` module.)
"""

from .dense import (
    CLIP_PIXEL_MEAN,
    CLIP_PIXEL_MEAN_255,
    CLIP_PIXEL_STD,
    CLIP_PIXEL_STD_255,
    MODIFIED_RESNET_STRIDES,
    attnpool_dense,
    attnpool_pooled,
    interpolate_positional_embedding,
    modified_resnet_features,
)
from .embeddings import check_text_embeddings, l2_normalize
from .loading import (
    EMBEDDED_CLIP_PATH,
    CLIPWeightsError,
    clear_clip_memo,
    clip_embed_dim,
    clip_model_key,
    load_clip,
    load_clip_from_cfg,
    load_clip_state_dict,
    resolve_clip_weights,
)
from .teacher import CLIPImageTeacher, build_clip_teacher_from_cfg
from .teacher_cache import TeacherCache, TeacherEmbeddingCache, teacher_cache_key
from .text import (
    PROMPT_TEMPLATES,
    clean_class_name,
    encode_text_embeddings,
    encode_text_tokens,
    get_text_embeddings,
    load_prompts,
    load_text_embeddings,
    save_text_embeddings,
    text_embeddings_cache_key,
    text_embeddings_from_cfg,
    text_embeddings_provenance,
    tokenize_for_model,
)

__all__ = [
    "CLIP_PIXEL_MEAN",
    "CLIP_PIXEL_MEAN_255",
    "CLIP_PIXEL_STD",
    "CLIP_PIXEL_STD_255",
    "MODIFIED_RESNET_STRIDES",
    "attnpool_dense",
    "attnpool_pooled",
    "interpolate_positional_embedding",
    "modified_resnet_features",
    "EMBEDDED_CLIP_PATH",
    "CLIPWeightsError",
    "clear_clip_memo",
    "clip_embed_dim",
    "clip_model_key",
    "load_clip",
    "load_clip_from_cfg",
    "load_clip_state_dict",
    "resolve_clip_weights",
    "CLIPImageTeacher",
    "build_clip_teacher_from_cfg",
    "PROMPT_TEMPLATES",
    "clean_class_name",
    "encode_text_embeddings",
    "encode_text_tokens",
    "get_text_embeddings",
    "load_prompts",
    "load_text_embeddings",
    "save_text_embeddings",
    "text_embeddings_cache_key",
    "text_embeddings_from_cfg",
    "text_embeddings_provenance",
    "tokenize_for_model",
    "check_text_embeddings",
    "l2_normalize",
    "TeacherCache",
    "TeacherEmbeddingCache",
    "teacher_cache_key",
]
