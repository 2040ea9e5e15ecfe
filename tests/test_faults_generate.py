"""generate.py under faults: bad numbers are refused before anything is written, a signal leaves
nothing half-written, and the output gets the user's usual permissions."""
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, assert_one_line_error, run, run_here


@pytest.mark.parametrize("flags", [["--pairs", "0"], ["--batch-size", "0"], ["--seconds", "inf"],
                                   ["--sample-rate", "-1"], ["--benchmark-seconds", "0"], ["--delta", "nan"],
                                   ["--delta", "1e308"], ["--seed", "1e20"], ["--seed", "100000000000000000000"],
                                   ["--delta-group", "vco_1=1e308"]])
def test_bad_numbers_write_nothing(tmp_path, flags):
    p = run(ROOT / "generate.py", "--out", tmp_path / "pairs", *flags, check=False)
    assert_one_line_error(p)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("flags,needle", [
    (["--seconds", "0.002"], "--seconds 0.002 is too short: give at least 0.004167"),
    (["--seconds", "1e-50"], "--seconds 1e-50 is too short"),
    (["--gallery", "GALLERY", "--seconds", "0.01"], "512 samples for the gallery log-mel"),
    (["--sample-rate", "3000000000"], "--sample-rate: '3000000000' is not a finite number in [1, 2147483647]")])
def test_a_sound_synthax_cannot_shape_is_refused_before_any_work(tmp_path, flags, needle):
    """synthax needs 2 control steps (1/480 s each), the gallery's log-mel 512 samples, JAX an int32 rate; these were
    JAX's "xp and fp must be one-dimensional arrays of equal size" (0.002 s, 2 pairs) or a traceback."""
    flags = [str(tmp_path / "gallery") if f == "GALLERY" else f for f in flags]
    p = run_here(ROOT / "generate.py", "--pairs", "2", "--out", tmp_path / "o", *flags)
    assert needle in assert_one_line_error(p)
    assert os.listdir(tmp_path) == []


def test_synthesis_out_of_memory_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """JAX's own errors (e.g. --seconds 1e7: RESOURCE_EXHAUSTED allocating 250 GB, simulated here) are one line."""
    import jax
    import generate

    def oom(tmp, args):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 250181848256 bytes.\nmore")
    monkeypatch.setattr(generate, "write_outputs", oom)
    with pytest.raises(SystemExit) as e:
        generate.main(["--pairs", "1", "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and capsys.readouterr().err == (
        "generate.py: error: synthesis failed (RESOURCE_EXHAUSTED: Out of memory allocating 250181848256 bytes.); "
        "lower --batch-size, --seconds or --sample-rate\n")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_leaves_no_half_written_output(tmp_path, sig):
    (tmp_path / "mine.txt").write_text("kept")
    p = subprocess.Popen([sys.executable, ROOT / "generate.py", "--pairs", "100000", "--batch-size", "8",
                          "--out", tmp_path / "pairs"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True)
    deadline = time.time() + 300  # wait until it is writing wav files into its temporary folder
    while time.time() < deadline and not any(d.name.startswith(".generate-") and any(d.glob("*.wav"))
                                             for d in tmp_path.iterdir() if d.is_dir()):
        time.sleep(0.2)
    p.send_signal(sig)
    err = p.communicate(timeout=120)[1]
    assert p.returncode == 128 + sig and "interrupted" in err and "Traceback" not in err  # 143 SIGTERM, 130 Ctrl-C
    assert [l for l in err.splitlines() if "generate.py" in l] == [err.strip().splitlines()[-1]], err  # tqdm aside
    assert sorted(f.name for f in tmp_path.iterdir()) == ["mine.txt"]


def test_output_folder_has_the_usual_permissions(tmp_path):
    out = tmp_path / "pairs"
    p = subprocess.run([sys.executable, ROOT / "generate.py", "--pairs", "2", "--batch-size", "2", "--out", out],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, preexec_fn=lambda: os.umask(0o022))
    assert p.returncode == 0, p.stderr
    assert oct(out.stat().st_mode & 0o777) == oct(0o755)  # not mkdtemp's 0700


@pytest.mark.parametrize("flags,name", [(["--delta", "0.1", "0.1000001"], "voice/delta_0.1"),
                                        (["--synth", "voice", "voice"], "voice/delta_0.25")])
def test_two_values_that_share_an_output_name_are_refused_before_any_work(tmp_path, flags, name):
    p = run(ROOT / "generate.py", "--pairs", "2", "--out", tmp_path / "pairs", *flags, check=False)
    assert f"would both write {name}" in assert_one_line_error(p)
    assert os.listdir(tmp_path) == []


def test_a_second_job_on_one_out_is_refused_while_the_first_writes(tmp_path):
    first = subprocess.Popen([sys.executable, ROOT / "generate.py", "--pairs", "100000", "--batch-size", "8",
                              "--out", tmp_path / "pairs"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.time() + 300
    while not (tmp_path / ".pairs.lock").exists():  # the first job owns --out from its start
        assert first.poll() is None and time.time() < deadline, first.communicate()[1][-2000:]
        time.sleep(0.1)
    second = run(ROOT / "generate.py", "--pairs", "2", "--seed", "1", "--out", tmp_path / "pairs", check=False)
    assert f"in use by another generate.py (pid {first.pid})" in assert_one_line_error(second)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == 143
    assert os.listdir(tmp_path) == []  # neither left anything: no pairs, no lock file
