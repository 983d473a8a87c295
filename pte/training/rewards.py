"""Math-verify grading and composable rewards; answers are extracted by ``pte.training.answers``.

Implements the reward s_i of docs/method.md §4 (correctness of the final answer, plus an optional format
term) and the grader guards of §6: a gold answer that math-verify cannot parse raises instead of
being scored (math-verify's string fallback would otherwise match an equally broken prediction), and
math-verify's ``signal.alarm`` timeouts are switched off inside worker processes whose time is
bounded from the parent instead, so grading works off the main thread and never hangs a run.
Both sides are normalised the same way first, around spots where math-verify's LaTeX grammar fails.
"""

from __future__ import annotations

import decimal
import logging
import math
import multiprocessing as mp
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Protocol

import torch
from math_verify import parse, verify
from sympy import Basic, Derivative, Equality, Expr, MatrixBase
from sympy.core.function import AppliedUndef
from typing_extensions import Self

from pte.training.answers import drop_math_dollars, extract_answer, last_boxed

logger = logging.getLogger(__name__)

_DELIMITED_RE = re.compile(r"(?<!\\)\$|\\\(|\\\[")
# Golds written as code (a Minerva gold reads "np.arcsin(...)"); numpy's log is the natural one.
_NUMPY_RE = re.compile(r"\b(?:np|numpy)\.(?P<name>arcsin|arccos|arctan|sinh|cosh|tanh|sin|cos|tan|exp|log|pi)\b")
# A whole subscript that is a command or a \text word (L_{\odot}, m_{\max }, x_{\text{max}}) is no atom of the
# grammar; the plain word is. Bases that are commands (\sum_{...}) and commands taking arguments are left alone.
_SUBSCRIPT_WORD_RE = re.compile(
    r"(?<![\\A-Za-z])(?P<base>[A-Za-z])\s*_\s*(?:\{\s*(?:\\(?:textrm|mathrm|text|mbox)\s*\{\s*(?P<text>[A-Za-z]+)\s*\}"
    r"|\\(?P<command>[A-Za-z]+))\s*\}|\\(?P<bare>[A-Za-z]+)(?![A-Za-z]|\s*\{))"
)
# The grammar lexes a lone E/e as Euler's number, a token that takes no subscript, so E_{1} fails to parse (F_{1}
# does not); \mathsf{E} is an ordinary symbol. A subscripted E is never Euler's number.
_SUBSCRIPTED_E_RE = re.compile(r"(?<![\\A-Za-z])(?P<e>[Ee])(?=\s*_)")
_NATIVE_TIMEOUT_S = 5
_STARTUP_TIMEOUT_S = 120.0
_READY = "ready"


class GoldAnswerError(ValueError):
    """A gold answer that math-verify cannot parse; scoring it would be meaningless (docs/method.md §6)."""


def _as_math(text: str) -> str:
    """Wrap a bare answer in ``$...$`` so math-verify reads it as LaTeX.

    Unwrapped, math-verify misreads many bare answers: ``\\sqrt{2}`` parses to nothing, ``(1, 2)`` to
    ``2`` and ``50\\%`` to ``50``. An escaped ``\\$`` is a dollar sign, not a delimiter.
    """
    return text if _DELIMITED_RE.search(text) else f"${text}$"


def _normalise(text: str) -> str:
    """Rewrite the spellings math-verify cannot parse into ones it can, identically for gold and prediction."""
    text = _NUMPY_RE.sub(lambda m: "\\ln" if m["name"] == "log" else f"\\{m['name']}", text)
    text = _SUBSCRIPT_WORD_RE.sub(lambda m: f"{m['base']}_{{{m['text'] or m['command'] or m['bare']}}}", text)
    return _SUBSCRIPTED_E_RE.sub(r"\\mathsf{\g<e>}", text)


def _gold_text(gold: str | float, row: str | int) -> str:
    """Render a gold value as text; floats are written positionally because ``1e-07`` parses as ``e - 7``.

    Inline math separators (``3$, $4``) are dropped (``pte.training.answers.drop_math_dollars``), so a gold parses the
    same from training data, benchmark loaders and every reward path.
    """
    if isinstance(gold, bool) or (isinstance(gold, float) and not math.isfinite(gold)):
        raise GoldAnswerError(f"row {row}: gold answer {gold!r} is not a number or a math string")
    if isinstance(gold, float):
        return format(decimal.Decimal(repr(gold)), "f")
    return drop_math_dollars(str(gold))


def _parse_gold(gold: str | float, row: str | int, timeout: int | None) -> list:
    """Parse a gold answer with the given math-verify timeout (None disables its ``signal.alarm``)."""
    text = _gold_text(gold, row)
    parsed = parse(_as_math(_normalise(text)), parsing_timeout=timeout) if text else []
    if not any(isinstance(item, (Basic, MatrixBase)) for item in parsed):
        raise GoldAnswerError(f"row {row}: math-verify cannot parse gold answer {text!r} (got {parsed!r})")
    return parsed


def _native_timeout() -> int | None:
    """Use math-verify's own timeout where ``signal.alarm`` works (the main thread), else none."""
    return _NATIVE_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def parse_gold(gold: str | float, row: str | int = "?") -> list:
    """Parse a gold answer, refusing one that math-verify cannot turn into a math object.

    math-verify falls back to the raw string when parsing fails, and two identical broken strings verify
    as equal; requiring a SymPy object in the parse keeps a broken gold from ever scoring 1.

    Args:
        gold: LaTeX (with or without ``$``) or a number such as ``0.5`` or ``27``.
        row: Dataset row id or batch index, named in the error.

    Returns:
        math-verify's parse (SymPy objects and their source strings).

    Raises:
        GoldAnswerError: The parse holds no SymPy object.
    """
    return _parse_gold(gold, row, _native_timeout())


def _compared_gold(gold: list, pred: list) -> list:
    """Compare a bare-expression prediction with the right side of a gold ``\\frac{dM}{dt} = ...``.

    math-verify does so itself only when the left side is made of symbols (``m_{\\max} = ...``); a derivative or an
    applied function on the left names the asked-for quantity just as well. ``2x + y = 5`` still needs an equation.
    """
    if not any(isinstance(item, Expr) for item in pred):
        return gold
    named = [
        item.rhs for item in gold if isinstance(item, Equality) and isinstance(item.lhs, (Derivative, AppliedUndef))
    ]
    return named or gold


def _check(pred: str | None, gold: str | float, row: str | int, timeout: int | None) -> bool:
    """Verify one prediction; the gold is parsed first so a broken gold raises even for an empty pred."""
    gold_parsed = _parse_gold(gold, row, timeout)
    if pred is None or not pred.strip():
        return False
    pred_parsed = parse(_as_math(_normalise(pred.strip())), parsing_timeout=timeout)
    return verify(_compared_gold(gold_parsed, pred_parsed), pred_parsed, timeout_seconds=timeout)


def verify_answer(pred: str | None, gold: str | float) -> bool:
    """Check one extracted answer (see ``extract_answer``) against its gold in this process.

    On the main thread math-verify's own 5 s timeouts apply; elsewhere they are off and a pathological
    input can hang, so grade model output with ``Grader``.

    Raises:
        GoldAnswerError: The gold answer cannot be parsed.
    """
    return _check(pred, gold, "?", _native_timeout())


def _worker_main(conn: Connection) -> None:
    """Grade jobs from ``conn`` until the parent goes away; time is bounded by the parent, not by signals."""
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    conn.send(_READY)
    while True:
        try:
            index, pred, gold, row = conn.recv()
        except EOFError:
            return
        try:
            conn.send((index, _check(pred, gold, row, None), None))
        except GoldAnswerError as err:
            conn.send((index, False, str(err)))


@dataclass
class _Worker:
    """One grading process and the item it is working on (None when idle)."""

    process: BaseProcess
    conn: Connection
    ready: bool = False
    item: int | None = None
    started: float = 0.0


class Grader:
    """Parallel math-verify grading with a hard per-item timeout.

    Each worker grades one item at a time; an item that runs past ``timeout_s`` grades False and its
    worker is killed and replaced, since a hung SymPy call cannot be cancelled. Workers come from the
    ``forkserver`` start method (safe with torch already imported), which preloads this module once (if
    this process has not started its forkserver yet) so a worker costs a fork, not a fresh import of torch
    and SymPy. As with spawn, a script creating a Grader needs an ``if __name__ == "__main__":`` guard.
    Not thread-safe: use one Grader per thread.

    Args:
        timeout_s: Wall-clock limit per item, counted from when a worker takes it.
        workers: Number of worker processes.

    Attributes:
        timeouts: Items cut off so far, worth logging next to the reward.
    """

    def __init__(self, timeout_s: float = 5.0, workers: int = 2) -> None:
        if timeout_s <= 0 or workers < 1:
            raise ValueError(f"need timeout_s > 0 and workers >= 1, got {timeout_s=} {workers=}")
        self.timeout_s = float(timeout_s)
        self.timeouts = 0
        self._ctx = mp.get_context("forkserver")
        self._ctx.set_forkserver_preload(["__main__", __name__])
        self._workers = [self._start_worker() for _ in range(workers)]

    def _start_worker(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe()
        process = self._ctx.Process(target=_worker_main, args=(child_conn,), daemon=True, name="pte-grader")
        process.start()
        child_conn.close()
        return _Worker(process=process, conn=parent_conn)

    @staticmethod
    def _stop_worker(worker: _Worker) -> None:
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join(timeout=5.0)
        worker.conn.close()

    def _replace(self, slot: int) -> None:
        self._stop_worker(self._workers[slot])
        self._workers[slot] = self._start_worker()

    def grade(self, preds: list[str | None], golds: list[str], rows: list[str | int] | None = None) -> list[bool]:
        """Grade predictions against golds in parallel.

        Args:
            preds: Extracted answers (None for a response without one).
            golds: Gold answers, one per prediction.
            rows: Ids named in a ``GoldAnswerError``; defaults to batch indices.

        Returns:
            One bool per item; timed-out items are False.

        Raises:
            GoldAnswerError: After the whole batch is graded, if any gold answer cannot be parsed.
        """
        if not self._workers:
            raise RuntimeError("Grader is closed")
        if len(preds) != len(golds) or (rows is not None and len(rows) != len(golds)):
            raise ValueError(f"got {len(preds)} preds, {len(golds)} golds and {len(rows or golds)} rows")
        rows = list(range(len(golds))) if rows is None else rows
        for slot, worker in enumerate(self._workers):
            if worker.item is not None:  # left busy by an interrupted call: its late result would be misfiled
                self._replace(slot)
        results = [False] * len(preds)
        gold_errors: list[str] = []
        pending = deque(range(len(preds)))
        remaining = len(preds)
        while remaining:
            for worker in self._workers:
                if worker.ready and worker.item is None and pending:
                    index = pending.popleft()
                    worker.conn.send((index, preds[index], golds[index], rows[index]))
                    worker.item, worker.started = index, time.monotonic()
            deadlines = [w.started + self.timeout_s for w in self._workers if w.item is not None]
            wait_s = max(0.0, min(deadlines) - time.monotonic()) if deadlines else _STARTUP_TIMEOUT_S
            ready = wait([w.conn for w in self._workers], timeout=wait_s)
            if not ready and not deadlines:
                raise RuntimeError(f"grader workers did not start within {_STARTUP_TIMEOUT_S:.0f} s")
            for slot, worker in enumerate(self._workers):
                if worker.conn not in ready:
                    continue
                try:
                    message = worker.conn.recv()
                except (EOFError, OSError):
                    if not worker.ready:
                        worker.process.join(timeout=5.0)
                        raise RuntimeError(f"grader worker died on start-up (exit code {worker.process.exitcode})")
                    if worker.item is not None:
                        logger.warning("grader worker died on item %s; grading it False", rows[worker.item])
                        remaining -= 1
                    self._replace(slot)
                    continue
                if message == _READY:
                    worker.ready = True
                    continue
                index, correct, error = message
                results[index] = correct
                if error:
                    gold_errors.append(error)
                worker.item = None
                remaining -= 1
            now = time.monotonic()
            for slot, worker in enumerate(self._workers):
                if worker.item is not None and now - worker.started >= self.timeout_s:
                    logger.warning(
                        "grading item %s timed out after %.1f s; grading it False", rows[worker.item], self.timeout_s
                    )
                    self.timeouts += 1
                    remaining -= 1
                    self._replace(slot)
        if gold_errors:
            raise GoldAnswerError(f"{len(gold_errors)} unparseable gold answer(s): " + "; ".join(gold_errors))
        return results

    def close(self) -> None:
        """Stop the workers (they hold no state, so they are simply killed); idempotent."""
        for worker in self._workers:
            self._stop_worker(worker)
        self._workers = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class RewardFn(Protocol):
    """A named per-response reward; ``name`` keys its component in logs."""

    name: str

    def __call__(self, responses: list[str], golds: list[str]) -> torch.Tensor:
        """Return one float reward per response, shape [N]."""
        ...


class CorrectnessReward:
    """1.0 if the extracted final answer verifies against the gold, else 0.0 (the paper's reward)."""

    name = "correctness"

    def __init__(self, grader: Grader) -> None:
        self.grader = grader

    def __call__(self, responses: list[str], golds: list[str]) -> torch.Tensor:
        answers = [extract_answer(response) for response in responses]
        return torch.tensor(self.grader.grade(answers, golds), dtype=torch.float32)


class FormatReward:
    """1.0 if the response puts a non-empty answer in ``\\boxed{}``, else 0.0 (a shaping term)."""

    name = "format"

    def __call__(self, responses: list[str], golds: list[str]) -> torch.Tensor:
        return torch.tensor([float(last_boxed(response) is not None) for response in responses], dtype=torch.float32)


class CombinedReward:
    """Weighted sum of reward functions that also returns each component for logging.

    Args:
        fns: Reward functions with distinct names.
        weights: One weight per function.
    """

    def __init__(self, fns: list[RewardFn], weights: list[float]) -> None:
        names = [fn.name for fn in fns]
        if not fns or len(fns) != len(weights):
            raise ValueError(f"need one weight per reward function, got {len(fns)} fns and {len(weights)} weights")
        if len(set(names)) != len(names):
            raise ValueError(f"reward names must be distinct, got {names}")
        self.fns = list(fns)
        self.weights = [float(weight) for weight in weights]

    def __call__(self, responses: list[str], golds: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return the weighted total [N] and each component [N] keyed by name."""
        if len(responses) != len(golds):
            raise ValueError(f"got {len(responses)} responses and {len(golds)} golds")
        components = {fn.name: fn(responses, golds) for fn in self.fns}
        total = torch.zeros(len(responses), dtype=torch.float32)
        for fn, weight in zip(self.fns, self.weights):
            component = components[fn.name]
            if component.shape != total.shape:
                raise ValueError(
                    f"reward {fn.name!r} returned shape {tuple(component.shape)}, want {tuple(total.shape)}"
                )
            total = total + weight * component.float()
        return total, components


_REWARDS: dict[str, Callable[[Grader], RewardFn]] = {
    "correctness": CorrectnessReward,
    "format": lambda _grader: FormatReward(),
}


def build_reward(spec: dict[str, float], grader: Grader) -> CombinedReward:
    """Build the reward a config names, e.g. ``{"correctness": 1.0, "format": 0.1}`` (name to weight).

    Raises:
        ValueError: A name is not a known reward, or the spec is empty.
    """
    if not spec:
        raise ValueError(f"empty reward spec; known rewards: {sorted(_REWARDS)}")
    unknown = [name for name in spec if name not in _REWARDS]
    if unknown:
        raise ValueError(f"unknown reward {unknown[0]!r}; known rewards: {sorted(_REWARDS)}")
    return CombinedReward([_REWARDS[name](grader) for name in spec], list(spec.values()))
