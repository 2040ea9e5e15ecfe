"""Hostile files, odd paths and concurrent runs, for all four scripts: a checkpoint never runs code when
it is loaded; a link to a folder is followed, while a broken or looping link, a file where a folder
belongs, a folder this user cannot write and a full disk each get one line on stderr and exit 2 with
every existing file byte-identical and nothing half-written; a live training run owns its folder; two
probes finishing together both keep their scores."""
import concurrent.futures
import ctypes
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import ROOT, assert_one_line_error, run

MARKER = Path("/tmp/doppelgangers-security-marker")  # what the hostile pickles below would create


class Hostile:
    """Unpickling this runs a shell command: what a checkpoint or cache must never get to do."""

    def __reduce__(self):
        return os.system, (f"touch {MARKER}",)


def snapshot(root):
    """Every entry under root: file bytes, link targets (never followed), folders."""
    out = {}
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(d, name)
            out[str(p.relative_to(root))] = ("link", os.readlink(p)) if p.is_symlink() else \
                p.read_bytes() if p.is_file() else "dir"
    return out


def limits(full_disk=False, no_root_override=False):
    """preexec_fn for the faults: a disk that is full past 1 MB (RLIMIT_FSIZE, SIGXFSZ ignored so a write
    fails with EFBIG instead of killing the process), and permission bits that bind root too (the DAC
    override capabilities dropped from the bounding set, so the exec'd process lacks them)."""
    def pre():
        if full_disk:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (full_disk, full_disk))
        if no_root_override and os.geteuid() == 0:
            libc = ctypes.CDLL(None, use_errno=True)
            for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
                if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                    raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")
    return pre


def read_only(d):
    d.mkdir(parents=True, exist_ok=True)
    d.chmod(0o555)
    return d


def tone(path, k):
    t = np.arange(4000) / 16000
    sf.write(path, (0.1 + 0.1 * k) * np.sin(2 * np.pi * (300 + 400 * k) * t), 16000)


def labelled(root):
    """A four-clip probe task: two classes, two folds."""
    root.mkdir(parents=True)
    for i in range(4):
        tone(root / f"{i}.wav", i // 2)
    (root / "meta.csv").write_text("file,kind,fold\n" + "".join(f"{i}.wav,{'ab'[i // 2]},{i % 2}\n" for i in range(4)))
    return root


class Mean(torch.nn.Module):
    """The exported-encoder contract, instantly: (B, T) -> (B, 4)."""

    def forward(self, wave):
        return torch.stack([wave.mean(1), wave.std(1), wave.abs().max(1).values, wave.pow(2).mean(1)], 1)


def encoder(path):
    torch.jit.save(torch.jit.script(Mean()), str(path))
    return path


def probe_args(t):
    return ["--task", "csv", "--data-dir", labelled(t / "d"), "--label", "kind", "--epochs", "2",
            "--encoder", encoder(t / "enc.pt")]


def links(t):
    (t / "loop_a").symlink_to(t / "loop_b")
    (t / "loop_b").symlink_to(t / "loop_a")
    (t / "broken").symlink_to(t / "nowhere")
    (t / "file").write_text("mine\n")
    return t


def hostile_checkpoint(t, random_run):
    run_dir = t / "run"
    run_dir.mkdir()
    ckpt = torch.load(random_run / "checkpoint.pt", weights_only=False)  # this session's own file
    ckpt["config"]["note"] = Hostile()
    torch.save(ckpt, run_dir / "checkpoint.pt")
    return ["train.py", "--resume", run_dir, "--epochs", "0"]


def full_disk_generate(t):
    old = t / "pairs"  # an earlier output that --force would replace
    old.mkdir()
    (old / "keep.txt").write_text("earlier\n")
    return ["generate.py", "--pairs", "2", "--batch-size", "2", "--force", "--out", old]


def full_disk_probe(t):
    (t / "out").mkdir()
    (t / "out" / "results.json").write_text('{"rows": [], "summary": [], "skipped_files": {}}\n')
    return ["probe.py", *probe_args(t), "--out", t / "out"]


def poisoned_cache(t):
    np.savez(t / "e.npz", embeddings=np.array([Hostile()] * 3, dtype=object))  # an object array: pickled
    return ["analyze.py", "fad", "--set", f"a={t / 'e.npz'}", "--set", f"b={t / 'e.npz'}", "--out", t / "new"]


def generate_force_read_only(t):
    (t / "pairs" / "voice").mkdir(parents=True)
    (t / "pairs" / "voice" / "mine.wav").write_bytes(b"earlier")
    read_only(t / "pairs" / "voice")  # its file cannot be removed, so neither can pairs/
    return ["generate.py", "--pairs", "2", "--force", "--out", t / "pairs"]


LOG = "step,epoch,lr,loss,align,unif,val_align,val_unif,sounds_per_s\n4,1,0.001,2.7,0.6,-1.6,0.4,-3.0,100\n"

# name: (build(t) -> argv, part of the error line, limits). Every case runs in a fresh folder t holding
# links(t); t must be byte-identical afterwards (the scripts refuse before writing or remove what they made).
CASES = {
    "train: checkpoint that would run code": (None, "never runs code", {}),  # built with random_run below
    "train: --out a broken link": (lambda t: ["train.py", "--epochs", "0", "--out", t / "broken"], "broken symbolic link", {}),
    "train: --resume a file": (lambda t: ["train.py", "--resume", t / "file"], "is a file", {}),
    "train: --data a link loop": (lambda t: ["train.py", "--data", t / "loop_a", "--out", t / "run"], "symbolic link loop", {}),
    "train: --out in a read-only folder": (lambda t: ["train.py", "--epochs", "0", "--out", read_only(t / "ro") / "run"],
                                           "Permission denied", dict(no_root_override=True)),
    "train: --resume a read-only run": (lambda t: (read_only(t / "run"), ["train.py", "--resume", t / "run"])[1],
                                        "cannot write to", dict(no_root_override=True)),  # the shared FolderLock's
    "train: full disk": (lambda t: ["train.py", "--epochs", "0", "--out", t / "run"], "checkpoint.pt: File too large",
                         dict(full_disk=1 << 20)),
    "generate: --out a broken link": (lambda t: ["generate.py", "--out", t / "broken"], "broken symbolic link", {}),
    "generate: --out a link loop": (lambda t: ["generate.py", "--force", "--out", t / "loop_a"], "symbolic link loop", {}),
    "generate: --out in a read-only folder": (lambda t: ["generate.py", "--out", read_only(t / "ro") / "pairs"],
                                              "Permission denied", dict(no_root_override=True)),
    "generate: --force over a read-only folder": (generate_force_read_only, "cannot be replaced",
                                                  dict(no_root_override=True)),
    "generate: full disk": (full_disk_generate, "000000_a.wav: File too large", dict(full_disk=20_000)),
    "probe: --data-dir a link loop": (lambda t: ["probe.py", "--task", "csv", "--label", "kind", "--data-dir", t / "loop_a"],
                                      "symbolic link loop", {}),
    "probe: --out a broken link": (lambda t: ["probe.py", *probe_args(t), "--out", t / "broken"], "broken symbolic link", {}),
    "probe: --encoder a folder": (lambda t: ["probe.py", *probe_args(t), "--encoder", t], "not a file", {}),
    "probe: --out read-only": (lambda t: ["probe.py", *probe_args(t), "--out", read_only(t / "ro")], "not writable",
                               dict(no_root_override=True)),
    "probe: full disk": (full_disk_probe, "File too large", dict(full_disk=1000)),
    "analyze: --out a broken link": (lambda t: ["analyze.py", "training", "--runs", t, "--out", t / "broken"],
                                     "broken symbolic link", {}),
    "analyze: --runs a file": (lambda t: ["analyze.py", "training", "--runs", t / "file", "--out", t / "new"], "is a file", {}),
    "analyze: --out read-only": (lambda t: ["analyze.py", "training", "--runs", t, "--out", read_only(t / "ro") / "new"],
                                 "not writable", dict(no_root_override=True)),
    "analyze: full disk": (lambda t: (t.joinpath("config.json").write_text(
                                          '{"synth": "voice", "delta": 0.1, "keep": null, "delta_group": null, '
                                          '"delta_schedule": null}'),
                                      t.joinpath("log.csv").write_text(LOG),
                                      ["analyze.py", "training", "--runs", t, "--out", t / "new"])[-1],
                           "training_align_unif.png: File too large", dict(full_disk=3000)),
    "analyze: embedding cache with a pickle": (poisoned_cache, "embedding cache", {}),
}


def run_case(name, t, random_run):
    build, _, lim = CASES[name]
    argv = hostile_checkpoint(t, random_run) if build is None else build(links(t))
    before = snapshot(t)
    env = dict(os.environ, PROBE_NO_DOWNLOAD="1", PYTHONDONTWRITEBYTECODE="1")
    if lim.get("full_disk"):
        env["JAX_ENABLE_COMPILATION_CACHE"] = "false"  # a cache entry cut at the limit would poison the shared cache
    p = subprocess.run([sys.executable, ROOT / argv[0], *map(str, argv[1:])], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600, preexec_fn=limits(**lim))
    return p, before, snapshot(t)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, random_run):
    """Every case at once, two at a time (each mostly imports torch)."""
    MARKER.unlink(missing_ok=True)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = {n: pool.submit(run_case, n, tmp_path_factory.mktemp("case"), random_run) for n in CASES}
        return {n: f.result() for n, f in futures.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_fault_is_one_line_exit_2_and_changes_nothing(name, outcomes):
    p, before, after = outcomes[name]
    p.stderr = "\n".join(l for l in p.stderr.splitlines() if not l.startswith("generate:"))  # tqdm's progress bar
    line = assert_one_line_error(p)
    assert CASES[name][1] in line and "Traceback" not in p.stderr, line
    assert after == before  # nothing written, nothing half-written, nothing removed
    assert not MARKER.exists()  # no pickle ran


def test_checkpoints_load_without_running_code(random_run):
    """What train.py writes loads with torch's weights-only unpickler as is: nothing in it needs more."""
    ckpt = torch.load(random_run / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "step", "config", "rng"} <= ckpt.keys()


def test_a_checkpoint_behind_a_killed_owner_resumes_through_a_link(random_run, tmp_path):
    """A run folder whose owner was killed with -9: its stale .lock does not block; --resume through a link."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(random_run / "config.json", run_dir)
    shutil.copy(random_run / "checkpoint.pt", run_dir)
    (tmp_path / "link").symlink_to(run_dir)
    owner = subprocess.run([sys.executable, "-c", "import os, signal, sys; sys.path.insert(0, sys.argv[1]); import train; "
                            "train.FolderLock(sys.argv[2]); os.kill(os.getpid(), signal.SIGKILL)",
                            ROOT, tmp_path / "link"], capture_output=True, text=True, timeout=300)
    assert owner.returncode == -9 and (run_dir / ".lock").exists(), owner.stderr[-2000:]
    run(ROOT / "train.py", "--resume", tmp_path / "link", "--epochs", "0")
    assert sorted(f.name for f in run_dir.iterdir()) == ["checkpoint.pt", "config.json", "encoder.pt", "log.csv"]


PAUSED = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, sys.argv[1])
    flag, sys.argv = sys.argv[2], ["train.py", *sys.argv[3:]]
    import train
    save = train.save_checkpoint
    def paused(*a, **k):  # after the first checkpoint: say so, and wait to be let go
        save(*a, **k)
        if not os.path.exists(flag + ".go"):
            open(flag + ".ready", "w").close()
            while not os.path.exists(flag + ".go"):
                time.sleep(0.05)
    train.save_checkpoint = paused
    train.main()
""")


def test_a_live_run_owns_its_folder(tmp_path):
    script, flag, out = tmp_path / "paused.py", tmp_path / "flag", tmp_path / "run"
    script.write_text(PAUSED)
    first = subprocess.Popen([sys.executable, script, ROOT, flag, "--synth", "voice", "--batch-size", "4", "--epochs",
                              "1", "--sounds-per-epoch", "16", "--save-every", "0", "--out", out], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not Path(f"{flag}.ready").exists():
            assert first.poll() is None and time.time() < deadline, first.stderr.read()[-2000:] if first.stderr else ""
            time.sleep(0.1)
        before = snapshot(out)
        assert (out / ".lock").read_text().strip() == str(first.pid)
        second = run(ROOT / "train.py", "--resume", out, check=False)
        assert f"in use by another train.py (pid {first.pid})" in assert_one_line_error(second)
        assert snapshot(out) == before
    finally:
        Path(f"{flag}.go").touch()
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    assert sorted(f.name for f in out.iterdir()) == ["checkpoint.pt", "config.json", "encoder.pt", "log.csv"]
    assert len((out / "log.csv").read_text().splitlines()) == 2  # header + the epoch's validated row: unharmed


def test_two_probes_finishing_together_keep_both_scores(tmp_path):
    data, out = labelled(tmp_path / "d"), tmp_path / "out"
    out.mkdir()
    earlier = dict(encoder="earlier.pt", task="csv:d:kind", metric="accuracy", mean=0.5, std=0.0, folds=2)
    (out / "results.json").write_text(json.dumps(dict(rows=[], summary=[earlier], skipped_files={})))
    procs = [subprocess.Popen([sys.executable, ROOT / "probe.py", "--task", "csv", "--data-dir", data, "--label", "kind",
                               "--epochs", "2", "--encoder", encoder(tmp_path / f"{name}.pt"), "--out", out],
                              cwd=ROOT, env=dict(os.environ, PROBE_NO_DOWNLOAD="1"), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-2000:]
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert sorted(s["encoder"] for s in summary) == sorted(["earlier.pt", str(tmp_path / "a.pt"), str(tmp_path / "b.pt")])


def test_generate_force_through_a_link_replaces_the_folder_it_points_to(tmp_path):
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "old.txt").write_text("earlier\n")
    (tmp_path / "pairs").symlink_to(tmp_path / "target")
    run(ROOT / "generate.py", "--pairs", "2", "--batch-size", "2", "--force", "--out", tmp_path / "pairs")
    assert (tmp_path / "pairs").is_symlink()  # still the user's link, now to the new pairs
    assert sorted(f.name for f in (tmp_path / "pairs").iterdir()) == \
        ["000000_a.wav", "000000_b.wav", "000001_a.wav", "000001_b.wav", "params.npz"]
    assert sorted(f.name for f in tmp_path.iterdir()) == ["pairs", "target"]  # no temporary or old folder left
