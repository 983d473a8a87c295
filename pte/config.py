"""The typed config schema shared by train.py and eval.py, and its one loader.

Every field is documented once, here; the YAML files in configs/ mirror it with one-line comments.
Loading merges: schema defaults <- YAML file <- ``key=value`` overrides (OmegaConf dot-list). A YAML file may
name a file it overlays with a top-level ``base:`` key (the paper configs: ``paper.yaml`` plus one short file per
model), so a setting shared by several configs is written once. An unknown key, a wrong type or an impossible
combination stops the run at once with the key's name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pte.engine.cache import POLICIES, CachePolicy
from pte.engine.rollout import SamplingConfig
from pte.engine.thought import ThoughtConfig
from pte.errors import UserError
from pte.training.carry import letter_span, span

METHODS = ("base", "lora", "lora_c", "pte")
OBJECTIVES = ("grpo", "sft")
# The cache each method trains under (and evaluates under unless cache.policy says otherwise).
METHOD_POLICY = {"base": "full", "lora": "full", "lora_c": "window", "pte": "pte"}


class ConfigError(UserError, ValueError):
    """A config problem, with the dotted key that caused it."""


def require(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


@dataclass
class ModelCfg:
    """name: hub id, local path, ``smollm2`` (offline SmolLM2-135M-Instruct), ``toy-carry`` (the toy reasoning model of
    pte/models/toy.py, trained on first use and cached) or ``tiny-qwen2``/``tiny-llama``. adapter: an adapter export
    (``<run>/adapter``) of the same method to start training from, e.g. an ``objective: sft`` run before GRPO.
    """

    name: str = "smollm2"
    revision: str = "main"
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    adapter: str | None = None

    def __post_init__(self) -> None:
        require(self.dtype in ("float32", "bfloat16", "float16"), "model.dtype", f"unknown dtype {self.dtype!r}")


@dataclass
class CacheCfg:
    """Cache policy D. Training always uses the method's own policy (``METHOD_POLICY``); ``policy`` overrides
    it for eval.py (None = the method's own). On a PTE checkpoint ``full``/``window``/``sink`` run the base
    model exactly (update off) and ``global_only`` is the paper's Global-Only ablation (update with S_g, no
    absorption). ``retain_prompt`` false puts each row's own prompt inside its window (prompts may exceed W). The thought window W comes from ``window`` if > 0, else ``budget`` minus the longest
    prompt of the micro-batch if set, else the paper's training rule W = longest prompt of the micro-batch.

    ``train_windows`` / ``train_evict_ratios`` (``[lo, hi]``, empty = off) make training draw a schedule per
    micro-batch instead: W log-uniform over the integers lo..hi, the eviction ratio uniform over [lo, hi]. One adapter
    then meets many windows (a W longer than the trace evicts nothing, so it also learns to leave the base alone), as
    the paper's rule W = longest prompt does across micro-batches. Evaluation always uses ``window``/``evict_ratio``.
    """

    policy: str | None = None
    window: int = 64
    budget: int | None = None
    evict_ratio: float = 0.25
    sink_tokens: int = 0
    retain_prompt: bool = True
    train_windows: list[int] = field(default_factory=list)
    train_evict_ratios: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        require(self.policy in (None, *POLICIES), "cache.policy", f"expected one of {POLICIES}, got {self.policy!r}")
        require(0 <= self.evict_ratio < 1, "cache.evict_ratio", "must be in [0, 1)")
        require(self.window >= 0, "cache.window", "must be >= 0 (0 = derive from budget or prompt length)")
        require(self.budget is None or self.budget > 0, "cache.budget", "must be positive")
        w, r = self.train_windows, self.train_evict_ratios
        require(
            not w or (len(w) == 2 and 1 <= w[0] <= w[1]),
            "cache.train_windows",
            f"expected [lo, hi], 1 <= lo <= hi, got {w}",
        )
        require(
            not r or (len(r) == 2 and 0 <= r[0] <= r[1] < 1),
            "cache.train_evict_ratios",
            f"expected [lo, hi] in [0, 1), got {r}",
        )

    def policy_for(self, prompt_len: int, name: str, draw: np.random.Generator | None = None) -> CachePolicy:
        """The concrete policy ``name`` for a micro-batch whose longest prompt has ``prompt_len`` tokens; with ``draw``
        (training), W and the eviction ratio come from ``train_windows`` / ``train_evict_ratios`` where set."""
        window = self.window or (self.budget - prompt_len if self.budget else prompt_len)
        ratio = self.evict_ratio
        if draw is not None and self.train_windows:
            lo, hi = self.train_windows
            window = min(hi, int(math.exp(draw.uniform(math.log(lo), math.log(hi + 1)))))
        if draw is not None and self.train_evict_ratios:
            ratio = float(draw.uniform(*self.train_evict_ratios))
        if window < 1:
            raise ConfigError(f"cache.budget={self.budget}: leaves no window after a {prompt_len}-token prompt")
        return CachePolicy(name, window, ratio, self.sink_tokens, self.retain_prompt)

    @property
    def drawn(self) -> bool:
        """Training draws a schedule per micro-batch."""
        return bool(self.train_windows or self.train_evict_ratios)


@dataclass
class ThoughtCfg:
    """PTE settings; see ``pte.engine.thought.ThoughtConfig`` for each field's meaning."""

    rank: int = 32
    global_tokens: int = 32
    alpha: float = 32.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    normalize: str = "rms"
    state_scale: str = "mean"
    evicted_keys: str = "pre_rope"
    evicted_context: str = "token"
    init_std: float = 1.0
    init_move: float | None = None
    write_gate: bool = False
    state_grad: str = "detach"

    def build(self) -> ThoughtConfig:
        kwargs = {k: getattr(self, k) for k in self.__dataclass_fields__}
        return ThoughtConfig(**{**kwargs, "target_modules": tuple(self.target_modules)})


@dataclass
class LoraCfg:
    """peft LoRA for the ``lora`` (full cache) and ``lora_c`` (window cache) baselines.

    No dropout: replay must reproduce the rollout's log-probs exactly.
    """

    rank: int = 32
    alpha: float = 64.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class DataCfg:
    """Where training prompts come from and how they are turned into chat prompts.

    ``carry_steps`` / ``carry_values`` size the offline long-horizon task (``source: carry``, pte/training/carry.py, and
    the ``carry`` benchmark of eval.py): chain length (about 5 tokens of trace per step) and how many marked values the
    answer needs, each one number or an inclusive ``[lo, hi]`` range drawn per problem; ``carry_letters`` how many codes
    (2-10) a marked value is drawn from (10: any digit, the task; fewer: a recall under a plain window guesses better).
    """

    source: str = "reasoning_gym"
    tasks: list[str] = field(default_factory=lambda: ["basic_arithmetic"])
    size: int = 512
    carry_steps: Any = 10
    carry_values: Any = 1
    carry_letters: Any = 10
    path: str | None = None
    hf_name: str | None = None
    hf_config: str | None = None
    split: str = "train"
    revision: str = "main"
    question_field: str = "question"
    answer_field: str = "answer"
    limit: int | None = None
    template: str = "chat"
    system: str | None = None
    instruction: str = "Please reason step by step, and put your final answer within \\boxed{}."
    few_shot: list[dict[str, str]] = field(default_factory=list)
    default_few_shot: bool = True
    val_size: int = 16

    def __post_init__(self) -> None:
        for key in ("carry_steps", "carry_values"):
            try:
                span(getattr(self, key), key)
            except ValueError:
                require(False, f"data.{key}", f"expected a positive number or [lo, hi], got {getattr(self, key)!r}")
        try:
            letter_span(self.carry_letters)
        except ValueError:
            require(
                False, "data.carry_letters", f"expected 2 to 10 or [lo, hi] within them, got {self.carry_letters!r}"
            )


ENGINE_SAMPLING = SamplingConfig()


@dataclass
class SamplingCfg:
    """The sampler's knobs, declared once for ``rollout`` (training) and ``eval``: each field means what it means in
    ``pte.engine.rollout.SamplingConfig`` (its defaults too), which :meth:`sampling` builds."""

    max_new_tokens: int = ENGINE_SAMPLING.max_new_tokens
    temperature: float = ENGINE_SAMPLING.temperature
    top_p: float = ENGINE_SAMPLING.top_p
    top_k: int = ENGINE_SAMPLING.top_k

    def sampling(self, **engine: Any) -> SamplingConfig:
        """The engine's ``SamplingConfig`` with these knobs plus ``engine``'s (e.g. ``compile``)."""
        return SamplingConfig(self.temperature, self.top_p, self.top_k, self.max_new_tokens, **engine)


@dataclass
class RolloutCfg(SamplingCfg):
    """Sampling of the GRPO groups. batch_size sequences = (batch_size / group_size) prompts x group_size.

    micro_batch: the update's micro-batch: rows per replay forward + backward when ``replay.micro_batch`` is 0, per
        SFT batch and per validation batch. It does not set how many rows are decoded at once (``decode_batch``).
    decode_batch: rows each process decodes at once (0 = all of its rows, batch_size / processes). One decode step
        reads every weight once whatever the rows, so fewer, wider steps are faster as long as the rows' K/V fit
        (the bounded window keeps them small: ``python -m pte.plan``). Each block of rows is one rollout, its padded
        prompt and, under the paper's rule, its window W set by its own longest prompt; with a fixed window the
        tokens do not depend on this value (every row samples from its own stream, pte/engine/noise.py).
    prompt_buckets: with ``compile``, cache shapes by longest prompt: a block whose longest prompt has L tokens gets
        the slots of the smallest bucket >= L (bucket + the largest window its prompts can get), so the compiled
        decode step is built once per bucket, and a compilation past that stops the run (pte/engine/shapes.py). A longer
        prompt is refused. Unused without ``compile``.
    compile: run the one-token decode steps through ``torch.compile(mode="reduce-overhead")`` over a cache with
        fixed shapes (CUDA graphs on a GPU). Off by default: compiling costs minutes per model up front and only pays
        on a GPU, where per-token launch overhead dominates small batches; on a CPU it runs but gains little.
    """

    batch_size: int = 8
    group_size: int = 4
    micro_batch: int = 8
    decode_batch: int = 0
    prompt_buckets: list[int] = field(default_factory=list)
    compile: bool = False

    def __post_init__(self) -> None:
        require(self.group_size >= 2, "rollout.group_size", "must be >= 2 (advantages compare samples of a prompt)")
        require(
            self.batch_size % self.group_size == 0,
            "rollout.batch_size",
            f"{self.batch_size} sequences cannot be split into groups of rollout.group_size={self.group_size}",
        )
        require(
            self.micro_batch >= 1 and self.batch_size % self.micro_batch == 0,
            "rollout.micro_batch",
            f"must divide rollout.batch_size={self.batch_size}",
        )
        require(
            self.decode_batch >= 0 and self.batch_size % (self.decode_batch or self.batch_size) == 0,
            "rollout.decode_batch",
            f"must divide rollout.batch_size={self.batch_size} (0 = all of a process's rows)",
        )
        require(self.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
        require(all(n >= 1 for n in self.prompt_buckets), "rollout.prompt_buckets", "lengths must be >= 1")
        require(
            not self.compile or bool(self.prompt_buckets),
            "rollout.prompt_buckets",
            "rollout.compile needs prompt-length buckets, e.g. [256, 512, 1024]: one compiled decode step per bucket",
        )

    @property
    def prompts_per_step(self) -> int:
        return self.batch_size // self.group_size


def check_shards(r: RolloutCfg, world: int) -> None:
    """Each of ``world`` processes takes whole groups of the global batch, in whole micro-batches and decode blocks."""
    require(
        r.prompts_per_step % world == 0,
        "rollout.batch_size",
        f"{r.batch_size} sequences = {r.prompts_per_step} prompts x rollout.group_size={r.group_size} cannot be "
        f"shared by {world} processes (trainer.devices x trainer.num_nodes): the prompts must divide evenly",
    )
    for key in ("micro_batch", "decode_batch"):
        rows = getattr(r, key)
        require(
            (r.batch_size // world) % (rows or 1) == 0,
            f"rollout.{key}",
            f"must divide the {r.batch_size // world} sequences each of the {world} processes samples "
            f"(rollout.batch_size / (trainer.devices x trainer.num_nodes))",
        )


@dataclass
class ReplayCfg:
    """Bounds on the training pass's memory and work, none of which changes a log-prob or a gradient (docs/scale.md).
    They hold for the GRPO replay, the full-cache replay of ``lora``, the reference of the KL term and SFT
    (pte/engine/replay.py); ``skip_zero_loss`` for the GRPO replay only.

    micro_batch: rows per replay forward + backward, independent of the rollout's rows (0 = a rollout micro-batch);
        a block of rows keeps the batch's prompt width and eviction steps, and ends at its own longest response.
    max_chunk_tokens: tokens per row in one replay forward; a longer stretch between evictions (the first chunk holds
        prompt + window, ``lora`` replays the whole response) is cut into pieces with nothing evicted between them,
        each attending the earlier pieces' K/V with their gradient (0 = no cap; must be 0 under fsdp).
    logits_chunk: positions (rows x tokens) per LM-head piece when log-probs and entropy are computed, so no
        ``[rows, tokens, vocab]`` float32 tensor is ever built; with grad each piece is rebuilt in the backward
        (0 = one piece).
    checkpointing: recompute each decoder layer's activations in the backward instead of keeping them (the rerun
        attends what the forward attended and stores no K/V; each chunk's loss must be backpropagated before the
        next chunk, as training does).
    skip_zero_loss: the GRPO update replays only rows whose loss can be non-zero. A row with no weighted token, or
        (with ``grpo.beta`` 0) a zero advantage, as in a group whose rewards all agree, adds exactly zero to the loss
        and the gradient; the logged entropy, clip fraction and rollout/replay gap then cover the replayed rows.
    """

    micro_batch: int = 0
    max_chunk_tokens: int = 0
    logits_chunk: int = 4096
    checkpointing: bool = False
    skip_zero_loss: bool = True

    def __post_init__(self) -> None:
        require(self.micro_batch >= 0, "replay.micro_batch", "must be >= 0 (0 = rollout.micro_batch)")
        require(self.max_chunk_tokens >= 0, "replay.max_chunk_tokens", "must be >= 0 (0 = no cap)")
        require(self.logits_chunk >= 0, "replay.logits_chunk", "must be >= 0 (0 = one piece)")


@dataclass
class GRPOCfg:
    """Objective knobs (the paper gives none of them; defaults follow DAPO-style practice)."""

    clip_low: float = 0.2
    clip_high: float = 0.28
    beta: float = 0.0
    loss_agg: str = "dapo"
    std_norm: bool = True
    mask_truncated: bool = False
    updates_per_batch: int = 1
    adv_eps: float = 1e-4

    def __post_init__(self) -> None:
        require(self.loss_agg in ("grpo", "dapo", "dr_grpo"), "grpo.loss_agg", "expected grpo, dapo or dr_grpo")
        require(self.beta >= 0, "grpo.beta", "must be >= 0")
        require(self.updates_per_batch >= 1, "grpo.updates_per_batch", "must be >= 1")


@dataclass
class OptimCfg:
    lr: float = 1e-5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_steps: int = 0
    schedule: str = "constant"
    zero_factor_lr: float = 1.0  # lr multiplier of each adapter's zero-initialised factor (PTE's A, LoRA's B)

    def __post_init__(self) -> None:
        require(
            self.schedule in ("constant", "cosine"),
            "optim.schedule",
            f"expected constant or cosine, got {self.schedule!r}",
        )
        require(self.zero_factor_lr > 0, "optim.zero_factor_lr", f"must be > 0, got {self.zero_factor_lr}")


@dataclass
class RewardCfg:
    """Weights of the reward components (each logged on its own) and the grader's limits."""

    correctness: float = 1.0
    format: float = 0.0
    timeout_s: float = 5.0
    workers: int = 2


STRATEGIES = ("auto", "ddp", "fsdp")
FSDP_PRECISIONS = ("32-true", "bf16-true", "bf16-mixed", "16-true")  # what Lightning's ModelParallelStrategy takes


@dataclass
class TrainerCfg:
    """Lightning Trainer settings and where a run lives (``out_dir/run_name``). ``strategy``: ``auto`` (one process
    unless devices x num_nodes > 1), ``ddp`` (pte.training.distributed.ReplayDDPStrategy: one process per device, each
    holding the whole base, gradients summed once per step) or ``fsdp`` (pte.training.distributed.ReplayFSDPStrategy,
    for a base that does not fit one device: the frozen base sharded over all processes with FSDP2, one unit per decoder
    layer, the adapter whole on every process and reduced as under ddp; rollouts, replay chunks and evaluation
    batches run in lock-step, docs/distributed.md). ``devices`` is per node (-1 = all), ``num_nodes`` the
    number of machines. ``rollout.batch_size`` is the global batch over all processes.

    ckpt_every: optimiser steps between periodic checkpoints ``checkpoints/step-<N>.ckpt`` (+ ``last.ckpt``), written
        atomically; 0 = only at the end and on interrupts (a SIGKILL then loses the run).
    keep_last: periodic checkpoints kept (the newest ones).
    overwrite: start afresh in a run directory that already holds a run (its checkpoints, TensorBoard logs, configs
        and adapter are deleted); without it such a directory is refused unless ``ckpt_path`` resumes it.
    max_nonfinite: consecutive steps with a NaN/inf loss or gradient (each skipped, no optimiser step) after which
        the run saves and stops; 0 = never stop.
    stop_at: end the run (saved and exported as at ``max_steps``) at the first evaluation whose ``val/accuracy`` reaches
        this; null = run every step. For sweeps that ask "how soon", not "how far".
    precision: Lightning precision; the half ``-true`` values cast only the frozen base (pte/training/precision.py),
        so the adapter, the thought state and the optimiser state stay float32.
    """

    max_steps: int = 10
    accelerator: str = "auto"
    strategy: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    precision: str = "32-true"
    out_dir: str = "runs"
    run_name: str = "default"
    log_every: int = 1
    val_every: int = 0
    val_limit: int = 8
    ckpt_every: int = 10
    keep_last: int = 2
    overwrite: bool = False
    max_nonfinite: int = 3
    stop_at: float | None = None

    def __post_init__(self) -> None:
        require(self.ckpt_every >= 0, "trainer.ckpt_every", "must be >= 0 (0 = only at the end)")
        require(self.keep_last >= 1, "trainer.keep_last", "must be >= 1")
        require(self.max_nonfinite >= 0, "trainer.max_nonfinite", "must be >= 0 (0 = never stop)")
        require(
            self.strategy in STRATEGIES,
            "trainer.strategy",
            f"expected one of {STRATEGIES} (ddp: the whole base on every process; fsdp: the frozen base sharded "
            f"over the processes, docs/distributed.md), got {self.strategy!r}",
        )
        require(
            self.strategy != "fsdp" or self.precision in FSDP_PRECISIONS,
            "trainer.precision",
            f"trainer.strategy=fsdp takes one of {FSDP_PRECISIONS}, got {self.precision!r}",
        )
        require(self.devices >= 1 or self.devices == -1, "trainer.devices", "must be >= 1, or -1 for all devices")
        require(self.num_nodes >= 1, "trainer.num_nodes", "must be >= 1")

    @property
    def world_size(self) -> int | None:
        """Processes over all nodes, or None when ``devices`` = -1 (known only at launch)."""
        return self.devices * self.num_nodes if self.devices > 0 else None


@dataclass
class EvalCfg(SamplingCfg):
    """Benchmarks, samples and the cache budgets that eval.py sweeps; sampling as in :class:`SamplingCfg`.

    max_rows: sequences (problems x samples) decoded at once; a batch with more rows runs in row batches of at most
        this many, so the K/V held is bounded (0 = batch_size x n_samples).
    """

    benchmarks: list[str] = field(default_factory=lambda: ["math500"])
    paths: dict[str, str] = field(default_factory=dict)
    n_samples: int = 1
    k: list[int] = field(default_factory=lambda: [1])
    limit: int | None = None
    windows: list[int] = field(default_factory=list)
    policies: list[str] = field(default_factory=list)
    batch_size: int = 8
    max_rows: int = 0
    out_dir: str | None = None


@dataclass
class Config:
    """A whole run. objective: ``grpo`` (cache-aware GRPO, the paper) or ``sft`` (teacher-forced worked solutions
    through the same chunked replay under the method's cache; needs a source with solutions, e.g. ``carry``)."""

    seed: int = 0
    method: str = "pte"
    objective: str = "grpo"
    ckpt_path: str | None = None
    model: ModelCfg = field(default_factory=ModelCfg)
    cache: CacheCfg = field(default_factory=CacheCfg)
    thought: ThoughtCfg = field(default_factory=ThoughtCfg)
    lora: LoraCfg = field(default_factory=LoraCfg)
    data: DataCfg = field(default_factory=DataCfg)
    rollout: RolloutCfg = field(default_factory=RolloutCfg)
    replay: ReplayCfg = field(default_factory=ReplayCfg)
    grpo: GRPOCfg = field(default_factory=GRPOCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    reward: RewardCfg = field(default_factory=RewardCfg)
    trainer: TrainerCfg = field(default_factory=TrainerCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)

    def __post_init__(self) -> None:
        require(self.method in METHODS, "method", f"expected one of {METHODS}, got {self.method!r}")
        require(self.objective in OBJECTIVES, "objective", f"expected one of {OBJECTIVES}, got {self.objective!r}")
        if self.method != "pte":
            require(self.cache.policy != "pte", "cache.policy", f"method={self.method} has no thought encoder")
        if self.trainer.world_size:
            check_shards(self.rollout, self.trainer.world_size)
        require(
            not (self.cache.drawn and self.rollout.compile),
            "cache.train_windows",
            "drawn schedules change the cache's shape every step; rollout.compile needs fixed shapes",
        )
        require(
            self.trainer.strategy != "fsdp" or self.replay.max_chunk_tokens == 0,
            "replay.max_chunk_tokens",
            "must be 0 under trainer.strategy=fsdp: pieces of a chunk make the processes' forwards and backwards "
            "differ, and sharded ones must run in lock-step (bound the replay with replay.micro_batch and "
            "replay.checkpointing instead)",
        )

    @property
    def eval_policy(self) -> str:
        """The cache policy for evaluation: ``cache.policy`` or the method's own."""
        return self.cache.policy or METHOD_POLICY[self.method]


BASE_KEY = "base"  # top-level YAML key naming the file a config overlays, relative to the config's own directory


def load_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> DictConfig:
    """The YAML at ``path`` merged over the file its ``base:`` key names, recursively (nested bases are allowed).

    The base path is relative to the overlay's directory, so ``--config`` works from any working directory.

    Raises:
        ConfigError: naming ``base`` when the base file is missing or the chain of bases loops.
    """
    path = Path(path).resolve()
    if path in _chain:
        loop = " -> ".join(p.name for p in (*_chain, path))
        raise ConfigError(f"{BASE_KEY}: the chain of base files loops ({loop})")
    conf = OmegaConf.load(path)
    if not isinstance(conf, DictConfig):
        raise ConfigError(f"{path.name}: a config file must be a mapping of keys, not a list")
    parent = conf.pop(BASE_KEY, None)
    if parent is None:
        return conf
    base_path = path.parent / str(parent)
    if not base_path.is_file():
        raise ConfigError(f"{BASE_KEY}: {path.name} overlays {parent}, but {base_path} is not a file")
    return OmegaConf.merge(load_yaml(base_path, (*_chain, path)), conf)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, base: Any = None) -> Config:
    """Schema defaults <- YAML at ``path`` (over its ``base:`` files) <- ``base`` (e.g. a checkpoint's config) <-
    ``key=value`` overrides."""
    try:
        conf = OmegaConf.structured(Config)
        if path is not None:
            conf = OmegaConf.merge(conf, load_yaml(path))
        if base is not None:
            conf = OmegaConf.merge(conf, base)
        conf = OmegaConf.merge(conf, OmegaConf.from_dotlist(list(overrides or [])))
        return OmegaConf.to_object(conf)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"{key}: {err.msg if hasattr(err, 'msg') else err}".splitlines()[0]) from None


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def as_dict(cfg: Config) -> DictConfig:
    return OmegaConf.structured(cfg)
