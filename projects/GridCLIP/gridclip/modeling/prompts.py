"""Grounding prompts: a caption or a GLIP-style prompt turned into phrases with character spans.

Two kinds of prompt (pure Python, no NLP dependency):

- **phrases** (GLIP's detection prompt): ``"red star. blue ring. yellow heart."``. The prompt is
  split on ``.`` only; each non-empty segment, stripped of surrounding whitespace, is one phrase
  *as written* (commas, unicode, underscores and inner words are kept: ``"bow (weapon), red."``
  is the one phrase ``"bow (weapon), red"``).
- **caption** (a free sentence): ``"a red star beside two blue rings on a striped background"``
  -> ``red star``, ``blue rings``, ``striped background``: the project's one caption rule,
  :mod:`gridclip.data.phrases` (also used for the captions of image-text pairs), which states it.

Every :class:`Phrase` keeps its ``span``: ``(start, end)`` Python string indices (Unicode code
points, end exclusive) into the original prompt, so ``prompt[start:end] == phrase.text`` always.

A phrase's ``name`` is what its text embedding is computed from: for captions, the text as
written with its last word singularised (:func:`~gridclip.data.phrases.phrase_name`, ``"blue
rings"`` -> ``"blue ring"``: detectors' class names, and the embedded world's CLIP captions, are
singular); for GLIP-style prompts, the text as written (the user typed class names). Phrases
whose names are equal (case-insensitive) share one class of the vocabulary
(:meth:`ParsedPrompt.class_names`); a detection of that class names the first of them and lists
every span.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from ..data.phrases import (
    CAPTION_SEPARATORS,
    CAPTION_STOPWORDS,
    caption_phrases,
    pluralize,
    singularize,
)

__all__ = [
    "CAPTION_SEPARATORS",
    "CAPTION_STOPWORDS",
    "PROMPT_KINDS",
    "ParsedPrompt",
    "Phrase",
    "parse_prompt",
    "pluralize",
    "singularize",
    "template_caption",
]

#: how a prompt is split: ``auto`` = ``phrases`` when it holds at least two ``.``-separated
#: segments, else ``caption``
PROMPT_KINDS = ("auto", "phrases", "caption")

_NUMBER_WORDS = "one two three four five six seven eight nine ten eleven twelve".split()


def template_caption(object_names: Sequence[str]) -> str:
    """A caption listing objects by name and count, in order of first appearance, e.g.
    ``["red_star", "blue_ring", "blue_ring", "yellow_heart"]`` -> ``"a red star, two blue rings
    and a yellow heart"``; :func:`parse_prompt` reads it back into one phrase per name.

    Names are written with underscores as spaces; counts above twelve as digits.
    """
    counts: Dict[str, int] = {}
    for name in object_names:
        name = " ".join(str(name).replace("_", " ").split())
        if not name:
            raise ValueError("template_caption: an object has an empty name")
        counts[name] = counts.get(name, 0) + 1
    if not counts:
        raise ValueError("template_caption: no objects to name")
    items = []
    for name, n in counts.items():
        if n == 1:
            items.append(("an " if name[0].lower() in "aeiou" else "a ") + name)
        else:
            number = _NUMBER_WORDS[n - 1] if n <= len(_NUMBER_WORDS) else str(n)
            items.append(f"{number} {pluralize(name)}")
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


@dataclass(frozen=True)
class Phrase:
    """One phrase of a prompt.

    Attributes:
        text: the phrase as written in the prompt (``prompt[span[0]:span[1]]``).
        span: ``(start, end)`` string indices into the prompt, end exclusive.
        name: what its text embedding is computed from (see the module doc).
    """

    text: str
    span: Tuple[int, int]
    name: str


@dataclass(frozen=True)
class ParsedPrompt:
    """A prompt, how it was read, and its phrases in order of appearance."""

    prompt: str
    kind: str
    phrases: Tuple[Phrase, ...]
    _classes: Tuple[Tuple[int, ...], ...] = field(default=(), repr=False)

    @property
    def class_names(self) -> List[str]:
        """The vocabulary: one name per distinct phrase name (case-insensitive), first-seen
        order; the text embedding of class k is computed from ``class_names[k]``."""
        return [self.phrases[group[0]].name for group in self._classes]

    @property
    def class_phrases(self) -> List[List[Phrase]]:
        """For each class of :attr:`class_names`, its phrases (first occurrence first)."""
        return [[self.phrases[i] for i in group] for group in self._classes]

    @property
    def class_labels(self) -> List[str]:
        """For each class, the text of its first phrase (what a drawing labels)."""
        return [phrases[0].text for phrases in self.class_phrases]

    def class_of(self, name: str) -> Optional[int]:
        """The class index whose name equals ``name`` (case-insensitive, ``_`` = space)."""
        key = _key(name)
        for k, class_name in enumerate(self.class_names):
            if _key(class_name) == key:
                return k
        return None

    def describe(self) -> str:
        return f"{self.kind} prompt, {len(self._classes)} phrases"


def _key(name: str) -> str:
    return " ".join(str(name).replace("_", " ").lower().split())


def _check_prompt(prompt) -> str:
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    if not prompt.strip():
        raise ValueError(
            'prompt is empty: give a caption ("a red star beside two blue rings") or phrases '
            'separated by periods ("red star. blue ring.")'
        )
    return prompt


def _glip_phrases(prompt: str) -> List[Phrase]:
    phrases, start = [], 0
    for segment in prompt.split("."):
        end = start + len(segment)
        stripped = segment.strip()
        if stripped:
            offset = start + (len(segment) - len(segment.lstrip()))
            phrases.append(Phrase(stripped, (offset, offset + len(stripped)), stripped))
        start = end + 1  # the "."
    return phrases


def _caption_phrases(prompt: str) -> List[Phrase]:
    return [Phrase(text, span, name) for text, span, name in caption_phrases(prompt)]


def parse_prompt(prompt: str, kind: str = "auto") -> ParsedPrompt:
    """Split a grounding prompt into phrases with spans (rules in the module doc).

    Args:
        prompt: a GLIP-style prompt (``"red star. blue ring."``) or a caption.
        kind: ``"phrases"`` (split on ``.`` only), ``"caption"`` (the caption rule) or
            ``"auto"``: ``phrases`` when the prompt has at least two non-empty ``.``-separated
            segments, else ``caption``. A caption of several sentences needs ``kind="caption"``.

    Returns:
        A :class:`ParsedPrompt`; its :attr:`~ParsedPrompt.class_names` are the vocabulary.

    Raises:
        ValueError: an empty prompt, an unknown kind, or a prompt without any phrase (only
            articles, numerals and separators).
    """
    prompt = _check_prompt(prompt)
    if kind not in PROMPT_KINDS:
        raise ValueError(f"prompt kind {kind!r}: choose one of {PROMPT_KINDS}")
    if kind == "auto":
        kind = "phrases" if sum(1 for s in prompt.split(".") if s.strip()) >= 2 else "caption"
    phrases = _glip_phrases(prompt) if kind == "phrases" else _caption_phrases(prompt)
    if not phrases:
        raise ValueError(
            f"prompt {prompt!r} holds no phrase ({kind} rule: only articles, numerals and "
            "separators); name the objects to detect"
        )
    groups: Dict[str, List[int]] = {}
    for i, phrase in enumerate(phrases):
        groups.setdefault(_key(phrase.name), []).append(i)
    classes = tuple(tuple(g) for g in groups.values())
    return ParsedPrompt(prompt=prompt, kind=kind, phrases=tuple(phrases), _classes=classes)
