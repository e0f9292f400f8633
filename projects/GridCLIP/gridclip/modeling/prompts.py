"""Grounding prompts: a caption or a GLIP-style prompt turned into phrases with character spans.

Two kinds of prompt (pure Python, no NLP dependency):

- **phrases** (GLIP's detection prompt): ``"red star. blue ring. yellow heart."``. The prompt is
  split on ``.`` only; each non-empty segment, stripped of surrounding whitespace, is one phrase
  *as written* (commas, unicode, underscores and inner words are kept: ``"bow (weapon), red."``
  is the one phrase ``"bow (weapon), red"``).
- **caption** (a free sentence): ``"a red star beside two blue rings on a striped background"``.
  The rule, applied to the caption's words (``\\w`` runs, with inner ``-``/``'`` kept, so unicode
  letters are words):

  1. every punctuation mark (``, . ; : ! ? ( ) " &`` ...) ends a phrase;
  2. every word of :data:`CAPTION_SEPARATORS` ends a phrase and is dropped: conjunctions (``and``,
     ``or``, ``with`` ...), prepositions of place (``beside``, ``on``, ``next to`` ...), verbs that
     link objects (``is``, ``are``, ``has`` ...) and relative words (``that``, ``which``);
  3. words of :data:`CAPTION_STOPWORDS` at either end of a phrase are dropped: articles and other
     determiners (``a``, ``the``, ``some``, ``each`` ...), numerals (``two``, ``3``), ``there``
     and pronouns;
  4. what remains, if anything, is one phrase: ``"red star"``, ``"blue rings"``,
     ``"striped background"``.

Every :class:`Phrase` keeps its ``span``: ``(start, end)`` Python string indices (Unicode code
points, end exclusive) into the original prompt, so ``prompt[start:end] == phrase.text`` always.

A phrase's ``name`` is what its text embedding is computed from: for captions, the text as
written with its last word singularised by :func:`singularize` (``"blue rings"`` -> ``"blue
ring"``: detectors' class names, and the embedded world's CLIP captions, are singular); for
GLIP-style prompts, the text as written (the user typed class names). Phrases whose names are
equal (case-insensitive) share one class of the vocabulary (:meth:`ParsedPrompt.class_names`);
a detection of that class names the first of them and lists every span.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

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

#: Words (and two-word expressions) that end a caption phrase and belong to none.
CAPTION_SEPARATORS = frozenset("""
    and or but nor plus with without
    on in at of by to from into onto over under above below beneath behind beside besides
    between among near around inside outside across along against toward towards through
    within beyond upon
    next_to in_front_of on_top_of close_to left_of right_of
    is are was were be being been has have having holds holding contains containing shows
    showing sits sitting lies lying stands standing
    that which who whose where while
    """.split())
#: Words dropped at either end of a caption phrase.
CAPTION_STOPWORDS = frozenset("""
    a an the this these those some any each every either neither no another other others
    several many much few more most all both such
    one two three four five six seven eight nine ten eleven twelve dozen dozens
    there here it its they them their his her hers him he she we our us you your my me i
    also too only just very
    """.split())
_SENTENCE_END = ".!?;"
_WORD = re.compile(r"[^\W_]+(?:[_'’\-][^\W_]+)*|\S", re.UNICODE)
_IRREGULAR_PLURALS = {
    "men": "man",
    "women": "woman",
    "people": "person",
    "children": "child",
    "mice": "mouse",
    "feet": "foot",
    "teeth": "tooth",
    "geese": "goose",
    "knives": "knife",
    "leaves": "leaf",
    "wolves": "wolf",
    "halves": "half",
}
_NOT_PLURAL_ENDINGS = ("ss", "us", "is", "ous", "'s", "’s")


def singularize(word: str) -> str:
    """A plural English noun's singular, by suffix rules (no dictionary beyond a few irregular
    plurals): ``rings -> ring``, ``crosses -> cross``, ``boxes -> box``, ``berries -> berry``,
    ``people -> person``. Words that do not look plural (``glass``, ``bus``, ``star``, numbers,
    words of three letters or fewer) are returned as they are. Letter case of the stem is kept."""
    lower = word.lower()
    if lower in _IRREGULAR_PLURALS:
        singular = _IRREGULAR_PLURALS[lower]
        return singular if word.islower() else singular.capitalize() if word[:1].isupper() else word
    if len(word) <= 3 or not lower.endswith("s") or lower.endswith(_NOT_PLURAL_ENDINGS):
        return word
    if not word[-2].isalpha():
        return word
    if lower.endswith("ies") and len(word) > 4:
        return word[:-3] + ("Y" if word[-1].isupper() else "y")
    if lower.endswith(("sses", "xes", "ches", "shes", "zzes")):
        return word[:-2]
    return word[:-1]


def pluralize(noun: str) -> str:
    """The plural of a noun phrase's last word (``red cross -> red crosses``, ``blue ring -> blue
    rings``, ``berry -> berries``); :func:`singularize` inverts it for regular nouns."""
    if not noun:
        return noun
    if noun.lower().endswith(("s", "x", "ch", "sh", "z")):
        return noun + "es"
    if noun.lower().endswith("y") and len(noun) > 1 and noun[-2].lower() not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


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
    tokens = [(m.group(), m.start(), m.end()) for m in _WORD.finditer(prompt)]
    chunks: List[List[Tuple[str, int, int]]] = [[]]
    i = 0
    while i < len(tokens):
        text = tokens[i][0]
        lower = text.lower()
        is_word = bool(re.match(r"[^\W_]", text))
        # two- to four-word separators (next to, in front of, on top of)
        matched = 0
        for n in (4, 3, 2):
            words = [t[0].lower() for t in tokens[i : i + n]]
            if len(words) == n and "_".join(words) in CAPTION_SEPARATORS:
                matched = n
                break
        if matched:
            chunks.append([])
            i += matched
            continue
        if not is_word or lower in CAPTION_SEPARATORS:
            chunks.append([])
        else:
            chunks[-1].append(tokens[i])
        i += 1
    phrases = []
    for chunk in chunks:
        while chunk and (chunk[0][0].lower() in CAPTION_STOPWORDS or chunk[0][0].isdigit()):
            chunk = chunk[1:]
        while chunk and (chunk[-1][0].lower() in CAPTION_STOPWORDS or chunk[-1][0].isdigit()):
            chunk = chunk[:-1]
        if not chunk:
            continue
        start, end = chunk[0][1], chunk[-1][2]
        text = prompt[start:end]
        last = chunk[-1][0]
        name = text[: len(text) - len(last)] + singularize(last)
        phrases.append(Phrase(text, (start, end), " ".join(name.split())))
    return phrases


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
