"""The CLI and the package's import surface: one-line errors, verbs that say what they are for, lazy
subpackages, and no process-wide side effects from importing or drawing."""
import subprocess
import sys

import pytest

import blockattn
from blockattn.cli import build_parser, main


def test_subpackages_load_lazily_after_import_blockattn():
    assert blockattn.linear.__name__ == "blockattn.linear"
    assert blockattn.modules.__name__ == "blockattn.modules"
    with pytest.raises(AttributeError, match="no_such"):
        blockattn.no_such


def test_eval_and_compare_say_what_each_is_for():
    helps = {action.dest: action.help for action in build_parser()._subparsers._group_actions[0]._choices_actions}
    assert "end-to-end" in helps["eval"] and "compare" in helps["eval"]
    assert "layer-level" in helps["compare"] and "eval" in helps["compare"]


def test_a_bad_value_is_one_line_not_a_traceback(capsys):
    assert main(["show", "causal", "q_len=0", "-o", "unused.png"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("blockattn show: error: ") and "q_len" in err and len(err.splitlines()) == 1


def test_importing_and_drawing_change_no_process_state(tmp_path):
    script = f"""
import os, sys, matplotlib
env, backend = dict(os.environ), matplotlib.rcParams._get_backend_or_none()
import blockattn, blockattn.plots
from blockattn.methods import get
import torch
layout = get("xattention", block_size=32).select(torch.randn(1, 2, 128, 16), torch.randn(1, 2, 128, 16))
layout.show(r"{tmp_path / 'layout.png'}")
blockattn.plots.plot_layout(layout, r"{tmp_path / 'tokens.png'}", token_masks=True)
assert matplotlib.rcParams._get_backend_or_none() == backend, matplotlib.rcParams._get_backend_or_none()
assert "matplotlib.pyplot" not in sys.modules
assert dict(os.environ) == env
import torch.backends.mkldnn as mkldnn
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
    assert (tmp_path / "layout.png").stat().st_size > 100 and (tmp_path / "tokens.png").stat().st_size > 100
