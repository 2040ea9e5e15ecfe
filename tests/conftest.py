import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))  # tests may import the scripts; the scripts never import each other (but train -> generate)

# One persistent JAX compile cache for the whole test session, shared with subprocesses:
# the synths take seconds to compile and many tests build the same one.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(os.environ.get("TMPDIR", "/tmp")) / "doppelgangers-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("OMP_NUM_THREADS", "2")


def run(*args, check=True, timeout=600, **kw):
    """Run a project script as a user would; returns the CompletedProcess."""
    p = subprocess.run([sys.executable, *map(str, args)], cwd=kw.pop("cwd", ROOT), capture_output=True, text=True,
                       timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def assert_one_line_error(p):
    """Bad input: exit code 2 and exactly one line on stderr."""
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, p.stderr
    return lines[0]


@pytest.fixture(scope="session")
def data_dir():
    assert DATA.is_dir(), f"real audio missing at {DATA}"
    return DATA


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A briefly pretrained encoder from the real train.py (voice, delta 0.25): 18 steps of 8 pairs."""
    out = tmp_path_factory.mktemp("runs") / "voice_d0.25"
    run(ROOT / "train.py", "--synth", "voice", "--delta", "0.25", "--batch-size", "8", "--epochs", "1",
        "--sounds-per-epoch", "160", "--log-every", "6", "--out", out)
    return out


@pytest.fixture(scope="session")
def random_run(tmp_path_factory):
    """The paper's "Random Init." baseline: train.py --epochs 0."""
    out = tmp_path_factory.mktemp("runs") / "random"
    run(ROOT / "train.py", "--epochs", "0", "--out", out)
    return out
