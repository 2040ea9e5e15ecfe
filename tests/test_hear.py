"""probe.py as a HEAR 2021 module, on a real exported encoder (train.py --epochs 0), called as
hearvalidator and heareval's runner call it; the runner's embeddings probed by probe.py; and
`python probe.py --task esc50` with no other flag."""
import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

import probe as hear
from conftest import ROOT, assert_one_line_error

SR = 16000
LENGTHS = (0.3, 1.0, 3.74)  # below one window, exactly one, the validator's scene length
N_SOUNDS = 8  # the validator's scene batch


def noise(n, seconds, seed=0):
    """The validator's test audio: uniform white noise in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, int(seconds * SR)), generator=g) * 2 - 1


@pytest.fixture(scope="module")
def model(random_run):
    return hear.load_model(str(random_run / "encoder.pt")).to("cpu")  # as the validator and the runner do


@pytest.fixture(scope="module")
def outputs(model):
    out = {}
    for seconds in LENGTHS:
        audio = noise(N_SOUNDS, seconds)
        emb, ts = hear.get_timestamp_embeddings(audio, model)
        out[seconds] = audio, emb, ts, hear.get_scene_embeddings(audio, model)
    return out


def test_model_attributes(model):
    assert isinstance(model, torch.nn.Module) and model.sample_rate == 16000
    assert model.scene_embedding_size == model.timestamp_embedding_size == 512
    assert all(isinstance(s, int) for s in (model.scene_embedding_size, model.timestamp_embedding_size))


@pytest.mark.parametrize("seconds", LENGTHS)
def test_timestamp_embeddings_as_the_validator_checks(model, outputs, seconds):
    _, emb, ts, _ = outputs[seconds]
    assert isinstance(emb, torch.Tensor) and isinstance(ts, torch.Tensor)  # the validator calls torch.diff
    assert emb.dtype == ts.dtype == torch.float32 and torch.isfinite(emb).all()
    n_frames = math.floor(seconds * 1000 / model.hop_ms + 1e-9) + 1  # every hop from 0 to the end
    assert emb.shape == (N_SOUNDS, n_frames, 512) and ts.shape == (N_SOUNDS, n_frames)
    diff = torch.diff(ts.double(), dim=1)
    assert (diff - 50).abs().max() < 1e-3 and ts.min() == 0  # a regular 50-ms hop from the start
    assert 1000 * seconds - 50 < ts.max() <= 1000 * seconds  # up to the end, not past it
    assert (ts == ts[:1]).all()


@pytest.mark.parametrize("seconds", LENGTHS)
def test_scene_embeddings_are_the_encoders_own(model, outputs, seconds):
    audio, _, _, scene = outputs[seconds]
    assert scene.dtype == torch.float32 and scene.shape == (N_SOUNDS, 512)
    with torch.no_grad():
        torch.testing.assert_close(scene, model.encoder(audio), rtol=1e-4, atol=1e-5)


def test_each_timestamp_embedding_is_the_window_centred_on_it(model, outputs):
    audio, emb, ts, _ = outputs[3.74]
    padded = torch.nn.functional.pad(audio, (SR // 2, SR // 2))
    ks = [0, 1, 37, emb.shape[1] - 1]
    windows = torch.stack([padded[:, round(ts[0, k].item() * SR / 1000):][:, :SR] for k in ks], dim=1)
    with torch.no_grad():
        ref = model.encoder(windows.reshape(-1, SR)).reshape(N_SOUNDS, len(ks), -1)
    torch.testing.assert_close(emb[:, ks], ref, rtol=1e-4, atol=1e-5)
    one, _ = hear.get_timestamp_embeddings(audio[5:6], model)  # sounds do not mix across the batch
    torch.testing.assert_close(one[0], emb[5], rtol=1e-4, atol=1e-5)


def test_numpy_input_other_hops_and_train_mode(random_run, outputs):
    m = hear.load_model(str(random_run / "encoder.pt"), hop_ms=12.5)  # the runner's --model-options
    audio, emb, _, scene = outputs[0.3]
    emb2, ts2 = hear.get_timestamp_embeddings(audio.numpy(), m)
    assert emb2.shape == (N_SOUNDS, 25, 512) and np.allclose(np.diff(ts2.numpy()), 12.5)
    torch.testing.assert_close(emb2[:, ::4], emb, rtol=1e-4, atol=1e-5)
    m.train()  # BatchNorm stays in eval mode: no embedding depends on the rest of its batch
    torch.testing.assert_close(hear.get_scene_embeddings(audio, m), scene)
    third = hear.load_model(str(random_run / "encoder.pt"), 1000 / 3)  # a fractional hop: rounded per frame, no drift
    _, ts3 = hear.get_timestamp_embeddings(outputs[1.0][0][:1], third)
    assert np.allclose(ts3.numpy(), [[0, 1000 / 3, 2000 / 3, 1000]], atol=1e-3)


def test_bad_model_file_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="encoder"):
        hear.load_model("")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not an exported encoder"):
        hear.load_model(str(tmp_path / "junk.pt"))


def make_hear_task(root):
    """A 2-fold HEAR scene task with audio, as hear-preprocess writes it."""
    (root / "16000").mkdir(parents=True)
    meta = {"task_name": "tones", "embedding_type": "scene", "prediction_type": "multiclass",
            "splits": ["fold00", "fold01"], "sample_duration": 1.0}
    (root / "task_metadata.json").write_text(json.dumps(meta))
    (root / "labelvocabulary.csv").write_text("idx,label\n0,low\n1,high\n")
    t = np.arange(SR) / SR
    for fold in meta["splits"]:
        (root / "16000" / fold).mkdir()
        split = {}
        for i in range(12):
            label = ["low", "high"][i % 2]
            f0 = (200 if label == "low" else 2000) * (1 + 0.05 * i)
            sf.write(root / "16000" / fold / f"{i}.wav", (0.5 * np.sin(2 * np.pi * f0 * t)).astype(np.float32), SR)
            split[f"{i}.wav"] = [label]
        (root / f"{fold}.json").write_text(json.dumps(split))
    return root


def write_runner_embeddings(task, out, model):
    """What heareval's runner writes for a scene task: metadata and splits copied, and one
    <split>/<file>.embedding.npy per clip (here from our own HEAR API)."""
    out.mkdir(parents=True)
    for f in ["task_metadata.json", "labelvocabulary.csv", "fold00.json", "fold01.json"]:
        shutil.copy(task / f, out / f)
    for wav in sorted((task / "16000").glob("*/*.wav")):
        (out / wav.parent.name).mkdir(exist_ok=True)
        x = torch.from_numpy(sf.read(wav, dtype="float32")[0])[None]
        np.save(out / wav.parent.name / f"{wav.name}.embedding.npy", hear.get_scene_embeddings(x, model)[0].numpy())


def test_runner_embeddings_are_probed_alone_and_beside_an_encoder(random_run, model, tmp_path):
    task = make_hear_task(tmp_path / "tones")
    runner = tmp_path / "embeddings" / "probe" / "tones"
    write_runner_embeddings(task, runner, model)
    probe = lambda *a: subprocess.run([sys.executable, ROOT / "probe.py", "--task", "hear", "--epochs", "30", *a],
                                      cwd=tmp_path, capture_output=True, text=True, timeout=600)
    p = probe("--data-dir", runner, "--out", tmp_path / "alone")  # no --encoder: the folder is the embeddings
    assert p.returncode == 0, p.stderr
    p = probe("--data-dir", task, "--encoder", random_run / "encoder.pt", "--embeddings", runner, "--out", tmp_path / "mix")
    assert p.returncode == 0, p.stderr
    summary = json.loads((tmp_path / "mix" / "results.json").read_text())["summary"]
    score = {s["encoder"]: s["mean"] for s in summary}
    assert set(score) == {str(random_run / "encoder.pt"), str(runner)}
    # the runner's embeddings are the encoder's own scene embeddings: the same probe, the same score
    assert score[str(runner)] == pytest.approx(score[str(random_run / "encoder.pt")], abs=0.05)
    alone = json.loads((tmp_path / "alone" / "results.json").read_text())["summary"]
    assert alone[0]["mean"] == pytest.approx(score[str(runner)])
    (runner / "fold01" / "3.wav.embedding.npy").write_bytes(b"junk")
    p = probe("--data-dir", runner, "--out", tmp_path / "bad")
    assert "3.wav.embedding.npy" in assert_one_line_error(p)


@pytest.fixture()
def project(random_run, tmp_path):
    """probe.py as a user's copy: next to it data/, in the working folder runs/."""
    shutil.copy(ROOT / "probe.py", tmp_path / "probe.py")  # probe.py imports no other script
    return tmp_path


def test_esc50_with_no_flag_says_what_is_missing(project):
    env = {"PROBE_NO_DOWNLOAD": "1", "PATH": "/usr/bin:/bin"}
    p = subprocess.run([sys.executable, "probe.py", "--task", "esc50"], cwd=project, capture_output=True, text=True,
                       timeout=300, env=env)
    assert "no ESC-50 at" in assert_one_line_error(p)
    (project / "runs").mkdir()
    p = subprocess.run([sys.executable, "probe.py", "--task", "esc50"], cwd=project, capture_output=True, text=True,
                       timeout=300, env=env)
    assert "no ESC-50 at" in assert_one_line_error(p)


def test_esc50_with_no_flag_probes_every_run(project, random_run):
    esc = project / "data" / "ESC-50"
    (esc / "audio").mkdir(parents=True)
    (esc / "meta").mkdir()
    rows, t = ["filename,fold,target,category,esc10,src_file,take"], np.arange(SR) / SR
    for i in range(20):
        c = ["dog", "rain"][i % 2]
        x = np.sin(2 * np.pi * (300 if c == "dog" else 3000) * (1 + 0.02 * i) * t) * 0.5
        sf.write(esc / "audio" / f"{i}.wav", x.astype(np.float32), SR)
        rows.append(f"{i}.wav,{i // 4 + 1},{i % 2},{c},False,{i},A")
    (esc / "meta" / "esc50.csv").write_text("\n".join(rows) + "\n")
    for name in ("a", "b"):
        (project / "runs" / name).mkdir(parents=True)
        shutil.copy(random_run / "encoder.pt", project / "runs" / name / "encoder.pt")
    p = subprocess.run([sys.executable, "probe.py", "--task", "esc50", "--epochs", "5"], cwd=project,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert "probing every runs/*/encoder.pt: runs/a/encoder.pt, runs/b/encoder.pt" in p.stdout
    summary = json.loads((project / "probes" / "results.json").read_text())["summary"]
    assert [s["encoder"] for s in summary] == ["runs/a/encoder.pt", "runs/b/encoder.pt"]
