"""The method learns sound, not a shortcut: a short real pretraining, then what the encoder ignores.

Anything the two sides of a pair share that no other sample has (a noise realization, a phase, a
crop offset) lets alignment + uniformity be solved by fingerprinting it. If each side does not get
its own noise, the encoder learns to tell noise realizations apart: the same parameters rendered
with two noises then look almost like a random negative. Trained on pairs with independent noise,
it learns to ignore the noise. The test runs the project's own commands end to end.
"""
import csv

from conftest import ROOT, run

STEPS, BATCH = 150, 64  # ~4 min on 2 CPU cores
# torchvision's init: with it the shortcut shows within 150 steps. With the default PyTorch init the
# shortcut takes longer to form (noise invariance still 0.98 after 150 shared-noise steps, 0.08 after 672).


def test_pretraining_learns_to_ignore_the_noise_realization(tmp_path):
    out = tmp_path / "run"
    run(ROOT / "train.py", "--synth", "voice", "--delta", "0.25", "--batch-size", str(BATCH), "--epochs", "1",
        "--init", "torchvision", "--sounds-per-epoch", str(int(STEPS * BATCH / 0.9) + 1), "--log-every", "50",
        "--out", out, timeout=1800)
    factors = tmp_path / "factors"
    run(ROOT / "generate.py", "--factors", "noise", "negative", "--synth", "voice", "--delta", "0.25",
        "--pairs", "128", "--out", factors)
    run(ROOT / "analyze.py", "invariance", "--factors", factors,
        "--encoder", out / "encoder.pt", "--out", tmp_path / "inv")
    with open(tmp_path / "inv" / "invariance.csv") as f:
        inv = {(r["encoder"], r["factor"]): float(r["invariance"]) for r in csv.DictReader(f)}
    # (s_noise - s_neg) / (1 - s_neg) after 150 steps of 64 pairs: measured 0.96 with independent
    # noise, 0.63 when the two sides share their noise
    print(f"noise invariance after {STEPS} steps of {BATCH} pairs: {inv['run', 'noise']:.3f}")
    assert inv["run", "negative"] == 0.0
    assert inv["run", "noise"] > 0.8, inv
