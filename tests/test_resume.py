"""No training is ever lost: train.py in subprocesses on the tiny config, stopped by SIGTERM, Ctrl-C (SIGINT) and
SIGKILL, then resumed; each resumed run must equal a straight run (weights and logged values). The runs use
tests/digit_train.py (train.py with a reward the tiny model earns), so every step really changes the weights."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pte.config import load_config

ROOT = Path(__file__).resolve().parent.parent
STEPS = 4
ENV = {
    **os.environ,
    "PYTHONPATH": str(ROOT),
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def args(out: Path, *overrides: str) -> list[str]:
    return ["--config", "configs/tiny.yaml", f"trainer.out_dir={out}", "trainer.run_name=run", *overrides]


def start(argv: list[str], **env: str) -> subprocess.Popen:
    """train.py in its own process group, like a job started from a shell."""
    cmd = [sys.executable, "tests/digit_train.py", *argv]
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**ENV, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, lines: list[str] | None = None) -> tuple[int, list[str], str]:
    out, err = proc.communicate(timeout=600)
    return proc.returncode, [*(lines or []), *out.splitlines()], err


def run(argv: list[str]) -> tuple[int, list[str], str]:
    return finish(start(argv))


def stop_after(proc: subprocess.Popen, step: int, signum: int) -> list[str]:
    """Read stdout until the line of ``step`` and send ``signum`` to the process group (as Ctrl-C in a terminal
    reaches the grader workers too); return the lines read."""
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if line.startswith(f"step {step}/"):
            os.killpg(proc.pid, signum)
            break
    return lines


def step_values(lines: list[str]) -> dict[int, str]:
    """Step -> its stdout line without the timing (the last line of a step wins, as after a resume)."""
    return {int(m.group(1)): m.group(2) for m in (re.match(r"step (\d+)/\d+ (.*) [\d.]+ s$", x) for x in lines) if m}


def weights(run_dir: Path, name: str = "last.ckpt") -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / name, weights_only=False)["state_dict"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and any(v.abs().sum() > 0 for v in a.values() if v.is_floating_point())
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the straight run"


def resume_from_report(err: str) -> list[str]:
    """The arguments of the ``resume with:`` command that train.py printed."""
    line = next(x for x in err.splitlines() if x.startswith("resume with: "))
    cmd = shlex.split(line.removeprefix("resume with: "))
    assert cmd[:2] == ["python", "train.py"]
    return cmd[2:]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_config_checkpoints_within_its_first_steps(path):
    t = load_config(path).trainer
    assert 0 < t.ckpt_every <= min(t.max_steps, 10) and t.keep_last >= 1


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> tuple[Path, dict[int, str]]:
    """An uninterrupted run of STEPS steps (stdout a pipe, so not a terminal)."""
    out = tmp_path_factory.mktemp("straight")
    rc, lines, err = run(args(out, f"trainer.max_steps={STEPS}"))
    assert rc == 0, err
    return out / "run", step_values(lines)


def test_non_terminal_stdout_gets_one_line_per_step(straight):
    _, steps = straight
    assert sorted(steps) == list(range(1, STEPS + 1))
    assert all(
        re.match(r"reward [\d.]+ accuracy [\d.]+ loss \S+ response_len [\d.]+ kv_held [\d.]+ \w?i?B/seq", v)
        for v in steps.values()
    )


def test_periodic_checkpoints_keep_the_last_few(straight):
    run_dir, _ = straight
    names = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
    assert names == ["last.ckpt", f"step-{STEPS - 1}.ckpt", f"step-{STEPS}.ckpt"]  # tiny: ckpt_every 1, keep_last 2
    assert not list((run_dir / "checkpoints").glob(".*tmp*")), "temporary files left behind"


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["sigterm", "sigint"])
def test_interrupt_saves_and_resume_equals_straight_run(tmp_path, straight, signum, code):
    """The signal reaches the process group in the middle of step 3 (after its prompts were taken and its samples
    drawn); ckpt_every=0, so the interrupt checkpoint is the only one. Resume repeats step 3."""
    ref_dir, ref_steps = straight
    argv = args(tmp_path, f"trainer.max_steps={STEPS}", "trainer.ckpt_every=0")
    rc, lines, err = finish(start(argv, PTE_TEST_SIGNAL=f"3:{signal.Signals(signum).name}"))
    assert rc == code, err
    ckpt = tmp_path / "run" / "checkpoints" / "interrupted.ckpt"
    assert f"checkpoint written: {ckpt} (step 2)" in err
    assert sorted(step_values(lines)) == [1, 2]
    config = (tmp_path / "run" / "config.yaml").read_bytes()

    rc, resumed_lines, err = run(resume_from_report(err))
    assert rc == 0, err
    assert_same_weights(weights(tmp_path / "run"), weights(ref_dir))
    assert step_values(lines) | step_values(resumed_lines) == ref_steps
    assert (tmp_path / "run" / "config.yaml").read_bytes() == config, "resume rewrote the run's config.yaml"
    assert (tmp_path / "run" / "config.resume-2.yaml").exists()


def test_sigterm_from_outside_exits_143_with_a_resumable_state(tmp_path, straight):
    """A SIGTERM sent by another process at an arbitrary moment after step 2 (the scheduler's case)."""
    ref_dir, ref_steps = straight
    argv = args(tmp_path, f"trainer.max_steps={STEPS}", "trainer.ckpt_every=0")
    proc = start(argv)
    rc, lines, err = finish(proc, stop_after(proc, 2, signal.SIGTERM))
    assert rc == 143, err
    saved = torch.load(tmp_path / "run" / "checkpoints" / "interrupted.ckpt", weights_only=False)["global_step"]
    rc, resumed_lines, err = run(resume_from_report(err))
    assert rc == 0, err
    assert_same_weights(weights(tmp_path / "run"), weights(ref_dir))
    assert {s: v for s, v in step_values(lines).items() if s <= saved} | step_values(resumed_lines) == ref_steps


def test_sigkill_after_first_checkpoint_resumes_exactly(tmp_path, straight):
    ref_dir, ref_steps = straight
    argv = args(tmp_path, f"trainer.max_steps={STEPS}")
    proc = start(argv)
    lines = stop_after(proc, 2, signal.SIGKILL)  # step 1's checkpoint is written before step 2 starts
    rc, lines, _ = finish(proc, lines)
    assert rc == -signal.SIGKILL
    rc, resumed_lines, err = run([*argv, "ckpt_path=last"])
    assert rc == 0, err
    resumed_at = int(re.search(r"resuming from \S+ at step (\d+)", err).group(1))
    assert resumed_at >= 1
    assert_same_weights(weights(tmp_path / "run"), weights(ref_dir))
    logged = {s: v for s, v in step_values(lines).items() if s <= resumed_at} | step_values(resumed_lines)
    assert logged == ref_steps


def test_failing_resume_leaves_the_checkpoints_byte_identical(tmp_path, straight):
    run_dir = tmp_path / "run"
    shutil.copytree(straight[0], run_dir)
    before = {p.name: p.read_bytes() for p in (run_dir / "checkpoints").iterdir()}
    bad = ["data.source=file", f"data.path={tmp_path / 'typo.jsonl'}", f"trainer.max_steps={STEPS + 2}"]
    rc, _, err = run(args(tmp_path, *bad, "ckpt_path=last"))
    assert rc != 0
    assert {p.name: p.read_bytes() for p in (run_dir / "checkpoints").iterdir()} == before
    assert "holds all training so far" in err


def test_reused_run_name_is_refused_in_one_line(tmp_path, straight):
    shutil.copytree(straight[0], tmp_path / "run")
    rc, _, err = run(args(tmp_path, "trainer.max_steps=1"))
    assert rc == 2
    assert err.strip().splitlines()[-1].startswith("error: trainer.run_name: ")
    assert "Traceback" not in err
