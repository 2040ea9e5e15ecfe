"""One error policy in all four scripts: argparse's refusals (an unknown flag, a bad value, a missing required
flag) are one line on stderr with the script's name and exit 2, like every other bad input; probe.py, imported
as a HEAR module, does not import what only its command line and downloads use."""
import ast

import pytest

from conftest import ROOT, assert_one_line_error, run_here

CASES = [
    ("generate.py", ["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ("generate.py", ["--pairs", "many"], "argument --pairs: invalid int value: 'many'"),
    ("train.py", ["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ("train.py", ["--amp", "maybe"], "argument --amp: invalid choice: 'maybe'"),
    ("probe.py", ["--task", "csv", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ("probe.py", [], "the following arguments are required: --task"),
    ("analyze.py", [], "the following arguments are required: cmd"),
    ("analyze.py", ["invariance", "--out", "x"], "the following arguments are required: --factors, --encoder"),
    ("analyze.py", ["pairs", "--pairs", "x", "--out", "y", "--batch-size", "0"],
     "argument --batch-size: '0' is not a finite number in [1, inf)"),
]


@pytest.mark.parametrize("script,args,needle", CASES, ids=[f"{s} {' '.join(a)}" for s, a, _ in CASES])
def test_a_bad_flag_is_one_line_and_exit_2(script, args, needle):
    line = assert_one_line_error(run_here(ROOT / script, *args))
    assert line.startswith(f"{script}: error: ") and needle in line, line


def test_probe_imports_no_download_or_cli_module_at_the_top():
    tree = ast.parse((ROOT / "probe.py").read_text())
    top = {a.name.split(".")[0] for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))
           for a in (n.names if isinstance(n, ast.Import) else [ast.alias(n.module or "")])}
    # argparse is imported at the top: the shared number() helper, an argparse type, needs it
    assert not top & {"urllib", "zipfile", "tqdm", "tempfile", "shutil"}, top
    assert {"torch", "numpy", "soundfile"} <= top  # the check reads the real import list
