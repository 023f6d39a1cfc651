"""Answer extraction and checking, shared by difficulty estimation and evaluation.

``extract_answer(response)`` pulls the final answer out of a model response;
``answers_match(pred, gold)`` decides whether it equals the reference answer;
``DefaultAnswerChecker`` combines the two behind the ``AnswerChecker`` interface, and
``load_checker("package.module:callable")`` plugs in a user's checker instead.

Matching rules (documented here because results depend on them):

* **Option letters.** A gold answer that is an option label (``B``, ``(B)``, ``B.``,
  ``Option B``) matches a prediction naming the same label, also in the forms
  ``B) text`` / ``(B) text`` / ``B. text``. With ``options`` (letter -> text), a prediction
  that is one option's *text* counts as that letter, and a predicted letter's text is
  compared with a non-letter gold. When both sides name a letter, only the letters count.
  ``"BB"`` is not ``"B"``, and a word starting with ``A`` is not option ``A``.
* **Numbers.** Thousands commas (``1,234``), fractions (``3/4``, ``\\frac{3}{4}``),
  signs, scientific notation and a trailing unit (``12 cm``, ``12\\text{ cm}``, ``45^\\circ``,
  ``5 m/s``) are understood; a leading currency sign or ``x =`` is dropped. If the gold is
  written as an integer, the prediction must equal it (up to float rounding:
  ``3.0 == 3``, ``3.02 != 3``). Otherwise they must agree within ``rel_tol`` (default 1 %)
  relative to the gold, or ``abs_tol`` absolutely (for gold values near 0).
* **Percentages.** A ``%`` on either side may be read as a unit or as x/100:
  ``45%`` matches ``45`` and ``0.45``; without any ``%``, ``45`` does not match ``0.45``.
* **Text.** Case-, whitespace- and LaTeX-wrapper-insensitive (``\\text{}``, ``\\mathrm{}``,
  ``\\left``/``\\right``, ``$``), ignoring end punctuation.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable
from collections.abc import Mapping, Sequence

from . import GapError
from .plugins import import_object

__all__ = [
    "AnswerChecker",
    "AnswerError",
    "CheckerLoadError",
    "DefaultAnswerChecker",
    "answers_match",
    "extract_answer",
    "gold_answer",
    "load_checker",
    "normalize_gold",
    "normalize_options",
]

OptionsLike = Mapping[str, Any] | Sequence[Any] | str | None

# The final-answer block of a reference response.
_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
# Letters treated as option labels when scanning free text without an options mapping.
FALLBACK_LETTERS = "ABCDE"

# ---------------------------------------------------------------------------------------------------- Small text helpers

_LATEX_WRAPPERS = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mathit|operatorname|mbox)\s*\{([^{}]*)\}")
_LATEX_SPACES = re.compile(r"\\[,!;: ]|~|\\quad|\\qquad")
_DEGREE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree")


def find_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` with balanced braces (nested ok);
    an unclosed last box is skipped in favour of an earlier complete one."""
    for m in reversed(list(re.finditer(r"\\(?:boxed|fbox)\s*", text))):
        i = m.end()
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                c = text[j]
                if c == "{" and text[j - 1] != "\\":
                    depth += 1
                elif c == "}" and text[j - 1] != "\\":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1 : j]
            continue  # unbalanced: truncated output, try an earlier box
        # "\boxed 5" (TeX allows a single token without braces)
        tok = re.match(r"[^\s$]+", text[i:])
        if tok:
            return tok.group(0)
    return None


def _unwrap_latex(s: str) -> str:
    prev = None
    while prev != s:  # nested wrappers: \text{\textbf{B}}
        prev = s
        s = _LATEX_WRAPPERS.sub(r"\1", s)
    return s


def _clean(s: str | None) -> str | None:
    """Strips whitespace, markdown emphasis, ``$``/``\\(\\)``/``\\[\\]`` delimiters, a box,
    a trailing period. Returns None when nothing is left."""
    if s is None:
        return None
    s = s.strip()
    boxed = find_boxed(s)
    if boxed is not None:
        s = boxed
    for _ in range(3):
        s = s.strip()
        s = re.sub(r"^(?:\*\*|\*|__)+|(?:\*\*|\*|__)+$", "", s).strip()
        s = re.sub(r"^\\[(\[]|\\[)\]]$", "", s).strip()
        s = s.strip("$").strip()
        if s.endswith("."):
            s = s[:-1].strip()
    if re.fullmatch(r"\\(?:text|textbf|mathrm|mathbf)\s*\{[^{}]*\}", s):
        s = _unwrap_latex(s).strip()
    return s or None


# --------------------------------------------------------------------------------------------------------------- Options


def normalize_options(options: OptionsLike) -> dict[str, str]:
    """letter -> text from a mapping (``{"A": "12", ...}``), a list of texts (lettered A, B,
    ... in order) or a string with one ``A. text`` / ``(A) text`` per line."""
    if options is None:
        return {}
    if isinstance(options, Mapping):
        out = {}
        for k, v in options.items():
            key = str(k).strip().strip("().").strip().upper()
            if len(key) == 1 and key.isalpha():
                out[key] = str(v)
        return out
    if isinstance(options, str):
        out = {}
        for line in options.splitlines():
            m = re.match(r"^\s*\(?([A-Za-z])\)?\s*[.):：]\s*(.+?)\s*$", line)
            if m:
                out[m.group(1).upper()] = m.group(2)
        return out
    try:
        seq = list(options)
    except TypeError:
        return {}
    return {chr(ord("A") + i): str(v) for i, v in enumerate(seq[:26])}


def _parse_option(s: str) -> tuple[str, str | None] | None:
    """(letter, text-or-None) when ``s`` is an option label, alone or followed by its text."""
    s = s.strip()
    m = re.fullmatch(r"\(?([A-Za-z])\)?", s)
    if m:
        return m.group(1).upper(), None
    m = re.fullmatch(r"\(([A-Za-z])\)\s*[.:]?\s*(.*)", s, re.S)
    if m:
        return m.group(1).upper(), (m.group(2).strip() or None)
    m = re.fullmatch(r"([A-Z])\s*[.):：]\s*(.*)", s, re.S)
    if m:
        return m.group(1), (m.group(2).strip() or None)
    m = re.fullmatch(r"(?i:option|choice)\s*:?\s*\(?([A-Za-z])\)?(?:\s*[.):：]\s*(.*))?", s, re.S)
    if m:
        return m.group(1).upper(), ((m.group(2) or "").strip() or None)
    return None


# ------------------------------------------------------------------------------------------------------------ Extraction

_ANSWER_PATTERNS = [
    # "The (final|correct) answer is X", "Answer: X", "**Final Answer:** X", "answer = X",
    # "the correct option is (B)", "the right choice is B"
    re.compile(
        r"(?:\b(?:final|correct|right|best)\s+)?\b(?:answer|option|choice)\b\s*\**\s*"
        r"(?:is|would\s+be|should\s+be|will\s+be|=|:|：)\s*:?\s*\**[ \t]*\n?[ \t]*(?P<a>[^\n]+)",
        re.I,
    ),
    # "Option B is correct", "choice (C) is the answer"
    re.compile(
        r"\b(?:option|choice)\s*(?P<a>\(?[A-Z]\)?)\s+is\s+(?:the\s+)?(?:correct|right|answer|best)",
        re.I,
    ),
]

_NUMBER_IN_TEXT = re.compile(
    r"(?<![\w.])[-−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?%?(?![\w])|(?<![\w.])[-−]?\.\d+%?(?![\w])"
)


_NOT_AN_ANSWER = re.compile(
    r"(?:not|correct|incorrect|wrong|unclear|unknown|the\s+following|as\s+follows|below|above|"
    r"to|that|which|whether|because|determined|given)\b|[?]",
    re.I,
)
_FILLER = re.compile(r"^(?:likely|probably|clearly|definitely|therefore|thus|then|indeed)\s+", re.I)


def _from_patterns(text: str) -> str | None:
    """The answer of the last "The answer is X" / "Answer: X" clause that names one."""
    hits = []
    for pat in _ANSWER_PATTERNS:
        hits.extend((m.start(), m.group("a")) for m in pat.finditer(text))
    for _, raw in sorted(hits, key=lambda h: h[0], reverse=True):
        cand = _FILLER.sub("", raw.strip().lstrip("*").strip())
        if _NOT_AN_ANSWER.match(cand):
            continue
        got = _clean(_cut_sentence(cand))
        if got is not None:
            return got
    return None


def _cut_sentence(a: str) -> str:
    """The answer clause: up to the end of the sentence (``. `` / ``, `` / ``; ``)."""
    a = a.strip()
    m = re.search(r"(?<=\S)\.(?=\s|$)|[,;](?=\s)", a)
    if m:
        # Keep "B. text" forms whole when the cut would leave only the label.
        head = a[: m.start()].strip()
        if re.fullmatch(r"\(?[A-Za-z]\)?", head) and a[m.start()] == ".":
            return a
        a = head
    return a


def _letter_candidates(text: str, letters: str) -> list[tuple[int, str]]:
    cls = "[" + re.escape(letters) + "]"
    pats = [
        r"\((%s)\)" % cls,  # (B)
        r"(?i:\b(?:option|choice))\s*\(?(%s)\)?(?![\w])" % cls,  # option B
        r"(?m)^\s*(%s)\s*[.)]?\s*$" % cls,  # B alone on a line
        r"(?<![\w(])(%s)[.)](?=\s|$)" % cls,  # B. / B) followed by a space
    ]
    return [(m.start(1), m.group(1)) for p in pats for m in re.finditer(p, text)]


def extract_answer(text: str | None, *, options: OptionsLike = None) -> str | None:
    """The final answer of a model response, or None.

    In order: the last ``<answer>...</answer>`` block (a box inside it wins); the last
    ``\\boxed{...}``; the last "The answer is X" / "Answer: X" clause; a short response
    (at most 3 words, or an option label with text) as a whole; the last option label or
    number in the text (option labels first when ``options`` are given). Reasoning inside
    ``<think>...</think>`` is ignored when text follows it. The result is stripped of
    whitespace, ``$`` and a trailing period.
    """
    if text is None:
        return None
    text = str(text)
    if "</think>" in text:
        tail = text.rsplit("</think>", 1)[1]
        if tail.strip():
            text = tail
    blocks = _ANSWER_BLOCK.findall(text)
    if blocks:
        # The block is the answer; a box or an "answer is" clause inside it narrows it.
        block = blocks[-1]
        got = _clean(find_boxed(block)) or _from_patterns(block) or _clean(block)
        if got is not None:
            return got
    else:
        m = list(re.finditer(r"<answer>", text, re.I))
        if m and text[m[-1].end() :].strip():  # unclosed (truncated) answer block
            text = text[m[-1].end() :]

    boxed = find_boxed(text)
    if boxed is not None:
        got = _clean(boxed)
        if got is not None:
            return got

    got = _from_patterns(text)
    if got is not None:
        return got

    stripped = text.strip()
    if stripped and "\n" not in stripped:
        if len(stripped.split()) <= 3 or _parse_option(stripped) is not None:
            got = _clean(stripped)
            if got is not None:
                return got

    opts = normalize_options(options)
    letters = "".join(sorted(opts)) if opts else FALLBACK_LETTERS
    letter_hits = _letter_candidates(text, letters)
    number_hits = [(m.start(), m.group(0)) for m in _NUMBER_IN_TEXT.finditer(text)]
    if opts and letter_hits:
        return max(letter_hits)[1]
    hits = letter_hits + number_hits
    if not hits:
        return None
    return _clean(max(hits)[1])


# -------------------------------------------------------------------------------------------------------------- Matching

_NUMBER = re.compile(
    r"(?P<num>[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|[+-]?\.\d+)"
    r"(?:\s*/\s*(?P<den>\d+(?:\.\d+)?))?"
    r"(?:[eE](?P<exp>[+-]?\d+))?"
)


def _latex_to_plain(s: str) -> str:
    s = s.replace("−", "-").replace("–", "-").replace("\\%", "%").replace("\\$", "$")
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\\frac\s*\{\s*([-+]?[\d.]+)\s*\}\s*\{\s*([\d.]+)\s*\}", r"\1/\2", s)
    s = re.sub(r"\\frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}", r"(\1)/(\2)", s)
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\1/\2", s)
    s = _DEGREE.sub("°", s)
    s = _unwrap_latex(s)
    s = re.sub(r"\\left|\\right", "", s)
    s = _LATEX_SPACES.sub(" ", s)
    return s


def _parse_number(s: str) -> tuple[float, bool, bool] | None:
    """(value, written_as_integer, has_percent) when ``s`` is a number with an optional
    unit; None otherwise."""
    s = _latex_to_plain(s).strip()
    s = re.sub(r"^[a-zA-Z]\w*\s*(?:=|≈)\s*", "", s)  # "x = 12"
    s = re.sub(r"^(?:\$|€|£|¥|usd\s*)", "", s, flags=re.I).strip()
    m = _NUMBER.match(s)
    if not m:
        return None
    rest = s[m.end() :].strip()
    percent = False
    if rest.startswith("%") or re.match(r"percent\b", rest, re.I):
        percent = True
        rest = re.sub(r"^(?:%|percent)", "", rest, flags=re.I).strip()
    # A unit: letters, degree signs, '/', '.', '*', exponents; no further numbers.
    unit = re.sub(r"\^\s*\{?-?\d+\}?|[²³]", "", rest)
    if not all(ch.isalpha() or ch in " /.*·°'\"-" for ch in unit):
        return None
    num = m.group("num").replace(",", "")
    try:
        value = float(num)
        if m.group("den") is not None:
            den = float(m.group("den"))
            if den == 0:
                return None
            value /= den
        if m.group("exp") is not None:
            value *= 10.0 ** int(m.group("exp"))
    except (ValueError, OverflowError):
        return None
    if not math.isfinite(value):
        return None
    integer = m.group("den") is None and m.group("exp") is None and "." not in num
    return value, integer, percent


def _close(pred: float, gold: float, gold_integer: bool, rel_tol: float, abs_tol: float, integer_exact: bool) -> bool:
    diff = abs(pred - gold)
    if gold_integer and integer_exact:
        return diff <= max(abs_tol, 1e-9 * abs(gold))
    return diff <= max(abs_tol, rel_tol * abs(gold))


def _norm_text(s: str) -> str:
    s = _latex_to_plain(s).lower()
    s = s.strip().strip("\"'`“”‘’")
    s = re.sub(r"[\s$]+", "", s)
    s = s.strip(".,;:!?")
    return s


def _values_equal(pred: str, gold: str, rel_tol: float, abs_tol: float, integer_exact: bool) -> bool:
    pn, gn = _parse_number(pred), _parse_number(gold)
    if pn is not None and gn is not None:
        pv, _, pp = pn
        gv, gi, gp = gn
        # '%' on one side only: read it either as a unit or as x/100. On both: compare as is.
        preds = [pv] + ([pv / 100.0] if pp and not gp else [])
        golds = [(gv, gi)] + ([(gv / 100.0, False)] if gp and not pp else [])
        return any(_close(p, g, gint, rel_tol, abs_tol, integer_exact) for p in preds for g, gint in golds)
    if (pn is None) != (gn is None):
        # One side is a number and the other is not: only identical text can match.
        return _norm_text(pred) == _norm_text(gold) != ""
    a, b = _norm_text(pred), _norm_text(gold)
    return a != "" and a == b


def _interpret(s: str, opts: dict[str, str], rel_tol: float, abs_tol: float, integer_exact: bool):
    """(letter or None, texts to compare) for one side."""
    opt = _parse_option(s)
    if opt is not None:
        letter, rest = opt
        texts = [rest] if rest else []
        if letter in opts:
            texts.append(opts[letter])
        return letter, texts
    letter = None
    if opts:
        hits = [k for k, v in opts.items() if _values_equal(s, v, rel_tol, abs_tol, integer_exact)]
        if len(hits) == 1:
            letter = hits[0]
    return letter, [s]


def answers_match(
    pred: str | None,
    gold: str | None,
    *,
    options: OptionsLike = None,
    rel_tol: float = 1e-2,
    abs_tol: float = 1e-6,
    integer_exact: bool = True,
) -> bool:
    """Whether the extracted prediction equals the gold answer (rules in the module doc)."""
    if pred is None or gold is None:
        return False
    p, g = _clean(str(pred)), _clean(str(gold))
    if p is None or g is None:
        return False
    opts = normalize_options(options)
    p_letter, p_texts = _interpret(p, opts, rel_tol, abs_tol, integer_exact)
    g_letter, g_texts = _interpret(g, opts, rel_tol, abs_tol, integer_exact)
    if p_letter is not None and g_letter is not None:
        return p_letter == g_letter
    return any(_values_equal(a, b, rel_tol, abs_tol, integer_exact) for a in p_texts for b in g_texts)


# ---------------------------------------------------------------------------------------------------- Pluggable checkers


@runtime_checkable
class AnswerChecker(Protocol):
    """Anything called as ``checker(response, gold, row) -> bool``.

    ``response`` is the full model output, ``gold`` the reference answer and ``row`` the
    dataset row (a mapping; may be None), e.g. to read its options. A plain function with
    this signature is a valid checker.
    """

    def __call__(self, response: str, gold: str, row: Mapping[str, Any] | None = None) -> bool: ...


@dataclass(frozen=True)
class DefaultAnswerChecker:
    """``answers_match(extract_answer(response), gold)``, with options read from the row.

    ``options_keys``: row fields tried in order for the options (a mapping letter -> text,
    a list of texts, or an ``"A. ...\\nB. ..."`` string).
    """

    rel_tol: float = 1e-2
    abs_tol: float = 1e-6
    integer_exact: bool = True
    options_keys: Sequence[str] = field(default=("options", "choices"), repr=False)

    def options_of(self, row: Mapping[str, Any] | None) -> OptionsLike:
        if not row:
            return None
        for key in self.options_keys:
            value = row.get(key)
            if value is not None and len(value) > 0:
                return value
        return None

    def __call__(self, response: str, gold: str, row: Mapping[str, Any] | None = None) -> bool:
        options = self.options_of(row)
        return answers_match(extract_answer(response, options=options), gold, options=options, rel_tol=self.rel_tol,
                             abs_tol=self.abs_tol, integer_exact=self.integer_exact)


class AnswerError(GapError):
    """A row without a usable gold answer; the message names the row and the fix."""


def normalize_gold(value: Any, where: str) -> str | None:
    """The one rule for a stored gold answer: a string is stripped, a number is written as JSON writes it (``3``,
    ``2.5``), a one-item list is its item; None, NaN, an empty string or list is no answer (None). A list of several
    answers, or any other value, raises `AnswerError` naming `where`."""
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    if value is None or (isinstance(value, (list, tuple)) and not value):
        return None
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, numbers.Number) and not isinstance(value, bool):
        if isinstance(value, numbers.Real) and math.isnan(value):
            return None
        return str(int(value)) if isinstance(value, numbers.Integral) else repr(float(value))
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    what = f"a list of {len(value)} answers" if isinstance(value, (list, tuple)) else f"a {type(value).__name__}"
    raise AnswerError(f"{where}: the gold answer is {what} ({shown}); give one answer, as a string or a number")


def gold_answer(row: Mapping[str, Any], index: int, answer_column: str = "answer", messages_column: str = "messages") -> str:
    """The row's gold answer: its `answer_column` value (`normalize_gold`), else the last ``<answer>…</answer>`` of
    its last assistant turn."""
    from .data import messages_of, turn_texts

    value = normalize_gold(row.get(answer_column), f"row {index}, field '{answer_column}'")
    if value is not None:
        return value
    messages = messages_of(row, index, messages_column, AnswerError) or []
    assistant = turn_texts([m for m in messages if isinstance(m, Mapping)], "assistant")
    if assistant:
        blocks = _ANSWER_BLOCK.findall(assistant[-1])
        if blocks and blocks[-1].strip():
            return blocks[-1].strip()
    raise AnswerError(
        f"row {index} has no gold answer: no non-empty '{answer_column}' field and no <answer>...</answer> block in "
        f"its last assistant turn; add an '{answer_column}' column (or name yours with --answer-column)"
    )


class CheckerLoadError(GapError, ImportError):
    """A ``--checker`` spec that cannot be imported or is not callable (a `GapError`, and an `ImportError`)."""


_SPEC_HELP = (
    "use 'package.module:callable' (module importable, e.g. on PYTHONPATH) or "
    "'path/to/file.py:callable'; the callable is called as checker(response, gold, row) -> bool, "
    "and a class is instantiated without arguments first"
)


def load_checker(spec: str | None = None, **kwargs: Any) -> AnswerChecker:
    """Loads an answer checker from ``"module:attr"``, ``"module.attr"`` or
    ``"file.py:attr"``; ``None``/``""``/``"default"`` give ``DefaultAnswerChecker(**kwargs)``.
    A class is instantiated with ``kwargs``; a function is returned as is."""
    if spec is None or not str(spec).strip() or str(spec).strip() == "default":
        return DefaultAnswerChecker(**kwargs)
    spec = str(spec).strip()
    obj, attr = import_object(
        spec, "answer checker", CheckerLoadError, _SPEC_HELP, "_gap_user_checker_", allow_dotted=True
    )
    if isinstance(obj, type):
        try:
            obj = obj(**kwargs)
        except Exception as exc:
            raise CheckerLoadError(
                f"cannot load answer checker {spec!r}: constructing {attr}() failed with "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    elif kwargs:
        raise CheckerLoadError(f"answer checker {spec!r} is not a class; it cannot take options {sorted(kwargs)}")
    if not callable(obj):
        raise CheckerLoadError(
            f"cannot load answer checker {spec!r}: {attr!r} is a {type(obj).__name__}, not callable; {_SPEC_HELP}"
        )
    return obj
