"""Training callbacks: periodic held-out evaluation and memory curves, read back from TensorBoard event files."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from pte.config import load_config
from pte.evaluation.plots import figure_array, memory_phases
from pte.training.callbacks import EvalCallback, MemoryCurveCallback, build_callbacks, eval_line
from pte.training.progress import StepProgressBar, step_line

TINY = str(Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml")


def test_build_callbacks_evaluates_only_when_enabled():
    (memory,) = build_callbacks(load_config(TINY, ["trainer.val_every=0"]), None)
    assert isinstance(memory, MemoryCurveCallback) and memory.plot_every == 0
    callbacks = build_callbacks(load_config(TINY, ["trainer.val_every=3", "trainer.val_limit=2"]), None)
    assert [type(c) for c in callbacks] == [EvalCallback, MemoryCurveCallback]
    assert (callbacks[0].every, callbacks[0].limit, callbacks[1].plot_every) == (3, 2, 3)


def test_step_line_names_each_quantity_with_its_unit():
    metrics = {
        "train/reward_mean": 0.25,
        "train/accuracy": 0.5,
        "train/loss": 0.0123,
        "train/response_length": 23.5,
        "train/kv_bytes_held_per_seq": 3 * 1024**2,
    }
    line = step_line(3, 8, metrics, 1.234)
    assert line == "step 3/8 reward 0.250 accuracy 0.500 loss 0.0123 response_len 23.5 kv_held 3.0 MiB/seq 1.23 s"
    assert step_line(1, 2, {"train/loss": 1.5}, 0.5) == "step 1/2 loss 1.5 0.50 s"  # objective=sft: no reward


def test_eval_line_shows_accuracy_and_kv_held():
    metrics = {"val/accuracy": 0.64, "val/kv_bytes_held_per_seq": 12.3 * 1024, "val/response_length": 40.0}
    assert eval_line(25, metrics) == "step 25: val/accuracy 0.640, kv held 12.3 KiB/seq"
    assert eval_line(5, {"val/accuracy": 1.0}) == "step 5: val/accuracy 1.000"  # no KV record: no KV part


def test_figure_array_is_rgb():
    image = figure_array(memory_phases({"rollout": [(1, 2.0**20), (2, 3 * 2.0**20)]}))
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.min() < 128 < image.max()  # something was drawn on the white background


def test_training_logs_validation_and_memory_curves(tmp_path, caplog):
    """Two steps with val_every=2: memory scalars every step, evaluation and plots at step 2 only, and the
    evaluation's accuracy on the console."""
    caplog.set_level(logging.INFO, logger="pte.training.callbacks")
    train.main(
        [
            "--config",
            TINY,
            f"trainer.out_dir={tmp_path}",
            "trainer.max_steps=2",
            "trainer.val_every=2",
            "trainer.val_limit=2",
            "rollout.max_new_tokens=6",
            "data.size=12",
        ]
    )
    events = EventAccumulator(str(tmp_path / "tiny" / "tb"), size_guidance={"scalars": 0, "images": 0}).Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}

    accuracy = scalars["val/accuracy"]
    assert [step for step, _ in accuracy] == [2] and 0.0 <= accuracy[0][1] <= 1.0
    messages = [r.getMessage() for r in caplog.records if r.name == "pte.training.callbacks"]
    printed = [m for m in messages if "val/accuracy" in m]
    assert len(printed) == 1 and re.fullmatch(r"step 2: val/accuracy \d\.\d{3}, kv held [\d.]+ (B|KiB)/seq", printed[0])
    assert f"val/accuracy {accuracy[0][1]:.3f}" in printed[0]
    assert 0 < scalars["val/response_length"][0][1] <= 6
    assert scalars["val/gold_errors"] == [(2, 0.0)]
    assert scalars["val/kv_bytes_peak_per_seq"][0][1] >= scalars["val/kv_bytes_held_per_seq"][0][1] > 0
    assert [step for step, _ in scalars["train/reward_mean"]] == [1, 2]  # one step axis for train/, val/, memory/
    # CPU: one curve, the process's resident-set peak (per-phase figures would all be that same curve)
    assert [tag for tag in scalars if tag.startswith("memory/")] == ["memory/peak_rss_process_mib"]
    steps, values = zip(*scalars["memory/peak_rss_process_mib"])
    assert steps == (1, 2) and min(values) > 0
    assert not any(re.search(r"kv_bytes_(held|peak)$", tag) for tag in scalars), "a kv_bytes name without its unit"
    for tag in ("memory/kv_curve", "memory/phases"):
        images = events.Images(tag)
        assert [i.step for i in images] == [2] and images[0].width > 100 and images[0].height > 100, tag


def test_progress_bar_counts_optimiser_steps_from_the_resumed_step():
    """After a resume at step 3 of 8 the bar reads 3/8, then 4/8 (not batches of an endless epoch, not 30/19)."""
    bar = StepProgressBar()
    trainer = SimpleNamespace(
        global_step=3, max_steps=8, current_epoch=0, max_epochs=-1, num_training_batches=float("inf")
    )
    bar._trainer = trainer
    bar._train_progress_bar = bar.init_train_tqdm()
    bar.on_train_epoch_start(trainer)
    assert (bar.train_progress_bar.n, bar.train_progress_bar.total) == (3, 8)
    trainer.global_step = 4
    bar.get_metrics = lambda *_: {}
    bar.on_train_batch_end(trainer, None, None, None, 0)
    assert bar.train_progress_bar.n == 4 and "step" in str(bar.train_progress_bar)
    bar.train_progress_bar.close()
