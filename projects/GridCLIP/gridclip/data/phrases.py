"""The one rule that reads phrases out of a caption, and names them (pure Python, no NLP library).

Used by the image-text pairs (:mod:`gridclip.data.captions`: captions without given phrases,
and the key each phrase is embedded as) and by grounding prompts
(:mod:`gridclip.modeling.prompts`: captions typed at inference).

**Splitting a caption** (:func:`caption_phrases`), on the caption's words (``\\w`` runs, with inner
``-``/``'``/``_`` kept, so unicode letters are words):

1. every punctuation mark (``, . ; : ! ? ( ) " &`` ...) ends a phrase;
2. every word of :data:`CAPTION_SEPARATORS` ends a phrase and is dropped: conjunctions (``and``,
   ``or``, ``with`` ...), prepositions of place (``beside``, ``on``, ``next to`` ...), verbs that
   link objects (``is``, ``are``, ``has``, ``showing`` ...) and relative words (``that``);
3. words of :data:`CAPTION_STOPWORDS` at either end of a phrase are dropped: articles and other
   determiners (``a``, ``the``, ``some``, ``each`` ...), numerals (``two``, ``3``), ``there``
   and pronouns;
4. a phrase whose last word frames the caption rather than names something in the image
   (:data:`FRAME_WORDS`: ``photo``, ``picture``, ``image`` ...: "a photo of ...") is dropped;
5. what remains is one phrase, spanned as written: ``"a photo of a red star beside two blue
   rings on a striped background."`` -> ``red star``, ``blue rings``, ``striped background``.

**Naming a phrase** (what its text embedding is computed from): the phrase with its last word
singularised by :func:`singularize` (``blue rings`` -> ``blue ring``: detectors' class names and
the embedded world's CLIP captions are singular). :func:`phrase_key` is that name in lower case
after rule 3 on a phrase given as text ("two blue rings" -> "blue ring"); it never splits.
"""

from __future__ import annotations

import re
from typing import List, Optional, Tuple

__all__ = [
    "CAPTION_SEPARATORS",
    "CAPTION_STOPWORDS",
    "FRAME_WORDS",
    "caption_phrases",
    "phrase_count",
    "phrase_key",
    "phrase_name",
    "pluralize",
    "singularize",
]

#: Words (and two- to four-word expressions, joined by ``_``) that end a caption phrase and
#: belong to none.
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
    several many much few more most all both such various multiple numerous
    one two three four five six seven eight nine ten eleven twelve dozen dozens
    there here it its they them their his her hers him he she we our us you your my me i
    also too only just very
    """.split())
#: A phrase ending in one of these frames the caption ("a photo of ..."): it is dropped.
FRAME_WORDS = frozenset(
    "photo photos picture pictures image images scene rendering drawing view close-up".split()
)

_WORD = re.compile(r"[^\W_]+(?:[_'’\-][^\W_]+)*|\S", re.UNICODE)
_IS_WORD = re.compile(r"[^\W_]", re.UNICODE)
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

Token = Tuple[str, int, int]  # (text, start, end) in the caption


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


def _is_word(token: str) -> bool:
    return bool(_IS_WORD.match(token))


def _strip_stopwords(chunk: List[Token]) -> List[Token]:
    """Rule 3: stopwords and numerals dropped at both ends of a chunk of words."""

    def stop(token: Token) -> bool:
        return token[0].lower() in CAPTION_STOPWORDS or token[0].isdigit()

    while chunk and stop(chunk[0]):
        chunk = chunk[1:]
    while chunk and stop(chunk[-1]):
        chunk = chunk[:-1]
    return chunk


def phrase_name(text: str) -> str:
    """A phrase's name: ``text`` with its last word singularised and spaces collapsed (case
    kept): ``"blue rings"`` -> ``"blue ring"``."""
    words = text.split()
    if not words:
        return ""
    last = _WORD.findall(words[-1])
    if last and _is_word(last[-1]):
        words[-1] = words[-1][: len(words[-1]) - len(last[-1])] + singularize(last[-1])
    return " ".join(words)


def caption_phrases(caption: str) -> List[Tuple[str, Tuple[int, int], str]]:
    """The phrases of a free caption (rules 1-5 of the module doc), in order.

    Returns:
        ``(text, (start, end), name)`` per phrase, with ``caption[start:end] == text`` (Python
        string indices, end exclusive) and ``name`` = :func:`phrase_name` of ``text``.
    """
    tokens = [(m.group(), m.start(), m.end()) for m in _WORD.finditer(caption)]
    chunks: List[List[Token]] = [[]]
    i = 0
    while i < len(tokens):
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
        text = tokens[i][0]
        if not _is_word(text) or text.lower() in CAPTION_SEPARATORS:
            chunks.append([])
        else:
            chunks[-1].append(tokens[i])
        i += 1
    phrases = []
    for chunk in chunks:
        chunk = _strip_stopwords(chunk)
        if not chunk or chunk[-1][0].lower() in FRAME_WORDS:
            continue
        start, end = chunk[0][1], chunk[-1][2]
        text = caption[start:end]
        phrases.append((text, (start, end), phrase_name(text)))
    return phrases


def phrase_key(text: str) -> str:
    """What a phrase given as text is embedded as, in lower case: punctuation and stopwords
    (rule 3) dropped at its ends, inner words kept (no splitting), the last word singularised:
    ``"Two blue rings."`` -> ``"blue ring"``, ``"a cup of coffee"`` -> ``"cup of coffee"``.
    For a phrase of :func:`caption_phrases` it is its ``name`` in lower case."""
    text = str(text)
    tokens = [(m.group(), m.start(), m.end()) for m in _WORD.finditer(text)]
    while tokens and not _is_word(tokens[0][0]):
        tokens = tokens[1:]
    while tokens and not _is_word(tokens[-1][0]):
        if tokens[-1][0] == ")" and "(" in text[tokens[0][1] : tokens[-1][1]]:
            break  # a closing bracket opened inside the phrase stays: "bow (weapon)"
        tokens = tokens[:-1]
    tokens = _strip_stopwords(tokens)
    if not tokens:
        return ""
    return phrase_name(text[tokens[0][1] : tokens[-1][2]]).lower()


_COUNT_WORDS = {
    "a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "dozen": 12,
}  # fmt: skip


def phrase_count(text: str) -> Optional[int]:
    """How many objects a phrase names, when its words say so: a leading article or number
    (``"a red star"`` -> 1, ``"two blue rings"`` -> 2, ``"3 cups"`` -> 3), else 1 for a singular
    phrase (``"red star"``) and None (unknown, at least one) for a plural one without a number
    (``"blue rings"``, ``"some rings"``, ``"many rings"``)."""
    words = [t for t in _WORD.findall(str(text)) if _is_word(t)]
    if not words:
        return None
    first = words[0].lower()
    if first in _COUNT_WORDS:
        return _COUNT_WORDS[first]
    if first.isdigit():
        return int(first) if int(first) > 0 else None
    last = words[-1]
    return None if singularize(last) != last else 1
