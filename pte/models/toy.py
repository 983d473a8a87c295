"""A toy base reasoning model for the carry task, trained on this CPU: ``python -m pte.models.toy``.

The paper's table compares methods built on one base model that already reasons with a full cache. At toy scale
that base is a small Llama (grouped-query attention, rotary positions, character tokenizer) trained by ordinary
full-cache next-token prediction on worked carry-chain solutions (pte/training/carry.py) over a family of variants
(chain lengths 6-20, one to three marked values), until it solves held-out problems with a full cache. A few
(length, values) combinations never appear in its training; the build record lists the full-cache accuracy of every
combination, held-out ones included, so an adapter can be tested on variants nobody tuned for.

Three phases. The first learns the task from a random start; its model finds operands and where the chain ends by
relative position, the question's length and the last step's label, which fails on held-out combinations. The second
(the lookup phase) goes on from it with filler items at random places of question and solution (drawn apart, so the
two no longer line up), solutions shifted to random positions and step labels starting at random letters, which only
a lookup by content survives. The third (polish) checks every trained variant and, while one is short of its target,
trains more on the weak ones: the same spec rounds differently on another CPU, so the builder checks its target
instead of hoping. Each phase is cached on its own (a built phase is reused by any later phase started from it). The
base is saved as a plain Hugging Face model directory (``model.name`` can point to it); ``model.name:
toy-carry`` builds it on first use and caches it under ``$PTE_CACHE`` (``~/.cache/pte``). ``--score N`` then scores
the built base on N more problems per variant (greedy, full cache).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import re
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pte.engine.cache import CachePolicy
from pte.engine.generate import generate
from pte.machine import cpu_name
from pte.models.tiny import cache_dir, tiny_tokenizer
from pte.training.answers import extract_answer
from pte.training.carry import (
    FORMAT,
    LABELS,
    CarryProblem,
    carry_problem,
    carry_problems,
    problem_variant,
    variants,
)
from pte.training.prompts import format_prompt
from pte.training.rewards import Grader

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ToySpec:
    """Architecture, task and training budget of the toy base (the defaults are what ``toy-carry`` builds)."""

    steps: tuple[int, int] = (6, 20)  # carry chain lengths trained on (data.carry_steps), inclusive
    values: tuple[int, int] = (1, 3)  # marked values trained on (data.carry_values), inclusive
    held_out: tuple[tuple[int, int], ...] = (
        (7, 2),
        (11, 3),
        (14, 1),
        (17, 2),
        (20, 3),
    )  # (steps, values) never trained
    hidden: int = 64
    layers: int = 3
    heads: int = 4
    kv_heads: int = 2
    train_steps: int = 12000  # first phase, at most; the loss sits near 0.78 to ~5000, stops at 6638-7343 (17-31 min)
    stop_loss: float = 1e-3  # stop early once the mean loss of the last 50 steps is below this
    batch: int = 32
    lr: float = 3e-3  # constant; AdamW without weight decay
    seed: int = 0
    eval_problems: int = 20  # held-out problems per (steps, values) combination
    lookup_steps: int = 4000  # second phase (0: none), lr decaying linearly from lookup_lr to 0; see train_lookup_phase
    lookup_lr: float = 2e-3
    fillers: int = 3  # second phase: 0 to this many filler items per problem, at random places of its worksheet
    separate_fillers: bool = True  # second phase: the solution draws its own fillers (unscored), not the question's
    position_jump: int = 32  # second phase: the solution's positions shifted by 0 to this many, drawn per problem
    label_shift: int = 6  # second phase: step labels start 0 to this many letters late (``b``, ``c``, ...), per problem
    polish_rounds: int = 4  # third phase (0: none): at most this many rounds of training weighted to weak variants
    polish_steps: int = 500  # third phase: steps per round, lr decaying linearly from polish_lr to 0 in each round
    polish_lr: float = 5e-4
    polish_target: float = 0.985  # third phase: stop once every trained variant scores this on its check problems
    polish_problems: int = 200  # third phase: check problems per trained variant (seeds apart from every other set)

    @property
    def name(self) -> str:
        """``toy-carry-<first phase>``, then ``-lookup-<second phase>`` and ``-polish-<third phase>`` for the phases
        there are: a built phase is reused by every later phase started from it."""
        spec = asdict(self)
        lookup = {k: spec.pop(k) for k in LOOKUP_FIELDS}
        polish = {k: spec.pop(k) for k in POLISH_FIELDS}
        for key in ("separate_fillers", "label_shift"):
            if not lookup[key]:
                del lookup[key]  # bases built before these options keep their cache names
        name = f"toy-carry-{_digest([spec, FORMAT])}"
        if self.lookup_steps:
            name += f"-lookup-{_digest([lookup, LOOKUP_RECIPE])}"
        return f"{name}-polish-{_digest([polish, POLISH_RECIPE])}" if self.polish_rounds else name

    def first_phase(self) -> ToySpec:
        return replace(self, lookup_steps=0, polish_rounds=0)

    def previous_phase(self) -> ToySpec | None:
        """The spec of the phase this one starts from (None for the first)."""
        if self.polish_rounds:
            return replace(self, polish_rounds=0)
        return self.first_phase() if self.lookup_steps else None


FILLER = "."  # the lookup phase's filler item
LABEL_ITEM = re.compile(r"[a-z]\d=")  # a chain step's item (``a1=?``, ``a1=9``); ``ans`` and recalls are not
LOOKUP_RECIPE = "fillers-anywhere"  # bump when the lookup phase changes: its cached bases are keyed by it
LOOKUP_FIELDS = ("lookup_steps", "lookup_lr", "fillers", "separate_fillers", "position_jump", "label_shift")
POLISH_RECIPE = "weighted-by-error"  # bump when the polish phase changes
POLISH_FIELDS = ("polish_rounds", "polish_steps", "polish_lr", "polish_target", "polish_problems")


def _digest(obj: object) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:8]


def carry_prompt(tok: PreTrainedTokenizerFast, question: str) -> str:
    """The prompt every carry run uses: the chat template, no instruction, no few-shot (data.template=chat)."""
    return format_prompt(tok, question, template="chat", instruction="")


def _batch(tok: PreTrainedTokenizerFast, problems: list[CarryProblem]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, labels)`` ``[N, L]``; labels are -100 outside the solution and its EOS."""
    rows = []
    for p in problems:
        prompt = tok(carry_prompt(tok, p.question), add_special_tokens=False)["input_ids"]
        answer = tok(p.solution, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append((prompt, answer))
    width = max(len(a) + len(b) for a, b in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (a, b) in enumerate(rows):
        ids[i, : len(a) + len(b)] = torch.tensor(a + b)
        labels[i, len(a) : len(a) + len(b)] = torch.tensor(b)
    return ids, labels


def new_model(spec: ToySpec, vocab: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=spec.hidden,
        intermediate_size=3 * spec.hidden,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=False,  # untied and no weight decay: the chain is learned several times faster
        pad_token_id=0,
        eos_token_id=1,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(spec.seed)
    return LlamaForCausalLM(config)


def full_cache_correct(model, tok, problems: list[CarryProblem], batch: int = 100) -> list[bool]:
    """Greedy full-cache correctness per problem, graded by the project's reward code (batches of similar length)."""
    max_new = max(len(tok(p.solution)["input_ids"]) for p in problems) + 8
    order = sorted(range(len(problems)), key=lambda i: len(problems[i].question))
    problems = [problems[i] for i in order]
    preds = []
    for i in range(0, len(problems), batch):
        chunk = problems[i : i + batch]
        prompts = [carry_prompt(tok, p.question) for p in chunk]
        out = generate(model, tok, prompts, CachePolicy("full"), chat=False, temperature=0.0, max_new_tokens=max_new)
        preds += [extract_answer(t) for t in out.texts]
    with Grader(timeout_s=5.0, workers=1) as grader:
        graded = grader.grade(preds, [p.answer for p in problems])
    correct = [False] * len(problems)
    for i, ok in zip(order, graded):
        correct[i] = bool(ok)
    return correct


@contextmanager
def global_rng_untouched() -> Iterator[None]:
    """Restore the global random streams (torch CPU, numpy, python ``random``) on exit.

    ``model.name: toy-carry`` builds the base inside the first run, after ``seed_everything``; without this its
    initialisation and training would shift the run's streams, so a fresh clone would train another adapter than
    every later run that loads the cached base.
    """
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):  # the build runs on the CPU
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


def combinations(spec: ToySpec) -> list[tuple[int, int]]:
    """Every (steps, values) variant in the spec's ranges, held-out ones included."""
    return variants(spec.steps, spec.values)


def heldout_problems(spec: ToySpec) -> dict[tuple[int, int], list[CarryProblem]]:
    """``spec.eval_problems`` problems per combination, from seeds the training stream never uses."""
    return {
        (s, v): carry_problems(spec.eval_problems, seed=10_000 + 100 * s + v + 1000 * spec.seed, steps=s, carry=v)
        for s, v in combinations(spec)
    }


def scoring_problems(spec: ToySpec, n: int) -> dict[tuple[int, int], list[CarryProblem]]:
    """``n`` problems per combination for scoring a built base (``--score``): seeds 41000 + 100 x steps + values, apart
    from the builder's held-out seeds, as in docs/results.md."""
    return {(s, v): carry_problems(n, seed=41_000 + 100 * s + v, steps=s, carry=v) for s, v in combinations(spec)}


def accuracy_by_variant(model, tok, problems: dict[tuple[int, int], list[CarryProblem]]) -> dict[str, float]:
    """Greedy full-cache accuracy per ``"<steps>x<values>"`` variant, every variant's problems in one pass."""
    correct = full_cache_correct(model, tok, [p for ps in problems.values() for p in ps])
    scores, i = {}, 0
    for (s, v), ps in problems.items():
        scores[f"{s}x{v}"] = sum(correct[i : i + len(ps)]) / len(ps)
        i += len(ps)
    return scores


@global_rng_untouched()
def train_toy_base(spec: ToySpec, out_dir: Path, tok: PreTrainedTokenizerFast, start: Path | None = None) -> dict:
    """Train the toy base, check it on held-out problems, save it to ``out_dir``; return the build record.

    ``start`` is a built earlier phase of ``spec`` (``spec.previous_phase()``); the phases after it run here, every
    phase when it is None. Seeded by ``spec.seed`` alone, and the caller's global random streams are left as they were.
    """
    t0 = time.perf_counter()
    held_out = heldout_problems(spec)
    banned = {p.question for ps in held_out.values() for p in ps}
    if start is None:
        model, steps_run = train_first_phase(spec, tok, banned)
        done: dict = {"train_steps_run": steps_run}
        looked_up = False
    else:  # the earlier phase's own record, under first_phase or lookup_phase
        model = LlamaForCausalLM.from_pretrained(start).train()
        built = json.loads((start / "toy_base.json").read_text())
        looked_up = built["spec"]["lookup_steps"] > 0
        phase = "lookup_phase" if looked_up else "first_phase"
        done = {"train_steps_run": built["train_steps_run"], phase: {"name": start.name, **built}}
    if spec.lookup_steps and not looked_up:
        train_lookup_phase(spec, model, tok, banned)
    if spec.polish_rounds:
        done["polish"] = polish_phase(spec, model, tok, banned)
    model.eval().requires_grad_(False)
    per_combo = accuracy_by_variant(model, tok, held_out)
    record = {
        "spec": asdict(spec),
        "format": FORMAT,
        "params": sum(p.numel() for p in model.parameters()),
        **done,
        "heldout_full_cache_accuracy": sum(per_combo.values()) / len(per_combo),
        "heldout_min_combination_accuracy": min(per_combo.values()),
        "heldout_problems_per_combination": spec.eval_problems,
        "heldout_accuracy_by_steps_x_values": per_combo,
        "seconds": round(time.perf_counter() - t0, 1),
        "built_on": built_on(),
    }
    tmp = out_dir.with_suffix(".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "toy_base.json").write_text(json.dumps(record, indent=2))
    tmp.rename(out_dir)
    log.info(
        "toy base: %.1f %% held-out full-cache accuracy (worst combination %.0f %%), %.0f s -> %s",
        100 * record["heldout_full_cache_accuracy"],
        100 * record["heldout_min_combination_accuracy"],
        record["seconds"],
        out_dir,
    )
    return record


def train_first_phase(spec: ToySpec, tok: PreTrainedTokenizerFast, banned: set[str]) -> tuple[LlamaForCausalLM, int]:
    """Full-cache next-token prediction from a random start, until the loss is near 0 or ``spec.train_steps``;
    returns the model and the steps run."""
    model = new_model(spec, len(tok)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
    rng = np.random.default_rng([spec.seed, 3])
    recent: deque[float] = deque(maxlen=50)
    bar = tqdm(range(spec.train_steps), desc="toy base (full-cache SFT)", mininterval=5)
    for step in bar:
        ids, labels = _batch(tok, training_problems(spec, rng, banned))
        loss = _step(model, opt, model(input_ids=ids, labels=labels).loss)
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        recent.append(loss)
        if len(recent) == recent.maxlen and sum(recent) / len(recent) < spec.stop_loss:
            log.info("toy base: mean loss of the last %d steps below %g at step %d", len(recent), spec.stop_loss, step)
            break
        if step % 50 == 0:
            log.info("toy base step %d: loss %.3f", step, loss)
    return model, step + 1


def train_lookup_phase(spec: ToySpec, model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, banned: set[str]) -> None:
    """Second phase: teach the built base to look its question up by content.

    The first phase's base finds operands and where the chain ends by relative position, the question's length and
    the last step's label: exact on every trained variant, wrong on held-out ones, and a solution shifted by one
    position is all wrong (docs/results.md). Here each problem carries 0 to ``spec.fillers`` filler items at random
    places of its question and, drawn apart and not scored, of its solution (``spec.separate_fillers``; so what comes
    after each step or recall must be looked up, and no length or alignment gives where the chain or the answer line
    ends); its step labels start 0 to ``spec.label_shift`` letters late (so no label marks the chain's end); and its
    solution starts 0 to ``spec.position_jump`` positions late (so no fixed offset reaches an operand).
    """
    rng = np.random.default_rng([spec.seed, 4])
    draw = lambda: lookup_batch(spec, tok, training_problems(spec, rng, banned), rng)
    _decaying_run(model, spec.lookup_steps, spec.lookup_lr, draw, "lookup phase")


def polish_phase(spec: ToySpec, model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, banned: set[str]) -> dict:
    """Third phase: go on training until every trained variant scores ``spec.polish_target`` with a full cache.

    The same spec trains another model on a CPU whose kernels round differently, and one build can end a few points
    short on a variant (docs/results.md, "Task and base model"), so the builder checks instead of hoping: each round
    scores every trained variant on ``spec.polish_problems`` check problems and, while one is short, trains
    ``spec.polish_steps`` steps on the previous phase's batches with half of each batch drawn by error (weak variants
    more often). A build that meets the target at once is saved as it was. Held-out variants are neither trained nor
    checked here (they stay held out); the best-scoring round is kept. Returns the phase's record.
    """
    checks = check_problems(spec)
    banned = banned | {p.question for ps in checks.values() for p in ps}
    rng = np.random.default_rng([spec.seed, 5])
    rounds: list[dict] = []
    best: tuple[tuple[float, float], int, dict] | None = None
    for r in range(spec.polish_rounds + 1):
        model.eval()
        scores = accuracy_by_variant(model, tok, checks)
        worst, mean = min(scores.values()), sum(scores.values()) / len(scores)
        short = {k: v for k, v in scores.items() if v < spec.polish_target}
        rounds.append({"steps": r * spec.polish_steps, "min": worst, "mean": mean, "short": short})
        log.info("toy base polish check after %d steps: worst %.3f, mean %.4f, short %s", r * spec.polish_steps,
                 worst, mean, short or "none")  # fmt: skip
        if best is None or (worst, mean) > best[0]:
            best = ((worst, mean), r, {k: v.clone() for k, v in model.state_dict().items()})
        if not short or r == spec.polish_rounds:
            break
        model.train()
        weights = polish_weights(dict(zip(checks, scores.values())))  # scores come in the order of checks
        draw = lambda w=weights: _augmented(spec, tok, polish_problems(spec, rng, w, banned), rng)
        _decaying_run(model, spec.polish_steps, spec.polish_lr, draw, f"polish round {r + 1}")
    model.load_state_dict(best[2])
    return {
        "rounds": rounds,
        "kept_after_steps": best[1] * spec.polish_steps,
        "met_target": best[0][0] >= spec.polish_target,
    }


def check_problems(spec: ToySpec) -> dict[tuple[int, int], list[CarryProblem]]:
    """``spec.polish_problems`` problems per trained variant for the polish phase's checks: seeds 60000 + 100 x steps
    + values + 1000 x seed, apart from the held-out (10000 + ...) and scoring (41000 + ...) sets."""
    return {
        (s, v): carry_problems(spec.polish_problems, seed=60_000 + 100 * s + v + 1000 * spec.seed, steps=s, carry=v)
        for s, v in combinations(spec)
        if (s, v) not in spec.held_out
    }


def polish_weights(scores: dict[tuple[int, int], float]) -> dict[tuple[int, int], float]:
    """How often each trained variant (steps, values) is drawn: half uniform, half in proportion to its check errors."""
    errors = {k: 1 - v for k, v in scores.items()}
    total = sum(errors.values()) or 1.0
    return {k: 0.5 / len(errors) + 0.5 * e / total for k, e in errors.items()}


def polish_problems(
    spec: ToySpec, rng: np.random.Generator, weights: dict[tuple[int, int], float], banned: set[str]
) -> list[CarryProblem]:
    """One batch of ``spec.batch`` problems, each variant drawn with its weight; banned questions left out."""
    combos = list(weights)
    p = np.array([weights[c] for c in combos])
    picks = rng.choice(len(combos), size=spec.batch, p=p / p.sum())
    problems = [carry_problem(rng, *combos[i]) for i in picks]
    return [q for q in problems if q.question not in banned]


def _augmented(
    spec: ToySpec, tok: PreTrainedTokenizerFast, problems: list[CarryProblem], rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The lookup phase's batch when the spec has that phase, else a plain one (default positions)."""
    if spec.lookup_steps:
        return lookup_batch(spec, tok, problems, rng)
    return (*_batch(tok, problems), None)


def _decaying_run(
    model: LlamaForCausalLM,
    steps: int,
    lr: float,
    draw: Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
    desc: str,
) -> None:
    """``steps`` AdamW steps on batches ``(input_ids, labels, position_ids)`` from ``draw``, lr decaying linearly
    from ``lr`` to 0."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps)
    bar = tqdm(range(steps), desc=f"toy base ({desc})", mininterval=5)
    for step in bar:
        ids, labels, positions = draw()
        loss = _step(model, opt, model(input_ids=ids, position_ids=positions, labels=labels).loss)
        decay.step()
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        if step % 50 == 0:
            log.info("toy base %s step %d: loss %.4f", desc, step, loss)


def lookup_batch(
    spec: ToySpec, tok: PreTrainedTokenizerFast, problems: list[CarryProblem], rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One lookup-phase batch ``(input_ids, labels, position_ids)``, each ``[N, L]``: late labels, fillers, shifted
    solutions."""
    if spec.label_shift:
        problems = [with_shifted_labels(p, rng, spec.label_shift) for p in problems]
    ids, labels = _batch(tok, [with_fillers(p, rng, spec.fillers, spec.separate_fillers) for p in problems])
    if spec.separate_fillers:
        labels[ids == tok.convert_tokens_to_ids(FILLER)] = -100  # the solution's own fillers are noise, not targets
    return ids, labels, shifted_positions(labels, rng, spec.position_jump)


def training_problems(spec: ToySpec, rng: np.random.Generator, banned: set[str]) -> list[CarryProblem]:
    """One batch of the family, held-out variants and the evaluation's own problems left out."""
    problems = carry_problems(
        spec.batch, int(rng.integers(2**31)), spec.steps, spec.values, exclude=frozenset(spec.held_out)
    )
    return [p for p in problems if p.question not in banned]


def _step(model: LlamaForCausalLM, opt: torch.optim.Optimizer, loss: torch.Tensor) -> float:
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()


def with_fillers(problem: CarryProblem, rng: np.random.Generator, most: int, separate: bool = False) -> CarryProblem:
    """``problem`` with 0 to ``most`` filler items (``.``) at random places after its start digit, in question and
    solution alike (the question's items line up one to one with the solution's, which ends with one more).

    With ``separate`` the solution draws its own 0 to ``most`` fillers instead of the question's: the two no longer
    line up, so not even "stop where the solution is as long as the question" finds the chain's end (the default).
    """
    question, solution = problem.question.split(" "), problem.solution.split(" ")
    places = _filler_places(rng, len(question), most)
    for items, at in ((question, places), (solution, _filler_places(rng, len(solution), most) if separate else places)):
        for i in at:
            items.insert(i, FILLER)
    return CarryProblem(" ".join(question), " ".join(solution), problem.answer)


def with_shifted_labels(problem: CarryProblem, rng: np.random.Generator, most: int) -> CarryProblem:
    """``problem`` with its step labels 0 to ``most`` letters later (at most to ``z``), in question and solution alike.

    The first phase ties where a chain ends to its last label and the number of values (13x1 ends at ``m``, 14x2 at
    ``n``), so a held-out combination (14x1: ``n`` and one value) gets a wrong end; late labels end every chain length
    at many letters.
    """
    steps, _ = problem_variant(problem.question)
    shift = int(rng.integers(min(most, len(LABELS) - steps) + 1))

    def relabel(text: str) -> str:
        return " ".join(
            LABELS[LABELS.index(x[0]) + shift] + x[1:] if LABEL_ITEM.match(x) else x for x in text.split(" ")
        )

    return CarryProblem(relabel(problem.question), relabel(problem.solution), problem.answer)


def _filler_places(rng: np.random.Generator, items: int, most: int) -> list[int]:
    """0 to ``most`` insertion indices after the first of ``items`` items, last first (so each insert keeps the rest)."""
    return sorted(rng.integers(1, items + 1, size=int(rng.integers(most + 1))).tolist(), reverse=True)


def shifted_positions(labels: torch.Tensor, rng: np.random.Generator, most: int) -> torch.Tensor:
    """Position ids ``[N, L]`` for right-padded rows: each row's solution (from its first labelled token) moved 0 to
    ``most`` positions later, drawn per row."""
    n, width = labels.shape
    start = (labels != -100).int().argmax(1)  # [N]
    pos = torch.arange(width).expand(n, width)
    jump = torch.from_numpy(rng.integers(0, most + 1, size=n))
    return pos + jump[:, None] * (pos >= start[:, None])


def built_on() -> dict[str, str | int]:
    """What the build ran on: the same spec trains another model on a CPU whose kernels round differently
    (docs/results.md, "Task and base model"), so the record names the machine beside the cache name."""
    return {
        "cpu": cpu_name(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


DEFAULT_SPEC = ToySpec()  # what ``model.name: toy-carry`` loads (tests swap in a tiny spec)


def toy_base_dir(spec: ToySpec | None = None) -> Path:
    """The cached toy base for ``spec`` (default ``DEFAULT_SPEC``), trained now if it is not there yet."""
    spec = DEFAULT_SPEC if spec is None else spec
    out = cache_dir() / spec.name
    if not (out / "toy_base.json").exists():
        previous = spec.previous_phase()
        start = toy_base_dir(previous) if previous else None
        took = "1-8 min" if spec.polish_rounds else "13-40 min"
        log.info("building the toy base model %s (once; this phase %s on a 2-core CPU)", spec.name, took)
        train_toy_base(spec, out, tiny_tokenizer(), start=start)
    return out


def _parse_range(text: str) -> tuple[int, int]:
    """``6,20`` -> (6, 20); ``10`` -> (10, 10)."""
    lo, _, hi = text.partition(",")
    return int(lo), int(hi or lo)


def _parse_pairs(text: str) -> tuple[tuple[int, int], ...]:
    """``7:2,11:3`` -> ((7, 2), (11, 3)); empty -> ()."""
    return tuple((int(a), int(b)) for a, b in (x.split(":") for x in text.split(",") if x))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: the toy-carry cache)")
    parser.add_argument(
        "--score", type=int, default=0, metavar="N", help="then score the base on N more problems per variant"
    )
    for field, default in asdict(ToySpec()).items():
        flag = f"--{field.replace('_', '-')}"
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
            continue
        kind = _parse_pairs if field == "held_out" else _parse_range if isinstance(default, tuple) else type(default)
        parser.add_argument(flag, type=kind, default=getattr(ToySpec(), field))
    args = vars(parser.parse_args(argv))
    out, score = args.pop("out"), args.pop("score")
    spec = ToySpec(**args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if out is None:
        path = toy_base_dir(spec)
    else:
        train_toy_base(spec, out, tiny_tokenizer())
        path = out
    if not score:
        print(json.dumps(json.loads((path / "toy_base.json").read_text()), indent=2))
        return
    model = LlamaForCausalLM.from_pretrained(path).eval().requires_grad_(False)
    scores = accuracy_by_variant(model, tiny_tokenizer(), scoring_problems(spec, score))
    summary = {"base": path.name, "problems_per_variant": score, "min": min(scores.values())}
    print(json.dumps({**summary, "mean": sum(scores.values()) / len(scores), "by_variant": scores}, indent=2))


if __name__ == "__main__":
    main()
