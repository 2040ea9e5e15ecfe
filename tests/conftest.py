import contextlib
import io
import os
import runpy
import signal
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))  # tests may import the scripts; the scripts never import each other (but train -> generate)

# One persistent JAX compile cache for the whole test session, shared with subprocesses:
# the synths take seconds to compile and many tests build the same one.
# Each pytest-xdist worker has its own: JAX writes cache entries in place, and a reader racing a writer
# would print a warning into a test's one-line stderr.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(os.environ.get("TMPDIR", "/tmp")) /
                                                      f"doppelgangers-jax-cache{os.environ.get('PYTEST_XDIST_WORKER', '')}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("OMP_NUM_THREADS", "2")
# Two test workers share the cores: threads that spin while they wait would slow both several-fold.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# A suite started in the background by a non-interactive shell inherits SIGINT ignored, and would pass
# that on to every script it runs: the Ctrl-C tests need the scripts to see SIGINT.
signal.signal(signal.SIGINT, signal.default_int_handler)


def run(*args, check=True, timeout=600, **kw):
    """Run a project script as a user would; returns the CompletedProcess."""
    p = subprocess.run([sys.executable, *map(str, args)], cwd=kw.pop("cwd", ROOT), capture_output=True, text=True,
                       timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def run_here(*args, env=None):
    """`python SCRIPT ARGS` run inside this process (runpy, as __main__), for bad input that a script refuses
    before any work: the same code path and exit code, without the ~5 s a new interpreter spends importing
    torch and JAX. Returns a CompletedProcess. Library loggers that hold the real stderr are not captured."""
    script, *rest = map(str, args)
    out, err, code = io.StringIO(), io.StringIO(), 0
    saved = sys.argv, os.getcwd(), signal.getsignal(signal.SIGTERM), dict(os.environ)
    sys.argv = [script, *rest]
    os.chdir(ROOT)
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        if isinstance(e.code, str):  # sys.exit("message") prints it and exits 1
            err.write(e.code + "\n")
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # what a real run would print as a traceback, and its exit code
        err.write(traceback.format_exc())
        code = 1
    finally:
        sys.argv = saved[0]
        os.chdir(saved[1])
        signal.signal(signal.SIGTERM, saved[2])
        os.environ.clear()
        os.environ.update(saved[3])
    return subprocess.CompletedProcess([sys.executable, *args], code, out.getvalue(), err.getvalue())


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
