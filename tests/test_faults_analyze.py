"""Damaged inputs, bad flags and signals for analyze.py: one line on stderr, exit 2 (or 130/143 for a
signal), no traceback, nothing that was already on disk changed, no empty --out left behind."""
import concurrent.futures
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "analyze.py"
SR = 16000
LOG_HEAD = "step,epoch,lr,loss,align,unif,val_align,val_unif,sounds_per_s\n"
PAPER_SAMPLER = dict(keep=None, delta_group=None, delta_schedule=None)  # train.py writes these for every run


def noise(n=SR // 4, seed=0):
    return (0.1 * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)


def clips(d, n=3, bad=()):
    """n short clips in folder d; indices in bad hold a NaN or an inf sample."""
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        x = noise(seed=i)
        if i in bad:
            x[100] = np.nan if i % 2 == 0 else np.inf
        sf.write(d / f"{i}.wav", x, SR, subtype="FLOAT")
    return d


def pair_folder(d, params, bad=False):
    d.mkdir(parents=True)
    if isinstance(params, bytes):
        (d / "params.npz").write_bytes(params)
    else:
        np.savez(d / "params.npz", **params)
    for i in range(2):
        a = noise(seed=i)
        if bad:
            a[5] = np.inf
        sf.write(d / f"{i:06d}_a.wav", a, SR, subtype="FLOAT")
        sf.write(d / f"{i:06d}_b.wav", noise(seed=10 + i), SR, subtype="FLOAT")
    return d


def cache(path, emb, **extra):
    np.savez(path, embeddings=emb, **extra)
    return path


def run_folder(d, config=None, log=None):
    d.mkdir(parents=True)
    cfg = json.dumps(dict(synth="voice", delta=0.25, epochs=1, **PAPER_SAMPLER)) if config is None else config
    (d / "config.json").write_bytes(cfg if isinstance(cfg, bytes) else cfg.encode())
    if log is not None:
        (d / "log.csv").write_bytes(log)
    return d


def nan_encoder(path):
    class Enc(torch.nn.Module):
        def forward(self, x):
            return x[:, :4] * float("nan")
    torch.jit.script(Enc()).save(str(path))
    return path


def good(t):
    return clips(t / "good", 3)


def scripted(path, forward):
    """An encoder.pt whose forward is the given TorchScript-able function of the batch."""
    class Enc(torch.nn.Module):
        def forward(self, x):
            return forward(x)
    torch.jit.script(Enc()).save(str(path))
    return path


def picky(x):
    if x.shape[0] > 2:  # analyze.py's own check feeds 2 clips; a set feeds more
        raise RuntimeError("batches of more than 2 clips are not supported")
    return x[:, :4]


def no_width(x):
    return x[:, :0]


def ast(d, labels):
    """A tiny AST classifier (random weights) in the save_pretrained layout, as analyze.py reads it."""
    from transformers import ASTConfig, ASTFeatureExtractor, ASTForAudioClassification
    torch.manual_seed(0)
    cfg = ASTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, max_length=128,
                    num_mel_bins=32, num_labels=labels, frequency_stride=16, time_stride=16)
    ASTForAudioClassification(cfg).save_pretrained(d)
    ASTFeatureExtractor(num_mel_bins=32, max_length=128, sampling_rate=SR).save_pretrained(d)
    return d


def one_d(x):
    return x[:, :1]


def results(t, run):
    t.joinpath("r.json").write_text(json.dumps(dict(summary=[dict(encoder=str(run / "encoder.pt"), task="t",
                                                                  metric="accuracy", mean=0.5, std=0.1, folds=2)])))
    return t / "r.json"


# each case: a function of a fresh folder t that builds the inputs and returns the arguments (without --out)
CASES = {
    "audio truncated": lambda t: (clips(t / "a", 1), (t / "a" / "0.wav").write_bytes(
        (t / "a" / "0.wav").read_bytes()[:30]), ["features", "--set", f"a={t / 'a'}"])[-1],
    "audio empty (0 frames)": lambda t: (t.joinpath("a").mkdir(), sf.write(t / "a" / "x.wav", np.zeros(0), SR),
                                         ["features", "--set", f"a={t / 'a'}"])[-1],
    "audio all non-finite (fad)": lambda t: ["fad", "--set", f"a={clips(t / 'a', 2, bad=(0, 1))}",
                                             "--set", f"g={good(t)}"],
    "audio non-finite pair (pairs)": lambda t: ["pairs", "--pairs", pair_folder(t / "p", dict(synth="voice", delta=0.1),
                                                                                  bad=True)],
    "params.npz garbage": lambda t: ["pairs", "--pairs", pair_folder(t / "p", b"PK\x03\x04 not a zip")],
    "params.npz delta not a number": lambda t: ["pairs", "--pairs", pair_folder(t / "p", dict(synth="voice",
                                                                                             delta="big"))],
    "embeddings npz garbage": lambda t: (t.joinpath("a.npz").write_bytes(b"garbage"),
                                         ["fad", "--set", f"a={t / 'a.npz'}", "--set", f"b={t / 'a.npz'}"])[-1],
    "embeddings 1-D": lambda t: ["fad", "--set", f"a={cache(t / 'a.npz', np.zeros(5))}",
                                 "--set", f"b={cache(t / 'b.npz', np.zeros((5, 3)))}"],
    "embeddings non-finite": lambda t: ["fad", "--set", f"a={cache(t / 'a.npz', np.full((5, 3), np.nan))}",
                                        "--set", f"b={cache(t / 'b.npz', np.ones((5, 3)))}"],
    "embeddings fewer file names": lambda t: ["fad", "--set", f"a={cache(t / 'a.npz', np.ones((5, 3)), files=['x'])}",
                                              "--set", f"b={cache(t / 'b.npz', np.ones((5, 3)))}"],
    "results.json not JSON": lambda t: (t.joinpath("r.json").write_text("{rows: ["),
                                        ["training", "--results", t / "r.json"])[-1],
    "results.json a list": lambda t: (t.joinpath("r.json").write_text("[1, 2]"),
                                      ["training", "--results", t / "r.json"])[-1],
    "results.json row without score": lambda t: (t.joinpath("r.json").write_text(json.dumps(dict(rows=[dict(
        encoder="runs/x/encoder.pt", task="t", metric="accuracy")]))), ["training", "--results", t / "r.json"])[-1],
    "config.json a list": lambda t: ["training", "--runs", run_folder(t / "r", config="[1]")],
    "config.json delta not a number": lambda t: ["training", "--runs", run_folder(t / "r", config=json.dumps(dict(
        synth="voice", delta="big")))],
    "config.json not UTF-8": lambda t: ["training", "--runs", run_folder(t / "r", config='{"synth": "vé"}'.encode(
        "utf-16"))],
    "log.csv bad step": lambda t: ["training", "--runs", run_folder(t / "r", log=(LOG_HEAD + "x,0,1,1,1,1,,,1\n").encode())],
    "log.csv step inf": lambda t: ["training", "--runs", run_folder(t / "r", log=(LOG_HEAD + "1e400,1,1,1,1,1,,,1\n")
                                                                .encode())],
    "--against steps with a run of no step": lambda t: ["training", "--runs", run_folder(t / "r"), "--results",
                                                        results(t, t / "r"), "--against", "steps"],
    "classifier of 1 class": lambda t: ["uncertainty", "--set", f"a={good(t)}", "--classifier-path", ast(t / "ast", 1)],
    "embeddings (N, 0)": lambda t: ["fad", "--set", f"a={cache(t / 'a.npz', np.zeros((5, 0)))}",
                                    "--set", f"b={cache(t / 'b.npz', np.zeros((5, 0)))}"],
    "embeddings complex": lambda t: ["fad", "--set", f"a={cache(t / 'a.npz', np.ones((5, 3)) + 1j)}",
                                     "--set", f"b={cache(t / 'b.npz', np.ones((5, 3)))}"],
    "log.csv latin-1": lambda t: ["training", "--runs", run_folder(t / "r", log=(LOG_HEAD + "1,0,1,1,1,1,,,1 é\n").encode(
        "latin-1"))],
    "encoder.pt empty": lambda t: (t.joinpath("e.pt").write_bytes(b""), ["fad", "--set", f"a={good(t)}", "--set",
                                   f"b={t / 'good'}", "--embedder", f"encoder:{t / 'e.pt'}"])[-1],
    "encoder.pt non-finite output": lambda t: ["fad", "--set", f"a={good(t)}", "--set", f"b={t / 'good'}",
                                               "--embedder", f"encoder:{nan_encoder(t / 'e.pt')}"],
    "--batch-size 0": lambda t: ["fad", "--set", f"a={good(t)}", "--set", f"b={t / 'good'}", "--batch-size", "0"],
    "--batch-size -1 (uncertainty)": lambda t: ["uncertainty", "--set", f"a={good(t)}", "--classifier-path", t,
                                                "--batch-size", "-1"],
    "--max-files -1": lambda t: ["features", "--set", f"a={good(t)}", "--max-files", "-1"],
    "--max-pairs -1": lambda t: ["pairs", "--pairs", pair_folder(t / "p", dict(synth="voice", delta=0.1)),
                                 "--max-pairs", "-1"],
    "--pca-pairs 0": lambda t: ["pairs", "--pairs", pair_folder(t / "p", dict(synth="voice", delta=0.1)),
                                "--pca-pairs", "0"],
    "missing set folder": lambda t: ["features", "--set", f"a={t / 'nope'}"],
    "encoder fails on a batch of 3": lambda t: ["fad", "--set", f"a={good(t)}", "--set", f"b={t / 'good'}",
                                                "--embedder", f"encoder:{scripted(t / 'e.pt', picky)}"],
    "encoder output has width 0": lambda t: ["fad", "--set", f"a={good(t)}", "--set", f"b={t / 'good'}",
                                             "--embedder", f"encoder:{scripted(t / 'e.pt', no_width)}"],
    "invariance with a failing encoder": lambda t: ["invariance", "--factors", pair_folder(t / "f" / "noise", dict(
        synth="voice", delta=0.25, factor="noise")).parent, "--encoder", nan_encoder(t / "e.pt")],
}
NEEDLES = {"encoder fails on a batch of 3": "on 3 clip(s) of 0.25 s fails: builtins.RuntimeError: batches of more",
           "encoder output has width 0": "gives (2, 0), not (B, D) with D >= 1",
           "log.csv step inf": "log.csv is not a train.py log.csv (cannot convert float infinity to integer)",
           "--against steps with a run of no step": "--against steps: run r has no training step (no log.csv rows)",
           "classifier of 1 class": "has 1 class; the proxies need 2 or more",  # was an IndexError traceback
           "embeddings (N, 0)": "holds no (N, D) embeddings of real numbers (float64 (5, 0))",
           "embeddings complex": "holds no (N, D) embeddings of real numbers (complex128 (5, 3))"}


def snapshot(root):
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def run_case(name, t):
    args = CASES[name](t)
    (t / "results").mkdir()
    (t / "results" / "fad.csv").write_text("earlier output\n")  # a file a run must not touch
    before = snapshot(t)
    p = subprocess.run([sys.executable, str(SCRIPT), *map(str, args), "--out", str(t / "results" / "new")],
                       capture_output=True, text=True, timeout=300)
    return p, before, snapshot(t)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """All cases at once (each mostly waits on imports), three at a time on a small machine."""
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = {n: pool.submit(run_case, n, tmp_path_factory.mktemp("case")) for n in CASES}
        return {n: f.result() for n, f in futures.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_fault_one_line_exit_2(name, outcomes):
    p, before, after = outcomes[name]
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, (name, p.returncode, p.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("analyze.py: error:"), p.stderr[-2000:]
    assert "Traceback" not in p.stderr and NEEDLES.get(name, "") in lines[0]
    assert after == before  # inputs and earlier outputs byte-identical, no --out left behind


def test_a_command_that_fails_late_leaves_an_existing_out_as_it_was(tmp_path):
    """report computes its training section, then fails on invariance: training.csv, there before, is unchanged,
    and none of the section's new files appear."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "training.csv").write_text("earlier output\n")
    r = run_folder(tmp_path / "r", log=(LOG_HEAD + "4,1,0.001,2.7,0.6,-1.6,0.4,-3.0,100\n").encode())
    f = pair_folder(tmp_path / "f" / "noise", dict(synth="voice", delta=0.25, factor="noise")).parent  # no negatives
    enc = nan_encoder(tmp_path / "e.pt")
    before = snapshot(tmp_path)
    p = subprocess.run([sys.executable, str(SCRIPT), "report", "--runs", str(r), "--factors", str(f), "--encoder",
                        str(enc), "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "'negative' folder" in p.stderr, p.stderr[-2000:]
    assert snapshot(tmp_path) == before


def test_one_dimensional_embeddings_give_a_fad_and_a_pca(tmp_path):
    """D = 1 (a 1-d cache or encoder) was numpy's "matmul: Input operand 0 does not have enough dimensions" in fad and
    an IndexError in pairs' PCA: the FAD is the 1-d Frechet distance, the PCA's second axis 0."""
    a, b = cache(tmp_path / "a.npz", np.array([[0.0], [2.0]])), cache(tmp_path / "b.npz", np.array([[1.0], [2], [3]]))
    p = subprocess.run([sys.executable, str(SCRIPT), "fad", "--set", f"a={a}", "--set", f"b={b}", "--out",
                        str(tmp_path / "fad")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and not p.stderr, p.stderr[-2000:]
    row = next(r for r in (tmp_path / "fad" / "fad.csv").read_text().splitlines() if r.startswith("a,b,2,3,"))
    assert float(row.split(",")[-1]) == pytest.approx((1 - 2) ** 2 + 2 + 1 - 2 * np.sqrt(2 * 1), rel=1e-5)
    enc = scripted(tmp_path / "e.pt", one_d)
    p = subprocess.run([sys.executable, str(SCRIPT), "pairs", "--pairs", str(pair_folder(tmp_path / "p", dict(
        synth="voice", delta=0.1))), "--embedder", f"encoder:{enc}", "--out", str(tmp_path / "pairs")],
        capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and (tmp_path / "pairs" / "pairs_pca.png").is_file(), p.stderr[-2000:]


def test_clips_shorter_than_the_classifiers_window_are_classified(tmp_path):
    """A clip of 1 sample (and one of 2 at 8 kHz) was an AssertionError traceback in the AST feature extractor's
    fbank ("choose a window size 400 that is [2, 1]"): clips are zero-padded to its 25-ms window."""
    d = tmp_path / "a"
    d.mkdir()
    for i, (n, sr) in enumerate([(1, SR), (2, 8000), (SR // 4, SR)]):
        sf.write(d / f"{i}.wav", noise(n, seed=i), sr)
    p = subprocess.run([sys.executable, str(SCRIPT), "uncertainty", "--set", f"a={d}", "--classifier-path",
                        str(ast(tmp_path / "ast", 5)), "--out", str(tmp_path / "out")], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0 and not p.stderr, p.stderr[-2000:]
    assert len((tmp_path / "out" / "uncertainty.csv").read_text().splitlines()) == 4


def test_training_on_runs_without_validation_writes_the_table(tmp_path):
    """runs/random alone (the README's baseline) has no validation row: the table, and no empty figure."""
    r = run_folder(tmp_path / "random", config=json.dumps(dict(synth="voice", delta=0.25, epochs=0, **PAPER_SAMPLER)),
                   log=LOG_HEAD.encode())
    p = subprocess.run([sys.executable, str(SCRIPT), "training", "--runs", str(r), "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert sorted(f.name for f in (tmp_path / "out").iterdir()) == ["training.csv"]


def test_a_second_job_on_one_out_is_refused_while_the_first_writes(tmp_path):
    data = clips(tmp_path / "a", 400)
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, str(SCRIPT), "features", "--set", f"a={data}", "--out", str(out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / ".out.lock").exists():  # the first job owns --out
        assert first.poll() is None and time.time() < deadline, first.stderr.read()
        time.sleep(0.05)
    second = subprocess.run([sys.executable, str(SCRIPT), "fad", "--set", f"a={good(tmp_path)}", "--set",
                             f"b={tmp_path / 'good'}", "--out", str(out)], capture_output=True, text=True, timeout=300)
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=120)
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(lines) == 1 and f"in use by another analyze.py (pid {first.pid})" in lines[0]
    assert not out.exists() and not (tmp_path / ".out.lock").exists()


def test_a_file_name_that_is_not_utf8_is_read_and_written_escaped(tmp_path):
    """A Latin-1 é in a clip's name was "'utf-8' codec can't encode character '\\udce9'" (the clip skipped)."""
    d = clips(tmp_path / "a", 2)
    sf.write(bytes(d) + b"/caf\xe9.wav", noise(seed=5), SR)
    p = subprocess.run([sys.executable, str(SCRIPT), "features", "--set", f"a={d}", "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "skipped" not in p.stderr, p.stderr[-2000:]
    assert "a,caf\\udce9.wav," in (tmp_path / "out" / "features.csv").read_text()


def test_non_finite_clips_skipped_and_counted(tmp_path):
    bad, ok = clips(tmp_path / "bad", 4, bad=(1,)), clips(tmp_path / "ok", 3)
    p = subprocess.run([sys.executable, str(SCRIPT), "fad", "--set", f"bad={bad}", "--set", f"ok={ok}",
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "1 clip(s) skipped" in p.stderr and "non-finite" in p.stderr and "Traceback" not in p.stderr
    rows = (tmp_path / "out" / "fad.csv").read_text().splitlines()
    assert rows[1].startswith("bad,bad,3,3,")


def test_spreadsheet_bom_csv_and_json(tmp_path):
    log = "\ufeff" + LOG_HEAD + "4,1,0.001,2.7,0.6,-1.6,0.4,-3.0,100\n"
    config = "\ufeff" + json.dumps(dict(synth="voice", delta=0.1, **PAPER_SAMPLER))
    d = run_folder(tmp_path / "runs" / "r", config=config, log=log.encode("utf-8"))
    p = subprocess.run([sys.executable, str(SCRIPT), "training", "--runs", str(d), "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "out" / "training.csv").read_text().splitlines()[1] == "r,voice,0.1,4,1,0.4,-3"


@pytest.mark.parametrize("sig,code,fresh_out", [(signal.SIGTERM, 143, False), (signal.SIGINT, 130, True)])
def test_signal_mid_run_leaves_nothing_half_written(tmp_path, sig, code, fresh_out):
    """A real run, signalled once it is computing features (Essentia loaded): one line, 128 + signal number,
    the earlier features.csv untouched, no temp files, and no --out folder if the run created it."""
    data = clips(tmp_path / "a", 400)
    out = tmp_path / "out" / ("new" if fresh_out else "")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "features.csv").write_text("earlier output\n")
    before = snapshot(tmp_path)
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "features", "--set", f"a={data}", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while "essentia" not in Path(f"/proc/{proc.pid}/maps").read_text():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it was signalled"
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert err.strip().splitlines() == ["analyze.py: interrupted"]
    assert snapshot(tmp_path) == before
