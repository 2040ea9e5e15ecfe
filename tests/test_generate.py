import math
import re
import shutil
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf
import synthax.functional
from synthax.config import SynthConfig
from synthax.modules.envelopes import ADSR
from synthax.modules.oscillators import Noise

import generate
from conftest import ROOT, assert_one_line_error, run

B = 8


@pytest.fixture(scope="module")
def voice():
    return generate.PairSampler("voice", 0.25, B)


@pytest.mark.parametrize("synth,m", [("voice", 78), ("voicefm", 130), ("parametric", 340)])
def test_parameter_counts(synth, m):
    assert generate.PairSampler(synth, 0.1, 2).m == m


def test_batch_shapes_ranges_and_peaks(voice):
    audio_a, audio_b, theta, theta_a, theta_b = voice.sample(0)
    for audio in (audio_a, audio_b):
        assert audio.shape == (B, 16000) and audio.dtype == np.float32
        assert np.isfinite(audio).all()
        peaks = np.abs(audio).max(axis=1)
        assert (peaks <= 1.0 + 1e-6).all() and (peaks > 0).all()
    for t in (theta, theta_a, theta_b):
        assert t.shape == (B, 78)
        assert t.min() >= generate.EPS and t.max() <= 1.0


def test_delta_zero_gives_identical_parameters_but_not_the_same_noise():
    s = generate.PairSampler("voice", 0.0, 16)
    audio_a, audio_b, theta, theta_a, theta_b = s.sample(3)
    np.testing.assert_array_equal(theta_a, theta_b)
    np.testing.assert_array_equal(theta, theta_a)
    # each side draws its own noise: a noise realization shared by a pair (and by no other sound) is a
    # shortcut the encoder learns instead of sound. Pairs whose noise is audible therefore differ.
    assert (np.abs(audio_a - audio_b).max(axis=1) > 1e-3).sum() >= 4
    # and nothing else differs: with the noise level at its minimum the two sides are the same sound
    quiet = theta.copy()
    quiet[:, s.groups["mixer"][-1]] = generate.EPS  # Voice's mixer levels: vco_1, vco_2, noise
    a = np.asarray(s.render(quiet, jax.random.PRNGKey(1)))
    b = np.asarray(s.render(quiet, jax.random.PRNGKey(2)))
    assert np.abs(a).max() > 0.01
    np.testing.assert_allclose(a, b, atol=1e-5)  # the noise at its minimum level: ~3e-6


def test_factor_pairs_differ_in_one_factor_only(voice):
    assert set(voice.groups) >= {"vco_1", "vco_2", "adsr_1", "keyboard", "mixer", "noise"} - {"noise"}
    assert sorted(i for g in voice.groups.values() for i in g) == list(range(voice.m))  # a partition of theta
    a, b = voice.factor_pair("gain", 0)
    ratio = np.abs(b).max(1) / np.abs(a).max(1)
    assert (ratio <= 1 + 1e-6).all() and (ratio >= 0.1 - 1e-6).all() and np.ptp(ratio) > 0
    a, b = voice.factor_pair("shift", 0)
    assert np.abs(b[:, :800]).max() == 0  # delayed by at least 50 ms
    n, _ = voice.factor_pair("noise", 0)
    np.testing.assert_array_equal(n, a)  # same theta and noise key across factors of one step
    x, y = voice.factor_pair("negative", 0)
    assert not np.allclose(x, y)
    with pytest.raises(ValueError, match="unknown factor"):
        voice.factor_pair("nope", 0)


def test_cli_factors_write_one_folder_per_factor(tmp_path):
    out = tmp_path / "factors"
    run(ROOT / "generate.py", "--factors", "noise", "negative", "vco_1", "--pairs", "3", "--batch-size", "2",
        "--out", out)
    assert sorted(p.name for p in out.iterdir()) == ["negative", "noise", "vco_1"]
    for d in out.iterdir():
        assert len(list(d.glob("*.wav"))) == 6
        assert str(np.load(d / "params.npz")["factor"]) == d.name
    p = run(ROOT / "generate.py", "--factors", "nope", "--pairs", "1", "--out", tmp_path / "o", check=False)
    assert "unknown factor" in assert_one_line_error(p)
    assert not (tmp_path / "o").exists()


def expected_abs_diff(delta, n=400_000, seed=0):
    """E|clip(θ + δ z1) − clip(θ + δ z2)| for θ ~ U(ε, 1), z ~ N(0, 1), by Monte Carlo in numpy."""
    rng = np.random.default_rng(seed)
    theta = rng.uniform(generate.EPS, 1, n)
    a = np.clip(theta + delta * rng.standard_normal(n), generate.EPS, 1)
    b = np.clip(theta + delta * rng.standard_normal(n), generate.EPS, 1)
    return np.abs(a - b).mean()


def test_perturbation_matches_clipped_gaussian(voice):
    means = []
    for delta in (0.01, 0.05, 0.25, 0.5):
        voice.delta = delta
        diffs = np.concatenate([np.abs(ta - tb).ravel() for _, _, _, ta, tb in (voice.sample(s) for s in range(4))])
        means.append(diffs.mean())
        # 4 x 8 x 78 = 2496 draws: the standard error is below 0.006 at every delta
        assert abs(diffs.mean() - expected_abs_diff(delta)) < 0.02 + 0.05 * delta, (delta, diffs.mean())
    voice.delta = 0.25
    assert means == sorted(means) and means[0] < means[-1] / 10


def test_theta_is_uniform_unlike_synthax_init(voice):
    theta = np.concatenate([voice.sample(s)[2].ravel() for s in range(3)])
    counts, _ = np.histogram(theta, bins=10, range=(0, 1))
    assert counts.min() > 0.7 * len(theta) / 10  # flat histogram
    assert abs(theta.mean() - 0.5) < 0.02
    # the library fault being avoided: init's normalized attack has mean E[sqrt(U)] = 2/3, not 1/2
    params = ADSR(config=SynthConfig(batch_size=4000, buffer_size_seconds=0.1)).init(
        jax.random.PRNGKey(0), np.full(4000, 0.05, np.float32))
    assert abs(float(params["params"]["attack"].mean()) - 2 / 3) < 0.02


def test_normalization_is_per_sound():
    x = np.zeros((2, 100), np.float32)
    x[0, 10], x[1, 20] = 0.5, 3.0  # sound 0 does not clip, sound 1 does
    fixed = np.asarray(generate.normalize_if_clipping(x))
    assert fixed[0].max() == pytest.approx(0.5) and fixed[1].max() == pytest.approx(1.0)
    # synthax 0.2.2 decides by sound 0's peak, so sound 1 stays at 3.0
    assert np.asarray(synthax.functional.normalize_if_clipping(x))[1].max() == pytest.approx(3.0)


def test_each_sound_gets_its_own_noise(voice):
    config = SynthConfig(batch_size=3, sample_rate=16000, buffer_size_seconds=0.1)
    k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    n1 = np.asarray(generate.FreshNoise(config=config).apply({}, rngs={"noise": k1}))
    n2 = np.asarray(generate.FreshNoise(config=config).apply({}, rngs={"noise": k2}))
    assert not np.allclose(n1[0], n1[1]) and not np.allclose(n1, n2)
    assert abs(n1.std() - 1 / math.sqrt(3)) < 0.02  # U(-1, 1)
    # synthax's own Noise: one buffer for every sound (the fault being fixed)
    stock = np.asarray(Noise(config=config).apply({}))
    np.testing.assert_array_equal(stock[0], stock[1])
    # through the whole synth: identical parameters in every row, different noise => different audio
    theta = np.tile(np.full((1, voice.m), 0.5, np.float32), (B, 1))
    audio = np.asarray(voice.render(theta, jax.random.PRNGKey(0)))
    assert np.abs(audio[0] - audio[1]).max() > 1e-4


def test_keys_depend_on_seed_rank_step_and_stream(voice):
    a0 = voice.sample(5, rank=0)[0]
    np.testing.assert_array_equal(a0, generate.PairSampler("voice", 0.25, B).sample(5, rank=0)[0])
    for other in (voice.sample(5, rank=1)[0], voice.sample(6, rank=0)[0], voice.sample(5, rank=0, stream=1)[0],
                  generate.PairSampler("voice", 0.25, B, seed=1).sample(5)[0]):
        assert not np.allclose(a0, other)


def test_cli_sweep_writes_files_that_round_trip(tmp_path):
    out = tmp_path / "pairs"
    run(ROOT / "generate.py", "--synth", "voice", "--delta", "0.1", "0.5", "--pairs", "3", "--batch-size", "2",
        "--out", out)
    assert sorted(p.name for p in (out / "voice").iterdir()) == ["delta_0.1", "delta_0.5"]
    d = out / "voice" / "delta_0.5"
    assert sorted(p.name for p in d.iterdir()) == [f"{i:06d}_{s}.wav" for i in range(3) for s in "ab"] + ["params.npz"]
    params = np.load(d / "params.npz")
    assert str(params["synth"]) == "voice" and float(params["delta"]) == 0.5 and int(params["sample_rate"]) == 16000
    assert params["theta_a"].shape == (3, 78)
    # the files hold exactly what the sampler draws for that seed (16-bit PCM rounding aside)
    s = generate.PairSampler("voice", 0.5, 2)
    audio_a, audio_b, theta, theta_a, _ = s.sample(0)
    np.testing.assert_allclose(params["theta_a"][:2], theta_a, atol=1e-7)
    for i in range(2):
        x, sr = sf.read(d / f"{i:06d}_a.wav", dtype="float32")
        assert sr == 16000 and x.shape == (16000,)
        np.testing.assert_allclose(x, audio_a[i], atol=1.5 / 32768)
    # same theta across deltas: only the perturbation differs
    np.testing.assert_array_equal(np.load(out / "voice" / "delta_0.1" / "params.npz")["theta"], params["theta"])


def test_wav_files_are_byte_for_byte_what_soundfile_writes(tmp_path):
    # write_wav encodes 16-bit PCM itself (a signal must not land in libsndfile's Python callbacks)
    rng = np.random.default_rng(0)
    for audio in [rng.uniform(-1, 1, 16000).astype(np.float32) * 0.3,
                  np.array([1.0, -1.0, 0.5 / 32767, 1.5 / 32767, -0.5 / 32767, 0.0, -1e-9], np.float32),
                  (np.arange(-32767, 32767, dtype=np.float32) + 0.5) / np.float32(32767)]:
        generate.write_wav(tmp_path / "ours.wav", audio, 16000)
        sf.write(tmp_path / "soundfile.wav", audio, 16000, subtype="PCM_16", format="WAV")
        assert (tmp_path / "ours.wav").read_bytes() == (tmp_path / "soundfile.wav").read_bytes()


@pytest.mark.parametrize("args,needle", [
    (["--synth", "nope"], "unknown synth"),
    (["--delta", "-0.1"], "delta"),
    (["--delta", "inf"], "delta"),
    (["--pairs", "0"], "--pairs"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, args, needle):
    p = run(ROOT / "generate.py", "--out", tmp_path / "o", *args, check=False)
    assert needle in assert_one_line_error(p)
    assert not (tmp_path / "o").exists()


def test_refuses_non_empty_out_and_unwritable_out(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    p = run(ROOT / "generate.py", "--pairs", "1", "--out", tmp_path, check=False)
    assert "not empty" in assert_one_line_error(p)
    assert (tmp_path / "keep.txt").read_text() == "precious"
    (tmp_path / "ro").write_text("a file")
    p = run(ROOT / "generate.py", "--pairs", "1", "--out", tmp_path / "ro" / "sub", check=False)
    assert "--out" in (line := assert_one_line_error(p)) and "Not a directory" in line  # check_path, before any work


def test_gallery_loads_in_headless_chromium(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "headless Chromium is needed (Debian package chromium; .ci/run installs it)"
    out = tmp_path / "gallery"
    run(ROOT / "generate.py", "--gallery", out, "--synth", "voice", "--delta", "0", "0.5", "--pairs", "2")
    html = (out / "index.html").read_text()
    refs = re.findall(r'src="([^"]+)"', html)
    assert len([r for r in refs if r.endswith(".wav")]) == 8 and len([r for r in refs if r.endswith(".png")]) == 8
    for r in refs:
        assert (out / r).is_file(), r
        if r.endswith(".wav"):
            assert sf.info(out / r).samplerate == 16000
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          "--disable-component-update", "--disable-sync", "--no-first-run",
                          f"--user-data-dir={tmp_path / 'chrome'}", "--virtual-time-budget=5000", "--dump-dom",
                          (out / "index.html").as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert "images loaded: 8/8" in dom, dom[-500:]


# -----------------------------------------------------------------------------
# per-group delta, --keep pitch and the delta schedule

PITCH = {  # what generate.KEEP["pitch"] finds in each synth's parameter tree (see the comment above KEEP)
    "voice": ["keyboard.midi_f0", "vco_1.tuning", "vco_2.tuning"],
    "voicefm": ["keyboard.midi_f0"] + [f"vco_{i}.tuning" for i in range(1, 5)],
    "parametric": [f"keyboard_{i}.midi_f0" for i in range(1, 7)] + [f"vco_{i}.tuning" for i in range(1, 9)],
}


@pytest.mark.parametrize("synth", sorted(PITCH))
def test_keep_pitch_holds_every_pitch_column_equal_within_a_pair(synth):
    s = generate.PairSampler(synth, 0.25, 64, keep=["pitch"])
    pitch = [i for name in PITCH[synth] for i in s.columns[name]]
    assert sorted(s.kept_columns("pitch")) == sorted(pitch)
    key = s.key(0)
    # the perturbation alone (no synth to compile): kept columns equal, the rest moves as before
    theta, a, b = (np.asarray(x) for x in s.perturb(key, s.delta_at(0)))
    np.testing.assert_array_equal(a[:, pitch], b[:, pitch])
    np.testing.assert_array_equal(a[:, pitch], theta[:, pitch])
    rest = np.setdiff1d(np.arange(s.m), pitch)
    assert (np.abs(a[:, rest] - b[:, rest]).mean(axis=0) > 0.05).all()
    # the paper's sampler (same key): pitch moves like every other column
    _, a0, b0 = (np.asarray(x) for x in s.perturb(key, jnp.float32(0.25)))
    assert (np.abs(a0[:, pitch] - b0[:, pitch]).mean(axis=0) > 0.05).all()
    np.testing.assert_array_equal(a0[:, rest], a[:, rest])


def test_keep_pitch_through_the_jitted_sampler():
    s = generate.PairSampler("voice", 0.25, 4, keep="pitch")
    _, _, theta, a, b = s.sample(0)
    pitch = s.kept_columns("pitch")
    np.testing.assert_array_equal(a[:, pitch], b[:, pitch])
    np.testing.assert_array_equal(a[:, pitch], theta[:, pitch])
    assert (np.abs(a - b).max(axis=0) > 0).sum() == s.m - len(pitch)


def test_delta_group_sets_exactly_the_named_columns(voice):
    s = generate.PairSampler("voice", 0.25, B, delta_group=["keyboard=0", "vco_1=0.1", "vco_1.tuning=0.5"])
    d = s.delta_at(0)
    assert d.shape == (s.m,) and d.dtype == np.float32
    want = np.full(s.m, 0.25, np.float32)
    want[s.groups["keyboard"]] = 0.0
    want[s.groups["vco_1"]] = 0.1
    want[s.columns["vco_1.tuning"]] = 0.5  # a parameter's own value beats its module's, whatever the order
    np.testing.assert_array_equal(d, want)
    # --keep beats --delta-group; without either, delta stays the paper's single scalar
    kept = generate.PairSampler("voice", 0.25, B, delta_group=["vco_1.tuning=0.5"], keep=["pitch"]).delta_at(0)
    assert kept[s.columns["vco_1.tuning"]] == 0 and kept[s.columns["keyboard.duration"]] == 0.25
    assert voice.delta_at(0).shape == () and float(voice.delta_at(0)) == np.float32(voice.delta)
    # the columns named 0 are equal within each pair, the others are not
    _, a, b = (np.asarray(x) for x in s.perturb(s.key(0), d))
    np.testing.assert_array_equal(a[:, s.groups["keyboard"]], b[:, s.groups["keyboard"]])
    assert (np.abs(a - b).max(axis=0)[want > 0] > 0).all()
    for bad in (["nope=0.1"], ["keyboard"], ["keyboard=-1"], ["keyboard=nan"], ["keyboard.pitch=0"]):
        with pytest.raises(ValueError, match="--delta-group"):
            generate.PairSampler("voice", 0.25, B, delta_group=bad)
    with pytest.raises(ValueError, match="choose from pitch"):
        generate.PairSampler("voice", 0.25, B, keep=["tone"])


def test_delta_schedule_ramps_training_batches_only():
    s = generate.PairSampler("voice", 0.25, B, delta_schedule=(0.05, 11))
    assert float(s.delta_at(0)) == np.float32(0.05)      # step 0: START
    assert float(s.delta_at(5)) == pytest.approx(0.15)    # halfway
    assert float(s.delta_at(10)) == np.float32(0.25)      # the last step: the final delta
    assert float(s.delta_at(1000)) == np.float32(0.25)    # a run extended past its ramp stays there
    assert float(s.delta_at(0, stream=1)) == np.float32(0.25)  # validation uses the final delta
    # with per-group values every column is scaled by delta(step) / delta; kept columns stay 0
    g = generate.PairSampler("voice", 0.25, B, delta_group=["vco_1=0.1"], keep=["pitch"], delta_schedule=(0.05, 11))
    d0, d10 = g.delta_at(0), g.delta_at(10)
    lfo, vco = g.columns["lfo_1.frequency"], g.columns["vco_1.mod_depth"]
    assert d0[lfo] == np.float32(0.05) and d10[lfo] == np.float32(0.25)
    assert d0[vco] == pytest.approx(0.02) and d10[vco] == np.float32(0.1)
    assert d0[g.kept_columns("pitch")].max() == d10[g.kept_columns("pitch")].max() == 0
    # a pure function of the step, passed to the jitted function as an argument: one compilation for the run
    a = g.sample(3)
    np.testing.assert_array_equal(a[3], g.sample(3)[3])
    g.sample(7)
    assert g._pair._cache_size() == 1
    with pytest.raises(ValueError, match="--delta-schedule"):
        generate.PairSampler("voice", 0.0, B, delta_schedule=(0.05, 11))


def test_cli_keep_pitch_and_delta_group_write_params(tmp_path):
    out = tmp_path / "pairs"
    run(ROOT / "generate.py", "--synth", "voice", "--keep", "pitch", "--delta-group", "vco_2=0.05", "--pairs", "3",
        "--batch-size", "2", "--out", out)
    params = np.load(out / "params.npz")
    s = generate.PairSampler("voice", 0.25, 2)
    pitch = [i for name in PITCH["voice"] for i in s.columns[name]]
    np.testing.assert_array_equal(params["theta_a"][:, pitch], params["theta_b"][:, pitch])
    assert list(params["keep"]) == ["pitch"] and list(params["delta_group"]) == ["vco_2=0.05"]
    d = params["delta_columns"]
    assert d[pitch].max() == 0 and d[s.columns["vco_2.shape"]] == np.float32(0.05)
    assert d[s.columns["mixer.level"]].min() == 0.25


@pytest.mark.parametrize("synth", sorted(PITCH))
def test_keep_pitch_mod_also_holds_every_oscillators_modulation_depth(synth):
    s = generate.PairSampler(synth, 0.25, 2, keep=["pitch-mod"])
    vco_mod = [n for n in s.columns if n.startswith("vco_") and n.endswith(".mod_depth")]
    assert len(vco_mod) == len(PITCH[synth]) - sum(n.endswith("midi_f0") for n in PITCH[synth])  # one per VCO
    names = [n for n in s.columns if set(s.columns[n]) <= set(s.kept_columns("pitch-mod"))]
    assert sorted(names) == sorted(PITCH[synth] + vco_mod)  # the LFOs' own mod_depth (their rate) still moves
    # the same pairs as --keep pitch with each oscillator's mod_depth at delta 0, and --keep takes several sets
    same = generate.PairSampler(synth, 0.25, 2, keep=["pitch"], delta_group=[f"{n}=0" for n in vco_mod])
    np.testing.assert_array_equal(s.delta_at(), same.delta_at())
    both = generate.PairSampler(synth, 0.25, 2, keep=["pitch", "pitch-mod"])
    np.testing.assert_array_equal(both.delta_at(), s.delta_at())
    assert both.recipe() == "keep pitch, keep pitch-mod"


def flatness(audio):
    """Spectral flatness of each whole sound: 1 for white noise, near 0 for a few partials."""
    power = np.abs(np.fft.rfft(audio, axis=1)) ** 2 + 1e-12
    return np.exp(np.log(power).mean(axis=1)) / power.mean(axis=1)


def test_noise_curve_restores_the_mixers_dropped_noise_curve_on_the_sounds():
    """synthax 0.2.2's from_0to1 drops a vector curve with any entry equal to 1, so Voice's mixer level curve
    [1, 1, 0.025] never bends the noise level: it is linear in theta, and most random Voice sounds are noise."""
    paper, curved = (generate.PairSampler("voice", 0.25, 64, noise_curve=c) for c in (False, True))
    level = paper.columns["mixer.level"]  # (vco_1, vco_2, noise)
    assert paper.curves == [] and [(c, list(k), s) for c, k, s in curved.curves] == [([level[2]], [0.025], False)]
    assert all(generate.PairSampler(s, 0.25, 1, noise_curve=True).curves == [] for s in ("voicefm", "parametric"))
    # sounds of noise alone at level 0.5 (the oscillators at EPS): audible as released, 0.5^40 with the curve
    theta = np.array(jax.random.uniform(jax.random.PRNGKey(1), (64, paper.m), minval=generate.EPS, maxval=1.0))
    theta[:, level] = [generate.EPS, generate.EPS, 0.5]
    noise_only = [np.asarray(s._render(jnp.asarray(theta), jax.random.PRNGKey(0))) for s in (paper, curved)]
    assert np.sqrt((noise_only[0] ** 2).mean()) > 0.01 and np.abs(noise_only[1]).max() < 1e-4
    theta[:, level] = [0.5, 0.5, 1.0]  # the oscillators' levels and a full noise level are the same either way
    full = [np.asarray(s._render(jnp.asarray(theta), jax.random.PRNGKey(0))) for s in (paper, curved)]
    np.testing.assert_allclose(full[0], full[1], atol=1e-6)
    # over random pairs: most sounds are noise-like as released (the paper's data), few with the curve
    noisy = [(flatness(np.concatenate(s.batch(0))) > 0.1).mean() for s in (paper, curved)]
    assert noisy[0] > 0.45 and noisy[1] < 0.3, noisy
    # without the flag the sampler is the paper's, bit for bit
    plain = generate.Doppelgangers("voice", 0.25, 64).sample(0)
    for x, y in zip(plain, paper.sample(0)):
        np.testing.assert_array_equal(x, y)
    assert curved.recipe() == "noise curve"


def test_cli_noise_curve_is_recorded_in_params_and_the_default_params_are_unchanged(tmp_path):
    for name, flags in (("paper", []), ("curve", ["--noise-curve"])):
        run(ROOT / "generate.py", "--synth", "voice", "--pairs", "2", "--batch-size", "2", *flags,
            "--out", tmp_path / name)
    paper, curve = (np.load(tmp_path / n / "params.npz") for n in ("paper", "curve"))
    assert "noise_curve" not in paper.files and bool(curve["noise_curve"])
    np.testing.assert_array_equal(paper["theta_a"], curve["theta_a"])  # the same theta: only the rendering differs
    a, b = (sf.read(tmp_path / n / "000000_a.wav")[0] for n in ("paper", "curve"))
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("args,needles", [
    (["--delta-group", "nope=0.1"], ["unknown --delta-group name 'nope' for voice", "keyboard[.duration|midi_f0]",
                                     "vco_1[.initial_phase|mod_depth|tuning]"]),
    (["--synth", "voice", "parametric", "--delta-group", "keyboard=0"], ["'keyboard' for parametric", "keyboard_1["]),
    (["--delta-group", "keyboard=x"], ["NAME=VALUE"]),
    (["--keep", "tone"], ["unknown --keep set 'tone' (choose from pitch, pitch-mod)"]),
])
def test_cli_unknown_group_or_set_is_one_line_exit_2(tmp_path, args, needles):
    p = run(ROOT / "generate.py", "--out", tmp_path / "o", *args, check=False)
    line = assert_one_line_error(p)
    assert all(n in line for n in needles), line
    assert not (tmp_path / "o").exists()
