"""Bad input and damaged files for probe.py: each case exits 2 with one line on stderr (no traceback),
leaves every file that was there byte-identical and creates no --out; damaged clips are skipped and
counted; SIGTERM / SIGINT while embedding print one line and leave nothing half-written."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import run_here

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "probe.py"
DATA = ROOT.parent / "shared" / "data"


class Mean(torch.nn.Module):
    """Exported-encoder contract, instantly: (B, T) -> (B, 4) statistics of the waveform."""

    def forward(self, wave):
        return torch.stack([wave.mean(1), wave.std(1), wave.abs().max(1).values, wave.pow(2).mean(1)], 1)


class Slow(torch.nn.Module):
    """The same contract, taking tens of milliseconds per batch."""

    def forward(self, wave):
        for _ in range(200):
            wave = torch.sin(wave + 0.1)
        return torch.stack([wave.mean(1), wave.std(1)], 1)


class Picky(torch.nn.Module):
    """Fails on real inputs only: probe.py's own check feeds batches of 2 and 1 clips, the task a batch of 4."""

    def forward(self, wave):
        if wave.shape[0] > 2:
            raise RuntimeError("batches of more than 2 clips are not supported")
        return torch.stack([wave.mean(1), wave.std(1)], 1)


class LongClipsFail(torch.nn.Module):
    """Fails on clips longer than 1 s, which the task has and probe.py's own check does not feed."""

    def forward(self, wave):
        if wave.shape[1] > 16000:
            raise ValueError("clips longer than 1 s are not supported")
        return torch.stack([wave.mean(1), wave.std(1)], 1)


class NoWidth(torch.nn.Module):
    def forward(self, wave):
        return wave[:, :0]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    path = tmp_path_factory.mktemp("encoder") / "encoder.pt"
    torch.jit.save(torch.jit.script(Mean()), str(path))
    return path


def run(*args, **kw):
    env = dict(os.environ, PROBE_NO_DOWNLOAD="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300, **kw)


def tone(path, label, seconds=0.3):
    t = np.arange(int(16000 * seconds)) / 16000
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, (0.1 + 0.1 * label) * np.sin(2 * np.pi * (300 + 400 * label) * t), 16000)


def folder(root, labels, folds=None, meta=None):
    """meta.csv (file, kind, fold) and one tone per row; meta replaces the CSV text when given."""
    folds = folds or [i % 2 for i in range(len(labels))]
    for i, y in enumerate(labels):
        tone(root / f"{i}.wav", "abc".index(y) if y in "abc" else 0)
    text = "file,kind,fold\n" + "".join(f"{i}.wav,{y},{k}\n" for i, (y, k) in enumerate(zip(labels, folds)))
    (root / "meta.csv").write_bytes(meta if meta is not None else text.encode())
    return root


def hear(root, meta=None, split=None, vocab=None):
    root.mkdir(parents=True)
    (root / "task_metadata.json").write_text(meta if meta is not None else json.dumps(
        {"task_name": "toy", "embedding_type": "scene", "prediction_type": "multiclass", "splits": ["fold00", "fold01"]}))
    (root / "labelvocabulary.csv").write_text(vocab if vocab is not None else "idx,label\n0,cat\n1,dog\n")
    for s in ["fold00", "fold01"]:
        entries = {f"{i}.wav": [["cat", "dog"][i % 2]] for i in range(4)}
        for name in entries:
            tone(root / "16000" / s / name, 0)
        (root / f"{s}.json").write_text(split if split is not None and s == "fold01" else json.dumps(entries))
    return root


def csv_args(root, *extra, label="kind"):
    return ["--task", "csv", "--data-dir", root, "--label", label, *extra]


def snapshot(root):
    return {p: p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


# Each case builds its input under tmp and returns (args, part of the error line). --out defaults to
# tmp/out, which must not exist afterwards unless the case made it.
def _latin1(tmp):
    return csv_args(folder(tmp / "d", "aabb", meta="file,kind,fold\n0.wav,caf\xe9,0\n1.wav,caf\xe9,1\n2.wav,b,0\n3.wav,b,1\n"
                           .encode("latin-1"))), "UTF-8"


def _encoder_file(tmp, data):
    (tmp / "bad.pt").write_bytes(data)
    return ["--encoder", tmp / "bad.pt", *csv_args(folder(tmp / "d", "aabb"))], "bad.pt"


def _module(tmp, module, root=None):
    torch.jit.save(torch.jit.script(module), str(tmp / "bad.pt"))
    return ["--encoder", tmp / "bad.pt", *csv_args(root or folder(tmp / "d", "aabb"))]


def _long_clips(tmp):
    root = folder(tmp / "d", "aabb")
    for i in range(4):
        tone(root / f"{i}.wav", i % 2, seconds=2.0)
    return _module(tmp, LongClipsFail(), root), "on 4 clip(s) of 2 s fails: builtins.ValueError: clips longer than 1 s"


def _results(tmp, text):
    (tmp / "out").mkdir()
    (tmp / "out" / "results.json").write_text(text)
    return csv_args(folder(tmp / "d", "aabb")), "results.json"


def _nonfinite_audio(tmp):
    root = folder(tmp / "d", "aabb")
    for i in range(4):
        sf.write(root / f"{i}.wav", np.full(4000, np.nan, np.float32), 16000, subtype="FLOAT")
    return csv_args(root), "decodes"


def _runner(tmp, make):
    """heareval runner output for a HEAR task: <split>/<file>.embedding.npy, make(i) the array of clip i."""
    for s in ["fold00", "fold01"]:
        (tmp / "e" / s).mkdir(parents=True)
        for i in range(4):
            np.save(tmp / "e" / s / f"{i}.wav.embedding.npy", make(i))
    return ["--task", "hear", "--data-dir", hear(tmp / "h"), "--embeddings", tmp / "e"]


def _folds(tmp, *folds):
    return csv_args(folder(tmp / "d", "aabb", meta=("file,kind,fold\n" + "".join(
        f"{i}.wav,{'aabb'[i]},{k}\n" for i, k in enumerate(folds))).encode()))


CASES = {
    "meta.csv latin-1": _latin1,
    "meta.csv UTF-16 without BOM": lambda tmp: (csv_args(folder(tmp / "d", "aabb", meta="file,kind\n0.wav,a\n".encode(
        "utf-16-le"))), "NUL bytes: UTF-16?"),
    "meta.csv column twice": lambda tmp: (csv_args(folder(tmp / "d", "aabb", meta=b"file,kind,kind,fold\n0.wav,a,x,0\n")),
                                          "column 'kind' appears 2 times in the header; rename one"),
    "meta.csv fold -1": lambda tmp: (_folds(tmp, 0, -1, 0, -1), "fold '-1' is not an integer in [0, 2^63)"),
    "meta.csv fold 10^30": lambda tmp: (_folds(tmp, 0, 10**30, 0, 10**30), f"fold '{10**30}' is not an integer in"),
    "--seed 2^64": lambda tmp: (csv_args(folder(tmp / "d", "aabb"), "--seed", 2**64), "--seed"),
    "hear runner embeddings of strings": lambda tmp: (_runner(tmp, lambda i: np.array(["a", "b"])),
                                                      "not a finite scene embedding of the others' size (shape (2,), <U1"),
    "hear split lists no clips": lambda tmp: (["--task", "hear", "--data-dir", hear(tmp / "h", split="{}")],
                                              "fold01.json lists no clips"),
    "meta.csv binary": lambda tmp: (csv_args(folder(tmp / "d", "aabb", meta=b"file,kind\x00\n\x00\xff\x00")), "meta.csv"),
    "meta.csv empty": lambda tmp: (csv_args(folder(tmp / "d", "aabb", meta=b"")), "meta.csv"),
    "meta.csv short row": lambda tmp: (csv_args(folder(tmp / "d", "aabb", meta=b"file,kind,fold\n0.wav,a,0\n1.wav\n")),
                                       "meta.csv"),
    "meta.csv fold not int": lambda tmp: (csv_args(folder(tmp / "d", "aabb", meta=b"file,kind,fold\n0.wav,a,x\n")), "'x'"),
    "single class": lambda tmp: (csv_args(folder(tmp / "d", "aaaa")), "2 classes"),
    "every row in one fold": lambda tmp: (csv_args(folder(tmp / "d", "aabb", folds=[0, 0, 0, 0])), "fold 0"),
    "test fold classes not in training": lambda tmp: (csv_args(folder(tmp / "d", "aabbcc", folds=[0, 0, 1, 1, 1, 1])),
                                                      "fold 0"),
    "all audio non-finite": _nonfinite_audio,
    "meta.csv lists a clip twice": lambda tmp: (csv_args(folder(tmp / "d", "aabb", meta=b"file,kind,fold\n0.wav,a,0\n"
                                                              b"1.wav,a,1\n2.wav,b,0\n3.wav,b,1\n0.wav,b,1\n")),
                                                "0.wav is listed 2 times"),
    "encoder fails on a batch of 4": lambda tmp: (_module(tmp, Picky()), "on 4 clip(s) of 1 s fails: builtins.RuntimeError: "
                                                  "batches of more than 2 clips are not supported"),
    "encoder fails on 2-s clips": _long_clips,
    "encoder output has width 0": lambda tmp: (_module(tmp, NoWidth()), "gives (2, 0), not (B, D) with D >= 1"),
    "--out is a file": lambda tmp: ((tmp / "out").write_text("mine\n"), csv_args(folder(tmp / "d", "aabb")))[1:] + ("--out",),
    "--cache-dir is a file": lambda tmp: ((tmp / "c").write_text("mine\n"),
                                          csv_args(folder(tmp / "d", "aabb"), "--cache-dir", tmp / "c"))[1:] + ("--cache-dir",),
    "--batch-size 0": lambda tmp: (csv_args(folder(tmp / "d", "aabb"), "--batch-size", 0), "--batch-size"),
    "--epochs 0": lambda tmp: (csv_args(folder(tmp / "d", "aabb"), "--epochs", 0), "--epochs"),
    "--probe-batch-size 0": lambda tmp: (csv_args(folder(tmp / "d", "aabb"), "--probe-batch-size", 0), "--probe-batch-size"),
    "--patience -1": lambda tmp: (csv_args(folder(tmp / "d", "aabb"), "--patience", -1), "--patience"),
    "--max-per-class 0": lambda tmp: (csv_args(folder(tmp / "d", "aabb"), "--max-per-class", 0), "--max-per-class"),
    "--lr nan": lambda tmp: (csv_args(folder(tmp / "d", "aabb"), "--lr", "nan"), "--lr"),
    "--valid-frac 1": lambda tmp: (csv_args(folder(tmp / "d", "aabb"), "--valid-frac", 1), "--valid-frac"),
    "--seed -1": lambda tmp: (csv_args(folder(tmp / "d", "aabb"), "--seed", -1), "--seed"),
    "results.json not JSON": lambda tmp: _results(tmp, "{oops"),
    "results.json a list": lambda tmp: _results(tmp, "[]\n"),
    "results.json rows not a list": lambda tmp: _results(tmp, '{"rows": 3, "summary": []}\n'),
    "results.json summary rows wrong": lambda tmp: _results(tmp, '{"rows": [], "summary": [{"mean": 1}]}\n'),
    "encoder.pt empty": lambda tmp: _encoder_file(tmp, b""),
    "encoder.pt truncated": lambda tmp: _encoder_file(tmp, (Path(tmp).parent / "enc.pt").read_bytes()[:500]),
    "encoder.pt text": lambda tmp: _encoder_file(tmp, b"not a model\n"),
    "hear metadata not JSON": lambda tmp: (["--task", "hear", "--data-dir", hear(tmp / "h", meta="{")], "task_metadata.json"),
    "hear metadata a list": lambda tmp: (["--task", "hear", "--data-dir", hear(tmp / "h", meta="[1]")], "task_metadata.json"),
    "hear split not a dict": lambda tmp: (["--task", "hear", "--data-dir", hear(tmp / "h", split='["a.wav"]')], "fold01.json"),
    "hear labels not a list": lambda tmp: (["--task", "hear", "--data-dir", hear(tmp / "h", split='{"0.wav": "cat"}')],
                                           "fold01.json"),
    "hear vocabulary idx not int": lambda tmp: (["--task", "hear", "--data-dir", hear(tmp / "h", vocab="idx,label\nx,cat\n")],
                                                "labelvocabulary.csv"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_one_line_exit_2_nothing_changed(case, encoder, tmp_path):
    (tmp_path / "enc.pt").write_bytes(encoder.read_bytes())  # for the truncated-encoder case
    tmp = tmp_path / "case"
    tmp.mkdir()
    args, needle = CASES[case](tmp)
    if "--encoder" not in args:
        args = [*args, "--encoder", encoder]
    if "--out" not in args:
        args = [*args, "--out", tmp / "out"]
    out_existed = (tmp / "out").exists()
    before = snapshot(tmp)
    proc = run_here(SCRIPT, *args, env=dict(PROBE_NO_DOWNLOAD="1"))
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0].startswith("probe.py: error:") and needle in lines[0], lines[0]
    assert snapshot(tmp) == before  # nothing written, nothing changed
    assert (tmp / "out").exists() == out_existed  # no empty --out left behind


def test_spreadsheet_csv_with_bom_works(encoder, tmp_path):
    root = folder(tmp_path / "d", "aabbaabb")
    (root / "meta.csv").write_bytes(b"\xef\xbb\xbf" + (root / "meta.csv").read_bytes().replace(b"\n", b"\r\n"))
    proc = run(*csv_args(root), "--encoder", encoder, "--out", tmp_path / "out", "--epochs", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "results.json").read_text())["summary"][0]["task"] == "csv:d:kind"


def test_nonfinite_and_missing_clips_are_skipped_and_counted(encoder, tmp_path):
    root = folder(tmp_path / "d", "aaaabbbb")
    sf.write(root / "1.wav", np.r_[np.zeros(100), np.inf, np.zeros(100)].astype(np.float32), 16000, subtype="FLOAT")
    (root / "4.wav").unlink()
    proc = run(*csv_args(root), "--encoder", encoder, "--out", tmp_path / "out", "--epochs", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (warning,) = proc.stderr.splitlines()
    assert "skipped 2 clips" in warning
    skipped = json.loads((tmp_path / "out" / "results.json").read_text())["skipped_files"]["csv:d:kind"]
    assert [s.split(" ")[0] for s in skipped] == ["1.wav", "4.wav"] and "non-finite" in skipped[0]


def test_damaged_cache_is_embedded_again(encoder, tmp_path):
    args = [*csv_args(folder(tmp_path / "d", "aabb")), "--encoder", encoder, "--out", tmp_path / "out", "--epochs", "2"]
    assert run(*args).returncode == 0
    (cache,) = (tmp_path / "out" / "embeddings").glob("*.npz")
    cache.write_bytes(cache.read_bytes()[:100])
    proc = run(*args)
    assert proc.returncode == 0 and "embedded 4 clips" in proc.stdout, proc.stderr[-3000:]
    with np.load(cache) as z:
        assert z["embeddings"].shape == (4, 4)


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_while_embedding_leaves_nothing_half_written(sig, code, tmp_path):
    # a slow encoder, so the signal lands inside the embedding loop
    slow = tmp_path / "slow.pt"
    torch.jit.save(torch.jit.script(Slow()), str(slow))
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"rows": [], "summary": [], "skipped_files": {}}\n')
    before = snapshot(out)
    env = dict(os.environ, PROBE_NO_DOWNLOAD="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--task", "csv", "--data-dir", DATA / "fsdd", "--label", "digit",
                             "--encoder", slow, "--out", out, "--batch-size", "4"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert "3000 clips" in proc.stdout.readline()  # printed right before embedding starts
    time.sleep(1.0)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr[-3000:]
    assert stderr.splitlines() == ["probe.py: interrupted"], stderr[-3000:]
    assert snapshot(out) == before  # no cache, no temp file, results.json untouched
