"""Benchmark evaluation under bounded KV caches: the evaluation protocol of docs/method.md §5.

A sweep is every (cache policy, thought window) setting in ``eval.policies`` x ``eval.windows``, run on every
benchmark in ``eval.benchmarks`` with ``eval.n_samples`` samples per problem. Results are written per problem to an
append-only ``records.jsonl`` as each batch finishes, keyed by a fingerprint of everything that shapes the samples,
so a rerun skips finished problems and every aggregate (pass@1 over the samples, unbiased pass@k, maj@k, response
length, truncation, evictions, KV bytes, tokens/s) is recomputed from the records. A problem whose gold answer the
grader cannot parse is recorded but never scored (docs/method.md §6); its count is reported as ``gold_errors``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from pte.config import CacheCfg, Config, ConfigError, EvalCfg, require, to_yaml
from pte.engine.cache import POLICIES
from pte.engine.generate import decode_responses, encode_prompts, eos_ids
from pte.engine.noise import RowNoise
from pte.engine.rollout import SamplingConfig, rollout
from pte.evaluation.math_sets import BENCHMARKS, OFFLINE, Problem, load_benchmark
from pte.evaluation.plots import average, summarize, write_report
from pte.evaluation.records import RecordStore, Sampled, batch_records
from pte.training.prompts import config_prompt, few_shot_examples
from pte.training.rewards import GoldAnswerError, Grader, extract_answer

log = logging.getLogger(__name__)

RECORDS_FILE = "records.jsonl"
# Returns (model, tokenizer, ...): load_base and load_trained both fit; items after the first two are ignored.
Loader = Callable[[], tuple]


@dataclass(frozen=True)
class Setting:
    """One cache configuration of a sweep; ``window`` 0 derives W from ``cache.budget`` or the prompt length."""

    policy: str
    window: int

    @property
    def name(self) -> str:
        return "full" if self.policy == "full" else f"{self.policy}-w{self.window}"

    def cache(self, base: CacheCfg) -> CacheCfg:
        """The run's cache config with this setting's policy and window (sink tokens only where they apply)."""
        sinks = base.sink_tokens if self.policy == "sink" else 0
        return replace(base, policy=self.policy, window=self.window, sink_tokens=sinks)


def sweep(cfg: Config) -> list[Setting]:
    """Validate ``eval.*`` against the model's method and expand the policy x window grid.

    The full cache never evicts, so it runs once whatever the windows. Raises ConfigError naming the key.
    """
    e = cfg.eval
    require(bool(e.benchmarks), "eval.benchmarks", "needs at least one benchmark")
    unknown = [b for b in e.benchmarks if b not in BENCHMARKS and b not in OFFLINE]
    require(not unknown, "eval.benchmarks", f"unknown {unknown}; known: {sorted([*BENCHMARKS, *OFFLINE])}")
    require(e.n_samples >= 1, "eval.n_samples", "must be >= 1")
    require(all(1 <= k <= e.n_samples for k in e.k), "eval.k", f"each k must be in [1, eval.n_samples={e.n_samples}]")
    require(e.limit is None or e.limit >= 1, "eval.limit", "must be >= 1 (or null for all problems)")
    require(e.batch_size >= 1, "eval.batch_size", "must be >= 1")
    require(e.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1")
    require(e.temperature >= 0, "eval.temperature", "must be >= 0 (0 = greedy)")
    require(0 < e.top_p <= 1, "eval.top_p", "must be in (0, 1]")
    require(e.top_k >= 0, "eval.top_k", "must be >= 0 (0 = off)")
    require(all(w >= 0 for w in e.windows), "eval.windows", "windows must be >= 0 (0 = derive from cache.budget)")
    for bench, path in e.paths.items():
        require(Path(path).is_file(), f"eval.paths.{bench}", f"{path} is not a file")
    policies = list(e.policies) or default_policies(cfg)
    for policy in policies:
        require(policy in POLICIES, "eval.policies", f"unknown policy {policy!r}; expected one of {POLICIES}")
        require(
            policy not in ("pte", "global_only") or cfg.method == "pte",
            "eval.policies",
            f"policy {policy!r} needs a PTE checkpoint (thought encoder); this model is method={cfg.method}",
        )
    if e.temperature == 0 and e.n_samples > 1:
        log.warning("eval.temperature=0 (greedy) with eval.n_samples=%d: all samples will be identical", e.n_samples)
    windows = list(e.windows) or [cfg.cache.window]
    settings = [Setting("full", 0) if p == "full" else Setting(p, w) for p in policies for w in windows]
    return list(dict.fromkeys(settings))


def default_policies(cfg: Config) -> list[str]:
    """What an empty ``eval.policies`` sweeps: ``cache.policy`` if set, else the method's own cache policy
    followed by the plain window and the full cache, so every trained model is compared with both baselines.
    """
    if cfg.cache.policy:
        return [cfg.cache.policy]
    own = cfg.eval_policy
    return [own, *(p for p in ("window", "full") if p != own)]


def checkpoint_id(path: str | None) -> str:
    """Identify a checkpoint by its files' names, sizes and modification times (cheap; changes on overwrite)."""
    if not path:
        return ""
    p = Path(path)
    files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return hashlib.sha1(json.dumps(stats).encode()).hexdigest()[:12]


def fingerprint(cfg: Config, setting: Setting) -> str:
    """Hash of everything that shapes a setting's samples; records with another fingerprint are not reused."""
    c, e, d, m = setting.cache(cfg.cache), cfg.eval, cfg.data, cfg.model
    spec = {
        "model": [m.name, m.revision, m.dtype],
        "method": cfg.method,
        "ckpt": checkpoint_id(cfg.ckpt_path),
        "thought": asdict(cfg.thought) if cfg.method == "pte" else None,
        "cache": [c.policy, c.window, c.budget, c.evict_ratio, c.sink_tokens, c.retain_prompt],
        "sampling": [e.max_new_tokens, e.temperature, e.top_p, e.n_samples, cfg.seed, *([e.top_k] if e.top_k else [])],
        "prompt": [d.template, d.system, d.instruction, few_shot_examples(d)],
    }
    return hashlib.sha1(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]


def output_dir(cfg: Config) -> Path:
    """``eval.out_dir``, else ``<checkpoint dir>/eval``, else ``<trainer.out_dir>/eval-<model>`` for a base model."""
    if cfg.eval.out_dir:
        return Path(cfg.eval.out_dir)
    if cfg.ckpt_path:
        ckpt = Path(cfg.ckpt_path)
        return (ckpt if ckpt.is_dir() else ckpt.parent) / "eval"
    return Path(cfg.trainer.out_dir) / f"eval-{cfg.model.name.strip('/').replace('/', '_')}"


def sample_batch(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    prompts: list[str],
    cache: CacheCfg,
    policy_name: str,
    sampling: SamplingConfig,
    generator: torch.Generator | None = None,
    max_rows: int = 0,
) -> Sampled:
    """Generate for formatted prompts under policy ``policy_name`` of ``cache`` (window resolved per rollout), in
    rollouts of at most ``max_rows`` prompts one after another (0 = one rollout), so that at most that many rows'
    K/V are held at once. Each row's draws come from one stream set for the whole call (pte/engine/noise.py), so sampled
    tokens do not depend on ``max_rows``."""
    device = next(model.parameters()).device
    size = max_rows or len(prompts)
    noise = RowNoise.draw(generator, len(prompts), sampling.max_new_tokens, device)  # samples independent of size
    start, parts = time.perf_counter(), []
    for i in range(0, len(prompts), size):
        ids, mask = encode_prompts(tok, prompts[i : i + size], chat=False, device=device)
        policy = cache.policy_for(int(mask.sum(1).max()), policy_name)
        block = noise[i : i + size]
        parts.append(rollout(model, ids, mask, policy, sampling, eos_ids(tok, model), tok.pad_token_id, noise=block))
    seconds = time.perf_counter() - start
    texts = [t for ro in parts for t in decode_responses(tok, ro)]
    return Sampled(texts, [extract_answer(t) for t in texts], parts, seconds)


def grade_groups(
    grader: Grader, answers: Sequence[Sequence[str | None]], golds: Sequence[str], ids: Sequence[str]
) -> list[list[bool] | str]:
    """Grade each problem's samples; a problem with an unparseable gold gets the error message instead.

    The whole batch is graded at once (parallel across problems); only if some gold fails is it regraded
    problem by problem to find which.
    """
    preds = [a for group in answers for a in group]
    flat_golds = [g for g, group in zip(golds, answers) for _ in group]
    flat_ids = [i for i, group in zip(ids, answers) for _ in group]
    try:
        flat = grader.grade(preds, flat_golds, flat_ids)
    except GoldAnswerError:
        return [_grade_one(grader, group, gold, pid) for group, gold, pid in zip(answers, golds, ids)]
    out, start = [], 0
    for group in answers:
        out.append(flat[start : start + len(group)])
        start += len(group)
    return out


def _grade_one(grader: Grader, answers: Sequence[str | None], gold: str, pid: str) -> list[bool] | str:
    try:
        return grader.grade(list(answers), [gold] * len(answers), [pid] * len(answers))
    except GoldAnswerError as err:
        return str(err)


class Evaluator:
    """Runs the missing part of a sweep into a RecordStore; the model and grader start only if work is left."""

    def __init__(self, cfg: Config, load: Loader, store: RecordStore) -> None:
        self.cfg, self.load, self.store = cfg, load, store
        self.model: nn.Module | None = None
        self.grader: Grader | None = None
        self.sampling = cfg.eval.sampling()

    def _start(self) -> None:
        """Load the model (on the GPU when one is available and allowed) and start the grader pool."""
        model, self.tok = self.load()[:2]
        use_gpu = torch.cuda.is_available() and self.cfg.trainer.accelerator != "cpu"
        self.model = model.to("cuda" if use_gpu else "cpu").eval()
        self.grader = Grader(self.cfg.reward.timeout_s, self.cfg.reward.workers)
        self.format = partial(config_prompt, self.tok, self.cfg.data)

    def close(self) -> None:
        """Stop the grader pool, reporting answers that were graded False because grading timed out."""
        if self.grader is not None:
            if self.grader.timeouts:
                log.warning("%d answers timed out in the grader and were graded False", self.grader.timeouts)
            self.grader.close()

    def run(self, setting: Setting, bench: str, problems: list[Problem], bar: tqdm) -> None:
        """Generate and grade the problems of one (setting, benchmark) that have no record yet, batch by batch."""
        fp, n = fingerprint(self.cfg, setting), self.cfg.eval.n_samples
        pending = [p for p in problems if self.store.get(fp, bench, p.id) is None]
        size = self.cfg.eval.batch_size
        for i in range(0, len(pending), size):
            if self.model is None:
                self._start()
            batch = pending[i : i + size]
            device = next(self.model.parameters()).device
            seed = zlib.crc32(f"{self.cfg.seed}/{fp}/{bench}/{batch[0].id}".encode())
            generator = torch.Generator(device=device).manual_seed(seed)
            prompts = [self.format(p.question) for p in batch for _ in range(n)]
            cache = setting.cache(self.cfg.cache)
            rows = rollout_rows(self.cfg.eval)
            out = sample_batch(self.model, self.tok, prompts, cache, setting.policy, self.sampling, generator, rows)
            groups = [out.answers[j * n : (j + 1) * n] for j in range(len(batch))]
            grades = grade_groups(self.grader, groups, [p.answer for p in batch], [p.id for p in batch])
            self.store.append(batch_records(fp, setting, bench, batch, out, grades))
            bar.update(len(batch))


def rollout_rows(e: EvalCfg) -> int:
    """Rows per eval rollout: ``eval.max_rows``, rounded down to whole problems when it holds one (0 = all)."""
    return e.max_rows - e.max_rows % e.n_samples if e.max_rows >= e.n_samples else e.max_rows


def _load_problems(bench: str, path: str | None, limit: int | None, cfg: Config) -> list[Problem]:
    """load_benchmark (the carry task at ``data.carry_*``), with a hub that cannot be reached reported as a config
    problem naming the way out."""
    d = cfg.data
    try:
        return load_benchmark(bench, path=path, limit=limit, carry=(d.carry_steps, d.carry_values, d.carry_letters))
    except (ConnectionError, OSError) as err:
        if path is not None:
            raise
        detail = " ".join(str(err).split())[:200]
        raise ConfigError(
            f"eval.benchmarks: {bench} cannot be loaded from the Hugging Face hub ({detail}); "
            f"offline, pass a local copy with eval.paths.{bench}=<file.jsonl>"
        ) from err


def evaluate(cfg: Config, load: Loader) -> dict:
    """Run (or finish) the sweep of ``cfg.eval`` and write records, results.json/.md, plots and then config.yaml.

    Args:
        cfg: resolved config; ``ckpt_path`` names the evaluated checkpoint (None for a base model).
        load: returns ``(model, tokenizer)``; called only if some record is missing, so rerunning a finished
            sweep re-aggregates without loading the model.

    Returns:
        The content of results.json: per setting, per benchmark and averaged, every reported number.
    """
    settings = sweep(cfg)
    out_dir = output_dir(cfg)
    e = cfg.eval
    problems = {b: _load_problems(b, e.paths.get(b), e.limit, cfg) for b in e.benchmarks}
    for bench, found in problems.items():
        require(bool(found), "eval.benchmarks", f"{bench} has no problems ({e.paths.get(bench) or 'built-in set'})")
    out_dir.mkdir(parents=True, exist_ok=True)
    store = RecordStore(out_dir / RECORDS_FILE)
    keys = [(fingerprint(cfg, s), b, p.id) for s in settings for b in e.benchmarks for p in problems[b]]
    done = sum(store.get(*key) is not None for key in keys)
    log.info(
        "%d settings x %d benchmarks: %d of %d problems already done", len(settings), len(problems), done, len(keys)
    )
    runner = Evaluator(cfg, load, store)
    try:
        with tqdm(total=len(keys), initial=done, desc="eval", unit="problem") as bar:
            for setting in settings:
                for bench in e.benchmarks:
                    runner.run(setting, bench, problems[bench], bar)
    finally:
        runner.close()
    results = collect(cfg, settings, problems, store)
    write_report(results, _curves(settings, store, cfg), out_dir)
    # Last, so that a failed run never leaves a config.yaml that does not describe the results.json beside it.
    tmp = out_dir / "config.yaml.tmp"
    tmp.write_text(to_yaml(cfg))
    tmp.replace(out_dir / "config.yaml")
    log.info("results in %s (results.md, results.json, plots, records.jsonl, config.yaml)", out_dir)
    return results


def collect(cfg: Config, settings: list[Setting], problems: dict[str, list[Problem]], store: RecordStore) -> dict:
    """Aggregate the records of the current sweep (and only those) into the results.json structure."""
    rows = []
    for setting in settings:
        fp = fingerprint(cfg, setting)
        records = {b: [store.get(fp, b, p.id) for p in ps] for b, ps in problems.items()}
        per_bench = {b: summarize(records[b], cfg.eval.k) for b in problems}
        avg = average(per_bench)
        for b, ps in problems.items():
            if len({p.variant for p in ps}) > 1:
                per_bench[b]["by_variant"] = by_variant(ps, records[b])
        for s in (*per_bench.values(), avg):  # bounded but never evicted: it measured the full cache
            s["never_evicts"] = setting.policy != "full" and s["evictions"] == 0
        rows.append(
            {
                "name": setting.name,
                "policy": setting.policy,
                "window": setting.window,
                "fingerprint": fp,
                "benchmarks": per_bench,
                "average": avg,
            }
        )
    return {
        "model": cfg.model.name,
        "method": cfg.method,
        "ckpt": cfg.ckpt_path,
        "benchmarks": list(problems),
        "n_samples": cfg.eval.n_samples,
        "k": sorted(set(cfg.eval.k)),
        "settings": rows,
    }


def by_variant(problems: list[Problem], records: list[dict]) -> dict[str, dict]:
    """``{variant: {"problems": n, "pass@1": p}}`` (:func:`summarize` over each variant's records; ``records[i]`` is that
    of ``problems[i]``) for the variants with a scored problem, in natural order (``6x1`` before ``14x1``)."""
    groups: dict[str, list[dict]] = {}
    for p, r in zip(problems, records, strict=True):
        groups.setdefault(p.variant, []).append(r)
    order = sorted(groups, key=lambda v: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", v)])
    scores = {v: summarize(groups[v], [1]) for v in order}
    return {v: {"problems": s["problems"], "pass@1": s["pass@1"]} for v, s in scores.items() if s["problems"]}


def _curves(settings: list[Setting], store: RecordStore, cfg: Config) -> dict[str, list[list[float]]]:
    """Each setting's longest recorded KV curve (over its benchmarks), for the memory plot."""
    curves = {}
    for setting in settings:
        fp = fingerprint(cfg, setting)
        found = [r["kv_curve"] for key, r in store.records.items() if key[0] == fp and r.get("kv_curve")]
        if found:
            curves[setting.name] = max(found, key=lambda c: c[-1][0])
    return curves
