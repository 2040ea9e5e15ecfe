"""Tests of probe.py: loaders on small replicas of ESC-50, UrbanSound8K and HEAR, the mAP metric,
the embedding cache, bad input, and linear probes on real audio of ../shared/data."""

import csv
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
import torchaudio

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "probe.py"
DATA = ROOT.parent / "shared" / "data"

spec = importlib.util.spec_from_file_location("probe", SCRIPT)
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)


class RandomFeatures(torch.nn.Module):
    """Exported-encoder contract without training: per 1-s window a log-mel pooled into four time
    segments, a fixed random projection to 512 dims; window embeddings averaged."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.mel = torchaudio.transforms.MelSpectrogram(16000, n_fft=1024, hop_length=160, n_mels=64)
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("proj", torch.randn(256, 512, generator=g) / 16)

    def forward(self, wave):
        B, T = wave.shape
        n = max(1, (T + 15999) // 16000)
        wave = F.pad(wave, (0, n * 16000 - T)).reshape(B * n, 16000)
        m = F.adaptive_avg_pool1d((self.mel(wave) + 1e-6).log(), 4).flatten(1)
        return (m @ self.proj).reshape(B, n, 512).mean(1)


def make_encoder(path, seed=0):
    """Write an exported encoder (TorchScript, config.json extra) to path; the one to swap for a
    briefly trained train.py encoder."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    extra = {"config.json": json.dumps({"encoder": "random-features", "seed": seed})}
    torch.jit.save(torch.jit.script(RandomFeatures(seed)), str(path), _extra_files=extra)
    return Path(path)


@pytest.fixture(scope="session")
def encoder(tmp_path_factory):
    return make_encoder(tmp_path_factory.mktemp("encoder") / "encoder.pt")


def run(*args):
    # PROBE_NO_DOWNLOAD: no test ever touches the network
    env = dict(os.environ, PROBE_NO_DOWNLOAD="1")
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def results(out):
    return json.loads((Path(out) / "results.json").read_text())


def error_lines(proc):
    return proc.stderr.strip().splitlines()


def tone(path, label, sr=16000, channels=1, seconds=0.5):
    """A short tone whose pitch and loudness depend on the class, so a probe can learn it."""
    t = np.arange(int(sr * seconds)) / sr
    x = (0.1 + 0.1 * label) * np.sin(2 * np.pi * (300 + 400 * label) * t)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.stack([x] * channels, 1) if channels > 1 else x, sr)


def write_csv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def make_esc50(root):
    """ESC-50 layout: 2 classes x 2 clips in each of the 5 folds; every third clip 44.1 kHz stereo."""
    rows = []
    for fold in range(1, 6):
        for target, category in enumerate(["dog", "rain"]):
            for take in "AB":
                name = f"{fold}-{100 + target}-{take}-{target}.wav"
                hifi = len(rows) % 3 == 0
                tone(root / "audio" / name, target, sr=44100 if hifi else 16000, channels=2 if hifi else 1)
                rows.append([name, fold, target, category, False, 100 + target, take])
    write_csv(root / "meta" / "esc50.csv", ["filename", "fold", "target", "category", "esc10", "src_file", "take"], rows)
    return root


def make_us8k(root):
    """UrbanSound8K layout: 10 folds, 2 classes, one clip each; every other clip 44.1 kHz stereo."""
    rows = []
    for fold in range(1, 11):
        for class_id, name in enumerate(["dog_bark", "siren"]):
            file = f"{100 + fold}-{class_id}-0-0.wav"
            hifi = len(rows) % 2 == 0
            tone(root / "audio" / f"fold{fold}" / file, class_id, sr=44100 if hifi else 16000, channels=2 if hifi else 1)
            rows.append([file, 100 + fold, 0.0, 0.5, 1, fold, class_id, name])
    write_csv(root / "metadata" / "UrbanSound8K.csv",
              ["slice_file_name", "fsID", "start", "end", "salience", "fold", "classID", "class"], rows)
    return root


def make_hear(root, kfold=True):
    """HEAR scene task: k folds (multiclass) or train/valid/test (multilabel), audio in 16000/<split>/."""
    classes = ["cat", "dog", "owl"]
    splits = ["fold00", "fold01", "fold02"] if kfold else ["train", "valid", "test"]
    meta = {"task_name": "toy_kfold" if kfold else "toy_multilabel", "version": "hear2021", "embedding_type": "scene",
            "prediction_type": "multiclass" if kfold else "multilabel",
            "split_mode": "new_split_kfold" if kfold else "trainvaltest", "sample_duration": 0.5,
            "evaluation": ["top1_acc"] if kfold else ["mAP"]}
    if kfold:
        meta["nfolds"], meta["splits"] = 3, splits
    root.mkdir(parents=True)
    (root / "task_metadata.json").write_text(json.dumps(meta))
    write_csv(root / "labelvocabulary.csv", ["idx", "label"], list(enumerate(classes)))
    for s, split in enumerate(splits):
        entries = {}
        for i in range(6):
            c = i % 3
            labels = [classes[c]] if kfold else sorted({classes[c], classes[(c + i // 3) % 3]})
            name = f"{split}_{i}.wav"
            tone(root / "16000" / split / name, c)
            entries[name] = labels
        (root / f"{split}.json").write_text(json.dumps(entries))
    return root


def assert_disjoint_folds(task):
    """Leave-one-fold-out: the test clips are exactly the fold's, and no clip (by file) is in two of
    train / valid / test."""
    files = np.array(task["files"])
    tested = []
    for k, train, valid, test in probe.cv_splits(task, 0.1, 0):
        assert sorted(test) == sorted(np.flatnonzero(task["folds"] == k))
        assert len(train) and len(valid) and len(test)
        assert not set(files[train]) & set(files[test])
        assert not set(files[valid]) & set(files[test])
        assert not set(files[train]) & set(files[valid])
        tested += list(test)
    return tested


# ----------------------------------------------------------------------------- loaders and metric

def test_esc50_loader_folds(tmp_path):
    root = make_esc50(tmp_path / "ESC-50")
    task = probe.load_esc50(root, download=False)
    meta = list(csv.DictReader(open(root / "meta" / "esc50.csv")))
    assert task["files"] == [f"audio/{r['filename']}" for r in meta]
    assert task["folds"].tolist() == [int(r["fold"]) for r in meta]
    assert task["test_folds"] == [1, 2, 3, 4, 5]
    assert [task["classes"][y] for y in task["labels"]] == [r["category"] for r in meta]
    assert sorted(assert_disjoint_folds(task)) == list(range(20))  # every clip tested exactly once


def test_us8k_loader_folds(tmp_path):
    root = make_us8k(tmp_path / "UrbanSound8K")
    task = probe.load_us8k(root)
    assert task["test_folds"] == list(range(1, 11))
    for f, k in zip(task["files"], task["folds"]):
        assert f.startswith(f"audio/fold{k}/") and (root / f).is_file()
    assert task["classes"] == ["dog_bark", "siren"]
    assert sorted(assert_disjoint_folds(task)) == list(range(20))


def test_hear_kfold_loader(tmp_path):
    root = make_hear(tmp_path / "toy_kfold")
    task = probe.load_hear(root)
    assert task["name"] == "hear:toy_kfold" and not task["multilabel"]
    assert task["test_folds"] == [0, 1, 2] and task["valid_fold"] is None
    for f, k in zip(task["files"], task["folds"]):
        assert f.startswith(f"16000/fold0{k}/")
    entries = json.loads((root / "fold01.json").read_text())
    for f, y in zip(task["files"], task["labels"]):
        if f.startswith("16000/fold01/"):
            assert entries[f.split("/")[-1]] == [task["classes"][y]]
    assert sorted(assert_disjoint_folds(task)) == list(range(18))


def test_hear_train_valid_test_multilabel_loader(tmp_path):
    root = make_hear(tmp_path / "toy_multilabel", kfold=False)
    task = probe.load_hear(root)
    assert task["multilabel"] and task["labels"].shape == (18, 3)
    splits = list(probe.cv_splits(task, 0.1, 0))
    assert len(splits) == 1  # one fold: train on train, stop on valid, test on test
    _, train, valid, test = splits[0]
    files = np.array(task["files"])
    assert all(f.startswith("16000/train/") for f in files[train])
    assert all(f.startswith("16000/valid/") for f in files[valid])
    assert all(f.startswith("16000/test/") for f in files[test])
    entries = json.loads((root / "test.json").read_text())
    for f, y in zip(files[test], task["labels"][test]):
        assert sorted(task["classes"][i] for i in np.flatnonzero(y)) == entries[f.split("/")[-1]]


def test_gm_notes_folds_are_instrument_disjoint():
    task = probe.load_csv(DATA / "gm_notes", "pitch")
    meta = list(csv.DictReader(open(DATA / "gm_notes" / "meta.csv")))
    assert task["folds"].tolist() == [int(r["fold"]) for r in meta]
    program = np.array([r["program"] for r in meta])
    for k, train, valid, test in probe.cv_splits(task, 0.1, 0):
        assert not set(program[test]) & set(program[np.r_[train, valid]])


def test_csv_without_fold_column_gets_seeded_stratified_folds(tmp_path):
    write_csv(tmp_path / "data" / "meta.csv", ["file", "kind"], [[f"{i}.wav", "ab"[i % 2]] for i in range(20)])
    task = probe.load_csv(tmp_path / "data", "kind", seed=3)
    assert task["test_folds"] == [0, 1, 2, 3, 4]
    assert np.bincount(task["folds"] * 2 + task["labels"]).tolist() == [2] * 10  # 2 per class and fold
    assert task["folds"].tolist() == probe.load_csv(tmp_path / "data", "kind", seed=3)["folds"].tolist()
    assert task["folds"].tolist() != probe.load_csv(tmp_path / "data", "kind", seed=4)["folds"].tolist()


def test_max_per_class_is_stratified_and_deterministic():
    task = probe.load_csv(DATA / "fsdd", "digit")
    small = probe.subsample(task, 20, seed=0)
    assert small["files"] == probe.subsample(task, 20, seed=0)["files"]
    assert np.bincount(small["folds"] * 10 + small["labels"]).tolist() == [4] * 50  # 4 per digit and fold
    assert set(small["files"]) <= set(task["files"])


def test_read_audio_downmixes_and_resamples(tmp_path):
    t = np.arange(44100) / 44100
    x = 0.3 * np.sin(2 * np.pi * 440 * t)
    sf.write(tmp_path / "same.wav", np.stack([x, x], 1), 44100)
    sf.write(tmp_path / "opposite.wav", np.stack([x, -x], 1), 44100)
    y = probe.read_audio(tmp_path / "same.wav")  # the shared helper: a numpy array, as in every script
    assert y.dtype == np.float32 and y.shape == (16000,)
    assert np.argmax(np.abs(np.fft.rfft(y))) == 440  # 1-s clip: bin = Hz
    assert abs(np.abs(y).max() - 0.3) < 0.02
    assert np.abs(probe.read_audio(tmp_path / "opposite.wav")).max() < 1e-3  # channels averaged


def test_map_score_leaves_out_classes_without_positives():
    # hand-checkable: class 0 ranked perfectly (AP 1), class 1 positives at ranks 1 and 3 (AP 5/6),
    # class 2 has no positive and is left out; tied scores form one threshold
    y = np.array([[1, 1, 0], [0, 0, 0], [0, 1, 0], [0, 0, 0]], dtype=np.float32)
    s = np.array([[.9, .9, .1], [.1, .8, .2], [.2, .7, .3], [.05, .1, .4]])
    assert probe.score(y, s, multilabel=True) == pytest.approx((1 + 5 / 6) / 2)
    assert probe.score(np.array([[1, 0], [0, 1]], np.float32), np.array([[.5, .5], [.5, .5]]), True) == pytest.approx(0.5)
    assert np.isnan(probe.score(np.zeros((3, 2), np.float32), s[:3, :2], multilabel=True))
    assert probe.score(np.array([0, 1, 1]), np.array([[1, 0], [0, 1], [1, 0]]), multilabel=False) == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------- end to end

FSDD = ["--task", "csv", "--data-dir", DATA / "fsdd", "--label", "digit", "--max-per-class", "20"]


@pytest.fixture(scope="module")
def fsdd_runs(tmp_path_factory):
    """Two probes of the same encoder on fsdd digits, each embedding afresh (own --out and cache)."""
    tmp = tmp_path_factory.mktemp("fsdd")
    enc = make_encoder(tmp / "run" / "encoder.pt")
    procs = [run(*FSDD, "--encoder", enc, "--out", tmp / name) for name in ("a", "b")]
    for p in procs:
        assert p.returncode == 0, p.stderr[-2000:]
    return dict(tmp=tmp, encoder=enc, procs=procs, results=[results(tmp / name) for name in ("a", "b")])


def test_fsdd_digit_above_chance_and_reproducible(fsdd_runs):
    (a, b), ra, rb = fsdd_runs["procs"], *fsdd_runs["results"]
    assert "embedded 200 clips" in a.stdout and "embedded 200 clips" in b.stdout
    assert ra["rows"] and [r["score"] for r in ra["rows"]] == [r["score"] for r in rb["rows"]]
    assert [r["fold"] for r in ra["rows"]] == [0, 1, 2, 3, 4]
    assert all(r["n_test"] == 40 and r["metric"] == "accuracy" for r in ra["rows"])
    (summary,) = ra["summary"]
    assert summary["task"] == "csv:fsdd:digit" and summary["folds"] == 5
    assert summary["mean"] > 0.3, summary  # chance: 0.1
    assert f"| {fsdd_runs['encoder']} | {100 * summary['mean']:.1f} ± {100 * summary['std']:.1f} |" in a.stdout


def test_cache_reused_and_invalidated(fsdd_runs):
    tmp, enc = fsdd_runs["tmp"], fsdd_runs["encoder"]
    args = [*FSDD, "--encoder", enc, "--out", tmp / "a"]
    (cache,) = (tmp / "a" / "embeddings").glob("*.npz")
    with np.load(cache) as z:
        assert {"embeddings", "files", "skipped", "encoder_hash", "data_hash"} <= set(z.files)
        assert z["embeddings"].shape == (200, 512) and z["embeddings"].dtype == np.float32
        assert str(z["encoder_hash"]) == hashlib.sha256(enc.read_bytes()).hexdigest()
        task = probe.subsample(probe.load_csv(DATA / "fsdd", "digit"), 20, seed=0)
        assert z["files"].tolist() == task["files"] and z["skipped"].tolist() == []
        before = z["embeddings"].copy()
    mtime = cache.stat().st_mtime_ns

    again = run(*args)
    assert again.returncode == 0 and "cached embeddings" in again.stdout and "embedded" not in again.stdout
    assert cache.stat().st_mtime_ns == mtime
    assert [r["score"] for r in results(tmp / "a")["rows"]] == [r["score"] for r in fsdd_runs["results"][0]["rows"]]

    make_encoder(enc, seed=1)  # same path, new weights
    changed = run(*args, "--epochs", "1")
    assert changed.returncode == 0 and "embedded 200 clips" in changed.stdout
    with np.load(cache) as z:
        assert str(z["encoder_hash"]) == hashlib.sha256(enc.read_bytes()).hexdigest()
        assert not np.allclose(z["embeddings"], before)

    fewer = run(*args, "--epochs", "1", "--max-per-class", "10")  # other clips (last flag wins): embedded again
    assert fewer.returncode == 0 and "embedded 100 clips" in fewer.stdout


def test_every_label_of_a_folder_reuses_one_embedding_file(encoder, tmp_path):
    root = tmp_path / "data"
    for i in range(12):
        tone(root / f"{i}.wav", i % 3)
    write_csv(root / "meta.csv", ["file", "pitch", "loud", "fold"], [[f"{i}.wav", i % 3, i // 2 % 2, i % 2] for i in range(12)])
    args = ["--task", "csv", "--data-dir", root, "--encoder", encoder, "--out", tmp_path / "out", "--epochs", "2"]
    first, second = run(*args, "--label", "pitch"), run(*args, "--label", "loud")
    assert first.returncode == 0 and second.returncode == 0, second.stderr[-2000:]
    assert "embedded 12 clips" in first.stdout and "cached embeddings" in second.stdout and "embedded" not in second.stdout
    assert len(list((tmp_path / "out" / "embeddings").glob("*.npz"))) == 1
    assert [s["task"] for s in results(tmp_path / "out")["summary"]] == ["csv:data:pitch", "csv:data:loud"]


def test_gm_notes_pitch_above_chance(encoder, tmp_path):
    proc = run("--task", "csv", "--data-dir", DATA / "gm_notes", "--label", "pitch", "--encoder", encoder,
               "--max-per-class", "10", "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (summary,) = results(tmp_path)["summary"]
    assert summary["mean"] > 5 / 49, summary  # chance: 1/49, instrument-disjoint folds


def test_two_encoders_side_by_side_on_esc50_replica(encoder, tmp_path):
    other = make_encoder(tmp_path / "random" / "encoder.pt", seed=1)
    root = make_esc50(tmp_path / "ESC-50")
    proc = run("--task", "esc50", "--data-dir", root, "--encoder", encoder, other, "--out", tmp_path / "out", "--epochs", "20")
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = results(tmp_path / "out")
    assert [(r["encoder"], r["fold"]) for r in res["rows"]] == [(str(e), k) for e in (encoder, other) for k in range(1, 6)]
    assert all(r["n_test"] == 4 and r["n_train"] + r["n_valid"] == 16 for r in res["rows"])
    assert [s["encoder"] for s in res["summary"]] == [str(encoder), str(other)]
    assert res["skipped_files"] == {"esc50": []}
    assert "| encoder | esc50 |" in proc.stdout
    assert f"| {other} | " in proc.stdout


def test_hear_multilabel_reports_map(encoder, tmp_path):
    root = make_hear(tmp_path / "toy_multilabel", kfold=False)
    proc = run("--task", "hear", "--data-dir", root, "--encoder", encoder, "--out", tmp_path / "out", "--epochs", "20")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = results(tmp_path / "out")["rows"]
    assert row["metric"] == "mAP" and row["task"] == "hear:toy_multilabel" and row["fold"] == 0
    assert (row["n_train"], row["n_valid"], row["n_test"]) == (6, 6, 6)
    assert 0 < row["score"] <= 1


# ----------------------------------------------------------------------------- bad input

def csv_folder(root, labels):
    for i, y in enumerate(labels):
        tone(root / "audio" / f"{i}.wav", "ab".index(y) if y in "ab" else 0)
    write_csv(root / "meta.csv", ["file", "kind", "fold"], [[f"audio/{i}.wav", y, i % 2] for i, y in enumerate(labels)])
    return root


def test_missing_dir_exits_2(encoder, tmp_path):
    proc = run("--task", "csv", "--data-dir", tmp_path / "nope", "--label", "digit", "--encoder", encoder, "--out", tmp_path)
    assert proc.returncode == 2 and len(error_lines(proc)) == 1 and "nope" in proc.stderr


def test_missing_label_column_exits_2(encoder, tmp_path):
    root = csv_folder(tmp_path / "data", "aabb")
    proc = run("--task", "csv", "--data-dir", root, "--label", "digit", "--encoder", encoder, "--out", tmp_path)
    assert proc.returncode == 2 and len(error_lines(proc)) == 1 and "'digit'" in proc.stderr


def test_missing_label_flag_exits_2(encoder, tmp_path):
    proc = run("--task", "csv", "--data-dir", DATA / "fsdd", "--encoder", encoder, "--out", tmp_path)
    assert proc.returncode == 2 and len(error_lines(proc)) == 1 and "--label" in proc.stderr


def test_class_with_one_clip_exits_2_or_is_dropped(encoder, tmp_path):
    root = csv_folder(tmp_path / "data", "aaaabbbbc")
    proc = run("--task", "csv", "--data-dir", root, "--label", "kind", "--encoder", encoder, "--out", tmp_path / "out")
    assert proc.returncode == 2 and len(error_lines(proc)) == 1 and "'c'" in proc.stderr
    proc = run("--task", "csv", "--data-dir", root, "--label", "kind", "--encoder", encoder, "--out", tmp_path / "out",
               "--drop-rare", "--epochs", "3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sum(r["n_test"] for r in results(tmp_path / "out")["rows"]) == 8


@pytest.mark.parametrize("kind", ["text", "state_dict", "wrong_output"])
def test_not_an_exported_encoder_exits_2(kind, tmp_path):
    path = tmp_path / "encoder.pt"
    if kind == "text":
        path.write_text("not a model\n")
    elif kind == "state_dict":
        torch.save(RandomFeatures().state_dict(), path)
    else:  # TorchScript, but (B, T) -> (B, T): a waveform, not an embedding
        torch.jit.save(torch.jit.script(torch.nn.Identity()), str(path))
    proc = run("--task", "csv", "--data-dir", DATA / "fsdd", "--label", "digit", "--encoder", path, "--out", tmp_path)
    assert proc.returncode == 2 and len(error_lines(proc)) == 1, proc.stderr
    assert "not an exported encoder" in proc.stderr


@pytest.mark.parametrize("how", [["--no-download"], []])  # flag, or PROBE_NO_DOWNLOAD=1 from run()
def test_esc50_missing_offline_exits_2(encoder, tmp_path, how):
    proc = run("--task", "esc50", "--data-dir", tmp_path / "ESC-50", "--encoder", encoder, "--out", tmp_path, *how)
    assert proc.returncode == 2 and len(error_lines(proc)) == 1, proc.stderr
    assert str(tmp_path / "ESC-50") in proc.stderr and probe.ESC50_URL in proc.stderr
    assert not (tmp_path / "ESC-50").exists()


def test_undecodable_clips_are_skipped_and_counted(encoder, tmp_path):
    root = csv_folder(tmp_path / "data", "aaaabbbb")
    (root / "audio" / "3.wav").write_bytes(b"RIFF but not audio")  # fails at the header
    sf.write(tmp_path / "x.flac", np.random.default_rng(0).normal(0, 0.1, 16000), 16000)
    flac = bytearray((tmp_path / "x.flac").read_bytes())
    flac[200:-100] = b"\xff" * (len(flac) - 300)  # header fine, audio frames not
    (root / "audio" / "5.wav").write_bytes(bytes(flac))
    proc = run("--task", "csv", "--data-dir", root, "--label", "kind", "--encoder", encoder, "--out", tmp_path / "out",
               "--epochs", "3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("probe.py:")]
    assert len(warnings) == 1, warnings  # one read pass: both counted together
    assert "skipped 2 clips" in warnings[0] and "audio/3.wav" in warnings[0]
    res = results(tmp_path / "out")
    assert [f.split(" ")[0] for f in res["skipped_files"]["csv:data:kind"]] == ["audio/3.wav", "audio/5.wav"]
    assert sum(r["n_test"] for r in res["rows"]) == 6


@pytest.mark.parametrize("folder,label,per_class,chance", [("fsdd", "digit", 10, 1 / 10), ("gm_notes", "pitch", 6, 1 / 49)])
def test_briefly_trained_encoder_beats_chance_next_to_random_init(trained_run, random_run, tmp_path, folder, label,
                                                                  per_class, chance):
    enc, rnd = trained_run / "encoder.pt", random_run / "encoder.pt"
    args = ["--task", "csv", "--data-dir", DATA / folder, "--label", label, "--max-per-class", per_class,
            "--encoder", enc, rnd, "--epochs", "30", "--out", tmp_path]
    first = run(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    summary = {s["encoder"]: s for s in results(tmp_path)["summary"]}
    assert summary[str(enc)]["mean"] > 2 * chance, summary
    assert f"| {enc} |" in first.stdout and f"| {rnd} |" in first.stdout  # one table row per encoder
    again = run(*args)  # cached embeddings, same seeded probe: the same numbers
    assert "cached embeddings" in again.stdout
    assert [r["score"] for r in results(tmp_path)["rows"]] == [r["score"] for r in json.loads(json.dumps(
        results(tmp_path)["rows"]))]
    assert {s["encoder"]: s["mean"] for s in results(tmp_path)["summary"]} == {k: v["mean"] for k, v in summary.items()}
