"""Policy names across config and eval: ``global_only`` is a PTE-only ablation."""

from __future__ import annotations

import pytest

import eval as eval_cli
from pte.config import CacheCfg


def test_global_only_is_a_cache_policy():
    assert CacheCfg(policy="global_only").policy_for(10, "global_only").uses_thought


def test_global_only_rejected_without_a_pte_checkpoint(capsys):
    with pytest.raises(SystemExit) as exc:
        eval_cli.main(["model=tiny-qwen2", "policies=[global_only]"])
    assert exc.value.code == 2
    assert "config error: eval.policies:" in capsys.readouterr().err
