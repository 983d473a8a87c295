"""Final-answer extraction from model responses and reference solutions (docs/method.md §4, §6).

Kept apart from ``pte.training.rewards`` so that benchmark loaders can read a reference solution's boxed answer without
importing math-verify, SymPy or torch.
"""

from __future__ import annotations

import re

_BOX_RE = re.compile(r"\\(?:boxed|fbox|framebox)(?![A-Za-z])")
_BARE_ARG_RE = re.compile(r"[^\s${}]+")
_SPACE_RE = re.compile(r"\s*")
_BRACE_TOKEN_RE = re.compile(r"\\.|[{}]", re.DOTALL)
_ANSWER_RE = re.compile(r"\banswer\**\s*(?:is\b\s*:?|:)\**\s*(?P<ans>[^\n]+)", re.IGNORECASE)
# GSM8K's own final line, "#### 2,125". Only a number may follow, so a markdown heading ("#### Step 1") never matches.
_HASHES_RE = re.compile(r"(?<!#)####[ \t]*\\?\$?[ \t]*(?P<ans>-?\d[\d,]*(?:\.\d+)?)[ \t]*\.?[ \t]*$", re.MULTILINE)
_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3}\b)")
_MATH_DOLLAR_RE = re.compile(r"(?<!\\)\$")
_TEXT_CMD = r"\\(?:textbf|mathbf|textrm|mathrm|text|mbox)\s*"
_WRAPPED_NUMBER_RE = re.compile(_TEXT_CMD + r"\{\s*\(?\s*(?P<number>-?\d[\d,]*(?:\.\d+)?)\s*\)?\s*\}")
_CHOICE_LABEL_RE = re.compile(_TEXT_CMD + r"\{\s*\([A-E]\)\s*\}(?:\s|~|\\[ ,;:!]|\\q?quad)*")


def drop_math_dollars(text: str) -> str:
    """Remove unescaped ``$`` delimiters from a gold answer, which is bare LaTeX.

    Sources write multi-part golds with inline math separators (OlympiadBench ``69$, $84``, ``$69$,$84$``) or
    split one expression across ``$ $``; read as delimited math, only one part would be graded. A dollar sign as
    currency is written ``\\$`` and is kept. The one rule for golds from every source (benchmarks, training data).
    """
    return _MATH_DOLLAR_RE.sub("", text).strip()


def _closing_braces(text: str) -> dict[int, int]:
    """Map the index of every ``{`` that closes to the index of its ``}``, in one pass over ``text``.

    Escaped characters (``\\{``, ``\\}``, ``\\\\``) are skipped so set braces do not unbalance a group. One pass
    keeps extraction linear in the response, however many unclosed or nested boxes it holds.
    """
    pairs, stack = {}, []
    for match in _BRACE_TOKEN_RE.finditer(text):
        token = match.group()
        if token == "{":
            stack.append(match.start())
        elif token == "}" and stack:
            pairs[stack.pop()] = match.start()
    return pairs


def last_boxed(text: str) -> str | None:
    """Return the content of the last complete, non-empty ``\\boxed``/``\\fbox``/``\\framebox`` in ``text``, else None.

    A box cut off by the generation budget (no closing brace) is skipped, so an earlier finished box counts. Braces
    are balanced (Minerva golds such as ``\\frac{\\pi}{2}`` live only inside reference solutions).
    """
    pairs = None  # brace pairs of the whole text, found once and only if a box takes a brace group
    for match in reversed(list(_BOX_RE.finditer(text))):
        start = _SPACE_RE.match(text, match.end()).end()  # the argument: a brace group (\boxed{5}) or a bare token
        if text.startswith("{", start):
            pairs = _closing_braces(text) if pairs is None else pairs
            end = pairs.get(start)
            content = text[start + 1 : end] if end is not None else None
        else:
            bare = _BARE_ARG_RE.match(text, start)
            content = bare.group() if bare else None
        if content and content.strip():
            return content.strip()
    return None


def _hashes_line(text: str) -> str | None:
    """Return the number on the last GSM8K-style ``#### X`` line, without thousands separators (as the gold)."""
    matches = list(_HASHES_RE.finditer(text))
    return _THOUSANDS_RE.sub("", matches[-1].group("ans")) if matches else None


def _answer_line(text: str) -> str | None:
    """Return X from the last "answer is X" / "Answer: X" phrase, without markdown bold or a final period."""
    for match in reversed(list(_ANSWER_RE.finditer(text))):
        answer = match.group("ans").strip().strip("*").strip().rstrip(".").strip()
        if answer:
            return answer
    return None


def _unwrap(answer: str) -> str:
    """Strip presentation that math-verify misreads: a number set in text (``\\textbf{(073)}`` reads as the string
    "073") and an answer-choice label before the value (``\\textbf{(B) } 36`` reads as ``B*36``).

    A bare choice (``\\text{(B)}``) is kept: math-verify already matches it to ``B``, and unwrapped ``E`` would turn
    into Euler's number.
    """
    number = _WRAPPED_NUMBER_RE.fullmatch(answer)
    if number:
        return number.group("number")
    label = _CHOICE_LABEL_RE.match(answer)
    value = answer[label.end() :].strip() if label else ""
    return value or answer


def extract_answer(text: str) -> str | None:
    """Return the final answer of a model response or reference solution, or None if it states none.

    The last box wins; without one, GSM8K's ``#### X`` line, then the last "answer is X" / "Answer: X" phrase, so a
    correct but unboxed answer still earns correctness credit (``FormatReward`` scores the box separately). Unescaped
    ``$`` inside a box are dropped: a box is already math, and sources split one across ``$ $``.
    """
    if not text:
        return None
    boxed = last_boxed(text)
    if boxed is not None:
        boxed = _MATH_DOLLAR_RE.sub("", boxed).strip()
    answer = boxed or _hashes_line(text) or _answer_line(text)
    return _unwrap(answer) if answer else None
