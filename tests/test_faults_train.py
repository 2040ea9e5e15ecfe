"""train.py under faults: bad flags and damaged files get one line and exit 2 with nothing touched,
and a run killed (-9) at any point resumes to the same log, learning rates and weights."""
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import ROOT, assert_one_line_error, run, run_here

TINY = ["--synth", "voice", "--batch-size", "4", "--sounds-per-epoch", "24", "--log-every", "1"]  # 5 steps/epoch


@pytest.mark.parametrize("flags,needle", [
    (["--lr", "0"], "--lr"), (["--lr", "nan"], "--lr"), (["--momentum", "-1"], "--momentum"),
    (["--weight-decay", "inf"], "--weight-decay"), (["--gamma", "0"], "--gamma"), (["--milestones", "1.5"], "--milestones"),
    (["--align-alpha", "0"], "--align-alpha"), (["--unif-t", "nan"], "--unif-t"), (["--unif-w", "inf"], "--unif-w"),
    (["--log-every", "0"], "--log-every"), (["--save-every", "-1"], "--save-every"), (["--max-steps", "-1"], "--max-steps"),
    (["--sounds-per-epoch", "0"], "--sounds-per-epoch"), (["--benchmark-steps", "0"], "--benchmark-steps"),
])
def test_bad_numbers_are_refused_before_any_folder_exists(tmp_path, flags, needle):
    p = run_here(ROOT / "train.py", "--out", tmp_path / "out", *flags)
    assert needle in assert_one_line_error(p) and "Traceback" not in p.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name,value", [("RANK", ""), ("LOCAL_RANK", "x"), ("WORLD_SIZE", "2.0")])
def test_a_malformed_torchrun_variable_is_refused_before_any_folder_exists(tmp_path, name, value):
    """Was "invalid literal for int() with base 10: ''", naming neither the variable nor the fix."""
    p = run_here(ROOT / "train.py", "--epochs", "0", "--out", tmp_path / "out", env={name: value})
    assert f"environment variable {name}={value!r} is not a whole number" in assert_one_line_error(p)
    assert not (tmp_path / "out").exists()


def snapshot(d):
    return {f.name: f.read_bytes() for f in d.iterdir()}


def test_a_run_folder_without_its_checkpoint_is_not_overwritten(random_run, tmp_path):
    run_dir = tmp_path / "exported"
    shutil.copytree(random_run, run_dir)
    (run_dir / "checkpoint.pt").unlink()  # deleted to save space; encoder.pt, config.json, log.csv stay
    before = snapshot(run_dir)
    p = run(ROOT / "train.py", "--epochs", "0", "--out", run_dir, check=False)
    assert "already holds a run" in assert_one_line_error(p)
    assert snapshot(run_dir) == before


def test_out_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    p = run(ROOT / "train.py", "--epochs", "0", "--out", tmp_path / "notes.txt", check=False)
    assert "is a file" in assert_one_line_error(p)
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("damage", ["truncated", "empty", "not_a_dict", "torchscript", "other_model"])
def test_damaged_or_foreign_checkpoint_is_one_line(random_run, tmp_path, damage):
    run_dir = tmp_path / "run"
    shutil.copytree(random_run, run_dir)
    ckpt = run_dir / "checkpoint.pt"
    if damage == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[:100_000])
    elif damage == "empty":
        ckpt.write_bytes(b"")
    elif damage == "not_a_dict":
        torch.save([1, 2, 3], ckpt)
    elif damage == "torchscript":
        shutil.copy(run_dir / "encoder.pt", ckpt)
    else:  # a checkpoint whose weights belong to another network
        c = torch.load(ckpt, weights_only=False)
        c["model"] = {"weight": torch.zeros(3)}
        torch.save(c, ckpt)
    before = snapshot(run_dir)
    p = run(ROOT / "train.py", "--resume", run_dir, "--epochs", "1", check=False)
    assert "checkpoint" in assert_one_line_error(p) and "Traceback" not in p.stderr
    assert snapshot(run_dir) == before


def test_non_finite_audio_is_refused_by_name_and_leaves_no_run_behind(tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    sf.write(audio / "fine.wav", np.zeros(16000, np.float32), 16000)
    x = np.zeros(16000, np.float32)
    x[100] = np.nan
    sf.write(audio / "nan.wav", x, 16000, subtype="FLOAT")
    p = run(ROOT / "train.py", "--data", audio, "--positives", "jitter", "--batch-size", "4", "--epochs", "1",
            "--sounds-per-epoch", "16", "--out", tmp_path / "run", check=False)
    assert "nan.wav holds non-finite samples" in assert_one_line_error(p)
    assert not (tmp_path / "run").exists()  # the same command works again once the file is fixed


KILLED = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, sys.argv[1])
    point, n, sys.argv = sys.argv[2], int(sys.argv[3]), ["train.py", *sys.argv[4:]]
    import train
    calls = []
    def kill_on(name, f, before=False):
        def wrapped(*a, **k):
            calls.append(name)
            if before and calls.count(name) == n:
                os.kill(os.getpid(), signal.SIGKILL)
            out = f(*a, **k)
            if calls.count(name) == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        return wrapped
    if point == "save":  # right after the n-th checkpoint is on disk
        train.save_checkpoint = kill_on("save", train.save_checkpoint)
    elif point == "validate":  # inside the n-th validation, before it returns
        train.contrastive_loss = kill_on("loss", train.contrastive_loss, before=True)
    elif point == "export":  # halfway through writing encoder.pt
        write = train.atomic_write
        def atomic_write(path, data):
            if str(path).endswith("encoder.pt"):  # atomic_write's hidden twin, cut short
                open(os.path.join(os.path.dirname(path), f".encoder.pt.tmp{os.getpid()}"), "wb").write(data[:1000])
                os.kill(os.getpid(), signal.SIGKILL)
            write(path, data)
        train.atomic_write = atomic_write
    train.main()
""")


def log_rows(run_dir):
    return [r.split(",")[:8] for r in (run_dir / "log.csv").read_text().splitlines()]  # all but sounds/s


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    run(ROOT / "train.py", *TINY, "--epochs", "3", "--save-every", "0", "--out", out)
    return out


# 5 steps/epoch and --save-every 0: checkpoints 1-5 follow steps 1-5, the 6th ends epoch 0's training,
# the 7th its validation; the training passes 15 losses, the validations 1 each after steps 5, 10, 15
@pytest.mark.parametrize("point,n", [("save", 3), ("save", 5), ("validate", 12), ("export", 1)],
                         ids=["mid-epoch", "epoch's last step", "inside validation", "inside export"])
def test_kill_9_anywhere_then_resume_equals_the_uninterrupted_run(straight, tmp_path, point, n):
    script = tmp_path / "killed.py"
    script.write_text(KILLED)
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, script, ROOT, point, str(n), *TINY, "--epochs", "3", "--save-every", "0",
                        "--out", out], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == -9, p.stderr[-2000:]
    run(ROOT / "train.py", "--resume", out)
    assert log_rows(out) == log_rows(straight)  # same rows, lr at every step, losses, validations
    a, b = (torch.load(d / "checkpoint.pt", weights_only=False) for d in (straight, out))
    assert a["step"] == b["step"] == 15 and a["val_epochs"] == b["val_epochs"] == 3
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    x = torch.randn(2, 16000)
    ea, eb = (torch.jit.load(str(d / "encoder.pt")) for d in (straight, out))
    assert torch.equal(ea(x), eb(x))
    assert sorted(f.name for f in out.iterdir()) == ["checkpoint.pt", "config.json", "encoder.pt", "log.csv"]


@pytest.fixture(scope="module")
def straight_fp16(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight_fp16") / "run"
    run(ROOT / "train.py", *TINY, "--epochs", "2", "--save-every", "0", "--amp", "fp16", "--out", out)
    return out


def test_kill_9_then_resume_in_fp16_equals_the_uninterrupted_run(straight_fp16, tmp_path):
    """fp16's loss scale is part of the checkpoint: a run killed mid-epoch resumes to the same rows and weights."""
    script = tmp_path / "killed.py"
    script.write_text(KILLED)
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, script, ROOT, "save", "3", *TINY, "--epochs", "2", "--save-every", "0",
                        "--amp", "fp16", "--out", out], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == -9, p.stderr[-2000:]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["scaler"]["_growth_tracker"] == 3
    run(ROOT / "train.py", "--resume", out)
    assert log_rows(out) == log_rows(straight_fp16)
    a, b = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (straight_fp16, out))
    assert a["step"] == b["step"] == 10 and a["scaler"] == b["scaler"] and b["config"]["precision"] == "fp16"
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_ends_the_run_with_one_line_and_whole_files(tmp_path, sig):
    import signal
    import time
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, ROOT / "train.py", *TINY, "--epochs", "50", "--save-every", "0", "--out", out],
                         cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    p.send_signal(getattr(signal, sig))
    err = p.communicate(timeout=120)[1]
    assert p.returncode == 128 + getattr(signal, sig) and "interrupted" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert sorted(f.name for f in out.iterdir()) == ["checkpoint.pt", "config.json", "log.csv"]
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] > 0
    rows = (out / "log.csv").read_text().splitlines()
    assert len(rows) > 1 and all(len(r.split(",")) == 9 for r in rows)  # whole rows only


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory):
    out = tmp_path_factory.mktemp("three") / "run"
    run(ROOT / "train.py", *TINY, "--epochs", "1", "--max-steps", "3", "--out", out)
    return out


def test_a_log_saved_by_a_spreadsheet_resumes_as_the_original(three_steps, tmp_path):
    """A UTF-8 BOM and CRLF line ends (what a spreadsheet writes back) mean the same rows."""
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(three_steps, a), shutil.copytree(three_steps, b)
    (b / "log.csv").write_bytes(b"\xef\xbb\xbf" + (b / "log.csv").read_bytes().replace(b"\n", b"\r\n"))
    for d in (a, b):
        run(ROOT / "train.py", "--resume", d, "--max-steps", "4")
    assert log_rows(a) == log_rows(b) and len(log_rows(a)) == 5  # header, steps 1-4


@pytest.mark.parametrize("text", ["not,a,log\n1,2,3\n", "\xff\xfe garbage",
                                  "step,epoch,lr,loss,align,unif,val_align,val_unif,sounds_per_s\nthree,0,0.1,0,0,0,,,1\n"])
def test_a_damaged_log_is_refused_by_name_and_nothing_is_rewritten(three_steps, tmp_path, text):
    d = tmp_path / "run"
    shutil.copytree(three_steps, d)
    (d / "log.csv").write_bytes(text.encode("latin-1"))
    before = snapshot(d)
    p = run(ROOT / "train.py", "--resume", d, "--max-steps", "4", check=False)
    assert f"{d / 'log.csv'} is not a train.py log.csv" in assert_one_line_error(p) and "Traceback" not in p.stderr
    assert snapshot(d) == before  # config.json too: nothing is rewritten before the inputs are known to be good


def test_a_folder_named_like_audio_is_a_folder_not_a_file(tmp_path):
    """Also a file name that is not UTF-8 (a Latin-1 é), which soundfile could not encode back."""
    audio = tmp_path / "audio"
    (audio / "take1.wav").mkdir(parents=True)
    latin1 = os.fsdecode(bytes(audio) + b"/caf\xe9.wav")
    for f in (audio / "fine.wav", audio / "take1.wav" / "inner.wav", latin1):
        sf.write(os.fsencode(f), 0.1 * np.random.default_rng(0).standard_normal(16000).astype(np.float32), 16000)
    run(ROOT / "train.py", "--data", audio, "--positives", "jitter", "--batch-size", "2", "--epochs", "1",
        "--sounds-per-epoch", "4", "--out", tmp_path / "run")
    assert (tmp_path / "run" / "encoder.pt").is_file()


def test_out_of_memory_mid_run_is_one_line_and_keeps_the_checkpoint(tmp_path):
    """A GPU that runs out of memory mid-run (simulated: the third loss raises torch's OutOfMemoryError): one line,
    exit 1, the checkpoint of the steps before is kept and resumes."""
    script = tmp_path / "oom.py"
    script.write_text(textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, sys.argv[1])
        sys.argv = ["train.py", *sys.argv[2:]]
        import train
        loss, calls = train.contrastive_loss, []
        def oom(*a, **k):
            calls.append(1)
            if len(calls) == 3:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return loss(*a, **k)
        train.contrastive_loss = oom
        train.main()
    """))
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, script, ROOT, *TINY, "--epochs", "1", "--save-every", "0", "--out", out],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 1 and len(lines) == 1 and "train.py: error: out of memory (CUDA out of memory" in lines[0]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
    run(ROOT / "train.py", "--resume", out)
