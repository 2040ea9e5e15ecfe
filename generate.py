"""Audio doppelgängers: positive pairs from randomly perturbed synthesizer parameters (Cherep & Singh, Algorithm 1).

    theta   ~ U(eps, 1)^m                     random point in the synth's normalized parameter space
    z1, z2  ~ N(0, I)
    theta_i = clip(theta + delta * z_i, eps, 1)
    audio_i = synth(theta_i)                  two sounds that are alike, but not the same

train.py imports `PairSampler` for on-the-fly synthesis; the command line writes pairs to disk, to listen and analyze.

    python generate.py --synth voice --delta 0.25 --pairs 1000 --out pairs/
    python generate.py --synth voice voicefm parametric --delta 0.01 0.05 0.1 0.25 0.5 --pairs 200 --out pairs/
    python generate.py --gallery gallery/ --synth voice --delta 0 0.01 0.05 0.1 0.25 0.5 --pairs 4
    python generate.py --factors --synth voice --delta 0.25 --pairs 200 --out factors/
    python generate.py --synth voice --delta 0.25 --keep pitch --delta-group vco_1=0.1 --pairs 200 --out pairs_keep/
    python generate.py --gallery gallery_noise_curve/ --synth voice --delta 0 0.25 --pairs 4 --noise-curve

One (synth, delta) writes OUT/000000_a.wav, OUT/000000_b.wav, ... and OUT/params.npz (theta, theta_a, theta_b of
shape (pairs, m), synth, delta, seed, sample_rate; with --delta-group or --keep also delta_columns, each column's
delta, delta_group and keep; with --noise-curve also noise_curve). Several synths or deltas write
OUT/<synth>/delta_<delta>/ in that layout each."""
import argparse
import contextlib
import errno
import fcntl
import fnmatch
import functools
import math
import os
import shutil
import signal
import stat
import struct
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import synthax.modules.mixers
import synthax.synth
from synthax.config import SynthConfig
from synthax.parameter import ModuleParameterRange
from synthax.modules.oscillators import Noise

# === 1. the paper ===
# Algorithm 1 despite three faults of synthax 0.2.2: synth.init's normalized values are not U(0,1) (uniform in the
# human range, then curved), so theta is sampled here; AudioMixer's normalize_if_clipping divides the batch by sound
# 0's peak; Noise renders one buffer for every sound, and noise shared by a pair is a shortcut the encoder would learn.
EPS = 1e-6  # lower clip bound: synthax's curve mapping takes log2 of the normalized value
MAX_DELTA = 1.0  # beyond it most of theta_i sits on a clip bound, whatever delta is
SYNTHS = ("voice", "voicefm", "parametric")
CONTROL_RATE = 480  # as the authors' code, for 16 kHz synthesis


def normalize_if_clipping(signal):  # each sound by its own peak, and only if it clips
    peak = jnp.max(jnp.abs(signal), axis=1, keepdims=True)
    return jnp.where(peak > 1.0, signal / jnp.maximum(peak, 1e-12), signal)


class FreshNoise(Noise):  # white noise per call from the 'noise' rng stream: one buffer per sound (Noise's unused)
    def __call__(self):
        key = self.make_rng("noise")
        return jax.random.uniform(key, (self.batch_size, int(self.buffer_size)), minval=-1.0, maxval=1.0)


def use_synthax_fixes():  # where synthax looks them up; idempotent, called where a sampler is built, not at import
    synthax.modules.mixers.normalize_if_clipping = normalize_if_clipping
    synthax.synth.Noise = FreshNoise  # looked up by name when a synth's setup() builds its modules


def make_synth(name, config):
    if name == "voice":
        return synthax.synth.Voice(config=config)  # 78 parameters
    if name == "voicefm":
        return synthax.synth.VoiceExpanded(config=config)  # 130 parameters
    if name == "parametric":
        return synthax.synth.ParametricSynth(config=config, sine=2, square_saw=2, fm_sine=1, fm_square_saw=1)  # 340
    raise ValueError(f"unknown synth {name!r} (choose from {', '.join(SYNTHS)})")


class Doppelgangers:
    """Algorithm 1, one delta for every parameter; a batch is a pure function of (seed, stream, rank, step): stream 0
    trains, 1 validates. sample() -> float32 numpy (audio_a, audio_b, theta, theta_a, theta_b), (B, T) and (B, m)."""

    def __init__(self, synth, delta, batch_size, sample_rate=16000, seconds=1.0, seed=0):
        use_synthax_fixes()
        self.synth_name, self.delta, self.batch_size, self.seed = synth, float(delta), batch_size, seed
        self.sample_rate, self.seconds = sample_rate, seconds
        self.synth = make_synth(synth, SynthConfig(batch_size=batch_size, sample_rate=sample_rate,
                                                   buffer_size_seconds=seconds, control_rate=CONTROL_RATE))
        # only the parameter tree's structure is needed (init's values are not U(0,1)); a real init takes ~10 s
        self.params = jax.eval_shape(self.synth.init, {"params": jax.random.PRNGKey(0), "noise": jax.random.PRNGKey(0)})
        self.paths, self.treedef = jax.tree_util.tree_flatten_with_path(self.params)
        self.shapes = [leaf.shape[1:] for _, leaf in self.paths]  # per sound: (), (n_input,), (n_out, n_in)
        self.sizes = [math.prod(s) for s in self.shapes]
        self.m = sum(self.sizes)
        self._pair = jax.jit(self._make_pair)
        self._render = jax.jit(self.render)

    def unflatten(self, theta):  # (B, m) -> synthax parameter tree, leaf by leaf (never ravel across the batch)
        parts = jnp.split(theta, np.cumsum(self.sizes)[:-1].tolist(), axis=1)
        leaves = [p.reshape((theta.shape[0],) + s) for p, s in zip(parts, self.shapes)]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def render(self, theta, noise_key):
        return self.synth.apply(self.unflatten(theta), rngs={"noise": noise_key})

    def perturb(self, key, delta):  # -> theta, theta_a, theta_b, each (B, m); delta: a scalar or one per column, (m,)
        k_theta, k_z = jax.random.split(key, 4)[:2]
        B, m = self.batch_size, self.m
        theta = jax.random.uniform(k_theta, (B, m), minval=EPS, maxval=1.0)
        z = jax.random.normal(k_z, (2, B, m))
        theta_a = jnp.clip(theta + delta * z[0], EPS, 1.0)
        theta_b = jnp.clip(theta + delta * z[1], EPS, 1.0)
        return theta, theta_a, theta_b

    def _make_pair(self, key, delta):  # delta is an argument, not a constant: no recompile per delta or schedule step
        theta, theta_a, theta_b = self.perturb(key, delta)
        # each side its own noise (see above), keys 2 and 3 of 4; vmap over the two sides compiles one synth graph
        audio_a, audio_b = jax.vmap(self.render)(jnp.stack([theta_a, theta_b]), jax.random.split(key, 4)[2:])
        return audio_a, audio_b, theta, theta_a, theta_b

    def key(self, step, rank=0, stream=0):  # the seed's key, folded with stream, rank and step in turn
        return functools.reduce(jax.random.fold_in, (stream, rank, step), jax.random.PRNGKey(self.seed))

    def delta_at(self, step=0, stream=0):
        return jnp.float32(self.delta)  # the paper's one delta for every batch (PairSampler's may vary)

    def sample(self, step, rank=0, stream=0):
        out = self._pair(self.key(step, rank, stream), self.delta_at(step, stream))
        return tuple(np.array(x, dtype=np.float32) for x in out)  # copies: safe to edit in place

    def batch(self, step, rank=0, stream=0):  # (audio_a, audio_b): the training contract, as train.py's RealAudio
        return self.sample(step, rank, stream)[:2]


# === 2. beyond the paper ===
FACTOR_STREAM = 2  # key space of the one-factor pairs (train.py draws streams 0 and 1)
# --keep: a note is midi_f0 plus tuning; pitch-mod adds vibrato/FM depth (±96 semitones), not LFO rates or mod_matrix
KEEP = {"pitch": ("*.midi_f0", "*.tuning"), "pitch-mod": ("*.midi_f0", "*.tuning", "vco_*.mod_depth")}


def leave_the_gpu_to_torch():  # read when JAX starts a backend; else it takes 75% of the GPU train.py shares with torch
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def synthesis_device(local_rank=0, devices=None):
    """The JAX device a torchrun rank synthesizes on: its own GPU (LOCAL_RANK) if JAX has one, else the CPU; JAX's
    default would put every rank on GPU 0, beside rank 0's training. devices: default jax.devices(), GPUs first."""
    leave_the_gpu_to_torch()
    gpus = [d for d in (jax.devices() if devices is None else devices) if d.platform in ("gpu", "cuda", "rocm")]
    return gpus[local_rank % len(gpus)] if gpus else jax.devices("cpu")[0]


class PairSampler(Doppelgangers):  # + recipes, one-factor pairs, a JAX device (synthesis_device), dropped_curves
    def __init__(self, synth, delta, batch_size, sample_rate=16000, seconds=1.0, seed=0, delta_group=None, keep=None,
                 delta_schedule=None, device=None, noise_curve=False):
        leave_the_gpu_to_torch()  # before the first JAX array
        super().__init__(synth, delta, batch_size, sample_rate, seconds, seed)
        self.device, self.noise_curve = device, bool(noise_curve)
        self.groups, self.columns = {}, {}  # theta's columns per module (vco_1, ...) and per MODULE.PARAM
        for (path, _), size, start in zip(self.paths, self.sizes, np.cumsum([0, *self.sizes]).tolist()):
            module = str(path[-2].key).removeprefix("modules_")
            self.groups.setdefault(module, []).extend(range(start, start + size))
            self.columns[f"{module}.{path[-1].key}"] = list(range(start, start + size))
        self.set_recipe(delta_group, keep, delta_schedule)
        self.curves = self.dropped_curves() if self.noise_curve else []  # read when _pair is first traced

    def dropped_curves(self):
        """synthax 0.2.2 drops a curve with an entry 1, so Voice's mixer level [1, 1, 0.025] (no other synth has one)
        is unused: noise is linear in theta, not theta^40, and most random Voices sound noisy (the paper's data)."""
        curves, modules = [], self.synth.bind(self.params).modules
        for name, cols in self.columns.items():
            spec = getattr(modules.get(name.split(".")[0]), name.split(".")[1], None)
            curve = np.asarray(getattr(spec, "curve", 1.0), np.float32)
            if isinstance(spec, ModuleParameterRange) and curve.ndim and (curve == 1).any():
                bent = np.flatnonzero(curve != 1)
                curves.append(([cols[i] for i in bent], curve[bent], bool(spec.symmetric)))
        return curves

    def render(self, theta, noise_key):
        for cols, curve, symmetric in self.curves:  # synthax's own curve formulas, per element
            x = theta[:, cols]
            if symmetric:
                d = 2 * x - 1
                x = (jnp.where(d == 0, d, jnp.exp2(jnp.log2(jnp.abs(d)) / curve) * jnp.sign(d)) + 1) / 2
            else:
                x = jnp.exp2(jnp.log2(x) / curve)
            theta = theta.at[:, cols].set(x)
        return super().render(theta, noise_key)

    def set_recipe(self, delta_group=None, keep=None, delta_schedule=None):
        """Which delta each column of theta gets (default self.delta). delta_group: "NAME=VALUE"s as --delta-group takes
        (a parameter's beats its module's); keep: KEEP names, delta 0, beating all; delta_schedule: see delta_at."""
        delta_group, keep = ([x] if isinstance(x, str) else list(x or []) for x in (delta_group, keep))
        self.delta_group, self.keep = {}, keep
        for spec in delta_group:
            name, _, text = str(spec).partition("=")
            try:  # also with no "=": float("") fails
                value = number(high=MAX_DELTA)(text)
            except (ValueError, argparse.ArgumentTypeError):
                raise ValueError(f"--delta-group takes NAME=VALUE with VALUE in [0, {MAX_DELTA}], got {spec!r}")
            if name not in self.groups and name not in self.columns:
                valid = [g + "[." + "|".join(n.split(".")[1] for n in self.columns if n.split(".")[0] == g) + "]"
                         for g in self.groups]  # e.g. keyboard[.duration|midi_f0]
                raise ValueError(f"unknown --delta-group name {name!r} for {self.synth_name} (choose a module or "
                                 f"MODULE.PARAM: {', '.join(valid)})")
            self.delta_group[name] = value
        if unknown := [k for k in self.keep if k not in KEEP]:
            raise ValueError(f"unknown --keep set {unknown[0]!r} (choose from {', '.join(KEEP)})")
        if delta_schedule is not None:
            start, steps = delta_schedule
            if not (math.isfinite(start) and start >= 0 and self.delta > 0):
                raise ValueError(f"--delta-schedule ramps from START >= 0 to --delta > 0, got {start} -> {self.delta}")
            delta_schedule = (float(start), int(steps))
        self.delta_schedule = delta_schedule
        # module-wide values first, so that a parameter's own value overrides its module's; keep last
        self._fixed = [(self.groups[n], v) for n, v in self.delta_group.items() if n in self.groups]
        self._fixed += [(self.columns[n], v) for n, v in self.delta_group.items() if n not in self.groups]
        self._fixed += [(self.kept_columns(k), 0.0) for k in self.keep]

    def kept_columns(self, keep="pitch"):  # theta's columns of a KEEP set
        return [i for name, cols in self.columns.items()
                if any(fnmatch.fnmatchcase(name, pattern) for pattern in KEEP[keep]) for i in cols]

    def delta_at(self, step=0, stream=0):
        """The delta of batch (step, stream): a float32 scalar while no column has its own (the paper's sampler, bit
        for bit), else one per column, (m,). Only stream 0 (training) follows delta_schedule, every column alike."""
        delta = self.delta
        if self.delta_schedule is not None and stream == 0:
            start, steps = self.delta_schedule
            t = min(step / (steps - 1), 1.0) if steps > 1 else 1.0
            delta = (1 - t) * start + t * self.delta  # exactly start at t = 0 and self.delta at t = 1
        if not self._fixed:
            return jnp.float32(delta)
        scale = 1.0 if delta == self.delta else delta / self.delta
        column = np.full(self.m, delta)
        for cols, value in self._fixed:
            column[cols] = value * scale
        return column.astype(np.float32)

    def recipe(self):  # what differs from the paper's single delta, e.g. 'keep pitch, vco_1=0.1' ('' for nothing)
        parts = ["noise curve"] * self.noise_curve + [f"keep {k}" for k in self.keep]
        parts += [f"{n}={v:g}" for n, v in self.delta_group.items()]
        if self.delta_schedule is not None:
            parts.append(f"delta ramp from {self.delta_schedule[0]:g} over {self.delta_schedule[1]} steps")
        return ", ".join(parts)

    def sample(self, step, rank=0, stream=0):
        with jax.default_device(self.device):  # thread-local: set here, in the thread that synthesizes
            return super().sample(step, rank, stream)

    def factor_pair(self, factor, step, stream=FACTOR_STREAM):
        """-> (audio_a, audio_b) differing in ONE factor: 'noise' (same theta), a synthax module (its parameters alone
        perturbed), 'gain' (b: a 0-20 dB quieter), 'shift' (b: a 50-250 ms later), 'doppelganger' and 'negative'."""
        k_theta, k_z, k_na, k_nb, k_x = jax.random.split(self.key(step, 0, stream), 5)
        B, m = self.batch_size, self.m
        theta = jax.random.uniform(k_theta, (B, m), minval=EPS, maxval=1.0)
        if factor == "doppelganger":
            return tuple(np.array(x) for x in self._pair(self.key(step, 0, stream), self.delta_at(step, stream))[:2])
        if factor in ("negative", "noise"):
            theta_b = jax.random.uniform(k_x, (B, m), minval=EPS, maxval=1.0) if factor == "negative" else theta
            return np.array(self._render(theta, k_na)), np.array(self._render(theta_b, k_nb))
        if factor in self.groups:
            z = jax.random.normal(k_z, (2, B, m)) * np.isin(np.arange(m), self.groups[factor]).astype(np.float32)
            theta_a, theta_b = (jnp.clip(theta + self.delta * z[i], EPS, 1.0) for i in (0, 1))
            return np.array(self._render(theta_a, k_na)), np.array(self._render(theta_b, k_na))
        a = np.array(self._render(theta, k_na))
        u = np.asarray(jax.random.uniform(k_x, (B, 1)))
        if factor == "gain":
            return a, a * 10 ** (-20 * u / 20)
        if factor == "shift":
            b = np.zeros_like(a)
            for i, d in enumerate((self.sample_rate * (0.05 + 0.2 * u[:, 0])).astype(int)):
                b[i, d:] = a[i, :a.shape[1] - d]
            return a, b
        raise ValueError(f"unknown factor {factor!r} (choose from {', '.join(self.factors())})")

    def factors(self):
        return ["doppelganger", "negative", "noise", "gain", "shift", *self.groups]


def log_mel_png(path, audio, sample_rate):  # the training frontend's view of a sound (VGGish log-mel), for a person
    import torch
    import torchaudio
    from matplotlib.figure import Figure  # not pyplot: no backend to choose, no global figure to close
    mel = torchaudio.transforms.MelSpectrogram(sample_rate, n_fft=512, win_length=400, hop_length=160,
                                               f_min=125, f_max=7500, n_mels=64, power=1.0, mel_scale="htk")
    spec = torch.log(mel(torch.from_numpy(audio)) + 0.01).numpy()
    fig = Figure(figsize=(3, 1.6), dpi=80)
    ax = fig.subplots()
    ax.imshow(spec, origin="lower", aspect="auto", cmap="magma")
    ax.set_axis_off()
    fig.subplots_adjust(0, 0, 1, 1)
    fig.savefig(path)


def write_gallery(out, args):
    import html
    sections = []
    for synth in args.synth:
        sampler = PairSampler(synth, 0.0, args.pairs, args.sample_rate, args.seconds, args.seed, args.delta_group,
                              args.keep, noise_curve=args.noise_curve)
        recipe = f" ({html.escape(sampler.recipe())})" if sampler.recipe() else ""
        for delta in args.delta:
            sampler.delta = delta  # same theta and noise for every delta: only the perturbation grows
            audio_a, audio_b, *_ = sampler.sample(0)
            rows = []
            for i in range(args.pairs):
                cells = []
                for side, audio in (("a", audio_a[i]), ("b", audio_b[i])):
                    stem = f"{synth}_delta_{delta:g}_{i:02d}_{side}"
                    write_wav(os.path.join(out, stem + ".wav"), audio, args.sample_rate)
                    log_mel_png(os.path.join(out, stem + ".png"), audio, args.sample_rate)
                    cells.append(f'<td><img src="{stem}.png" alt="{stem}"><br>'
                                 f'<audio controls preload="none" src="{stem}.wav"></audio></td>')
                rows.append(f"<tr><th>pair {i}</th>{''.join(cells)}</tr>")
            sections.append(f"<h2>{html.escape(synth)}, &delta; = {delta:g}{recipe}</h2>\n"
                            f"<table><tr><th></th><th>a</th><th>b</th></tr>{''.join(rows)}</table>")
    with open(os.path.join(out, "index.html"), "w") as f:
        f.write(f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Audio doppelgängers</title>
<style>body{{font-family:sans-serif;margin:2em}} td{{padding:4px;text-align:center}} img{{width:240px}}</style>
</head><body>
<h1>Audio doppelgängers</h1>
<p>Each pair shares a random parameter vector &theta;; each side adds its own Gaussian perturbation of
size &delta;. Images are the 64-band log-mel spectrograms the encoder sees. Seed {args.seed}.</p>
{chr(10).join(sections)}
<p id="status">loading</p>
<script>
window.addEventListener("load", () => {{
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.getElementById("status").textContent = `images loaded: ${{ok}}/${{imgs.length}}`;
}});
</script>
</body></html>
""")


def benchmark(args):
    print(f"{'synth':<11} {'m':>4} {'batch':>6} {'compile s':>10} {'sounds/s':>10} {'x realtime':>11}")
    for synth in args.synth:
        t0 = time.time()
        sampler = PairSampler(synth, args.delta[0], args.batch_size, args.sample_rate, args.seconds, args.seed,
                              args.delta_group, args.keep, noise_curve=args.noise_curve)
        sampler.sample(0)
        compile_s = time.time() - t0
        steps, t0 = 0, time.time()
        while steps < 3 or time.time() - t0 < args.benchmark_seconds:
            sampler.sample(steps + 1)
            steps += 1
        sounds_per_s = 2 * args.batch_size * steps / (time.time() - t0)  # a pair is two sounds
        print(f"{synth:<11} {sampler.m:>4} {args.batch_size:>6} {compile_s:>10.1f} {sounds_per_s:>10.0f} "
              f"{sounds_per_s * args.seconds:>11.0f}")


# === 3. plumbing ===
def write_wav(path, audio, sample_rate):
    """16-bit WAV byte for byte as soundfile writes it (floor(x * 32768), clipped), but through Python's file I/O: a
    full disk is an OSError naming the file, and a signal never lands inside libsndfile's Python callbacks."""
    pcm = np.floor(np.clip(np.asarray(audio, np.float32) * np.float32(32768), -32768, 32767)).astype("<i2").tobytes()
    header = struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + len(pcm), b"WAVE", b"fmt ", 16, 1, 1, sample_rate,
                         2 * sample_rate, 2, 16, b"data", len(pcm))  # the canonical 44 bytes: PCM, mono, 16 bit
    try:
        with open(path, "wb") as f:
            f.write(header + pcm)
    except OSError as e:
        raise OSError(e.errno, e.strerror, path) from None


def output_folder(path, flag):  # checked before any work; a link to a folder is followed, so the link keeps working
    check_path(path, flag)
    path = os.path.realpath(path) if os.path.islink(path) else os.path.abspath(path)
    # the old folder is moved aside and removed only after the new one is written: every part must allow it
    if stuck := [d for d, dirs, files in os.walk(path)
                 if not os.access(d, os.R_OK | os.X_OK) or (dirs or files) and not os.access(d, os.W_OK)]:
        raise ValueError(f"{flag} {path} cannot be replaced: {stuck[0]} is not writable by this user")
    return path


def move_into_place(tmp, out):  # an old out is renamed aside, removed only once tmp is in its place: never neither
    if not os.path.isdir(out):
        return os.replace(tmp, out)
    old = tmp + "-old"
    os.rename(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(old):
        print(f"generate.py: warning: the replaced output could not be removed completely: {old}", file=sys.stderr)


def write_pairs(out, sampler, n_pairs, progress, factor=None):  # the module docstring's layout; factor: factor_pair's
    os.makedirs(out, exist_ok=factor is None)  # a factor's folder is new: a factor given twice fails
    thetas = {"theta": [], "theta_a": [], "theta_b": []}
    for step, start in enumerate(range(0, n_pairs, sampler.batch_size)):
        audio_a, audio_b, *theta = sampler.sample(step) if factor is None else sampler.factor_pair(factor, step)
        k = min(sampler.batch_size, n_pairs - start)
        for i in range(k):
            write_wav(os.path.join(out, f"{start + i:06d}_a.wav"), audio_a[i], sampler.sample_rate)
            write_wav(os.path.join(out, f"{start + i:06d}_b.wav"), audio_b[i], sampler.sample_rate)
        for name, t in zip(thetas, theta):
            thetas[name].append(t[:k])
        progress.update(k)
    meta = dict(synth=sampler.synth_name, delta=sampler.delta, **({} if factor is None else {"factor": factor}),
                seed=sampler.seed, sample_rate=sampler.sample_rate)
    if factor is None and (sampler.delta_group or sampler.keep):  # a default params.npz stays as it was
        meta.update(delta_columns=sampler.delta_at(), keep=np.array(sampler.keep, dtype=str),
                    delta_group=np.array([f"{n}={v:g}" for n, v in sampler.delta_group.items()], dtype=str))
    if sampler.noise_curve:
        meta.update(noise_curve=True)
    np.savez(os.path.join(out, "params.npz"), **{k: np.concatenate(v) for k, v in thetas.items() if v}, **meta)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = fail  # a bad flag is one line on stderr, exit 2, as every other bad input
    p.add_argument("--synth", nargs="+", default=["voice"], help=f"one or more of {', '.join(SYNTHS)} (default voice)")
    p.add_argument("--delta", nargs="+", type=number(high=MAX_DELTA), default=[0.25],
                   help=f"perturbation size(s) in [0, {MAX_DELTA}] (default 0.25)")
    p.add_argument("--pairs", type=number(int, 1), default=1000, help="pairs per (synth, delta) (default 1000)")
    p.add_argument("--out", help="output folder; must be empty or absent unless --force")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--seed", type=number(int, 0, 2**32 - 1), default=0)
    p.add_argument("--batch-size", type=number(int, 1), default=64, help="sounds synthesized per JAX call (default 64)")
    p.add_argument("--sample-rate", type=number(int, 1, 2**31 - 1), default=16000)  # JAX's int32
    p.add_argument("--seconds", type=number(above=True), default=1.0)
    p.add_argument("--gallery", metavar="DIR", help="write a listening page DIR/index.html instead of pairs")
    p.add_argument("--factors", nargs="*", metavar="FACTOR", help="one-factor pairs, OUT/<factor>/ each: noise, gain, "
                   "shift, each synthax module (perturbed by delta), doppelganger, negative; none = all (analyze.py)")
    p.add_argument("--delta-group", action="append", metavar="NAME=VALUE", help="delta VALUE for a module (vco_1, ...) "
                   "or parameter (keyboard.midi_f0, beating its module's); repeatable; a wrong NAME lists the names")
    p.add_argument("--keep", action="append", metavar="SET",
                   help=f"hold a set equal within a pair (delta 0, beats --delta-group; repeatable): {', '.join(KEEP)}")
    p.add_argument("--noise-curve", action="store_true", help="apply the synth's level curves per element, as its "
                   "authors meant (synthax 0.2.2 drops Voice's noise-level curve: the paper's data have it dropped)")
    p.add_argument("--benchmark", action="store_true", help="print compile time and sounds/s per synth")
    p.add_argument("--benchmark-seconds", type=number(above=True), default=10.0)
    return p.parse_args(argv)


def check_args(args):  # the values and flag combinations argparse does not check, before any work (ValueError)
    if unknown := [s for s in args.synth if s not in SYNTHS]:
        raise ValueError(f"unknown synth {unknown[0]!r} (choose from {', '.join(SYNTHS)})")
    names = [f"{s}/delta_{d:g}" for s in args.synth for d in args.delta]  # the folders (and gallery files) written
    if dup := next((n for n in names if names.count(n) > 1), None):  # two values, one name: the second overwrites
        raise ValueError(f"two --synth/--delta values would both write {dup}; give distinct values "
                         f"(deltas differ only if they differ within 6 significant digits)")
    shortest = max(2 / CONTROL_RATE, 512 / args.sample_rate if args.gallery else 0)  # else synthax's shapes break
    if args.seconds < shortest:
        raise ValueError(f"--seconds {args.seconds:g} is too short: give at least {shortest:.4g} (2 synthax control "
                         f"steps of 1/{CONTROL_RATE} s{', 512 samples for the gallery log-mel' * bool(args.gallery)})")
    if args.delta_group or args.keep:  # names checked against each synth before anything is written
        for synth in args.synth:
            PairSampler(synth, 0.0, 1, args.sample_rate, args.seconds, args.seed, args.delta_group, args.keep)
    if args.factors is not None and not args.benchmark and (len(args.synth) > 1 or len(args.delta) > 1 or args.gallery):
        raise ValueError("--factors takes one --synth and one --delta, and no --gallery")
    if not (args.gallery or args.out or args.benchmark):
        raise ValueError("give --out DIR (or --gallery DIR, or --benchmark)")


def write_outputs(tmp, args):  # into the temporary folder that run() moves into place
    from tqdm import tqdm
    if args.gallery:
        return write_gallery(tmp, args)
    if args.factors is not None:
        sampler = PairSampler(args.synth[0], args.delta[0], min(args.batch_size, args.pairs), args.sample_rate,
                              args.seconds, args.seed, args.delta_group, args.keep, noise_curve=args.noise_curve)
        factors = args.factors or sampler.factors()
        if unknown := sorted(set(factors) - set(sampler.factors())):
            raise ValueError(f"unknown factor(s) {', '.join(unknown)} for {args.synth[0]} "
                             f"(choose from {', '.join(sampler.factors())})")
        with tqdm(total=len(factors) * args.pairs, unit="pair", desc="factors") as progress:
            for factor in factors:
                write_pairs(os.path.join(tmp, factor), sampler, args.pairs, progress, factor)
        return
    with tqdm(total=len(args.synth) * len(args.delta) * args.pairs, unit="pair", desc="generate") as progress:
        for synth in args.synth:
            sampler = PairSampler(synth, 0.0, min(args.batch_size, args.pairs), args.sample_rate, args.seconds,
                                  args.seed, args.delta_group, args.keep, noise_curve=args.noise_curve)
            for delta in args.delta:
                sampler.delta = delta  # jitted with delta as an argument: no recompile per delta
                d = tmp if len(args.synth) == len(args.delta) == 1 else os.path.join(tmp, synth, f"delta_{delta:g}")
                write_pairs(d, sampler, args.pairs, progress)


def run(args):
    check_args(args)
    if args.benchmark:
        return benchmark(args)
    out = output_folder(args.gallery or args.out, "--gallery" if args.gallery else "--out")
    parent, tmp = os.path.dirname(out), None
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot write to {parent}: {e.strerror}") from None
    lock = FolderLock(out, beside=True)  # one job per output: a second would replace the first one's pairs unasked
    try:
        if os.path.isdir(out) and os.listdir(out) and not args.force:  # checked once it is ours: no job fills it now
            raise ValueError(f"{out} is not empty (use --force to replace it)")
        try:  # built in a temporary sibling folder, moved into place at the end: an interrupted run harms nothing
            tmp = tempfile.mkdtemp(prefix=".generate-", dir=parent)
            os.umask(umask := os.umask(0))  # the umask can only be read by setting it
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's private 0700 would become the output's mode
        except OSError as e:
            raise OSError(f"cannot write to {parent}: {e.strerror}") from None
        try:
            write_outputs(tmp, args)
            move_into_place(tmp, out)
        except OSError as e:  # e.g. a full disk: the error names the file as the user would have seen it
            name = str(e.filename or "")
            where = os.path.join(out, os.path.relpath(name, tmp)) if name.startswith(tmp + os.sep) else name or out
            msg = f"cannot write {where}: {e.strerror or e}; nothing was written ({out} is as it was)"
            raise OSError(msg) from None
    finally:  # after a successful move there is nothing left to remove
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        lock.release()
    print(f"wrote {os.path.join(out, 'index.html') if args.gallery else out}")


# --- shared helpers: the same in every script that has them ---
# Each raises ValueError (bad input, one line) or OSError naming the file; main() alone turns either into fail().
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


def main(argv=None):
    try:
        run(parse_args(argv))
    except KeyboardInterrupt as e:  # the temporary folder is gone (run removes it), the output folder untouched
        exit_interrupted(e, "nothing was written (the output folder is as it was)")
    except (ValueError, OSError) as e:  # the only place an exception becomes one stderr line (fail folds it) + exit 2
        fail(e)
    except jax.errors.JaxRuntimeError as e:  # e.g. out of memory: a batch of sounds too long or too many
        fail(f"synthesis failed ({str(e).strip().splitlines()[0]}); lower --batch-size, --seconds or --sample-rate")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, interrupted)
    main()
