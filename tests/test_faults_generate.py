"""generate.py under faults: bad numbers are refused before anything is written, a signal leaves
nothing half-written, and the output gets the user's usual permissions."""
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, assert_one_line_error, run


@pytest.mark.parametrize("flags", [["--pairs", "0"], ["--batch-size", "0"], ["--seconds", "inf"],
                                   ["--sample-rate", "-1"], ["--benchmark-seconds", "0"], ["--delta", "nan"],
                                   ["--delta", "1e308"], ["--seed", "1e20"], ["--seed", "100000000000000000000"],
                                   ["--delta-group", "vco_1=1e308"]])
def test_bad_numbers_write_nothing(tmp_path, flags):
    p = run(ROOT / "generate.py", "--out", tmp_path / "pairs", *flags, check=False)
    assert_one_line_error(p)
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
