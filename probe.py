"""Linear probe of exported encoders on labelled audio (the paper's downstream evaluation).

Every encoder (train.py's TorchScript encoder.pt: (B, T) 16 kHz mono -> (B, 512)) embeds each clip of a task once,
whole; the embeddings are cached per (encoder, clip list), so every label of a folder reuses them. A linear layer on
the standardized embeddings (Adam, lr 1e-3, batch 32, early stopping on a split of the training folds) is trained per
fold, leaving one fold out; the table reports mean ± std over folds of accuracy (multiclass) or mAP (multilabel), in %.

  # ESC-50, official 5 folds (downloaded into --data-dir when it is missing and the machine is online)
  python probe.py --task esc50 --data-dir data/ESC-50 --encoder runs/voice/encoder.pt --out probes/
  # UrbanSound8K, official 10 folds
  python probe.py --task us8k --data-dir data/UrbanSound8K --encoder runs/voice/encoder.pt --out probes/
  # any folder with meta.csv (`file` relative to the folder, label columns, optional `fold` column); two encoders
  # side by side (e.g. trained vs random init) give one table row each; --max-per-class 20: a quick look
  python probe.py --task csv --data-dir ../shared/data/fsdd --label digit --max-per-class 20 \\
      --encoder runs/voice/encoder.pt runs/random/encoder.pt --out probes/
  # a HEAR-preprocessed scene task (k folds, or train/valid/test), e.g. FSD50K is scored by mAP
  python probe.py --task hear --data-dir tasks/esc50-v2.0.0-full --encoder runs/voice/encoder.pt --out probes/
  # no --encoder: every runs/*/encoder.pt, one row each
  python probe.py --task esc50

probe.py is also a HEAR 2021 module (load_model, get_scene_embeddings, get_timestamp_embeddings):

  python -m heareval.embeddings.runner probe --model runs/voice/encoder.pt --tasks-dir hear/tasks
  python -m hearvalidator.validate probe --model runs/voice/encoder.pt
  # the runner's embeddings, alone or beside our encoders on the task folder
  python probe.py --task hear --data-dir embeddings/probe/nsynth_pitch-v2.2.3-5h --out probes/
  python probe.py --task hear --data-dir hear/tasks/nsynth_pitch-v2.2.3-5h --encoder runs/voice/encoder.pt \\
      --embeddings embeddings/openl3_hear/nsynth_pitch-v2.2.3-5h --out probes/

Runs with the same --out add to one results.json (rows of the same encoder and task are replaced), so the printed
table gathers every encoder x task probed into that folder; runs at the same time merge under a lock.
"""

import argparse
import collections
import contextlib
import csv
import errno
import fcntl
import hashlib
import io
import itertools
import json
import math
import os
import re
import signal
import stat
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from sklearn.metrics import average_precision_score

SAMPLE_RATE = 16000  # encoder contract: 16 kHz mono, 1-s windows
DATA = Path(__file__).resolve().parent / "data"  # default home of downloaded benchmarks (git-ignored)
ESC50_URL = "https://github.com/karoldvl/ESC-50/archive/master.zip"
US8K_URL = "https://urbansounddataset.weebly.com/urbansound8k.html"
HEAR_HOP_MS = 50.0  # HEAR asks for a timestamp hop of at most 50 ms
WINDOWS_PER_CALL = 256  # 1-s windows per encoder call in the HEAR API: memory stays bounded whatever the clip length


# === 1. the paper ===
# A task is a dict: name, root (the files' folder), files, classes, multilabel, labels ((N,) class index or (N, C)
# multi-hot), folds ((N,) int), test_folds (each left out), valid_fold (early stopping only; None: carve from training)
def embed(encoder, path, task, args):
    """(embeddings, their clip indices, the clips skipped with why) of the clips that decode, each whole, read once.
    Clips up to 1 s are zero-padded to 1 s (as the encoder does) to batch together; longer ones batch by length."""
    from tqdm import tqdm
    out, bad, waiting = {}, [], {}

    def run(batch):
        y = encode(encoder, torch.stack([x for _, x in batch]).to(args.device), path).cpu().numpy()
        if out and y.shape[1] != len(next(iter(out.values()))):  # every clip's embedding has one width
            raise ValueError(f"encoder {path} gives {y.shape[1]}-d embeddings for clips of "
                             f"{len(batch[0][1]) / SAMPLE_RATE:g} s, {len(next(iter(out.values())))}-d for others")
        out.update(zip([i for i, _ in batch], y))

    root, files = task["root"], task["files"]
    with torch.no_grad(), tqdm(total=len(files), unit="clip", desc=f"{task['name']} {path}", disable=None) as bar:
        for i, f in enumerate(files):
            bar.update()
            try:
                x = torch.from_numpy(read_audio(root / f))
            except ValueError as e:  # read_audio's one error for a clip that cannot be used: skipped and counted
                bad.append(f"{f} ({first_line(e)})")
                continue
            x = torch.nn.functional.pad(x, (0, max(0, SAMPLE_RATE - len(x))))
            waiting.setdefault(len(x), []).append((i, x))
            if len(waiting[len(x)]) == args.batch_size:
                run(waiting.pop(len(x)))
        for group in waiting.values():
            run(group)
    if not out:
        raise ValueError(f"none of the {len(files)} clips under {root} decodes (first: {bad[0]})")
    ok = sorted(out)
    return np.stack([out[i] for i in ok]).astype(np.float32), ok, bad


def score(y_true, logits, multilabel):  # accuracy, or macro AP over the classes with a positive clip (NaN if none has)
    if not multilabel:
        return float((logits.argmax(1) == y_true).mean())
    keep = y_true.sum(0) > 0
    return float(average_precision_score(y_true[:, keep], logits[:, keep], average="macro")) if keep.any() else math.nan


def train_probe(x, y, train, valid, task, seed, args):  # early stopping on the validation score (ties: lower loss)
    torch.manual_seed(seed)
    model = torch.nn.Linear(x.shape[1], len(task["classes"]))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = torch.nn.BCEWithLogitsLoss() if task["multilabel"] else torch.nn.CrossEntropyLoss()
    order = torch.Generator().manual_seed(seed)
    x_train, y_train, x_valid, y_valid = x[train], y[train], x[valid], y[valid]
    best, best_state, best_epoch = (-math.inf, -math.inf), None, 0
    for epoch in range(1, args.epochs + 1):
        for idx in torch.randperm(len(train), generator=order).split(args.probe_batch_size):
            loss = loss_fn(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            logits = model(x_valid)
            s = score(y_valid.numpy(), logits.numpy(), task["multilabel"])
            current = (-math.inf if math.isnan(s) else s, -loss_fn(logits, y_valid).item())
        if current > best:
            best, best_epoch, best_state = current, epoch, {k: v.clone() for k, v in model.state_dict().items()}
        elif epoch - best_epoch >= args.patience:
            break
    model.load_state_dict(best_state)
    return model, best_epoch


def cv_splits(task, valid_frac, seed):  # (fold, train, valid, test) per test fold; valid: valid_fold or stratified
    folds, y = task["folds"], task["labels"].argmax(1) if task["multilabel"] else task["labels"]
    for k in task["test_folds"]:
        test = np.flatnonzero(folds == k)
        if (v := task["valid_fold"]) is not None:
            yield k, np.flatnonzero((folds != k) & (folds != v)), np.flatnonzero(folds == v), test
            continue
        rest = np.flatnonzero(folds != k)
        rng = np.random.default_rng(seed + k)
        valid = []
        for c in np.unique(y[rest]):
            members = rng.permutation(rest[y[rest] == c])
            valid += members[:min(round(valid_frac * len(members)), len(members) - 1)].tolist()
        valid = np.sort(valid or [int(rng.choice(rest))])  # tiny tasks: still early-stop on something
        yield k, np.setdiff1d(rest, valid), valid, test


def probe_task(emb, task, args):
    x = torch.from_numpy(emb)
    y = torch.from_numpy(task["labels"]).float() if task["multilabel"] else torch.from_numpy(task["labels"])
    rows, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # a small linear layer trains faster without thread syncs, and the same on any machine
    for k, train, valid, test in cv_splits(task, args.valid_frac, args.seed):
        t0 = time.time()
        mean, std = x[train].mean(0), x[train].std(0)  # standardized by the clips the probe is fit on only
        xs = (x - mean) / torch.where(std > 0, std, torch.ones_like(std))
        model, best_epoch = train_probe(xs, y, train, valid, task, args.seed + k, args)
        with torch.no_grad():
            s = score(y[test].numpy(), model(xs[test]).numpy(), task["multilabel"])
        rows.append(dict(fold=int(k), score=s, epochs=best_epoch, n_train=len(train), n_valid=len(valid),
                         n_test=len(test), seconds=round(time.time() - t0, 2)))
    torch.set_num_threads(threads)
    return rows


def probe(args):
    task = load_task(args)
    task = subsample(task, args.max_per_class, args.seed) if args.max_per_class else task
    task, _ = check_classes(task, args.drop_rare)  # before the long part: fail in seconds
    runs = ([args.data_dir] if task.get("runner") else []) + args.embeddings  # heareval runner outputs
    encoders = {path: load_encoder(path, args.device) for path in encoder_paths(args, runs)}  # bad ones fail now
    metric = "mAP" if task["multilabel"] else "accuracy"
    print(f"{task['name']}: {len(task['files'])} clips, {len(task['classes'])} classes, "
          f"{len(task['test_folds'])} test folds, {metric}")
    out_path = args.out / "results.json"
    read_results(out_path)  # a foreign results.json stops the run before the long part

    runner = {str(folder): runner_embeddings(folder, task) for folder in dict.fromkeys(runs)}  # bad ones fail now
    got = {path: task_embeddings(encoder, path, task, args) for path, encoder in encoders.items()} | runner
    ok = sorted(set.intersection(*(set(o) for o, _, _ in got.values())))  # every source is probed on these
    skipped = sorted(set().union(*(s for _, _, s in got.values())))
    if skipped:
        warn(f"{task['name']}: skipped {len(skipped)} clips that do not decode (first: {skipped[0]})")
    task, keep = check_classes(select(task, ok), args.drop_rare)  # the skipped clips may leave a class too small
    for path, (o, e, _) in got.items():
        pos, who = {i: k for k, i in enumerate(o)}, dict(encoder=path, task=task["name"], metric=metric)
        rows = [dict(who, **r) for r in probe_task(e[[pos[i] for i in ok]][keep], task, args)]
        for r in rows:
            print(f"{path} {task['name']} fold {r['fold']}: {metric} {100 * r['score']:.1f} "
                  f"(epoch {r['epochs']}, {r['n_train']} train / {r['n_test']} test, {r['seconds']:.1f} s)")
        scores = np.array([r["score"] for r in rows])
        summary = dict(who, mean=float(np.nanmean(scores)), std=float(np.nanstd(scores)), folds=len(rows))
        results = merge_results(out_path, rows, summary, {task["name"]: skipped})  # nothing finished is lost
    print(f"\nresults: {out_path}\n")
    print(table(results["summary"]))


# === 2. beyond the paper ===
def load_task(args):
    if args.task == "esc50":
        download = not args.no_download and os.environ.get("PROBE_NO_DOWNLOAD", "") in ("", "0")
        return load_esc50(args.data_dir or DATA / "ESC-50", download)
    if args.task == "us8k":
        return load_us8k(args.data_dir or DATA / "UrbanSound8K")
    if args.task == "hear":
        return load_hear(args.data_dir)
    return load_csv(args.data_dir, args.label, args.fold_column, args.seed)


def read_table(path, columns):  # a CSV's rows as dicts; UTF-8, with or without the BOM that spreadsheets write
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            if "\0" in "".join(header):  # UTF-16 without a BOM reads as UTF-8 with a NUL beside each letter
                raise ValueError(f"{path} is not UTF-8 text (NUL bytes: UTF-16?); save it as UTF-8 CSV")
            if dup := next((c for c in header if header.count(c) > 1), None):  # csv would keep the last one only
                raise ValueError(f"{path}: column {dup!r} appears {header.count(dup)} times in the header; rename one")
            if missing := [c for c in columns if c not in header]:
                raise ValueError(f"{path} has no column {missing[0]!r} (columns: {', '.join(header)})")
            rows = list(reader)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.object[e.start]:#x} at {e.start}); save it as UTF-8 CSV")
    except csv.Error as e:
        raise ValueError(f"{path} is not a readable CSV (line {reader.line_num}: {e})")
    except FileNotFoundError:
        raise ValueError(f"no {path.name} in {path.parent}")
    if short := [i for i, r in enumerate(rows) if None in r.values()]:
        raise ValueError(f"{path}: row {short[0] + 2} has fewer fields than the header")
    if not rows:
        raise ValueError(f"{path} lists no clips")
    return rows


def to_int(value, where, what="fold"):  # a fold is an int64, and seed + fold seeds its split: 0 <= fold < 2^63
    with contextlib.suppress(ValueError):
        if what != "fold" or 0 <= int(value) < 2**63:
            return int(value)
    raise ValueError(f"{where}: {what} {value!r} is not an integer{' in [0, 2^63)' * (what == 'fold')}")


def multiclass_task(name, root, files, values, folds):
    def key(v):  # numeric labels (digits, MIDI pitches) in numeric order, others alphabetically
        with contextlib.suppress(ValueError):
            return (0, float(v), v)
        return (1, 0.0, v)
    if len(set(files)) < len(files):  # the embedding cache holds one row per clip: a second row would be dropped
        dup = next(f for f, n in collections.Counter(files).items() if n > 1)
        raise ValueError(f"{name}: {dup} is listed {files.count(dup)} times; give every clip one row")
    classes = sorted(set(values), key=key)
    index = {c: i for i, c in enumerate(classes)}
    return dict(name=name, root=Path(root), files=list(files), classes=classes, multilabel=False,
                labels=np.array([index[v] for v in values], dtype=np.int64), folds=np.array(folds, dtype=np.int64),
                test_folds=sorted(set(folds)), valid_fold=None)


def load_esc50(data_dir, download=True):  # meta/esc50.csv (filename, fold 1-5, target, category, ...), audio/*.wav
    if not (path := data_dir / "meta" / "esc50.csv").is_file():
        if data_dir.exists() and any(data_dir.iterdir()):
            raise ValueError(f"no meta/esc50.csv in {data_dir}; point --data-dir at the unpacked {ESC50_URL}")
        if not download:
            raise ValueError(f"no ESC-50 at {data_dir}; unpack {ESC50_URL} there (meta/, audio/) or allow the download")
        download_esc50(data_dir)
    rows = read_table(path, ["filename", "fold", "category"])
    return multiclass_task("esc50", data_dir, [f"audio/{r['filename']}" for r in rows],
                           [r["category"] for r in rows], [to_int(r["fold"], path) for r in rows])


def download_esc50(data_dir):  # the official archive, checked (zip CRCs, meta file), moved into place in one rename
    import tempfile
    import urllib.request
    import zipfile
    from tqdm import tqdm
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    fix = f"unpack {ESC50_URL} so that {data_dir}/meta/esc50.csv and {data_dir}/audio/ exist"
    with tempfile.TemporaryDirectory(prefix=".esc50-", dir=data_dir.parent, ignore_cleanup_errors=True) as tmp:
        archive = Path(tmp) / "master.zip"
        try:
            with (urllib.request.urlopen(ESC50_URL, timeout=30) as r, open(archive, "wb") as f,
                  tqdm(total=int(r.headers.get("Content-Length") or 0) or None, unit="B", unit_scale=True,
                       desc="ESC-50") as bar):
                while chunk := r.read(1 << 20):
                    bar.update(f.write(chunk))
        except OSError as e:  # URLError, timeouts, disk
            raise OSError(f"cannot download ESC-50 ({first_line(e)}); {fix}")
        try:
            with zipfile.ZipFile(archive) as z:
                if z.testzip() is not None or "ESC-50-master/meta/esc50.csv" not in z.namelist():
                    raise zipfile.BadZipFile("damaged or not the official one")
                z.extractall(Path(tmp) / "unpacked")
        except zipfile.BadZipFile as e:
            raise ValueError(f"downloaded ESC-50 archive is not usable ({first_line(e)}); {fix}")
        os.replace(Path(tmp) / "unpacked" / "ESC-50-master", data_dir)  # onto a missing or an empty folder only


def load_us8k(data_dir):  # metadata/UrbanSound8K.csv (slice_file_name, ..., fold 1-10, classID, class), audio/foldK/
    if not (path := data_dir / "metadata" / "UrbanSound8K.csv").is_file():
        raise ValueError(f"no UrbanSound8K at {data_dir} (metadata/UrbanSound8K.csv); unpack it there from {US8K_URL}")
    rows = read_table(path, ["slice_file_name", "fold", "class"])
    return multiclass_task("us8k", data_dir, [f"audio/fold{r['fold']}/{r['slice_file_name']}" for r in rows],
                           [r["class"] for r in rows], [to_int(r["fold"], path) for r in rows])


def load_hear(data_dir):  # a HEAR scene task: <split>.json ({filename: [labels]}), audio in <rate>/<split>/<filename>
    meta = read_json(data_dir / "task_metadata.json", "HEAR task's metadata")  # missing: not a HEAR task folder
    kind = meta.get("prediction_type", "multiclass")
    if meta.get("embedding_type", "scene") != "scene":
        raise ValueError(f"{data_dir}: HEAR {meta.get('embedding_type')} tasks are not probed, only scene tasks")
    if kind not in ("multiclass", "multilabel"):
        raise ValueError(f"{data_dir}: prediction_type {kind!r} is neither multiclass nor multilabel")
    vocab = read_table(vocab_path := data_dir / "labelvocabulary.csv", ["idx", "label"])
    classes = [r["label"] for r in sorted(vocab, key=lambda r: to_int(r["idx"], vocab_path, "idx"))]
    index = {c: i for i, c in enumerate(classes)}

    # k-fold tasks name their folds (fold00, fold01, ...); otherwise one split, reported as fold 0
    splits = meta.get("splits") or [p.stem for p in data_dir.glob("fold*.json")]
    if not isinstance(splits, list):
        raise ValueError(f"{data_dir / 'task_metadata.json'}: splits is not a list")
    splits = sorted(map(str, splits))
    fold_of, valid_fold = {s: i for i, s in enumerate(splits)}, None
    if not splits and (data_dir / "train.json").is_file() and (data_dir / "test.json").is_file():
        fold_of = {"test": 0, "train": 1}
        if (data_dir / "valid.json").is_file():
            fold_of["valid"] = valid_fold = 2
    elif not splits:
        raise ValueError(f"{data_dir}: no split files (fold00.json, ... or train.json and test.json)")
    rates = sorted(int(p.name) for p in data_dir.iterdir() if p.is_dir() and p.name.isdigit())
    runner = not rates and any(data_dir.glob("*/*.embedding.npy"))  # what heareval's runner writes: no audio
    if not rates and not runner:
        raise ValueError(f"{data_dir}: no audio folder such as 16000/, nor the runner's <split>/*.embedding.npy")
    prefix = "" if runner else ("16000/" if SAMPLE_RATE in rates else f"{rates[-1]}/")
    files, labels, folds = [], [], []
    for split, fold in fold_of.items():
        if not (entries := read_json(path := data_dir / f"{split}.json", "HEAR split file")):
            raise ValueError(f"{path} lists no clips")
        for name in sorted(entries):
            if not isinstance(entries[name], list):
                raise ValueError(f"{path}: the labels of {name} are not a list")
            names = [str(x) for x in entries[name]]
            if unknown := [x for x in names if x not in index]:
                raise ValueError(f"{path}: label {unknown[0]!r} of {name} is not in labelvocabulary.csv")
            if kind == "multiclass" and len(names) != 1:
                raise ValueError(f"{path}: {name} has {len(names)} labels in a multiclass task")
            files.append(f"{prefix}{split}/{name}")
            labels.append(np.isin(classes, names).astype(np.float32) if kind == "multilabel" else index[names[0]])
            folds.append(fold)
    return dict(name=f"hear:{meta.get('task_name', data_dir.name)}", root=data_dir, files=files, classes=classes,
                multilabel=kind == "multilabel", labels=np.array(labels), folds=np.array(folds, dtype=np.int64),
                test_folds=list(range(len(splits))) or [0], valid_fold=valid_fold, prefix=prefix, runner=runner)


def load_csv(data_dir, label, fold_column=None, seed=0, n_folds=5):  # meta.csv; no fold column: seeded stratified folds
    rows = read_table(path := data_dir / "meta.csv", ["file", label] + ([fold_column] if fold_column else []))
    values = [r[label] for r in rows]
    if "" in values:
        raise ValueError(f"{path}: empty {label!r} in row {values.index('') + 2}")
    column = fold_column or ("fold" if "fold" in rows[0] else None)
    folds = [to_int(r[column], path) for r in rows] if column else [0] * len(rows)
    task = multiclass_task(f"csv:{data_dir.name}:{label}", data_dir, [r["file"] for r in rows], values, folds)
    if column is None:
        print(f"{task['name']}: no fold column, seeded stratified {n_folds}-fold split")
        rng, start = np.random.default_rng(seed), 0
        for c in np.unique(task["labels"]):  # every class spread evenly over the folds
            members = rng.permutation(np.flatnonzero(task["labels"] == c))
            task["folds"][members] = (start + np.arange(len(members))) % n_folds
            start += len(members)
        task["test_folds"] = list(range(n_folds))
    return task


def select(task, idx):
    idx = np.asarray(idx, dtype=np.int64)
    folds = task["folds"][idx]
    return dict(task, files=[task["files"][i] for i in idx], labels=task["labels"][idx], folds=folds,
                test_folds=[k for k in task["test_folds"] if (folds == k).any()])


def subsample(task, max_per_class, seed):  # at most max_per_class clips per class, round-robin over the folds (seeded)
    rng = np.random.default_rng(seed)
    y, keep = task["labels"].argmax(1) if task["multilabel"] else task["labels"], []  # multilabel: by first label
    for c in np.unique(y):
        by_fold = [rng.permutation(np.flatnonzero((y == c) & (task["folds"] == f))) for f in np.unique(task["folds"])]
        order = [i for group in itertools.zip_longest(*by_fold) for i in group if i is not None]
        keep += order[:max_per_class]
    return select(task, np.sort(keep))


def runner_embeddings(folder, task):  # as task_embeddings, from heareval runner's <folder>/<split>/<file>.embedding.npy
    ok, emb, missing = [], [], []
    for i, f in enumerate(task["files"]):
        path = Path(folder) / f"{f.removeprefix(task['prefix'])}.embedding.npy"
        if not path.is_file():
            missing.append(f"{f} (no {path.name} in {folder})")
            continue
        try:
            e = np.load(path, allow_pickle=False)
        except Exception as e:
            raise ValueError(f"{path} is not a .npy embedding ({first_line(e)})")
        if e.ndim != 1 or e.dtype.kind not in "biuf" or not np.isfinite(e).all() or (emb and e.shape != emb[0].shape):
            raise ValueError(f"{path}: not a finite scene embedding of the others' size (shape {e.shape}, {e.dtype})")
        ok.append(i), emb.append(e.astype(np.float32))
    if not ok:
        raise ValueError(f"{folder} holds no embedding of {task['name']}'s clips (<split>/<file>.embedding.npy)")
    return ok, np.stack(emb), missing


class HearModel(torch.nn.Module):  # HEAR API (module docstring), as hearvalidator checks; .to(device) moves the encoder
    def __init__(self, encoder, dim, hop_ms):
        super().__init__()
        self.encoder, self.hop_ms, self.sample_rate = encoder, float(hop_ms), SAMPLE_RATE
        self.scene_embedding_size = self.timestamp_embedding_size = int(dim)

    def train(self, mode=True):  # the encoder's BatchNorm stays in eval mode: no embedding depends on its batch
        self.training = mode
        return self

    def __repr__(self):  # one line, not the encoder's module tree
        return f"HearModel(sample_rate={self.sample_rate}, dim={self.scene_embedding_size}, hop_ms={self.hop_ms})"


def load_model(model_file_path="", hop_ms=HEAR_HOP_MS):  # hop_ms: the runner's --model-options '{"hop_ms": 25}'
    if not model_file_path:
        raise ValueError("load_model needs the path of an exported encoder (runs/NAME/encoder.pt)")
    if not 0 < float(hop_ms) <= 1000:
        raise ValueError(f"hop_ms must be in (0, 1000], not {hop_ms}")
    return HearModel(*read_encoder(model_file_path), hop_ms)


def hear_audio(audio, model):
    audio = torch.as_tensor(audio)
    if audio.dim() != 2:
        raise ValueError(f"audio must be (n_sounds, n_samples), not {tuple(audio.shape)}")
    return audio.to(next(model.encoder.parameters()).device, torch.float32)


@torch.no_grad()
def get_scene_embeddings(audio, model):  # (n_sounds, n_samples) -> (n_sounds, D): each whole clip, as probed
    audio = hear_audio(audio, model)
    per_call = max(1, WINDOWS_PER_CALL // max(1, round(audio.shape[1] / SAMPLE_RATE)))
    return torch.cat([model.encoder(a) for a in audio.split(per_call)]).float()


@torch.no_grad()
def get_timestamp_embeddings(audio, model):  # -> (n_sounds, n_frames, D), timestamps (n_sounds, n_frames) in ms
    """Frame k: the zero-padded 1-s window centred on k * hop_ms, for each k * hop_ms in the clip (0.3 s: 7 frames)."""
    audio = hear_audio(audio, model)
    n_sounds, n_samples = audio.shape
    hop = model.hop_ms * SAMPLE_RATE / 1000  # in samples, maybe fractional: each start is rounded on its own, no drift
    n_frames = int(n_samples / hop + 1e-9) + 1
    starts = (torch.arange(n_frames, dtype=torch.float64) * hop).round().long().to(audio.device)
    window = torch.arange(SAMPLE_RATE, device=audio.device)
    padded = torch.nn.functional.pad(audio, (SAMPLE_RATE // 2, SAMPLE_RATE - SAMPLE_RATE // 2))
    per_call = max(1, WINDOWS_PER_CALL // n_sounds)
    embeddings = torch.cat([model.encoder(padded[:, s[:, None] + window].reshape(-1, SAMPLE_RATE))
                            .reshape(n_sounds, len(s), -1) for s in starts.split(per_call)], dim=1)
    timestamps = (torch.arange(n_frames, dtype=torch.float64) * model.hop_ms).float().to(audio.device)
    return embeddings.float(), timestamps.expand(n_sounds, -1).contiguous()


# === 3. plumbing ===
def read_encoder(path):  # (encoder, D): encoder.pt on the CPU, checked: (B, T) -> (B, D) for a 1-s and a 0.5-s batch
    try:
        encoder = torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as e:
        raise ValueError(f"{path} is not an exported encoder (torch.jit.load: {first_line(e)})")
    try:
        with torch.no_grad():
            dims = [encode(encoder, torch.zeros(s), path).shape[1] for s in [(2, SAMPLE_RATE), (1, SAMPLE_RATE // 2)]]
    except ValueError as e:
        raise ValueError(f"{path} is not an exported encoder ({e})") from None
    if dims[0] != dims[1]:
        raise ValueError(f"{path} is not an exported encoder ({dims[0]}-d embeddings for 1 s, {dims[1]}-d for 0.5 s)")
    return encoder, dims[0]


def load_encoder(path, device):
    encoder = read_encoder(path)[0].to(device)
    if device == "cpu":  # batch norms folded into convolutions, MKLDNN kernels: a ResNet18 embeds ~1.7x faster
        with contextlib.suppress(Exception):  # some scripted modules do not freeze; the plain one computes the same
            encoder = torch.jit.optimize_for_inference(torch.jit.freeze(encoder))
    return encoder


def check_classes(task, drop_rare=False):
    """Stop where a score would mean nothing: fewer than 2 classes, a single-clip class (it cannot be both trained on
    and tested; dropped if asked), a left-out fold leaving too few training clips or sharing no class with them."""
    y, keep, name = task["labels"], np.arange(len(task["files"])), task["name"]
    counts = y.sum(0) if task["multilabel"] else np.bincount(y, minlength=len(task["classes"]))
    rare = [] if task["multilabel"] else [c for c, n in zip(task["classes"], counts) if n == 1]
    if rare and not drop_rare:
        raise ValueError(f"{name}: class {rare[0]!r} has a single clip; cross-validation needs at least 2 "
                         f"per class ({len(rare)} such classes; --drop-rare leaves them out)")
    if rare:
        warn(f"{name}: left out {len(rare)} single-clip classes ({', '.join(rare[:5])}{' ...' * (len(rare) > 5)})")
        keep = np.flatnonzero(counts[y] >= 2)
        task = dict(select(task, keep), classes=[c for c, n in zip(task["classes"], counts) if n >= 2])
        y = task["labels"] = (np.cumsum(counts >= 2) - 1)[task["labels"]]  # old class index -> new one
        counts = counts[counts >= 2]
    present = [c for c, n in zip(task["classes"], counts) if n > 0]
    if len(present) < 2:
        raise ValueError(f"{name}: {len(present)} class ({', '.join(present)}) among {len(y)} clips; "
                         f"a probe needs at least 2 classes")
    folds = task["folds"]
    for k in task["test_folds"]:
        train = (folds != k) & (folds != task["valid_fold"])
        if train.sum() < (1 if task["valid_fold"] is not None else 2):  # 2: one to train on, one to stop on
            raise ValueError(f"{name}: leaving fold {k} out leaves {train.sum()} clips to train on "
                             f"(folds: {', '.join(map(str, sorted(set(folds.tolist()))))}); it needs at least 2 folds")
        if not task["multilabel"] and not np.isin(y[folds == k], y[train]).any():
            raise ValueError(f"{name}: fold {k} holds only classes that no training fold has; its score means nothing")
    return task, keep


def task_embeddings(encoder, encoder_path, task, args):
    """(indices of the clips that decode, their embeddings, the others), cached until the encoder or clips change."""
    p, root = Path(encoder_path).resolve(), task["root"].resolve()
    where = hashlib.sha1(str(p).encode()).hexdigest()[:8]  # two runs/*/encoder.pt differ by folder
    clips = hashlib.sha1(json.dumps([str(root), task["files"]]).encode()).hexdigest()[:8]
    name = re.sub(r"[^A-Za-z0-9.-]+", "_", f"{p.parent.name}_{p.stem}-{where}__{root.name}-{clips}").strip("_")
    path, h = Path(args.cache_dir or args.out / "embeddings") / f"{name}.npz", hashlib.sha256(str(root).encode())
    for f in task["files"]:  # the data hash changes with any clip's size or mtime
        st = (root / f).stat() if (root / f).is_file() else None  # a missing clip is skipped later
        h.update(f"{f}\t{st and st.st_size}\t{st and st.st_mtime_ns}\n".encode())
    data_hash = h.hexdigest()
    encoder_hash = hashlib.sha256(Path(encoder_path).read_bytes()).hexdigest()
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["encoder_hash"]) == encoder_hash and str(z["data_hash"]) == data_hash:
                index = {f: i for i, f in enumerate(task["files"])}
                ok, emb = [index[f] for f in z["files"].tolist()], z["embeddings"]
                if emb.ndim == 2 and len(emb) == len(ok) and np.isfinite(emb).all():
                    print(f"{task['name']}: cached embeddings {path}")
                    return ok, emb, z["skipped"].tolist()
    except FileNotFoundError:
        pass
    except Exception as e:  # a damaged cache costs one more embedding pass, never the run
        warn(f"{path} is not a readable embedding cache ({first_line(e)}); embedding again")
    t0 = time.time()
    emb, ok, bad = embed(encoder, encoder_path, task, args)
    n, seconds = len(task["files"]), time.time() - t0
    print(f"{task['name']}: embedded {n} clips in {seconds:.1f} s ({n / seconds:.0f} clips/s)")
    buf = io.BytesIO()
    np.savez(buf, embeddings=emb, files=np.array([task["files"][i] for i in ok]), skipped=np.array(bad, dtype=str),
             encoder_hash=encoder_hash, data_hash=data_hash)
    atomic_write(path, buf.getvalue())
    return ok, emb, bad


def read_results(path):
    empty = dict(rows=[], summary=[], skipped_files={})
    results = dict(empty, **read_json(path, "probe.py results.json")) if path.exists() else empty
    rows_of = lambda x, *keys: isinstance(x, list) and all(isinstance(r, dict) and {*keys} <= r.keys() for r in x)
    if not (isinstance(results["skipped_files"], dict) and rows_of(results["rows"], "encoder", "task")
            and rows_of(results["summary"], "encoder", "task", "mean", "std")
            and all(isinstance(s[k], (int, float)) for s in results["summary"] for k in ("mean", "std"))):
        raise ValueError(f"{path} is not a probe.py results.json (rows, summary, skipped_files); move it away first")
    return results


def encoder_paths(args, runs):  # --encoder's paths, each once; with neither it nor runner embeddings, every run here
    if args.encoder is not None or runs:
        return list(dict.fromkeys(args.encoder or []))
    if not (paths := sorted(map(str, Path("runs").glob("*/encoder.pt")))):
        raise ValueError("no --encoder given and no runs/*/encoder.pt here; pass --encoder PATH, or export one "
                         "with python train.py --epochs 0 --out runs/random")
    print(f"probing every runs/*/encoder.pt: {', '.join(paths)}")
    return paths


def merge_results(path, rows, summary, skipped):
    """Re-read and merged under a flock: other probes may write meanwhile (FolderLock would refuse them; this waits)."""
    same = lambda r: (r["encoder"], r["task"]) == (summary["encoder"], summary["task"])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run holds it for the milliseconds of its merge
        results = read_results(path)
        results["rows"] = [r for r in results["rows"] if not same(r)] + rows
        results["summary"] = [s for s in results["summary"] if not same(s)] + [summary]
        results["skipped_files"].update(skipped)
        atomic_write(path, json.dumps(results, indent=1).encode())
    return results


def table(summary):
    encoders, tasks = (list(dict.fromkeys(s[k] for s in summary)) for k in ("encoder", "task"))
    cell = {(s["encoder"], s["task"]): f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}" for s in summary}
    rows = [f"| {e} | " + " | ".join(cell.get((e, t), "-") for t in tasks) + " |" for e in encoders]
    return "\n".join(["| encoder | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|", *rows])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = fail  # one line on stderr, exit 2, as for every other bad input
    p.add_argument("--encoder", nargs="+", metavar="PATH", help="exported encoders (TorchScript runs/NAME/encoder.pt), "
                   "one table row each (default: every runs/*/encoder.pt)")
    p.add_argument("--embeddings", nargs="+", type=Path, default=[], metavar="DIR", help="hear: the embeddings that "
                   "heareval's runner wrote for this task (embeddings/MODULE/TASK), one row each beside the encoders")
    p.add_argument("--task", required=True, choices=["esc50", "us8k", "hear", "csv"])
    p.add_argument("--data-dir", type=Path, help="task folder (default: probe.py's data/ESC-50 or data/UrbanSound8K)")
    p.add_argument("--label", help="csv: label column of meta.csv")
    p.add_argument("--fold-column", help="csv: fold column (default: fold if present, else seeded stratified 5 folds)")
    p.add_argument("--out", type=Path, default=Path("probes"), help="results.json goes here (default: probes/)")
    p.add_argument("--cache-dir", type=Path, help="embedding cache (default: <out>/embeddings/)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device for embedding")
    p.add_argument("--batch-size", type=number(int, 1), default=32, help="clips per encoder call")
    p.add_argument("--seed", type=number(int, 0, 2**32 - 1), default=0,
                   help="seeds probe init, data order, validation, subsets")
    p.add_argument("--epochs", type=number(int, 1), default=100, help="max probe epochs per fold")
    p.add_argument("--patience", type=number(int), default=10, help="epochs without validation gain before stopping")
    p.add_argument("--lr", type=number(above=True), default=1e-3, help="Adam learning rate (paper: 1e-3)")
    p.add_argument("--probe-batch-size", type=number(int, 1), default=32, help="probe batch size (paper: 32)")
    p.add_argument("--valid-frac", type=number(high=1, below=True), default=0.1,
                   help="share of the training folds for early stopping")
    p.add_argument("--max-per-class", type=number(int, 2), help="at most N clips per class (stratified over folds)")
    p.add_argument("--drop-rare", action="store_true", help="leave out classes with a single clip instead of stopping")
    p.add_argument("--no-download", action="store_true", help="never download a dataset (or PROBE_NO_DOWNLOAD=1)")
    return p.parse_args(argv)


def check_args(args):
    """What argparse cannot check, before any read or write (esc50 downloads a missing --data-dir, us8k says where)."""
    if args.task == "csv" and not args.label:
        raise ValueError("--task csv needs --label COLUMN")
    if args.task in ("hear", "csv") and args.data_dir is None:
        raise ValueError(f"--task {args.task} needs --data-dir")
    if args.embeddings and args.task != "hear":
        raise ValueError("--embeddings goes with --task hear (the runner's folders follow a HEAR task's splits)")
    for flag, paths, must_exist in [("--out", [args.out], False), ("--cache-dir", [args.cache_dir], False),
                                    ("--data-dir", [args.data_dir], args.task in ("csv", "hear")),
                                    ("--embeddings", args.embeddings, True), ("--encoder", args.encoder or [], True)]:
        for path in filter(None, paths):
            check_path(path, flag, "file" if flag == "--encoder" else "folder", must_exist)
            if flag in ("--out", "--cache-dir"):
                check_writable(path, flag)  # found now, not after the embedding
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device} but CUDA is not available")


def warn(msg):
    print(f"probe.py: warning: {' '.join(str(msg).split())}", file=sys.stderr)


def main(argv=None):
    args = parse_args(argv)
    try:
        check_args(args)
        probe(args)
    except KeyboardInterrupt as e:
        exit_interrupted(e)
    except (ValueError, OSError) as e:  # the only place an error becomes one line on stderr
        fail(f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename else e)


# --- shared helpers: the same in every script that has them ---
# Each raises ValueError (bad input, one line) or OSError naming the file; main() alone turns either into fail().
def first_line(e):  # an error as one line: its message's first line (its type's name if it has none), never cut
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def fail(msg, code=2):  # the one exit on an error, argparse's too: 'SCRIPT: error: msg' as one line on stderr
    print(f"{os.path.basename(__file__)}: error: {' '.join(str(msg).split())}", file=sys.stderr)
    sys.exit(code)


def interrupted(signum, frame):  # SIGTERM ends a run as Ctrl-C does (a KeyboardInterrupt): every file is left whole
    raise KeyboardInterrupt(signum)


def exit_interrupted(e, note=""):  # the exit on Ctrl-C (130) or SIGTERM (143): 128 + signal number, as a shell says
    print(f"{os.path.basename(__file__)}: interrupted{'; ' + note if note else ''}", file=sys.stderr)
    sys.exit(128 + (e.args[0] if e.args else signal.SIGINT))


def number(kind=float, low=0, high=math.inf, above=False, below=False):  # argparse type: finite, in [low, high]
    def check(text):
        x = kind(text)
        if not (math.isfinite(x) and (low < x if above else low <= x) and (x < high if below else x <= high)):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number in {'(' if above else '['}{low}, "
                                             f"{high}{')' if below or high == math.inf else ']'}")
        return x
    check.__name__ = kind.__name__  # argparse names it in "invalid float value: 'x'"
    return check


def check_path(path, flag, kind="folder", must_exist=False):
    """A path flag before any work: a link is followed; a broken or looping link, a file where a folder belongs (or
    the reverse: kind 'file'), or a missing path that must exist, is a ValueError naming the flag."""
    try:
        is_dir = stat.S_ISDIR(os.stat(path).st_mode)
    except FileNotFoundError:
        if os.path.islink(path):
            raise ValueError(f"{flag} {path} is a broken symbolic link (to {os.readlink(path)})") from None
        if must_exist:
            raise ValueError(f"{flag} {path} does not exist (not a {kind})") from None
        return
    except OSError as e:
        raise ValueError(f"{flag} {path} is a symbolic link loop" if e.errno == errno.ELOOP
                         else f"{flag} {path}: {e.strerror}") from None
    if is_dir != (kind != "file"):
        raise ValueError(f"{flag} {path} is a {'folder' if is_dir else 'file'}, not a {kind}")


def check_writable(path, flag):  # an output path this user can create: its nearest existing ancestor is writable
    ancestor = next(d for d in [Path(path).absolute(), *Path(path).absolute().parents] if d.exists())
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path} is not writable by this user ({ancestor}: permission denied)")


def atomic_write(path, data):
    """bytes to path through a hidden twin and a rename: never half-written; on any failure (a full disk, SIGTERM)
    neither the twin nor a folder made for it is left. OSError names path, not the twin."""
    path = Path(path)
    made = [d for d in [path.parent, *path.parent.parents] if not d.exists()]
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, path)
        made = []
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None
    finally:
        tmp.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            for d in made:
                d.rmdir()


def read_json(path, what):  # a JSON object (dict) from a file the project wrote, a UTF-8 BOM allowed
    try:
        obj = json.loads(Path(path).read_bytes().decode("utf-8-sig"))
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"{path} is not a readable {what} ({first_line(e)})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a JSON {type(obj).__name__}, not a {what} (a JSON object)")
    return obj


def read_audio(path, start=0, frames=-1):
    """An audio file (any rate and channels; frames from start, default all) as float32 mono at 16 kHz, (T,), or a
    ValueError naming it: undecodable, empty, or a non-finite sample (one NaN poisons every later step)."""
    try:
        x, sr = sf.read(os.fsencode(path), start=start, frames=frames, dtype="float32", always_2d=True)
    except Exception as e:
        raise ValueError(f"cannot read audio {path}: {first_line(e)}") from None
    if len(x) == 0:
        raise ValueError(f"{path} holds no samples")
    if not np.isfinite(x).all():
        raise ValueError(f"{path} holds non-finite samples (NaN or inf); remove or repair it")
    x = x.mean(axis=1)
    if sr != SAMPLE_RATE:
        import torch
        import torchaudio
        x = torchaudio.functional.resample(torch.from_numpy(x), sr, SAMPLE_RATE).numpy()
    return x


def encode(encoder, x, path):
    """encoder(x) on a float32 (B, T) batch, checked where it is used: (B, D), D >= 1, finite. A failure is one
    ValueError naming the encoder file, the batch and the encoder's own error (TorchScript's text ends with it)."""
    import torch
    what = f"encoder {path} on {x.shape[0]} clip(s) of {x.shape[-1] / SAMPLE_RATE:g} s"
    try:
        y = encoder(x)
    except Exception as e:  # e.g. out of memory, or a model that takes no clip of this length
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        own = next((line for line in reversed(lines) if re.match(r"[\w.]*(Error|Exception)\b", line)), lines[0])
        raise ValueError(f"{what} fails: {own}") from None
    if not isinstance(y, torch.Tensor) or y.dim() != 2 or y.shape[0] != x.shape[0] or y.shape[1] < 1:
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"{what} gives {shape}, not (B, D) with D >= 1")
    if not torch.isfinite(y).all():
        raise ValueError(f"{what} gives non-finite embeddings")
    return y.float()

# --- end of shared helpers ---


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, interrupted)
    main()
