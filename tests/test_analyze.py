"""Tests for analyze.py: the metrics on known inputs, every subcommand on tiny real inputs, bad input."""
import csv
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "analyze.py"
GENERATE = ROOT / "generate.py"
DATA = ROOT.parent / "shared" / "data"
SR = 16000

sys.path.insert(0, str(ROOT))
import analyze  # noqa: E402


def run(*args, cwd=None):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def ok(*args, cwd=None):
    p = run(*args, cwd=cwd)
    assert p.returncode == 0, p.stderr
    return p


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def pngs_ok(out, names):
    for n in names:
        b = (Path(out) / n).read_bytes()
        assert b[:8] == b"\x89PNG\r\n\x1a\n" and len(b) > 2000, n
    assert not list(Path(out).glob(".*.tmp*")), "temp files left behind"


PAPER_SAMPLER = dict(keep=None, delta_group=None, delta_schedule=None)  # train.py writes these for every run


# -----------------------------------------------------------------------------
# fixtures: a real generate.py sweep, a stand-in encoder, a tiny AST classifier

@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "pairs"
    p = subprocess.run([sys.executable, str(GENERATE), "--synth", "voice", "--delta", "0.01", "0.1", "0.5",
                        "--pairs", "24", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    return out


@pytest.fixture(scope="module")
def factors(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "factors"
    p = subprocess.run([sys.executable, str(GENERATE), "--factors", "negative", "noise", "gain", "shift", "vco_1",
                        "--synth", "voice", "--pairs", "6", "--out", str(out)], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr
    return out


@pytest.fixture(scope="module")
def encoder(trained_run):
    """The briefly trained encoder.pt of the real train.py (conftest)."""
    return trained_run / "encoder.pt"


@pytest.fixture(scope="module")
def tiny_ast(tmp_path_factory):
    from transformers import ASTConfig, ASTFeatureExtractor, ASTForAudioClassification
    d = tmp_path_factory.mktemp("ast")
    torch.manual_seed(0)
    cfg = ASTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                    max_length=128, num_mel_bins=32, num_labels=5, frequency_stride=16, time_stride=16)
    ASTForAudioClassification(cfg).save_pretrained(d)
    ASTFeatureExtractor(num_mel_bins=32, max_length=128, sampling_rate=SR).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Fake train.py run folders in the contract format, plus a probe.py results.json."""
    root = tmp_path_factory.mktemp("exp")
    final = {}
    for name, synth, delta in [("voice_a", "voice", 0.1), ("voice_b", "voice", 0.25), ("param_a", "parametric", 0.25)]:
        d = root / "runs" / name
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(dict(synth=synth, delta=delta, batch_size=8, epochs=2, lr=1e-3,
                                                       seed=0, data="", **PAPER_SAMPLER)))
        va, vu = 0.5 + delta, -2.0 - delta
        final[name] = (va, vu)
        lines = ["step,epoch,lr,loss,align,unif,val_align,val_unif,sounds_per_s",
                 "1,0,0.001,3.0,0.9,-1.0,,,100", f"2,0,0.001,2.9,0.8,-1.2,0.99,-1.5,100",
                 "3,1,0.001,2.8,0.7,-1.4,,,100", f"4,1,0.001,2.7,0.6,-1.6,{va},{vu},100"]
        (d / "log.csv").write_text("\n".join(lines) + "\n")
    # baselines without a delta: an untrained encoder and a real-audio run
    for name, extra in [("random", dict(epochs=0)), ("real_mix5", dict(data="/audio", positives="mix5"))]:
        d = root / "runs" / name
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps({**dict(synth="voice", delta=0.25, data=None, epochs=2),
                                                   **PAPER_SAMPLER, **extra}))
        log = "step,epoch,lr,loss,align,unif,val_align,val_unif,sounds_per_s\n"
        (d / "log.csv").write_text(log + ("4,1,0.001,2.7,0.6,-1.6,0.4,-3.0,100\n" if name == "real_mix5" else ""))
    rows = [dict(encoder=f"runs/{n}/encoder.pt", task=t, metric="accuracy", fold=k, score=0.5 + 0.1 * k + (n == "voice_b") * 0.05,
                 epochs=10, n_train=8, n_test=2, seconds=1.0)
            for n in final for t in ["csv:fsdd:digit", "csv:gm_notes:pitch"] for k in range(2)]
    rows.append(dict(encoder="baseline/encoder.pt", task="csv:fsdd:digit", metric="accuracy", fold=0, score=0.3,
                     epochs=10, n_train=8, n_test=2, seconds=1.0))
    summary = [dict(encoder=e, task=t, metric="accuracy", mean=np.mean(v), std=np.std(v), folds=len(v))
               for e, t in dict.fromkeys((r["encoder"], r["task"]) for r in rows)
               for v in [[r["score"] for r in rows if (r["encoder"], r["task"]) == (e, t)]]]  # as probe.py writes it
    (root / "results.json").write_text(json.dumps(dict(rows=rows, summary=summary, skipped_files={})))
    return root, final


# -----------------------------------------------------------------------------
# metrics on known inputs

def test_fad_identity_and_closed_form():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 8)) @ rng.standard_normal((8, 8))
    assert abs(analyze.fad(x, x)) < 1e-6
    # samples whose empirical mean and covariance are exactly mu and diag(sd^2)
    z = rng.standard_normal((400, 6))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    sd1, sd2 = rng.uniform(0.5, 2, 6), rng.uniform(0.5, 2, 6)
    closed = np.sum((mu1 - mu2) ** 2) + np.sum((sd1 - sd2) ** 2)
    assert analyze.fad(z * sd1 + mu1, z * sd2 + mu2) == pytest.approx(closed, rel=1e-6, abs=1e-6)
    # singular covariances (fewer clips than dimensions) still give a finite, non-negative number
    d = analyze.fad(rng.standard_normal((5, 20)), rng.standard_normal((6, 20)) + 1)
    assert np.isfinite(d) and d >= 0


def test_uncertainty_proxies_by_hand():
    p = np.array([[1.0, 0, 0, 0], [0.25, 0.25, 0.25, 0.25], [0.5, 0.3, 0.2, 0.0], [4.0, 2.0, 1.0, 1.0]])
    u = analyze.uncertainty_proxies(p)
    h3 = -(0.5 * np.log(0.5) + 0.3 * np.log(0.3) + 0.2 * np.log(0.2)) / np.log(4)
    h4 = -(0.5 * np.log(0.5) + 0.25 * np.log(0.25) + 2 * 0.125 * np.log(0.125)) / np.log(4)
    np.testing.assert_allclose(u["H_cu"], [1.0, 0.25, 0.5, 0.5])
    np.testing.assert_allclose(u["H_p"], [0.0, 1.0, h3, h4], atol=1e-12)
    np.testing.assert_allclose(u["S_conf"], [1.0, 0.0, 0.2, 0.25], atol=1e-12)


def test_spectral_features_tone_vs_noise():
    t = np.arange(SR) / SR
    f0 = 440.0
    # Essentia's PitchSalience does not remove the spectrum's mean: white noise scores ~pi/4 and a
    # 1/k sawtooth ~0.57, a tone with equal-strength harmonics (a glottal-pulse-like buzz) ~0.9
    buzz = sum(np.sin(2 * np.pi * f0 * k * t) for k in range(1, 18))
    saw = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 10))         # all harmonics
    square = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 10, 2))   # odd harmonics only
    inharm = sum(np.sin(2 * np.pi * f0 * k ** 1.15 * t) / k for k in range(1, 10))  # stretched partials
    noise = np.random.default_rng(0).standard_normal(SR)
    E = analyze.make_essentia()
    f = {k: analyze.clip_features(x, E) for k, x in
         dict(buzz=buzz, saw=saw, square=square, inharm=inharm, noise=noise, silence=np.zeros(SR)).items()}
    assert f["noise"]["flatness"] > 10 * f["saw"]["flatness"]
    assert f["buzz"]["pitch_salience"] > f["noise"]["pitch_salience"] > f["saw"]["pitch_salience"] > 0.3
    assert f["noise"]["complexity"] > f["saw"]["complexity"]
    assert f["noise"]["flux"] > f["saw"]["flux"]
    assert f["saw"]["inharmonicity"] < 0.01
    assert f["noise"]["inharmonicity"] > f["saw"]["inharmonicity"]
    assert f["inharm"]["inharmonicity"] > f["saw"]["inharmonicity"]
    assert f["square"]["odd_even_ratio"] > 10 * f["saw"]["odd_even_ratio"]
    assert f["square"]["odd_even_ratio"] <= analyze.OE_CLIP[1]  # Essentia's FLT_MAX saturation is clipped
    assert all(np.isnan(v) for v in f["silence"].values())    # silent frames are skipped, not scored


# -----------------------------------------------------------------------------
# subcommands on tiny inputs

def test_pairs_voice_similarity_decreases_with_delta(sweep, tmp_path):
    ok("pairs", "--pairs", sweep, "--out", tmp_path)
    rows = read_csv(tmp_path / "pairs.csv")
    assert [r["synth"] for r in rows] == ["voice"] * 3 and [int(r["n"]) for r in rows] == [24] * 3
    pos = {float(r["delta"]): float(r["pos_mean"]) for r in rows}
    assert pos[0.01] > pos[0.1] > pos[0.5]
    assert pos[0.01] > float(rows[0]["neg_mean"]) + 0.3  # positives are far more alike than negatives
    pngs_ok(tmp_path, ["pairs_similarity.png", "pairs_pca.png"])


def test_pairs_and_fad_with_exported_encoder(sweep, encoder, tmp_path):
    ok("pairs", "--pairs", sweep / "voice" / "delta_0.01", "--embedder", f"encoder:{encoder}", "--out", tmp_path / "p")
    rows = read_csv(tmp_path / "p" / "pairs.csv")
    assert len(rows) == 1 and -1 <= float(rows[0]["pos_mean"]) <= 1
    ok("fad", "--set", f"voice={sweep / 'voice' / 'delta_0.01'}", "--set", f"voice2={sweep / 'voice' / 'delta_0.5'}",
       "--target", f"fsdd={DATA / 'fsdd'}", "--max-files", "20", "--embedder", f"encoder:{encoder}",
       "--out", tmp_path / "f")
    rows = read_csv(tmp_path / "f" / "fad.csv")
    assert [(r["set"], r["target"], r["n_set"]) for r in rows] == [("voice", "fsdd", "20"), ("voice2", "fsdd", "20")]
    assert all(float(r["fad"]) > 0 for r in rows)
    pngs_ok(tmp_path / "f", ["fad.png"])


def test_features_on_real_clips_and_mixtures(sweep, tmp_path):
    p = ok("features", "--set", f"voice={sweep / 'voice' / 'delta_0.1'}", "--set", f"fsdd={DATA / 'fsdd'}",
           "--set", f"mix3=mix3:{DATA / 'fsdd_count'}", "--max-files", "5", "--out", tmp_path)
    rows = read_csv(tmp_path / "features.csv")
    assert list(rows[0]) == ["set", "file"] + analyze.FEATURES
    assert [r["set"] for r in rows] == ["voice"] * 5 + ["fsdd"] * 5 + ["mix3"] * 5
    assert all(np.isfinite(float(r["flatness"])) for r in rows)
    assert "mix3" in p.stdout
    pngs_ok(tmp_path, ["features.png"])
    # the subset is deterministic
    ok("features", "--set", f"fsdd={DATA / 'fsdd'}", "--max-files", "5", "--out", tmp_path / "again")
    assert [r["file"] for r in read_csv(tmp_path / "again" / "features.csv")] == [r["file"] for r in rows[5:10]]


def test_uncertainty_with_tiny_ast(tiny_ast, tmp_path):
    ok("uncertainty", "--set", f"fsdd={DATA / 'fsdd'}", "--set", f"gm={DATA / 'gm_notes'}", "--max-files", "4",
       "--classifier-path", tiny_ast, "--out", tmp_path)
    rows = read_csv(tmp_path / "uncertainty.csv")
    assert len(rows) == 8
    for r in rows:
        assert 0.2 - 1e-9 <= float(r["H_cu"]) <= 1 and 0 <= float(r["H_p"]) <= 1 and 0 <= float(r["S_conf"]) <= 1
    pngs_ok(tmp_path, ["uncertainty.png"])


def test_fad_with_probe_caches(tmp_path):
    rng = np.random.default_rng(0)
    for name, shift in [("a", 0.0), ("b", 1.0)]:
        np.savez(tmp_path / f"{name}.npz", embeddings=(rng.standard_normal((50, 40)) + shift).astype(np.float32),
                 labels=np.zeros(50), folds=np.zeros(50, int), files=np.array([f"{i}.wav" for i in range(50)]))
    # caches of 40 dims against an audio set embedded with mfcc (also 40 dims)
    ok("fad", "--set", f"a={tmp_path / 'a.npz'}", "--set", f"b={tmp_path / 'b.npz'}",
       "--target", f"fsdd={DATA / 'fsdd'}", "--target", f"b2={tmp_path / 'b.npz'}", "--max-files", "30",
       "--out", tmp_path / "out")
    by = {(r["set"], r["target"]): float(r["fad"]) for r in read_csv(tmp_path / "out" / "fad.csv")}
    assert set(by) == {("a", "fsdd"), ("a", "b2"), ("b", "fsdd"), ("b", "b2")}
    assert by[("b", "b2")] < 1e-6 < by[("a", "b2")]
    pngs_ok(tmp_path / "out", ["fad.png"])


def test_training_from_run_folders(runs, tmp_path):
    root, final = runs
    p = ok("training", "--runs", *sorted((root / "runs").iterdir()), "--results", root / "results.json",
           "--out", tmp_path, cwd=root)
    rows = {r["run"]: r for r in read_csv(tmp_path / "training.csv")}
    assert set(rows) == set(final) | {"random", "real_mix5"}
    assert rows["random"]["synth"] == "random init" and rows["random"]["val_align"] == "nan"
    assert rows["real_mix5"]["synth"] == "real (mix5)" and float(rows["real_mix5"]["val_unif"]) == -3.0
    for name, (va, vu) in final.items():
        assert float(rows[name]["val_align"]) == pytest.approx(va) and float(rows[name]["val_unif"]) == pytest.approx(vu)
    probes = read_csv(tmp_path / "probe.csv")
    assert len(probes) == 6  # 3 runs x 2 tasks; the baseline encoder has no run folder
    vb = [r for r in probes if r["run"] == "voice_b" and r["task"] == "csv:fsdd:digit"][0]
    assert float(vb["mean"]) == pytest.approx(0.6) and float(vb["delta"]) == 0.25 and vb["synth"] == "voice"
    assert "skipped" in p.stderr
    pngs_ok(tmp_path, ["training_align_unif.png", "training_probe.png"])


def test_training_legend_sits_under_the_panels_once():
    """Long recipe names in a legend inside each panel covered the data: one legend for the figure, each
    recipe once, below every panel."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2)
    rows = [dict(synth="voice", recipe=r, delta=d, val_align=d + i, run=f"{i}{d}")
            for i, r in enumerate(["", "keyboard.midi_f0=0.05, vco_1.tuning=0.05, vco_2.tuning=0.05"]) for d in (0.1, 0.25)]
    rows.append(dict(synth="random init", recipe="", delta=float("nan"), val_align=1.0, run="random"))
    for ax in axes:
        analyze.by_synth(ax, rows, "val_align")
    analyze.legend_below(fig, axes)
    fig.canvas.draw()
    assert all(ax.get_legend() is None for ax in axes) and len(fig.legends) == 1
    assert sorted(t.get_text() for t in fig.legends[0].get_texts()) == sorted({analyze.label(r) for r in rows})
    box = fig.legends[0].get_window_extent().transformed(fig.transFigure.inverted())
    assert box.y1 <= min(ax.get_position().y0 for ax in axes)
    plt.close(fig)


def test_training_draws_one_line_per_recipe(tmp_path):
    """Runs of the same synth and delta but different train.py recipes (--keep pitch, --delta-group,
    --delta-schedule) are separate lines and rows, never averaged together."""
    root = tmp_path / "exp"
    recipes = {"": {}, "keep pitch": dict(keep=["pitch"]), "keyboard=0.05": dict(delta_group=["keyboard=0.05"]),
               "keep pitch, ramp from 0.05": dict(keep=["pitch"], delta_schedule=0.05, delta_schedule_steps=672)}
    summary = []
    for i, (how, extra) in enumerate(recipes.items()):
        for delta in (0.1, 0.25):
            name = f"r{i}_d{delta}"
            (root / "runs" / name).mkdir(parents=True)
            config = dict(synth="voice", delta=delta, data=None, epochs=4, delta_group=None, keep=None,
                          delta_schedule=None, delta_schedule_steps=None)
            (root / "runs" / name / "config.json").write_text(json.dumps({**config, **extra}, indent=2))
            (root / "runs" / name / "log.csv").write_text(
                "step,epoch,lr,loss,align,unif,val_align,val_unif,sounds_per_s\n"
                f"168,0,0.03,0.1,1.2,-2.0,{1 + i + delta},{-3 - i},40.0\n")
            for task in ("csv:gm_notes:pitch", "csv:fsdd:digit"):
                summary.append(dict(encoder=f"runs/{name}/encoder.pt", task=task, metric="accuracy",
                                    mean=0.1 * i + delta, std=0.01, folds=5))
    rows = [dict(s, fold=k, score=s["mean"]) for s in summary for k in range(5)]
    (root / "results.json").write_text(json.dumps(dict(rows=rows, summary=summary, skipped_files={})))
    p = ok("training", "--runs", *sorted((root / "runs").iterdir()), "--results", root / "results.json",
           "--out", tmp_path / "out", cwd=root)
    out = tmp_path / "out"
    training = {r["run"]: r for r in read_csv(out / "training.csv")}
    for i, how in enumerate(recipes):
        assert training[f"r{i}_d0.25"]["recipe"] == how and float(training[f"r{i}_d0.25"]["val_unif"]) == -3 - i
    probes = read_csv(out / "probe.csv")
    assert len(probes) == 16 and {r["recipe"] for r in probes} == set(recipes)
    table = read_csv(out / "training_table.csv")
    assert list(table[0]) == ["run", "synth", "recipe", "delta", "val_align", "val_unif", "csv:fsdd:digit",
                              "csv:gm_notes:pitch"]
    kept = [r for r in table if r["recipe"] == "keep pitch" and r["delta"] == "0.25"][0]
    assert kept["csv:gm_notes:pitch"] == "35.0 ± 1.0" and float(kept["val_align"]) == pytest.approx(2.25)
    pngs_ok(out, ["training_align_unif.png", "training_probe.png"])
    # stdout is the report section: the per-run table in markdown, the recipe in every row
    assert "| run | synth | recipe | delta | val_align | val_unif | csv:fsdd:digit | csv:gm_notes:pitch |" in p.stdout
    assert "| r3_d0.1 | voice | keep pitch, ramp from 0.05 | 0.1 |" in p.stdout
    # a config.json whose recipe is not train.py's: one line, exit 2
    bad = root / "runs" / "r0_d0.1" / "config.json"
    bad.write_text(json.dumps(dict(synth="voice", delta=0.1, keep="pitch")))
    p = run("training", "--runs", bad.parent, "--out", tmp_path / "o2")
    assert p.returncode == 2 and "malformed keep" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_training_against_steps_draws_a_budget_curve(tmp_path):
    """--against steps: one line per recipe and delta over the runs' training steps, random init a reference line;
    --noise-curve is part of a run's recipe."""
    root = tmp_path / "exp"
    recipes = {"": {}, "noise curve, keep pitch-mod": dict(noise_curve=True, keep=["pitch-mod"])}
    summary = []
    for i, (how, extra) in enumerate(recipes.items()):
        for epochs in (4, 16):
            name = f"r{i}_e{epochs}"
            (root / "runs" / name).mkdir(parents=True)
            config = dict(synth="voice", delta=0.25, data=None, epochs=epochs, **PAPER_SAMPLER, noise_curve=False)
            (root / "runs" / name / "config.json").write_text(json.dumps({**config, **extra}))
            (root / "runs" / name / "log.csv").write_text(
                "step,epoch,lr,loss,align,unif,val_align,val_unif,sounds_per_s\n"
                f"{168 * epochs},{epochs - 1},0.03,0.1,1.2,-2.0,{1 + i},{-3 - epochs / 16},40.0\n")
            summary.append(dict(encoder=f"runs/{name}/encoder.pt", task="csv:gm_notes:pitch", metric="accuracy",
                                mean=0.3 + 0.1 * i + epochs / 100, std=0.01, folds=5))
    (root / "runs" / "random").mkdir()
    (root / "runs" / "random" / "config.json").write_text(json.dumps(dict(synth="voice", delta=0.25, data=None,
                                                                           epochs=0, **PAPER_SAMPLER)))
    summary.append(dict(encoder="runs/random/encoder.pt", task="csv:gm_notes:pitch", metric="accuracy", mean=0.65,
                        std=0.04, folds=5))
    rows = [dict(s, fold=k, score=s["mean"]) for s in summary for k in range(5)]
    (root / "results.json").write_text(json.dumps(dict(rows=rows, summary=summary, skipped_files={})))
    runs = sorted((root / "runs").iterdir())
    outs = {x: tmp_path / x for x in ("delta", "steps")}
    for x, out in outs.items():
        p = ok("training", "--runs", *runs, "--results", root / "results.json", "--against", x, "--out", out, cwd=root)
        pngs_ok(out, ["training_align_unif.png", "training_probe.png"])
    assert "probe scores vs training steps" in p.stdout
    training = {r["run"]: r for r in read_csv(outs["steps"] / "training.csv")}
    assert training["r1_e16"]["recipe"] == "noise curve, keep pitch-mod" and training["r1_e16"]["steps"] == "2688"
    assert training["r0_e4"]["recipe"] == "" and training["random"]["steps"] == "0"
    for png in ("training_align_unif.png", "training_probe.png"):  # the x axis and the lines differ
        assert (outs["delta"] / png).read_bytes() != (outs["steps"] / png).read_bytes()
    lines = by_steps_lines(root, runs)
    assert lines == {"voice, δ = 0.25": [(672, 0.34), (2688, 0.46)],
                     "voice, noise curve, keep pitch-mod, δ = 0.25": [(672, 0.44), (2688, 0.56)],
                     "random init": "reference 0.65"}


def by_steps_lines(root, runs):
    """What by_synth draws against steps for these runs' pitch scores: {label: [(steps, score)] or a reference}."""
    import matplotlib.pyplot as plt
    rows = analyze.read_results(root / "results.json", {r["run"]: r for r in map(analyze.read_run, runs)})
    fig, ax = plt.subplots()
    analyze.by_synth(ax, rows, "mean", x="steps")
    lines = {c.get_label(): [(int(a), round(float(b), 4)) for a, b in zip(*c.lines[0].get_data())]
             for c in ax.containers}  # errorbar's
    lines.update({ln.get_label(): f"reference {ln.get_ydata()[0]:g}" for ln in ax.get_lines()
                  if ln.get_linestyle() == "--"})
    assert ax.get_xlabel() == "training steps"
    plt.close(fig)
    return lines


def test_invariance_per_factor(factors, encoder, random_run, tmp_path):
    out = tmp_path / "inv"
    p = ok("invariance", "--factors", factors, "--encoder", encoder, random_run / "encoder.pt", "--out", out)
    rows = read_csv(out / "invariance.csv")
    assert {r["encoder"] for r in rows} == {encoder.parent.name, "random"}
    assert sorted(r["factor"] for r in rows if r["encoder"] == "random") == ["gain", "negative", "noise", "shift",
                                                                              "vco_1"]
    s_neg = {r["encoder"]: float(r["cos_mean"]) for r in rows if r["factor"] == "negative"}
    for r in rows:
        assert int(r["n"]) == 6 and -1 <= float(r["cos_mean"]) <= 1
        s, neg = float(r["cos_mean"]), s_neg[r["encoder"]]
        assert float(r["invariance"]) == pytest.approx((s - neg) / (1 - neg), abs=1e-4)
    assert "noise" in p.stdout
    pngs_ok(out, ["invariance.png"])
    # without random negatives there is no scale: one line, exit 2
    shutil.copytree(factors / "noise", tmp_path / "partial" / "noise")
    p = run("invariance", "--factors", tmp_path / "partial", "--encoder", encoder, "--out", tmp_path / "o2")
    assert p.returncode == 2 and "negative" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_report_has_every_figure_and_table(sweep, tiny_ast, runs, factors, encoder, tmp_path):
    root, _ = runs
    out = tmp_path / "report"
    ok("report", "--pairs", sweep, "--set", f"voice={sweep / 'voice' / 'delta_0.5'}", "--set", f"fsdd={DATA / 'fsdd'}",
       "--max-files", "4", "--classifier-path", tiny_ast, "--runs", *sorted((root / "runs").iterdir()),
       "--results", root / "results.json", "--factors", factors, "--encoder", encoder, "--out", out, cwd=root)
    md = (out / "report.md").read_text()
    figs = ["pairs_similarity.png", "pairs_pca.png", "features.png", "uncertainty.png", "fad.png",
            "training_align_unif.png", "training_probe.png", "invariance.png"]
    for f in figs:
        assert f"]({f})" in md
    pngs_ok(out, figs)
    assert md.count("|---|") >= 6 and "pos_mean" in md and "val_align" in md and "H_p" in md


def test_help_documents_mfcc_standardization():
    p = ok("pairs", "--help")
    assert "z-scored" in p.stdout


# -----------------------------------------------------------------------------
# bad input: one line on stderr, exit 2

def test_bad_input_one_line_exit_2(tmp_path, encoder):
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.wav").write_bytes(b"not audio at all")
    (tmp_path / "notenc.pt").write_bytes(b"garbage")
    np.savez(tmp_path / "d7.npz", embeddings=np.zeros((10, 7), np.float32))
    sf.write(tmp_path / "ok.wav", np.zeros(SR, np.float32), SR)
    (tmp_path / "run").mkdir()
    fsdd = DATA / "fsdd"
    cases = {
        "empty set": ["features", "--set", f"e={tmp_path / 'empty'}"],
        "unreadable audio": ["features", "--set", f"b={tmp_path / 'broken'}"],
        "mismatched dims": ["fad", "--set", f"c={tmp_path / 'd7.npz'}", "--set", f"f={fsdd}", "--max-files", "3"],
        "unknown embedder": ["fad", "--set", f"f={fsdd}", "--set", f"g={fsdd}", "--embedder", "vggish"],
        "missing folder": ["features", "--set", f"x={tmp_path / 'nope'}"],
        "missing pairs": ["pairs", "--pairs", tmp_path / "empty"],
        "not an encoder": ["pairs", "--pairs", tmp_path, "--embedder", f"encoder:{tmp_path / 'notenc.pt'}"],
        "clap missing": ["fad", "--set", f"f={fsdd}", "--set", f"g={fsdd}", "--embedder", "clap"],
        "no run folder": ["training", "--runs", tmp_path / "run"],
        "no classifier": ["uncertainty", "--set", f"f={fsdd}", "--classifier-path", tmp_path / "nope"],
        "duplicate set names": ["features", "--set", f"f={fsdd}", "--set", f"f={DATA / 'gm_notes'}"],
        "unknown subcommand": ["plot"],
    }
    # a pair folder, so "not an encoder" fails on the encoder rather than on the layout
    np.savez(tmp_path / "params.npz", synth="voice", delta=0.1)
    sf.write(tmp_path / "000000_a.wav", np.zeros(SR, np.float32), SR)
    sf.write(tmp_path / "000000_b.wav", np.zeros(SR, np.float32), SR)
    # all at once: each case is a fresh interpreter that mostly waits on imports, with its own --out (one job owns
    # an --out, so cases sharing one would refuse each other)
    procs = {what: subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args), "--out", str(tmp_path / f"out{i}")],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, (what, args) in enumerate(cases.items())}
    for what, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        lines = err.strip().splitlines()
        assert proc.returncode == 2, (what, err)
        assert len(lines) == 1 and lines[0].startswith("analyze.py: error:"), (what, err)
        if what == "clap missing":
            assert "laion_clap" in lines[0]


def test_training_from_real_run_folders(trained_run, random_run, tmp_path):
    p = subprocess.run([sys.executable, str(SCRIPT), "training", "--runs", str(trained_run), str(random_run),
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    rows = list(csv.DictReader(open(tmp_path / "training.csv")))
    trained = [r for r in rows if r["run"] == trained_run.name]
    assert trained and float(trained[0]["delta"]) == 0.25 and trained[0]["val_align"] not in ("", "nan")
    assert list(tmp_path.glob("*.png"))
