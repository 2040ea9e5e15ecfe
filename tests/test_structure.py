"""The design card's shape: each script in three fenced parts (the paper, beyond the paper, plumbing), the helpers
several scripts need in one shared block with the same text in each, and an import that changes nothing."""
import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["generate.py", "train.py", "probe.py", "analyze.py"]
FENCES = ["# === 1. the paper ===", "# === 2. beyond the paper ===", "# === 3. plumbing ==="]
OPEN, CLOSE = "# --- shared helpers: the same in every script that has them ---", "# --- end of shared helpers ---"
PART1_MAX = {"train.py": 260, "generate.py": 140, "probe.py": 160, "analyze.py": 300}
# names that each script defines for itself on purpose (its own command line and entry point)
OWN = {"main", "parse_args", "check_args", "build_parser", "benchmark", "run", "embed", "read_results"}


def lines(script):
    return (ROOT / script).read_text().splitlines()


def shared_block(script):
    text = lines(script)
    start, end = text.index(OPEN), text.index(CLOSE)
    return "\n".join(text[start + 1:end])


def top_level(source):
    """name -> source text of every top-level def and class."""
    tree = ast.parse(source)
    return {n.name: ast.get_source_segment(source, n) for n in tree.body
            if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


@pytest.mark.parametrize("script", SCRIPTS)
def test_three_parts_in_order(script):
    text = lines(script)
    at = [text.index(f) for f in FENCES]  # each exactly once, in order
    assert all(text.count(f) == 1 for f in FENCES) and at == sorted(at), at
    tree = ast.parse("\n".join(text))
    body = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    imports_after = [n.lineno for n in body if isinstance(n, (ast.Import, ast.ImportFrom)) and n.lineno > at[0] + 1]
    assert not imports_after, f"{script}: top-level imports after part 1 opens, lines {imports_after}"
    main_guard = [n.lineno for n in body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
    assert len(main_guard) == 1 and main_guard[0] > at[2], "if __name__ == '__main__' ends part 3"
    assert at[1] - at[0] <= PART1_MAX[script], f"{script}: part 1 has {at[1] - at[0]} lines"
    start, end = text.index(OPEN), text.index(CLOSE)
    assert at[2] < start < end < main_guard[0], "the shared block sits in part 3"


def test_shared_helpers_have_one_text():
    blocks = {s: top_level(shared_block(s)) for s in SCRIPTS}
    everywhere = {s: top_level((ROOT / s).read_text()) for s in SCRIPTS}
    names = {n for d in everywhere.values() for n in d}
    for name in sorted(names - OWN):
        having = [s for s in SCRIPTS if name in everywhere[s]]
        if len(having) < 2:
            continue
        outside = [s for s in having if name not in blocks[s]]
        assert not outside, f"{name} is defined in {', '.join(having)} but outside the shared block in {outside}"
        texts = {blocks[s][name] for s in having}
        assert len(texts) == 1, f"the copies of {name} in {', '.join(having)} differ"
    # a block holds shared helpers only: each of its helpers is needed by the script that holds it
    for s in SCRIPTS:
        src = (ROOT / s).read_text()
        for name in blocks[s]:
            assert len(re.findall(rf"\b{name}\b", src)) > 1, f"{s}: shared helper {name} is never used"


def test_import_changes_nothing():
    """Importing any script leaves the environment, signal handlers, synthax and the process as they were."""
    code = r"""
import os, signal, sys, json
sys.path.insert(0, sys.argv[1])
# the libraries first: what they set when imported (torch, JAX) is theirs, not the scripts'
import jax, matplotlib, numpy, sklearn.metrics, soundfile, torch, torchaudio, torchvision, tqdm
backend = matplotlib.get_backend()
env, handlers = dict(os.environ), {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
import synthax.modules.mixers, synthax.synth
before = (synthax.modules.mixers.normalize_if_clipping, synthax.synth.Noise)
out = sys.stdout
for name in ["generate", "train", "probe", "analyze"]:
    __import__(name)
after = (synthax.modules.mixers.normalize_if_clipping, synthax.synth.Noise)
import matplotlib
changed = sorted(set(env.items()) ^ set(os.environ.items()))
print(json.dumps(dict(env=[k for k, _ in changed], synthax=before != after, backend=matplotlib.get_backend() != backend, stdout=sys.stdout is not out,
      signals=[str(s) for s, h in handlers.items() if signal.getsignal(s) is not h])))
"""
    p = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    import json
    assert json.loads(p.stdout.strip().splitlines()[-1]) == dict(env=[], synthax=False, backend=False, stdout=False, signals=[])


@pytest.mark.parametrize("script", SCRIPTS)
def test_no_module_level_run_state(script):
    """Run state lives in objects that main() owns: no function mutates a module-level list, dict or set, and none
    declares a global."""
    source = (ROOT / script).read_text()
    tree = ast.parse(source)
    module_names = {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    mutators = {"append", "extend", "update", "clear", "pop", "add", "insert", "remove", "setdefault", "popitem"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):
            pytest.fail(f"{script}: global {', '.join(node.names)}")
    for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
        local = {a.arg for a in fn.args.args + fn.args.kwonlyargs} | {
            t.id for n in ast.walk(fn) if isinstance(n, (ast.Assign, ast.For, ast.With, ast.comprehension))
            for t in ast.walk(n.target if hasattr(n, "target") else ast.Tuple(elts=getattr(n, "targets", []) or
                                                                              [i.optional_vars for i in getattr(n, "items", []) if i.optional_vars]))
            if isinstance(t, ast.Name)}
        for call in [n for n in ast.walk(fn) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)]:
            target = call.func.value
            if isinstance(target, ast.Name) and target.id in module_names - local and call.func.attr in mutators:
                pytest.fail(f"{script}: {fn.name} mutates module-level {target.id} ({call.func.attr})")


def test_no_old_flag_aliases():
    """The project's own earlier flag names are gone; the paper's and Wang & Isola's names stay."""
    src = (ROOT / "train.py").read_text()
    for old in ['"--alpha"', '"--t"', '"--lam-align"', '"--lam-unif"']:
        assert old not in src


def test_the_four_scripts_stay_within_their_line_budget():
    """People copy one script into their own code: a feature or guard that adds lines pays for them elsewhere."""
    total = sum(len(lines(s)) for s in SCRIPTS)
    assert total <= 3389, f"the four scripts have {total} lines, over the 3,389-line budget"
