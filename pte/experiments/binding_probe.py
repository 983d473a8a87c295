"""What one evicted token tells the thought state: ``python -m pte.experiments.binding_probe``.

The state sums one term per evicted token (``thought.evicted_context: token``), each built from that token's own K and
V, with no cross-token terms. To recall several marked values by their marks, the term of a marked letter must hold
both which letter it is and which mark (``#``, ``$``, ``%``) it belongs to. This fits linear probes (ridge regression
on one-hot targets, 70 % of the letters to fit, 30 % to score) on the base model's pre-rotary K and V of every marked
letter in worked solutions of the carry family, per layer, and on the same rows beside their predecessor's
(``evicted_context: pair``, where the predecessor is the mark's symbol). Prints held-out probe accuracy per row kind.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np
import torch

from pte.models.load import load_model_and_tokenizer
from pte.models.toy import carry_prompt
from pte.training.carry import CODES, MARKS, carry_problems


def letter_rows(model, tok, problems) -> tuple[dict[str, list[np.ndarray]], list[int], list[int]]:
    """Per ``"<layer> <k|v>"``: the pre-rotary K or V row of each marked letter in the solutions (and ``... pair``: the
    row beside its predecessor's); the letters' mark indices and values."""
    captured: dict[tuple[int, str], torch.Tensor] = {}
    hooks = [
        getattr(layer.self_attn, f"{kind}_proj").register_forward_hook(
            lambda _m, _i, out, key=(i, kind): captured.__setitem__(key, out[0].detach())
        )
        for i, layer in enumerate(model.model.layers)
        for kind in "kv"
    ]
    rows: dict[str, list[np.ndarray]] = defaultdict(list)
    marks, letters = [], []
    try:
        for p in problems:
            prompt = carry_prompt(tok, p.question)
            ids = tok(prompt + p.solution, return_tensors="pt").input_ids
            with torch.no_grad():
                model(ids)
            chars = tok.convert_ids_to_tokens(ids[0])
            start, end = len(tok(prompt).input_ids), len(chars) - len(p.solution) + p.solution.index(" ans ")
            for t in range(start, end - 1):  # marks in the chain, not the recalls on the answer line
                if chars[t] in MARKS and chars[t + 1] in CODES:
                    marks.append(MARKS.index(chars[t]))
                    letters.append(CODES.index(chars[t + 1]))
                    for (layer, kind), out in captured.items():  # pre-rotary: k_proj's output, before RoPE
                        rows[f"{layer} {kind}"].append(out[t + 1].numpy())
                        rows[f"{layer} {kind} pair"].append(torch.cat([out[t + 1], out[t]]).numpy())
    finally:
        for h in hooks:
            h.remove()
    return rows, marks, letters


def probe_accuracy(x: np.ndarray, y: np.ndarray, classes: int, fit: np.ndarray, ridge: float = 1e-2) -> float:
    """Held-out accuracy of a ridge-regression probe from rows ``x [n, d]`` to labels ``y [n]``, fit on ``fit``."""
    x = np.c_[x, np.ones(len(x))]
    target = np.eye(classes)[y]
    w = np.linalg.solve(x[fit].T @ x[fit] + ridge * np.eye(x.shape[1]), x[fit].T @ target[fit])
    return float((np.argmax(x[~fit] @ w, axis=1) == y[~fit]).mean())


def main(argv: list[str] | None = None) -> dict[str, tuple[float, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy-carry", help="model name (pte.load_model_and_tokenizer)")
    parser.add_argument("--problems", type=int, default=1500, help="carry problems with 2-3 marks, 6-20 steps")
    parser.add_argument("--seed", type=int, default=777, help="seed of the problems")
    args = parser.parse_args(argv)
    model, tok = load_model_and_tokenizer(args.model)
    model.eval()
    problems = carry_problems(args.problems, args.seed, steps=(6, 20), carry=(2, 3))
    rows, marks, letters = letter_rows(model, tok, problems)
    y_mark, y_letter = np.array(marks), np.array(letters)
    fit = np.arange(len(marks)) < int(0.7 * len(marks))
    majority = np.bincount(y_mark[~fit]).max() / (~fit).sum()
    print(f"{len(marks)} marked letters; majority mark {100 * majority:.0f} %, letter chance 10 %")
    print("| layer | row | mark % | letter % |\n|---|---|---|---|")
    out = {}
    for key, x in rows.items():
        x = np.stack(x)
        out[key] = (probe_accuracy(x, y_mark, len(MARKS), fit), probe_accuracy(x, y_letter, len(CODES), fit))
        layer, kind = key.split(" ", 1)
        print(f"| {layer} | {kind} | {100 * out[key][0]:.0f} | {100 * out[key][1]:.0f} |")
    return out


if __name__ == "__main__":
    main()
