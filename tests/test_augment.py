import math
import random
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch

import train

SR = 16000


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)
    random.seed(0)


def apply(t, x):  # one library transform on (B, T)
    return t(x[:, None], sample_rate=SR).samples[:, 0]


def test_augmentation_chain_shape_dtype_finite_no_warnings():
    x = torch.randn(150, SR)  # 2 chunks: 100 + 50
    x0 = x.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. output_type deprecation warnings
        y = train.make_augment()(x)
    assert y.shape == x.shape and y.dtype == torch.float32 and torch.isfinite(y).all()
    assert torch.equal(x, x0)  # input untouched
    changed = (y - x).abs().amax(dim=1) > 1e-4
    assert 0 < changed.sum() < 150  # p=0.5 per transform: almost all, but not necessarily all, change


def test_each_transform_changes_signal_when_p_is_1():
    x = torch.randn(8, SR)
    for name, t in train.make_transforms(p=1.0).items():
        y = apply(t, x)
        assert y.shape == x.shape and torch.isfinite(y).all(), name
        assert ((y - x).abs().amax(dim=1) > 1e-3).all(), f"{name} left some example unchanged"


def peak_hz(y):
    return torch.fft.rfft(y * torch.hann_window(y.shape[-1])).abs().argmax(-1).float() * SR / y.shape[-1]


def test_pitch_shift_moves_sine_peak_by_expected_ratio():
    x = torch.sin(2 * math.pi * 440 * torch.arange(SR) / SR)
    for st in [-2.0, -1.3, -0.25, 0.7, 2.0]:
        assert peak_hz(train.pitch_shift(x[None], st)).item() == pytest.approx(440 * 2 ** (st / 12), rel=0.01)
    # the chain's transform: semitones ~ U(-2, 2) per example, each realised in the output
    t = train.make_transforms(p=1.0)["pitch"]
    y = apply(t, x.repeat(16, 1))
    st = torch.tensor(t.transform_parameters["semitones"])
    assert (st.abs() <= 2).all() and st.std() > 0.5
    torch.testing.assert_close(peak_hz(y), 440 * 2 ** (st / 12), rtol=0.01, atol=0)


def write_irs(d):
    rng = np.random.default_rng(0)
    ir = lambda n, sr: rng.standard_normal(n) * np.exp(-np.arange(n) / (0.05 * sr))
    sf.write(d / "room_44k_stereo.wav", np.stack([ir(8820, 44100), ir(8820, 44100)], 1), 44100)
    (d / "sub").mkdir()
    sf.write(d / "sub" / "room_16k.wav", ir(4000, SR).astype(np.float32), SR)
    (d / "README.txt").write_text("not audio")  # ignored


def test_irs_load_from_folder_and_reverb_is_applied(tmp_path):
    write_irs(tmp_path)
    t = train.make_transforms(ir_dir=tmp_path, p=1.0)["reverb"]
    irs = [d["samples"][0] for d in t.ir_paths]
    assert sorted(len(ir) for ir in irs) == [3200, 4000]  # 44.1 kHz stereo -> 16 kHz mono
    x = torch.randn(6, SR)
    y = apply(t, x)
    for xi, yi in zip(x, y):  # each output is x convolved with one of the IRs, cropped to x's length
        refs = [torch.from_numpy(np.convolve(xi.numpy(), ir.numpy())[:SR]) for ir in irs]
        assert any(torch.allclose(yi, r, atol=1e-4) for r in refs)
    assert train.make_augment(ir_dir=tmp_path)(x).shape == x.shape


def test_bad_ir_dir_raises_value_error(tmp_path):  # the shared check_path and read_audio name the flag and file
    with pytest.raises(ValueError, match="--ir-dir .*missing does not exist"):
        train.make_augment(ir_dir=tmp_path / "missing")
    (tmp_path / "README.txt").write_text("no audio here")
    with pytest.raises(ValueError, match="contains no audio files"):
        train.make_augment(ir_dir=tmp_path)
    (tmp_path / "broken.wav").write_bytes(b"RIFF garbage")
    with pytest.raises(ValueError, match="cannot read audio .*broken.wav"):
        train.make_augment(ir_dir=tmp_path)
