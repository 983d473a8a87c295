"""How long the thought state remembers an evicted token: ``python -m pte.experiments.state_memory``.

A recall on the carry task reads a marked letter that left the window tens of tokens earlier, through every
eviction since. Each eviction adds its increment and renormalises (``S <- N(S + S')``), so the letter's term shrinks
by the size of every later increment relative to the state. Until the encoder learns to keep it, the recall's
gradient reaches the letter's term, and the W^a that would select it, through that shrinkage: SFT sits near chance
while the memory lengthens (docs/results.md, "Why SFT sat on the recall plateau").

On teacher-forced worked solutions of the carry task under one fixed window (``cache.window``, ``cache.evict_ratio``),
for a freshly initialised adapter or a trained one (``--ckpt``), per layer:

- move: ``||S_new - S_old|| / ||S_old||`` at each eviction after a row's first (median);
- memory: ``||S(x) - S(x')|| / ||S(x)||`` where ``x'`` differs from the worked solution ``x`` only in the first
  marked letter, by distance from that letter in tokens (10-token bands, mean) and at the token that recalls it.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from pte.config import Config, load_config
from pte.engine.encoder import get_thought
from pte.engine.replay import replay
from pte.models.toy import carry_prompt
from pte.training.carry import CODES, carry_problems
from pte.training.methods import build_model, calibrate_thought, load_trained
from pte.training.sft import teacher_forced

# A replay chunk: response tokens [start, stop) and the per-layer states [B, G, r] they read.
Chunk = tuple[int, int, list[torch.Tensor]]


def chunk_states(
    model: torch.nn.Module, tok: PreTrainedTokenizerBase, cfg: Config, questions, solutions
) -> list[Chunk]:
    """Replay the worked solutions under ``cache.window`` and keep the states each chunk reads."""
    ro = teacher_forced(tok, [carry_prompt(tok, q) for q in questions], solutions, cfg, "pte", "cpu")
    states = get_thought(model).store
    with torch.no_grad():
        return [(c.start, c.stop, [s.clone() for s in states.states]) for c in replay(model, ro)]


def read_at(chunks: list[Chunk], t: int) -> list[torch.Tensor]:
    """The per-layer states the token at response index ``t`` is predicted from."""
    return next(s for start, stop, s in chunks if start <= t < stop)


def moves(chunks: list[Chunk]) -> list[float]:
    """Per layer, the median relative change of a row's state at each of its evictions after its first."""
    out = []
    for layer in range(len(chunks[0][2])):
        seq = torch.stack([s[layer].flatten(1) for _, _, s in chunks])  # [chunks, B, G*r]
        step = (seq[1:] - seq[:-1]).norm(dim=-1) / seq[:-1].norm(dim=-1)  # [chunks - 1, B]
        later = [col[col > 0][1:] for col in step.T]  # a row that did not evict keeps its state exactly
        out.append(float(torch.cat(later).median()))
    return out


def token_index(tok: PreTrainedTokenizerBase, text: str, char: int) -> int:
    """Response index of the token that starts at character ``char`` of ``text``."""
    return len(tok(text[:char], add_special_tokens=False)["input_ids"])


def measure(model: torch.nn.Module, tok: PreTrainedTokenizerBase, cfg: Config, problems: int, seed: int) -> dict:
    """Moves per layer and the memory of the first marked letter by distance band and at its recall."""
    probs = carry_problems(problems, seed, steps=cfg.data.carry_steps, carry=cfg.data.carry_values)
    rng = np.random.default_rng(seed)
    questions, solutions, swapped, marks, recalls = [], [], [], [], []
    for p in probs:
        s = p.solution
        at = s.index("#") + 1  # the first mark's letter in the chain
        other = CODES[(CODES.index(s[at]) + 1 + int(rng.integers(len(CODES) - 1))) % len(CODES)]
        questions.append(p.question)
        solutions.append(s)
        swapped.append(s[:at] + other + s[at + 1 :])
        marks.append(token_index(tok, s, at))
        recalls.append(token_index(tok, s, s.index("#", s.index(" ans ")) + 1))
    model.eval()
    real = chunk_states(model, tok, cfg, questions, solutions)
    other = chunk_states(model, tok, cfg, questions, swapped)

    def change(row: int, t: int) -> list[float]:
        return [float((a[row] - b[row]).norm() / a[row].norm()) for a, b in zip(read_at(real, t), read_at(other, t))]

    bands: dict[int, list[list[float]]] = {}
    for row, (mark, recall) in enumerate(zip(marks, recalls)):
        for t in range(mark + 1, recall + 1):
            bands.setdefault((t - mark) // 10 * 10, []).append(change(row, t))
    return {
        "moves": moves(real),
        "memory": {band: np.mean(v, axis=0).tolist() for band, v in sorted(bands.items())},
        "recall": np.mean([change(row, t) for row, t in enumerate(recalls)], axis=0).tolist(),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.yaml", help="run config (ignored with --ckpt)")
    parser.add_argument("--ckpt", default=None, help="a trained adapter or Lightning checkpoint (default: at init)")
    parser.add_argument("--problems", type=int, default=200, help="worked solutions of the config's carry task")
    parser.add_argument("--seed", type=int, default=4242, help="seed of the problems and of the swapped letters")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. thought.init_std=0.1")
    args = parser.parse_args(argv)
    if args.ckpt:
        model, tok, cfg = load_trained(args.ckpt, args.overrides)
    else:
        cfg = load_config(args.config, args.overrides)
        model, tok = build_model(cfg)
        if cfg.thought.init_move is not None:  # as training does for a fresh adapter, on other problems
            extra = carry_problems(8, args.seed + 1, steps=cfg.data.carry_steps, carry=cfg.data.carry_values)
            calibrate_thought(
                model, tok, cfg, [carry_prompt(tok, p.question) for p in extra], [p.solution for p in extra]
            )
    out = measure(model, tok, cfg, args.problems, args.seed)
    layers = range(len(out["moves"]))
    t = cfg.thought
    print(f"W={cfg.cache.window}, evict ratio {cfg.cache.evict_ratio}, init_std {t.init_std}, init_move {t.init_move}")
    print("| | " + " | ".join(f"layer {i}" for i in layers) + " |\n|---|" + "---|" * len(layers))
    print("| move per eviction % | " + " | ".join(f"{100 * v:.1f}" for v in out["moves"]) + " |")
    for band, v in out["memory"].items():
        print(f"| memory {band}-{band + 9} tokens after % | " + " | ".join(f"{100 * x:.2f}" for x in v) + " |")
    print("| memory at the recall % | " + " | ".join(f"{100 * x:.2f}" for x in out["recall"]) + " |")
    return out


if __name__ == "__main__":
    main()
