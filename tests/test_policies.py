"""Policy names across config and eval: ``global_only`` is a PTE-only ablation."""

from __future__ import annotations

import json

import pytest

import eval as eval_cli
from pte.config import CacheCfg
from tests.test_eval import FAST, _export


def test_global_only_is_a_cache_policy():
    assert CacheCfg(policy="global_only").policy_for(10, "global_only").uses_thought


def test_global_only_rejected_without_a_pte_checkpoint(capsys):
    with pytest.raises(SystemExit) as exc:
        eval_cli.main(["model=tiny-qwen2", "policies=[global_only]"])
    assert exc.value.code == 2
    assert "config error: eval.policies:" in capsys.readouterr().err


def test_eval_sweeps_global_only_on_a_pte_checkpoint(tmp_path):
    adapter = _export(tmp_path, "pte")
    out = tmp_path / "eval"
    args = [f"ckpt={adapter}", "policies=[global_only,window]", "windows=[4]", "limit=1", f"eval.out_dir={out}", *FAST]
    eval_cli.main(args)
    rows = json.loads((out / "results.json").read_text())["settings"]
    assert {r["policy"] for r in rows} == {"global_only", "window"}
