"""Prompt formatting for the policy (docs/method.md section 4): chat, DeepSeek-R1-Distill and plain templates.

Few-shot examples matter for small models: SmolLM2-135M-Instruct writes ``\\boxed{}`` in 0-6 % of answers zero-shot
and in 56-94 % after one worked example, so the default data config shows one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from transformers import PreTrainedTokenizerBase

from pte.config import ConfigError, DataCfg

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
DEFAULT_FEW_SHOT: tuple[dict[str, str], ...] = (
    {
        "question": "Calculate 14 + 3 * 5.",
        "answer": "Multiplication comes first: 3 * 5 = 15. Then 14 + 15 = 29.\nThe final answer is \\boxed{29}.",
    },
)
TEMPLATES = ("chat", "r1", "plain")
R1_BOS = "<｜begin▁of▁sentence｜>"
R1_EOS = "<｜end▁of▁sentence｜>"
R1_USER = "<｜User｜>"
R1_ASSISTANT = "<｜Assistant｜>"


def _few_shot_pairs(few_shot: Sequence[Mapping[str, str]] | None) -> list[tuple[str, str]]:
    """Check few-shot examples: each needs non-empty ``question`` and ``answer`` strings."""
    pairs = []
    for i, shot in enumerate(few_shot or ()):
        if not isinstance(shot, Mapping) or not all(
            isinstance(shot.get(k), str) and shot[k] for k in ("question", "answer")
        ):
            raise ConfigError(f"data.few_shot[{i}]: needs non-empty 'question' and 'answer' strings, got {shot!r}")
        pairs.append((shot["question"], shot["answer"]))
    return pairs


def format_prompt(
    tokenizer: PreTrainedTokenizerBase | None,
    question: str,
    template: str = "chat",
    system: str | None = None,
    few_shot: Sequence[Mapping[str, str]] | None = None,
    instruction: str = DEFAULT_INSTRUCTION,
) -> str:
    """Render a question as the text the policy continues (ending where its answer starts).

    Args:
        tokenizer: Its chat template serves ``chat``; ``r1`` and ``plain`` ignore it (None is fine).
        question: The bare question.
        template: ``chat``, ``r1`` (DeepSeek-R1-Distill, opens ``<think>``) or ``plain`` (base models).
        system: Optional system message; ``r1`` and ``plain`` put it first as raw text.
        few_shot: Worked ``question`` / ``answer`` dicts, shown as earlier turns.
        instruction: Appended on a new line to every question, few-shot ones included; empty for none.
    """
    if template not in TEMPLATES:
        raise ConfigError(f"data.template: unknown template {template!r}; expected one of {', '.join(TEMPLATES)}")

    def ask(text: str) -> str:
        return f"{text}\n{instruction}" if instruction else text

    turns = [(ask(q), a) for q, a in _few_shot_pairs(few_shot)]
    if template == "r1":
        # The R1-Distill template keeps only what follows </think> in earlier assistant turns.
        shots = "".join(f"{R1_USER}{q}{R1_ASSISTANT}{a.split('</think>')[-1]}{R1_EOS}" for q, a in turns)
        return f"{R1_BOS}{system or ''}{shots}{R1_USER}{ask(question)}{R1_ASSISTANT}<think>\n"
    if template == "plain":
        head = f"{system}\n\n" if system else ""
        shots = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in turns)
        return f"{head}{shots}Question: {ask(question)}\nAnswer:"
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ConfigError("data.template: 'chat' needs a tokenizer with a chat template; use 'plain' for base models")
    messages = [{"role": "system", "content": system}] if system else []
    for q, a in turns:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": ask(question)})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def few_shot_examples(data: DataCfg) -> list[dict[str, str]]:
    """The run's worked examples: ``data.few_shot``, else the built-in one when ``data.default_few_shot``."""
    return list(data.few_shot) or (list(DEFAULT_FEW_SHOT) if data.default_few_shot else [])


def config_prompt(tokenizer: PreTrainedTokenizerBase | None, data: DataCfg, question: str) -> str:
    """A question formatted exactly as a run with ``data`` formats its training prompts."""
    return format_prompt(tokenizer, question, data.template, data.system, few_shot_examples(data), data.instruction)
