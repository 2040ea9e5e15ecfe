"""
Analysis and figures for "Contrastive Learning from Synthetic Audio Doppelgängers" (Cherep & Singh).

One script, seven subcommands: pairs (Fig. 1), features (Fig. 2A), uncertainty (Fig. 2B), fad (Table 2), training
(Fig. 5, Fig. 3), invariance, and report (all that the inputs allow). Each writes PNG plots and the numbers behind
them (CSV) into --out DIR and prints its section of the report (markdown); `analyze.py NAME --help` says what NAME
computes, with more examples. Nothing downloads: every model is read from a local path.

  python generate.py --synth voice voicefm parametric --delta 0.01 0.05 0.1 0.25 0.5 --pairs 200 --out pairs/
  python generate.py --factors --synth voice --delta 0.25 --pairs 200 --out factors/
  python analyze.py pairs --pairs pairs/ --embedder mfcc --out figs/pairs
  python analyze.py features --set voice=pairs/voice/delta_0.25 --set fsdd=../shared/data/fsdd --out figs/features
  python analyze.py uncertainty --set voice=pairs/voice/delta_0.25 --classifier-path models/ast --out figs/uncertainty
  python analyze.py fad --set voice=pairs/voice/delta_0.25 --target fsdd=../shared/data/fsdd --out figs/fad
  python analyze.py training --runs runs/* --results probes/results.json --out figs/training
  python analyze.py invariance --factors factors/ --encoder runs/voice/encoder.pt runs/random/encoder.pt --out figs/inv
  python analyze.py report --pairs pairs/ --runs runs/* --results probes/results.json --out report/

Sets: --set NAME=PATH is a folder of audio (read recursively) or, for fad, a probe.py embedding cache .npz;
NAME=mixK:PATH is the paper's "Mix" set: each clip the sum of K random 1-s segments of one file under PATH.

Embedders: mfcc (mean, std over time of 20 MFCCs; no weights), encoder:PATH (train.py's encoder.pt), clap (LAION-CLAP).
"""
import argparse
import collections
import contextlib
import csv
import errno
import fcntl
import functools
import importlib.util
import inspect
import io
import json
import math
import os
import re
import shutil
import signal
import stat
import sys
import warnings
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import soundfile as sf
from tqdm import tqdm
# torch, torchaudio, essentia, transformers: imported where used, as each takes seconds and bad input fails at once

# === 1. the paper ===
# Fig. 1 (pairs vs δ), 2A (features), 2B (uncertainty), Table 2 (FAD); part 2 loads CLAP/AST, part 3 reads and draws.
SAMPLE_RATE = 16000
FRAME, HOP = 2048, 512  # spectral features: 128 ms frames at 16 kHz
SILENCE = 1e-8          # frame mean power below this (after level normalization) is skipped
OE_CLIP = (1e-3, 1e3)   # odd/even ratio range: Essentia returns FLT_MAX when even harmonics vanish
FEATURES = ["inharmonicity", "odd_even_ratio", "pitch_salience", "flatness", "flux", "complexity"]
PROXIES = ["H_cu", "H_p", "S_conf"]


def get_embedder(spec, args):  # -> a function from a float32 (B, T) 16 kHz batch to (B, D); see the module docstring
    if spec not in ("mfcc", "clap") and not spec.startswith("encoder:"):
        raise ValueError(f"unknown embedder {spec!r} (use mfcc, encoder:PATH or clap)")
    import torch
    import torchaudio
    if spec == "clap":
        return load_clap(args)
    if spec.startswith("encoder:"):  # an encoder.pt exported by train.py, checked on a dummy batch
        path = Path(spec[len("encoder:"):])
        if not path.is_file():
            raise ValueError(f"no such encoder file: {path}")
        try:
            enc = torch.jit.load(str(path), map_location="cpu").eval()
        except Exception:
            raise ValueError(f"{path} is not an exported encoder (TorchScript, (B, T) -> (B, D))") from None
        with torch.no_grad():
            encode(enc, torch.zeros(2, SAMPLE_RATE), path)  # a bad encoder fails now, before any audio is read
        return lambda x: encode(enc, x, path)
    mfcc = torchaudio.transforms.MFCC(SAMPLE_RATE, n_mfcc=20, melkwargs=dict(n_fft=512, hop_length=160, n_mels=64))
    stats = lambda m: torch.cat([m.mean(-1), m.std(-1)], 1)
    return lambda x: stats(mfcc(torch.nn.functional.pad(x, (0, max(0, 1024 - x.shape[1])))))  # very short clips


def embed(waves, fn, batch_size, desc="embed"):  # (N, D); a batch holds clips of one length: one tensor, nothing padded
    import torch
    by_len = {}
    for i, w in enumerate(waves):
        by_len.setdefault(len(w), []).append(i)
    idx = [ix[k:k + batch_size] for _, ix in sorted(by_len.items()) for k in range(0, len(ix), batch_size)]
    with torch.no_grad():
        parts = [fn(torch.from_numpy(np.stack([waves[i] for i in ix]).astype(np.float32))).numpy()
                 for ix in tqdm(idx, desc=desc, disable=None)]
    if len({p.shape[1] for p in parts}) > 1:  # an embedding's width must not depend on the clip's length
        raise ValueError(f"{desc}: the embedder gives {' and '.join(sorted({str(p.shape[1]) for p in parts}))}-d "
                         f"embeddings for clips of different lengths")
    out = np.concatenate(parts, dtype=np.float64)[np.argsort(np.concatenate(idx))]  # back in input order
    if not np.isfinite(out).all():
        raise ValueError(f"{desc}: the embedder gives non-finite embeddings")
    return out


# pairs (Fig. 1)
def pair_similarity(groups, fn, embedder, batch_size):  # -> positive/negative cosine rows; groups gain unit-norm a, b
    emb = embed([w for g in groups for w in g["wa"] + g["wb"]], fn, batch_size)
    if embedder == "mfcc":  # z-scored over the whole sweep before cosine: see cmd_pairs
        emb = (emb - emb.mean(0)) / (emb.std(0) + 1e-8)
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    rng = np.random.default_rng(0)
    rows, s = [], 0
    for g in groups:
        n = len(g["wa"])
        g["a"], g["b"] = a, b = emb[s:s + n], emb[s + n:s + 2 * n]
        s += 2 * n
        pos = (a * b).sum(1)
        perm = rng.permutation(n)  # random negatives: a against a shuffled b (never its own pair)
        neg = (a[perm] * b[np.roll(perm, 1)]).sum(1) if n > 1 else np.array([np.nan])
        rows.append(dict(synth=g["synth"], delta=g["delta"], n=n, pos_mean=pos.mean(), pos_sd=pos.std(),
                         neg_mean=neg.mean(), neg_sd=neg.std()))
    return sorted(rows, key=lambda r: (r["synth"], r["delta"]))


def plot_pair_pca(groups, pca_pairs):  # PCA fitted per synth over all its deltas, so the panels of a row share axes
    synths, deltas = sorted({g["synth"] for g in groups}), sorted({g["delta"] for g in groups})
    fig, axes = plt.subplots(len(synths), len(deltas), figsize=(2.6 * len(deltas), 2.6 * len(synths)), squeeze=False)
    for i, sy in enumerate(synths):
        gs = {g["delta"]: g for g in groups if g["synth"] == sy}
        allx = np.concatenate([np.concatenate([g["a"], g["b"]]) for g in gs.values()])
        mu = allx.mean(0)
        _, _, vt = np.linalg.svd(allx - mu, full_matrices=False)
        vt = np.concatenate([vt, np.zeros_like(vt)])[:2]  # a 1-d embedding: the second axis is 0
        for j, d in enumerate(deltas):
            ax = axes[i, j]
            ax.set_xticks([]), ax.set_yticks([])
            if d not in gs:
                ax.axis("off")
                continue
            pa, pb = ((gs[d][side][:pca_pairs] - mu) @ vt.T for side in "ab")
            for p, q in zip(pa, pb):
                ax.plot([p[0], q[0]], [p[1], q[1]], color=f"C{i}", lw=0.7, alpha=0.7)
            ax.scatter(pa[:, 0], pa[:, 1], s=6, color=f"C{i}")
            ax.scatter(pb[:, 0], pb[:, 1], s=6, color=f"C{i}", marker="x")
            ax.set_title(f"{sy}  δ={d:g}", fontsize=8)
    return fig


# features (Fig. 2A): Essentia's spectral descriptors, median over a clip's frames
def make_essentia():
    import essentia
    essentia.log.infoActive = essentia.log.warningActive = False  # keeps its import-time INFO line off stdout
    import essentia.standard as es
    return dict(
        es=es, window=es.Windowing(type="hann", size=FRAME), spectrum=es.Spectrum(size=FRAME),
        peaks=es.SpectralPeaks(sampleRate=SAMPLE_RATE, minFrequency=20, maxFrequency=SAMPLE_RATE / 2, maxPeaks=100,
                               orderBy="frequency"),  # HarmonicPeaks needs ascending, > 0 Hz
        pitch=es.PitchYinFFT(frameSize=FRAME, sampleRate=SAMPLE_RATE, minFrequency=40, maxFrequency=4000),
        harmonics=es.HarmonicPeaks(maxHarmonics=20), inharmonicity=es.Inharmonicity(),
        odd_even=es.OddToEvenHarmonicEnergyRatio(), flatness=es.Flatness(), flux=es.Flux(),
        salience=es.PitchSalience(sampleRate=SAMPLE_RATE, lowBoundary=100, highBoundary=5000),  # must be < Nyquist
        complexity=es.SpectralComplexity(sampleRate=SAMPLE_RATE, magnitudeThreshold=0.005))


def clip_features(x, E):  # per-clip features: the median over non-silent frames (NaN where no frame qualifies)
    x = np.asarray(x, np.float32)
    x = x * (0.1 / max(float(np.sqrt(np.mean(x ** 2))), 1e-8))  # same level for every clip: flux and
    x = np.pad(x, (0, max(0, FRAME - len(x))))                  # complexity depend on it
    vals = {f: [] for f in FEATURES}
    E["flux"].reset()
    prev = False
    for frame in E["es"].FrameGenerator(x, frameSize=FRAME, hopSize=HOP, startFromZero=True):
        if np.mean(frame ** 2) < SILENCE:  # flatness, salience etc. are undefined on silence
            prev = False
            continue
        s = E["spectrum"](E["window"](frame))
        flux = E["flux"](s)
        if prev:  # Flux of the first frame after silence compares against nothing
            vals["flux"].append(flux)
        prev = True
        vals["flatness"].append(E["flatness"](s))
        vals["pitch_salience"].append(E["salience"](s))
        vals["complexity"].append(E["complexity"](s))
        f0, _ = E["pitch"](s)
        freqs, mags = E["peaks"](s)
        if f0 <= 0 or len(freqs) == 0:
            continue
        hf, hm = E["harmonics"](freqs, mags, f0)
        if len(hf) == 0:
            continue
        vals["inharmonicity"].append(E["inharmonicity"](hf, hm))  # 1.0 when no harmonic has energy
        if hm.sum() > 0:
            # Essentia counts index 0 (harmonic 1) as "even": a zero slot in front makes the ratio odd/even energy
            r = E["odd_even"](np.r_[0.0, hf].astype(np.float32), np.r_[0.0, hm].astype(np.float32))
            vals["odd_even_ratio"].append(float(np.clip(r, *OE_CLIP)))
    return {f: float(np.median(v)) if v else float("nan") for f, v in vals.items()}


# uncertainty (Fig. 2B)
def uncertainty_proxies(p):  # class probabilities (N, C) -> H_cu (max), H_p (entropy / log C), S_conf (top-1 - top-2)
    p = np.asarray(p, np.float64)
    p = p / p.sum(1, keepdims=True)
    top = -np.sort(-p, 1)
    h_p = -(p * np.log(np.where(p > 0, p, 1.0))).sum(1) / np.log(p.shape[1])
    return dict(H_cu=top[:, 0], H_p=h_p, S_conf=top[:, 0] - top[:, 1])


def classify(sets, fe, model, sigmoid, batch_size):  # AST (part 2 loads it) class probabilities -> [(N, C) per set]
    import torch
    import torchaudio
    per_set = []
    for s in sets:
        waves = s["waves"]
        if fe.sampling_rate != SAMPLE_RATE:
            waves = [torchaudio.functional.resample(torch.from_numpy(w), SAMPLE_RATE, fe.sampling_rate).numpy()
                     for w in waves]
        waves = [np.pad(w, (0, max(0, fe.sampling_rate // 40 - len(w)))) for w in waves]  # fbank's 25-ms window
        probs, bs = [], min(batch_size, 8)  # AST attends over ~1200 patches: small batches
        with torch.no_grad():
            for i in tqdm(range(0, len(waves), bs), desc=f"classify {s['name']}", disable=None):
                inputs = fe(waves[i:i + bs], sampling_rate=fe.sampling_rate, return_tensors="pt")
                logits = model(**inputs).logits.double()
                p = torch.sigmoid(logits) if sigmoid else torch.softmax(logits, -1)
                probs.append((p / p.sum(-1, keepdim=True)).numpy())
        per_set.append(np.concatenate(probs))
    return per_set


# fad (Table 2)
def fad(e1, e2, eps=1e-6):  # Frechet distance ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)), as FAD/FID code does
    import scipy.linalg
    cov = lambda e: np.atleast_2d(np.cov(e, rowvar=False))  # (D, D), also for D = 1 (np.cov gives a scalar)
    mu1, s1, mu2, s2 = e1.mean(0), cov(e1), e2.mean(0), cov(e2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "singular matrix" warnings: handled by the offset below
        covmean = scipy.linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            off = eps * np.eye(len(s1))
            covmean = scipy.linalg.sqrtm((s1 + off) @ (s2 + off))
    covmean = np.real(covmean)  # tiny imaginary parts are numerical noise
    return max(float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)), 0.0)


# === 2. beyond the paper ===
# Local CLAP and AST weights, Mix sets, invariance (one factor at a time), training figures (Fig. 3, 5), the report.
def load_clap(args):  # LAION-CLAP from local weights, as an embedder (see get_embedder); nothing downloads
    import torchaudio
    missing = [] if importlib.util.find_spec("laion_clap") else ["the laion_clap package (pip install laion_clap)"]
    if not args.clap_checkpoint:
        missing.append("--clap-checkpoint FILE (local LAION-CLAP weights, e.g. 630k-audioset-best.pt)")
    elif not Path(args.clap_checkpoint).is_file():
        missing.append(f"the CLAP checkpoint {args.clap_checkpoint} (no such file)")
    if missing:
        raise ValueError("--embedder clap needs " + " and ".join(missing))
    try:
        import laion_clap
        model = laion_clap.CLAP_Module(enable_fusion=False, amodel=args.clap_amodel, device="cpu")
        model.load_ckpt(args.clap_checkpoint, verbose=False)
        model.eval()
    except Exception as e:
        raise ValueError(f"cannot load LAION-CLAP from {args.clap_checkpoint}: {first_line(e)}") from None
    return lambda x: model.get_audio_embedding_from_data(
        x=torchaudio.functional.resample(x, SAMPLE_RATE, 48000), use_tensor=True).float()  # CLAP works at 48 kHz


def load_ast(args):  # AST classifier from local weights -> (feature extractor, model, whether its logits are sigmoids)
    from transformers import ASTFeatureExtractor, ASTForAudioClassification, logging as hf_logging
    hf_logging.set_verbosity_error()
    d = Path(args.classifier_path)
    try:
        fe = ASTFeatureExtractor.from_pretrained(str(d), local_files_only=True)
        model = ASTForAudioClassification.from_pretrained(str(d), local_files_only=True).eval()
    except Exception as e:
        raise ValueError(f"cannot load an AST classifier from {d}: {first_line(e)}") from None
    if model.config.num_labels < 2:  # no top-2, and entropy / log C is 0 / 0
        raise ValueError(f"the classifier in {d} has {model.config.num_labels} class; the proxies need 2 or more")
    # AudioSet heads are multi-label (independent sigmoids); their outputs are normalized to sum 1
    return fe, model, args.activation == "sigmoid" or (args.activation == "auto" and (
        model.config.problem_type == "multi_label_classification" or model.config.num_labels == 527))


def mix(waves, k):  # Mix sets: each clip the sum of k random 1-s segments of a file (wrapping if short) at its loudness
    rng, out = np.random.default_rng(0), []
    for x in waves:
        x = np.pad(x, (0, max(0, SAMPLE_RATE - len(x))))
        m = np.sum([np.take(x, o + np.arange(SAMPLE_RATE), mode="wrap") for o in rng.integers(0, len(x), k)], 0)
        out.append((m * np.sqrt(np.mean(x ** 2) / max(np.mean(m ** 2), 1e-12))).astype(np.float32))
    return out


# invariance: what an encoder has learned to ignore
def cmd_invariance(args, run):
    """What an encoder ignores: per --encoder, the mean cosine similarity of pairs that differ in one factor (noise,
    gain, shift, each parameter group) beside doppelgänger pairs and random negatives, and the invariance
    (s - s_neg) / (1 - s_neg) -> invariance.csv, invariance.png

      python generate.py --factors --synth voice --delta 0.25 --pairs 200 --out factors/
      python analyze.py invariance --factors factors/ --encoder runs/voice/encoder.pt runs/random/encoder.pt \\
          --out figs/invariance
    """
    dirs = {}  # generate.py --factors output: {factor: pair folder}
    for npz in sorted(Path(args.factors).glob("*/params.npz")):
        try:
            dirs[str(np.load(npz, allow_pickle=False)["factor"])] = npz.parent
        except Exception:
            raise ValueError(f"{npz} has no factor (not written by generate.py --factors)") from None
    if "negative" not in dirs:
        raise ValueError(f"no generate.py --factors output with a 'negative' folder under {args.factors}")
    labels = [Path(p).parent.name or str(p) for p in args.encoder]  # the run folders' names, if unique
    labels = labels if len(set(labels)) == len(labels) else [str(p) for p in args.encoder]
    pairs = {name: read_pairs(d, args.max_pairs) for name, d in dirs.items()}  # read once for every encoder
    rows = []
    for path, label in zip(args.encoder, labels):
        fn, sims = get_embedder(f"encoder:{path}", args), {}
        for name, (wa, wb) in pairs.items():  # mean cosine between the two sides of each factor's pairs
            e = embed(wa + wb, fn, args.batch_size, desc=f"embed {name}")
            e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
            sims[name] = (e[:len(wa)] * e[len(wa):]).sum(1)
        s_neg = sims["negative"].mean()  # invariance 1: the factor is ignored, 0: as different as a random negative
        rows += [dict(encoder=label, factor=k, n=len(v), cos_mean=v.mean(), cos_sd=v.std(),
                      invariance=(v.mean() - s_neg) / max(1 - s_neg, 1e-12)) for k, v in sims.items()]
    table = write_csv(run, "invariance.csv", rows, ["encoder", "factor", "n", "cos_mean", "cos_sd", "invariance"])
    first = ["doppelganger", "noise", "gain", "shift"]  # then the synth's parameter groups
    factors = [f for f in first if f in dirs] + sorted(f for f in dirs if f not in first + ["negative"])
    encoders = list(dict.fromkeys(r["encoder"] for r in rows))
    fig, ax = plt.subplots(figsize=(6, 0.25 * len(factors) * len(encoders) + 1.5))
    h = 0.8 / len(encoders)
    for j, enc in enumerate(encoders):
        inv = {r["factor"]: r["invariance"] for r in rows if r["encoder"] == enc}
        ax.barh(np.arange(len(factors)) + j * h, [inv[f] for f in factors], height=h, color=f"C{j}", label=enc)
    ax.set_yticks(np.arange(len(factors)) + h * (len(encoders) - 1) / 2, factors)
    ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("(s − s_neg) / (1 − s_neg)\n1 = ignored, 0 = as different as a random negative")
    ax.set_title("what the encoder ignores: pairs that differ in one factor")
    ax.legend(fontsize=7)
    figures = [save_fig(run, fig, "invariance.png")]
    return Section("Invariance: embedding similarity of pairs that differ in one factor", figures, [table])


# training (Fig. 5, Fig. 3)
def recipe(cfg, path):  # pair drawing beyond delta, e.g. 'keep pitch, ramp from 0.05'; '' for the paper's sampler
    try:
        keep, groups, start = cfg["keep"] or [], cfg["delta_group"] or [], cfg["delta_schedule"]
        if not (isinstance(keep, list) and isinstance(groups, list)):
            raise TypeError
        ramp = [] if start is None else [f"ramp from {float(start):g}"]
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{path} has a malformed keep, delta_group or delta_schedule, or lacks one "
                         "(a config.json of train.py before --keep, --delta-group, --delta-schedule)") from None
    curve = ["noise curve"] * bool(cfg.get("noise_curve"))  # absent before train.py had --noise-curve: not given
    return ", ".join(curve + [f"keep {k}" for k in keep] + list(map(str, groups)) + ramp)


def read_run(d):  # train.py run folder -> (run, synth, recipe, delta, steps, epochs, val_align, val_unif) at its end
    d = Path(d)
    if not (d / "config.json").is_file():
        raise ValueError(f"{d} is not a train.py run folder (no readable config.json)")
    cfg = read_json(d / "config.json", "train.py config")
    try:
        synth = "+".join(map(str, cfg["synth"])) if isinstance(cfg["synth"], list) else str(cfg["synth"])
        delta = float(cfg["delta"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{d / 'config.json'} has no synth/delta") from None
    how = recipe(cfg, d / "config.json")
    if cfg.get("data"):  # the paper's real-audio baselines: no synth, no delta
        synth, delta, how = f"real ({cfg.get('positives', 'aug')})", float("nan"), ""
    elif cfg.get("epochs") == 0:  # "Random Init." baseline
        synth, delta, how = "random init", float("nan"), ""
    row = dict(run=d.name, synth=synth, recipe=how, delta=delta, steps=0, epochs=0,
               val_align=float("nan"), val_unif=float("nan"))
    path = d / "log.csv"
    if not path.is_file():
        return row
    try:  # steps and epochs of the last row, the last validation
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's BOM
            log = list(csv.DictReader(f))
        if log:
            row.update(steps=int(float(log[-1]["step"])), epochs=int(float(log[-1]["epoch"])))
        if val := [r for r in log if (r.get("val_align") or "").strip()]:
            row.update(val_align=float(val[-1]["val_align"]), val_unif=float(val[-1]["val_unif"]))
    except (KeyError, TypeError, ValueError, OverflowError, csv.Error) as e:  # UnicodeDecodeError too; inf steps
        raise ValueError(f"{path} is not a train.py log.csv ({first_line(e)})") from None
    return row


def read_results(path, runs):  # probe.py results -> (run, task, metric, mean, std, folds) rows of known runs' encoders
    path = Path(path)
    res = read_json(path, "probe.py results.json")
    try:  # probe.py's summary: one row per encoder and task
        summary = [dict(encoder=str(s["encoder"]), task=s["task"], metric=s["metric"], mean=float(s["mean"]),
                        std=float(s["std"]), folds=s["folds"]) for s in res["summary"]]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{path} is not a probe.py results.json ({type(e).__name__}: {first_line(e)})")
    out, skipped = [], set()
    for s in summary:
        enc = Path(s.pop("encoder"))
        run = next((read_run(d) for d in (enc.parent, path.parent / enc.parent)  # runs/NAME/encoder.pt -> runs/NAME/
                    if (d / "config.json").is_file()), None) or runs.get(enc.parent.name)
        if run is None:
            skipped.add(str(enc))
            continue
        out.append({k: run[k] for k in ("run", "synth", "recipe", "delta", "steps")} | s)
    if skipped:
        print(f"analyze.py: {path}: {len(skipped)} encoder(s) without a run folder skipped", file=sys.stderr)
    return out


def label(r, x="delta"):  # against steps, runs of one recipe at two deltas are two lines
    how = f"{r['synth']}, {r['recipe']}" if r["recipe"] else r["synth"]
    return f"{how}, δ = {r['delta']:g}" if x == "steps" and np.isfinite(r["delta"]) else how


def by_synth(ax, rows, key, err=None, series=None, x="delta"):  # a line per label; seeds (same label and x) averaged
    series = series or sorted({label(r, x) for r in rows})  # the figure's labels: one color per line in every panel
    for sy in sorted({label(r, x) for r in rows}):
        i = series.index(sy)
        rs = [r for r in rows if label(r, x) == sy and np.isfinite(r[key])]
        if not rs:
            continue
        if not np.isfinite(rs[0]["delta"]):  # a baseline without delta: a reference line
            ax.axhline(np.mean([r[key] for r in rs]), ls="--", color=f"C{i}", label=sy)
            continue
        ds = sorted({r[x] for r in rs})
        y = [np.mean([r[key] for r in rs if r[x] == d]) for d in ds]
        e = [np.mean([r[err] for r in rs if r[x] == d]) for d in ds] if err else None
        ax.errorbar(ds, y, yerr=e, marker="o", capsize=3, color=f"C{i}", label=sy)
    if x == "delta":
        delta_axis(ax, sorted({r["delta"] for r in rows if np.isfinite(r["delta"])}))
    else:
        steps = sorted({r["steps"] for r in rows if np.isfinite(r["delta"])})
        ax.set_xscale("log", base=2)  # budgets grow by factors
        ax.set_xticks(steps, [f"{s:,}" for s in steps])
        ax.minorticks_off()
        ax.set_xlabel("training steps")


def legend_below(fig, axes):  # one legend under the laid-out panels: recipe names are long, legends in panels hid data
    fig.tight_layout()
    seen = {}
    for h, l in (hl for ax in axes for hl in zip(*ax.get_legend_handles_labels())):
        seen.setdefault(l, h)
    fig.legend(seen.values(), seen.keys(), loc="upper center", bbox_to_anchor=(0.5, 0), ncol=min(len(seen), 3),
               fontsize=8, frameon=False)


def cmd_training(args, run):
    """Fig. 5, Fig. 3: final validation align/unif of train.py runs and probe.py scores vs each run's delta, one line
    per synth and recipe (--noise-curve, --keep, --delta-group, --delta-schedule; a ramped run sits at its final delta),
    or with --against steps vs its training steps (a budget curve, a line per recipe and delta) -> training.csv,
    probe.csv, training_table.csv (runs × tasks: mean ± std over folds, %), training_align_unif.png, training_probe.png

      python analyze.py training --runs runs/* --results probes/results.json --out figs/training
      python analyze.py training --runs runs/cpu25 runs/e16 runs/random --results probes/results.json \
          --against steps --out figs/budget
    """
    runs = {r["run"]: r for r in map(read_run, args.runs)}
    probes = [p for f in args.results for p in read_results(f, runs)]
    if not runs and not probes:
        raise ValueError("no probe result maps to a train.py run folder "
                         "(runs/NAME/encoder.pt -> runs/NAME/config.json)")
    drawn = [r for r in runs.values() if np.isfinite(r["val_align"])] + probes  # baselines (no delta) are lines
    if args.against == "steps" and (idle := [r["run"] for r in drawn if r["steps"] < 1 and np.isfinite(r["delta"])]):
        raise ValueError(f"--against steps: run {idle[0]} has no training step (no log.csv rows) to place on the log "
                         "axis; leave it out or use --against delta")
    order = lambda r: (r["synth"], r["recipe"], r["delta"], r["run"])
    rows = sorted(runs.values(), key=order)
    # a recipe column only where a run has one: runs of the paper's sampler give the same files as before
    head = ["run", "synth", *["recipe"] * any(r["recipe"] for r in [*rows, *probes]), "delta"]
    figures, tables = [], [write_csv(run, "training.csv", rows, [*head, "steps", "epochs", "val_align", "val_unif"],
                                     "training.csv: final validation alignment and uniformity")]
    if any(np.isfinite(r["val_align"]) for r in rows):  # e.g. runs/random alone has no validation to draw
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for ax, k in zip(axes, ["val_align", "val_unif"]):
            by_synth(ax, rows, k, x=args.against)
            ax.set_title(f"final {k.replace('val_', 'validation ')}")
        legend_below(fig, axes)
        figures.append(save_fig(run, fig, "training_align_unif.png"))
    if probes:
        probes.sort(key=lambda r: (r["task"], *order(r)))
        tables.append(write_csv(run, "probe.csv", probes, [*head, "task", "metric", "mean", "std", "folds"],
                                "probe.csv: linear-probe scores"))
        tasks = sorted({r["task"] for r in probes})
        # a row per run, a column per task (as probe.py's table: mean ± std in %), beside the final align/unif
        wide = {p["run"]: {k: p[k] for k in ("run", "synth", "recipe", "delta")} for p in probes}
        wide.update({r["run"]: dict(r) for r in rows})
        for p in probes:
            wide[p["run"]][p["task"]] = f"{100 * p['mean']:.1f} ± {100 * p['std']:.1f}"
        tables.append(write_csv(run, "training_table.csv", sorted(wide.values(), key=order),
                                [*head, "val_align", "val_unif", *tasks], "training_table.csv: final validation "
                                "alignment and uniformity, and each task's probe score (mean ± std over folds, %) "
                                "per run"))
        fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.8), squeeze=False)
        for ax, t in zip(axes[0], tasks):
            rs = [r for r in probes if r["task"] == t]
            by_synth(ax, rs, "mean", err="std", series=sorted({label(r, args.against) for r in probes}), x=args.against)
            ax.set_title(t, fontsize=9)
            ax.set_ylabel(rs[0]["metric"])
        legend_below(fig, axes[0])
        figures.append(save_fig(run, fig, "training_probe.png"))
    against = "δ (Fig. 5, Fig. 3)" if args.against == "delta" else "training steps"
    return Section(f"Training: alignment, uniformity and probe scores vs {against}", figures, tables)


# report
def markdown(s):  # a Section as report.md lines: figures, then tables to 4 digits (what a lone subcommand prints)
    md = [f"## {s.title}", ""] + [f"![{f}]({f})" for f in s.figures] + [""]
    for caption, cols, rows in s.tables:
        md += [f"*{caption}*", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        md += ["| " + " | ".join(str(fmt_row(r, 4).get(c, "")) for c in cols) + " |" for r in rows] + [""]
    return md


def cmd_report(args, run):
    """Everything the given inputs allow: pairs (--pairs), features (--set), uncertainty (--set + --classifier-path),
    fad (2+ sets/targets), training (--runs/--results), invariance (--factors + --encoder), all in DIR/report.md

      python analyze.py report --pairs pairs/ --set voice=pairs/voice/delta_0.25 --set fsdd=../shared/data/fsdd \\
          --runs runs/* --results probes/results.json --out report/
    """
    audio = [s for s in args.set if parse_set(s)[1].suffix != ".npz"]  # caches only serve fad
    audio_args = argparse.Namespace(**{**vars(args), "set": audio})
    sections = [cmd(a, run) for wanted, cmd, a in [
        (args.pairs, cmd_pairs, args),
        (audio, cmd_features, audio_args),
        (audio and args.classifier_path, cmd_uncertainty, audio_args),
        (args.set and len(args.set) + len(args.target) >= 2, cmd_fad, args),
        (args.runs or args.results, cmd_training, args),
        (args.factors and args.encoder, cmd_invariance, args)] if wanted]
    if not sections:
        raise ValueError("report: nothing to analyze; give --pairs, --set, --runs, --results and/or "
                         "--factors + --encoder")
    md = ["# Audio doppelgängers: analysis report", ""] + [line for s in sections for line in markdown(s)]
    run.outputs["report.md"] = "\n".join(md).encode(errors="backslashreplace")
    print(f"report: {args.out / 'report.md'} ({len(sections)} sections)")


# === 3. plumbing ===
# Run state, part 1's subcommands, reading sets, the helpers shared with the other scripts, the command line, main().
Section = collections.namedtuple("Section", "title figures tables")  # for report.md; tables: (caption, cols, rows)


class Run:  # main()'s state: the outputs, held in memory until the command succeeds; the lock on --out; the sets read
    def __init__(self, out):
        self.out, self.outputs, self.load_set = out, {}, functools.cache(load_set)  # report reads each set once
        self.made = [d for d in [out, *out.parents] if not d.exists()]  # removed again, innermost first, on failure
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.lock = FolderLock(out, beside=True)  # one job per --out: beside it, as --out may not exist yet

    def commit(self):  # every output at once: written into a hidden folder in --out, then renamed into place
        tmp = self.out / f".analyze-{os.getpid()}"
        try:
            for name, data in self.outputs.items():
                try:
                    atomic_write(tmp / name, data)
                except OSError as e:  # named as the file the user asked for
                    raise OSError(e.errno, e.strerror, str(self.out / name)) from None
            for name in self.outputs:  # a rename does not fill a disk: a failure leaves --out as it was
                os.replace(tmp / name, self.out / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def close(self, failed):
        self.lock.release()
        with contextlib.suppress(OSError):
            for d in self.made if failed else []:
                d.rmdir()


def write_csv(run, name, rows, cols, caption=None):  # -> the same rows as a report.md table: (caption, cols, rows)
    f = io.StringIO()
    w = csv.DictWriter(f, cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(map(fmt_row, rows))
    run.outputs[name] = f.getvalue().encode(errors="backslashreplace")  # a file name not UTF-8
    return caption or name, cols, rows


def save_fig(run, fig, name):
    f = io.BytesIO()
    fig.savefig(f, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    run.outputs[name] = f.getvalue()
    return name


def fmt_row(r, digits=6):
    return {k: (f"{v:.{digits}g}" if isinstance(v, (float, np.floating)) else v) for k, v in r.items()}


def delta_axis(ax, deltas):
    ax.set_xscale("symlog", linthresh=0.01)  # log-like, but keeps delta = 0
    ax.set_xticks(deltas, [f"{d:g}" for d in deltas])
    ax.set_xlabel("δ")


def violins(run, name, rows, names, titles, log, shape, size, title):  # a panel per titles key, a violin per set
    fig, axes = plt.subplots(*shape, figsize=size)
    for ax, (key, panel) in zip(axes.flat, titles.items()):
        for i, n in enumerate(names):
            v = np.array([r[key] for r in rows if r["set"] == n], float)
            v = v[np.isfinite(v)]
            if key == log:  # S_conf spans decades and can be 0
                v = np.log10(np.maximum(v, 1e-6))
            if len(np.unique(v)) >= 2:
                for b in ax.violinplot(v, positions=[i], showmedians=True, widths=0.8)["bodies"]:
                    b.set_color(f"C{i}")
            elif len(v):
                ax.scatter(np.full(len(v), i), v, color=f"C{i}", s=10)
        ax.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
        ax.set_title(panel + (" (log10)" if key == log else ""), fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    return save_fig(run, fig, name)


# the subcommands of part 1: read the sets, compute, write the CSV, the PNG and the report section
def cmd_pairs(args, run):
    """Fig. 1: cosine similarity of positive pairs and of random negatives vs delta per synth, and a PCA of the pairs
    per delta -> pairs.csv, pairs_similarity.png, pairs_pca.png. mfcc features are z-scored per dimension over the sweep
    before the cosine: raw MFCC statistics are dominated by the energy coefficient, which inflates every similarity.

      python generate.py --synth voice voicefm parametric --delta 0.01 0.05 0.1 0.25 0.5 --pairs 200 --out pairs/
      python analyze.py pairs --pairs pairs/ --embedder mfcc --out figs/pairs
      python analyze.py pairs --pairs pairs/ --embedder encoder:runs/voice/encoder.pt --out figs/pairs_enc
    """
    groups = read_sweep(args.pairs, args.max_pairs)
    rows = pair_similarity(groups, get_embedder(args.embedder, args), args.embedder, args.batch_size)
    table = write_csv(run, "pairs.csv", rows, ["synth", "delta", "n", "pos_mean", "pos_sd", "neg_mean", "neg_sd"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, sy in enumerate(sorted({r["synth"] for r in rows})):
        rs = [r for r in rows if r["synth"] == sy]
        x = [r["delta"] for r in rs]
        ax.errorbar(x, [r["pos_mean"] for r in rs], yerr=[r["pos_sd"] for r in rs], marker="o", capsize=3,
                    color=f"C{i}", label=f"{sy} positives")
        ax.plot(x, [r["neg_mean"] for r in rs], ls="--", color=f"C{i}", alpha=0.6, label=f"{sy} random negatives")
    delta_axis(ax, sorted({r["delta"] for r in rows}))
    ax.set_ylabel("cosine similarity" + (" (z-scored MFCC stats)" if args.embedder == "mfcc" else ""))
    ax.set_title(f"positive-pair similarity vs δ ({args.embedder})")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    figures = [save_fig(run, fig, "pairs_similarity.png"),
               save_fig(run, plot_pair_pca(groups, args.pca_pairs), "pairs_pca.png")]
    return Section(f"Positive-pair similarity vs δ (Fig. 1, {args.embedder})", figures, [table])


def cmd_features(args, run):
    """Fig. 2A: Essentia's inharmonicity, odd/even harmonic energy ratio, pitch salience, flatness, flux and
    complexity (median over a clip's non-silent frames, at a fixed RMS) of synthetic sets, real clips and K-segment
    mixtures of real clips -> features.csv, features.png

      python analyze.py features --set voice=pairs/voice/delta_0.25 --set fsdd=../shared/data/fsdd \\
          --set mix5=mix5:../shared/data/fsdd_count --max-files 300 --out figs/features

    odd/even is odd over even harmonic energy (harmonic 1 = odd), clipped to [1e-3, 1e3] and plotted in log10.
    PitchSalience does not remove the spectrum's mean: white noise scores ~0.79 (pi/4), a pure sine ~0, a 1/k
    sawtooth ~0.57, equal-strength harmonics ~0.9. SpectralComplexity counts at most 100 peaks.
    """
    sets = [run.load_set(s, args.max_files) for s in args.set]
    E = make_essentia()
    rows = [dict(set=s["name"], file=f, **clip_features(w, E)) for s in sets
            for f, w in tqdm(list(zip(s["files"], s["waves"])), desc=f"features {s['name']}", disable=None)]
    write_csv(run, "features.csv", rows, ["set", "file"] + FEATURES)
    names = [s["name"] for s in sets]
    figures = [violins(run, "features.png", rows, names, {f: f.replace("_", " ") for f in FEATURES}, "odd_even_ratio",
                       (2, 3), (12, 7), "spectral features per clip (median over frames)")]
    per_set = {n: np.array([[r[f] for f in FEATURES] for r in rows if r["set"] == n]) for n in names}
    summary = [dict(set=n, n=len(v), **{f: np.median(c[np.isfinite(c)]) if np.isfinite(c).any() else float("nan")
                                        for f, c in zip(FEATURES, v.T)}) for n, v in per_set.items()]
    return Section("Spectral features (Fig. 2A)", figures,
                   [("median per set (per-clip values in features.csv)", ["set", "n"] + FEATURES, summary)])


def cmd_uncertainty(args, run):
    """Fig. 2B: causal-uncertainty proxies of an Audio Spectrogram Transformer's class probabilities per clip: H_cu
    (max probability), H_p (entropy / log C), S_conf (top-1 minus top-2) -> uncertainty.csv, uncertainty.png

      python analyze.py uncertainty --set voice=pairs/voice/delta_0.25 --set mix5=mix5:../shared/data/fsdd_count \\
          --classifier-path models/ast-finetuned-audioset --out figs/uncertainty
    """
    sets = [run.load_set(s, args.max_files) for s in args.set]
    fe, model, sigmoid = load_ast(args)
    labels = [model.config.id2label.get(i, str(i)) for i in range(model.config.num_labels)]
    how = "sigmoid, normalized" if sigmoid else "softmax"
    rows = []
    for s, p in zip(sets, classify(sets, fe, model, sigmoid, args.batch_size)):
        u = uncertainty_proxies(p)
        rows += [dict(set=s["name"], file=f, top_class=labels[int(p[i].argmax())], **{k: u[k][i] for k in PROXIES})
                 for i, f in enumerate(s["files"])]
    write_csv(run, "uncertainty.csv", rows, ["set", "file", "top_class"] + PROXIES)
    names = [s["name"] for s in sets]
    titles = dict(H_cu="H_cu (max probability)", H_p="H_p (normalized entropy)", S_conf="S_conf (top1 - top2)")
    figures = [violins(run, "uncertainty.png", rows, names, titles, "S_conf", (1, 3), (12, 3.8),
                       f"causal-uncertainty proxies ({len(labels)} classes, {how})")]
    summary = [dict(set=n, n=sum(r["set"] == n for r in rows),
                    **{k: float(np.mean([r[k] for r in rows if r["set"] == n])) for k in PROXIES}) for n in names]
    return Section("Causal-uncertainty proxies (Fig. 2B)", figures,
                   [(f"mean per set, class probabilities by {how} (per clip in uncertainty.csv)",
                     ["set", "n"] + PROXIES, summary)])


def cmd_fad(args, run):
    """Table 2: Frechet Audio Distance of every --set against every --target (all pairs without --target)
    -> fad.csv, fad.png

      python analyze.py fad --set voice=pairs/voice --set parametric=pairs/parametric \\
          --target fsdd=../shared/data/fsdd --embedder clap --clap-checkpoint 630k-audioset-best.pt --out figs/fad
      python analyze.py fad --set a=probes/cache_a.npz --set b=probes/cache_b.npz --out figs/fad_cache
    """
    audio = any(parse_set(s)[1].suffix != ".npz" for s in args.set + args.target)
    fn = get_embedder(args.embedder, args) if audio else None
    sets = [run.load_set(s, args.max_files) for s in args.set + args.target]
    for s in sets:
        if len(s["files"]) < 2:
            raise ValueError(f"set {s['name']}: FAD needs at least 2 clips, got {len(s['files'])}")
    names = [s["name"] for s in sets]
    embs = {s["name"]: s["emb"] if "emb" in s else embed(s["waves"], fn, args.batch_size, desc=f"embed {s['name']}")
            for s in sets}
    if len({e.shape[1] for e in embs.values()}) > 1:
        raise ValueError("embedding dimensions differ: " + ", ".join(f"{k} has {e.shape[1]}" for k, e in embs.items()))
    set_names, target_names = names[:len(args.set)], names[len(args.set):] or names
    rows = [dict(set=s, target=t, n_set=len(embs[s]), n_target=len(embs[t]), fad=fad(embs[s], embs[t]))
            for s in set_names for t in target_names]
    table = write_csv(run, "fad.csv", rows, ["set", "target", "n_set", "n_target", "fad"])
    emb_name = args.embedder if audio else "cached embeddings"
    m = np.array([[r["fad"] for r in rows if r["set"] == s] for s in set_names])
    fig, ax = plt.subplots(figsize=(1.4 * len(target_names) + 2, 0.6 * len(set_names) + 1.5))
    im = ax.imshow(m, cmap="viridis")
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, f"{v:.3g}", ha="center", va="center", color="w", fontsize=8)
    ax.set_xticks(range(len(target_names)), target_names, rotation=30)
    ax.set_yticks(range(len(set_names)), set_names)
    ax.set(xlabel="target", title=f"Fréchet Audio Distance ({emb_name})")
    fig.colorbar(im, ax=ax)
    return Section(f"Fréchet Audio Distance (Table 2, {emb_name})", [save_fig(run, fig, "fad.png")], [table])


# reading sets and pair folders
AUDIO_EXT = {".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif"}


def read_clips(groups, what, unit="clip"):  # groups of files (a clip, a pair) -> (indices of those read, waves)
    kept, waves, refused = [], [], []
    for i, files in enumerate(tqdm(groups, desc=f"read {what}", disable=None)):
        try:
            waves.append([read_audio(f) for f in files])
            kept.append(i)
        except ValueError as e:  # skipped and counted: one bad file in 1000 should not stop a figure
            refused.append(first_line(e))
    if not kept:
        raise ValueError(f"{what}: no {unit} can be read ({refused[0]})")
    if refused:
        print(f"analyze.py: {what}: {len(refused)} {unit}(s) skipped; the first: {refused[0]}", file=sys.stderr)
    return kept, waves


def subset(n, max_files):  # a fixed seeded subset (in original order; 0 = all), so runs and sets are comparable
    return np.sort(np.random.default_rng(0).permutation(n)[:max_files or None])


def parse_set(spec):
    name, _, path = spec.partition("=") if "=" in spec else ("", "", spec)
    k, m = 0, re.fullmatch(r"mix(\d+):(.+)", path)
    if m:
        k, path = int(m.group(1)), m.group(2)
        if k < 1:
            raise ValueError(f"--set {spec}: mixK needs K >= 1")
    if not path:
        raise ValueError(f"--set {spec}: expected NAME=PATH or NAME=mixK:PATH")
    return name or Path(path).stem + (f"_mix{k}" if k else ""), Path(path), k


def load_set(spec, max_files):  # -> dict(name, files, waves) for audio, or dict(name, files, emb) for a probe.py cache
    name, path, k = parse_set(spec)
    if path.suffix == ".npz":
        try:
            z = np.load(path, allow_pickle=False)
            emb = z["embeddings"]
        except Exception:
            raise ValueError(f"{path} is not a probe.py embedding cache (no readable 'embeddings' array)") from None
        if emb.ndim != 2 or 0 in emb.shape or emb.dtype.kind not in "biuf":  # (N, 0): every FAD would be 0
            raise ValueError(f"set {name}: {path} holds no (N, D) embeddings of real numbers ({emb.dtype} {emb.shape})")
        emb = emb.astype(np.float64)
        if not np.isfinite(emb).all():
            raise ValueError(f"set {name}: {path} holds non-finite embeddings")
        try:
            files = [str(f) for f in z["files"]]
        except Exception:  # file names are optional here
            files = [str(i) for i in range(len(emb))]
        if len(files) != len(emb):
            raise ValueError(f"set {name}: {path} has {len(files)} file names for {len(emb)} embeddings")
        keep = subset(len(emb), max_files)
        return dict(name=name, files=[files[i] for i in keep], emb=emb[keep])
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in AUDIO_EXT and p.is_file())
    if not files:
        raise ValueError(f"no audio files under {path}")
    files = [files[i] for i in subset(len(files), max_files)]
    kept, waves = read_clips([[f] for f in files], f"set {name}")
    files, waves = [files[i] for i in kept], [w for w, in waves]
    return dict(name=name, files=[str(f.relative_to(path)) for f in files], waves=mix(waves, k) if k else waves)


def read_pairs(d, max_pairs=0):  # pair folder d's _a/_b.wav pairs, at most max_pairs (0 = all), as two lists of waves
    fa = sorted(d.glob("*_a.wav"))[: max_pairs or None]
    fb = [f.with_name(f.name[:-6] + "_b.wav") for f in fa]
    if not fa:
        raise ValueError(f"no NNNNNN_a.wav files in {d}")
    if not all(f.is_file() for f in fb):
        raise ValueError(f"{d}: some _a.wav files have no matching _b.wav")
    _, pairs = read_clips(list(zip(fa, fb)), str(d), "pair")
    return [a for a, _ in pairs], [b for _, b in pairs]


def read_sweep(root, max_pairs):  # generate.py pair folders under root -> [dict(synth, delta, wa, wb)] in folder order
    root = Path(root)
    dirs = sorted(p.parent for p in root.rglob("params.npz"))
    if not dirs:
        raise ValueError(f"no generate.py pair folders (params.npz) under {root}")
    groups = []
    for d in dirs:
        try:
            z = np.load(d / "params.npz", allow_pickle=False)
            groups.append(dict(synth=str(z["synth"]), delta=float(z["delta"])))
        except Exception:
            raise ValueError(f"{d / 'params.npz'} has no synth/delta (not written by generate.py)") from None
    for g, d in zip(groups, dirs):  # every folder checked before any audio is read
        g["wa"], g["wb"] = read_pairs(d, max_pairs)
    return groups


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


class FolderLock:
    """One job owns an output folder while it writes: an flock on FOLDER/.lock (beside: PARENT/.NAME.lock, for a folder
    not made yet or replaced whole) holding its pid. The OS drops it when the job dies: a kill -9 blocks no one."""

    def __init__(self, folder, beside=False):
        parent, name = os.path.split(os.path.abspath(folder))
        self.path = os.path.join(parent, f".{name}.lock") if beside else os.path.join(folder, ".lock")
        while True:
            try:
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise ValueError(f"cannot write to {os.path.dirname(self.path)}: {e.strerror}") from None
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(self.fd, 32).decode(errors="replace").strip()
                os.close(self.fd)
                raise ValueError(f"{folder} is in use by another {os.path.basename(__file__)} (pid "
                                 f"{owner or 'unknown'}); wait for it to end, or stop it first") from None
            with contextlib.suppress(OSError):  # the owner before us removed the file as we opened it: take the new one
                if os.path.samestat(os.fstat(self.fd), os.stat(self.path)):
                    break
            os.close(self.fd)
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())

    def release(self):  # remove the lock file while still holding it (no one takes a file about to vanish), let go
        if self.fd is not None:
            with contextlib.suppress(OSError):
                if os.path.samestat(os.fstat(self.fd), os.stat(self.path)):
                    os.remove(self.path)
            os.close(self.fd)
            self.fd = None

# --- end of shared helpers ---


# command line: every flag defined once; each subcommand's flags listed in SUBCOMMANDS
FLAGS = {
    "--out": dict(type=Path, help="output folder for PNGs, CSVs (created if absent)"),
    "--batch-size": dict(type=number(int, 1), default=64, help="clips per embedding/classifier batch"),
    "--embedder": dict(default="mfcc", help="mfcc (mean+std of 20 MFCCs; z-scored over the sweep in `pairs`), "
                       "encoder:PATH (train.py's encoder.pt) or clap (LAION-CLAP, needs --clap-checkpoint)"),
    "--clap-checkpoint": dict(help="local LAION-CLAP weights (.pt) for --embedder clap"),
    "--clap-amodel": dict(default="HTSAT-tiny", help="CLAP audio model of that checkpoint"),
    "--set": dict(action="append", default=[], metavar="NAME=PATH", help="audio folder (recursive), NAME=mixK:PATH for "
                  "K-segment mixtures of its files, or (fad) a probe.py embedding cache .npz; repeat for more sets"),
    "--max-files": dict(type=number(int), default=1000, help="files per set, fixed seeded subset (0 = all)"),
    "--target": dict(action="append", default=[], metavar="NAME=PATH",
                     help="FAD reference set(s), same syntax as --set (default: all pairs of --set)"),
    "--classifier-path": dict(help="folder of a local AST classifier (save_pretrained layout)"),
    "--activation": dict(choices=["auto", "softmax", "sigmoid"], default="auto", help="logits -> probabilities; "
                         "auto: sigmoid normalized to sum 1 for multi-label (AudioSet, 527 classes) heads, softmax "
                         "otherwise"),
    "--pairs": dict(help="generate.py output: a pair folder or a sweep of them"),
    "--max-pairs": dict(type=number(int), default=0, help="pairs per (synth, delta) folder or per factor (0 = all)"),
    "--pca-pairs": dict(type=number(int, 1), default=40, help="pairs drawn per PCA panel"),
    "--runs": dict(nargs="+", default=[], help="train.py run folders (config.json + log.csv)"),
    "--results": dict(nargs="+", default=[], help="probe.py results.json files"),
    "--against": dict(choices=["delta", "steps"], default="delta", help="training's x axis: each run's delta (Fig. 3, "
                      "5) or its training steps (a budget curve)"),
    "--factors": dict(help="generate.py --factors output (one folder per factor)"),
    "--encoder": dict(nargs="+", default=[], metavar="PATH", help="train.py encoder.pt file(s)"),
}
EMBEDDER = ["--embedder", "--clap-checkpoint", "--clap-amodel"]
PATHS = {"--out": "folder", "--classifier-path": "folder", "--clap-checkpoint": "file", "--pairs": "folder",
         "--factors": "folder", "--runs": "folder", "--results": "file", "--encoder": "file"}  # checked by check_args
SUBCOMMANDS = {  # name: (function, its required flags, its other flags); --help shows the function's docstring
    "pairs": (cmd_pairs, ["--pairs", "--out"], [*EMBEDDER, "--batch-size", "--max-pairs", "--pca-pairs"]),
    "features": (cmd_features, ["--set", "--out"], ["--max-files"]),
    "uncertainty": (cmd_uncertainty, ["--set", "--classifier-path", "--out"],
                    ["--max-files", "--activation", "--batch-size"]),
    "fad": (cmd_fad, ["--set", "--out"], ["--target", "--max-files", *EMBEDDER, "--batch-size"]),
    "training": (cmd_training, ["--out"], ["--runs", "--results", "--against"]),
    "invariance": (cmd_invariance, ["--factors", "--encoder", "--out"], ["--max-pairs", "--batch-size"]),
    "report": (cmd_report, ["--out"], [f for f in FLAGS if f != "--out"]),
}


def build_parser():
    raw = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    p.error = fail  # a bad flag is one line on stderr, exit 2, as every other bad input (here and in each subcommand)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, (fn, required, optional) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, description=inspect.cleandoc(fn.__doc__), formatter_class=raw)
        sp.set_defaults(run=fn)
        sp.error = fail
        for flag in required + optional:
            sp.add_argument(flag, required=flag in required, **FLAGS[flag])
    return p


def check_args(args):  # what argparse cannot check, before --out is created
    sets = [parse_set(s) for s in getattr(args, "set", []) + getattr(args, "target", [])]
    names = [name for name, _, _ in sets]
    if len(set(names)) < len(names):
        raise ValueError(f"set names must be unique, got {', '.join(names)}")
    for name, path, _ in sets if args.cmd in ("features", "uncertainty") else []:
        if path.suffix == ".npz":  # embedding caches serve fad only
            raise ValueError(f"set {name}: {path} is an embedding cache; this subcommand needs audio")
    if args.cmd == "fad" and not args.target and len(args.set) < 2:
        raise ValueError("fad needs a --target or at least two --set")
    if args.cmd == "training" and not args.runs and not args.results:
        raise ValueError("training needs --runs DIR ... and/or --results results.json ...")
    given = {flag: vars(args).get(flag[2:].replace("-", "_")) for flag in PATHS}  # what this subcommand has
    paths = [(flag, p, PATHS[flag]) for flag, v in given.items() for p in (v if isinstance(v, list) else [v]) if p]
    paths += [("--set", p, "file" if p.suffix == ".npz" else "folder") for _, p, _ in sets]
    for flag, path, kind in paths:  # every input must exist (the CLAP weights are named where read); --out is created
        check_path(path, flag, kind, must_exist=flag not in ("--out", "--clap-checkpoint"))
    check_writable(args.out, "--out")  # found now, not after the embedding


def main(argv=None):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing downloads, ever (set before transformers is imported)
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    matplotlib.use("Agg")  # figures go to files only
    run = None
    try:
        args = build_parser().parse_args(argv)
        check_args(args)
        run = Run(args.out)
        section = args.run(args, run)
        run.commit()
        run.close(failed=False)
        if section:  # report's sections went to report.md
            print("\n".join(markdown(section)))
    except (KeyboardInterrupt, ValueError, OSError) as e:
        if run:
            run.close(failed=True)
        if isinstance(e, KeyboardInterrupt):  # Ctrl-C or SIGTERM
            exit_interrupted(e)
        fail(f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename else first_line(e))


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, interrupted)
    main()
