"""Contrastive pretraining of a ResNet18 on audio doppelgängers (Cherep & Singh, §3.3-3.4).

Each step draws a fresh batch of synthetic positive pairs (generate.py's PairSampler, on the fly in a thread), embeds
both sides and minimises Wang & Isola's alignment + uniformity loss on the L2-normalized 512-d embeddings (named as
in their code: --align-alpha, --unif-t, --align-w, --unif-w). --data trains on real audio for the paper's baselines.

    # laptop CPU, a few minutes
    python train.py --synth voice --delta 0.25 --batch-size 32 --epochs 2 --sounds-per-epoch 1280 --out runs/cpu
    # the paper: 2 GPUs x 768 per GPU, 200 epochs x 100,000 sounds, lr 0.12 x 1536 / 256 = 0.72
    torchrun --nproc_per_node=2 train.py --synth voice --delta 0.25 --out runs/voice_d0.25
    # several machines: run this on each node (node_rank 0..N-1); the global batch, and the lr, scale with them
    torchrun --nnodes=2 --nproc_per_node=2 --node_rank=0 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        train.py --synth voice --delta 0.25 --out runs/voice_2nodes
    python train.py --synth voice --delta 0.25 --keep pitch --out runs/voice_keep_pitch  # pairs that keep their pitch
    python train.py --synth voice --delta 0.25 --delta-schedule 0.05 --out runs/voice_ramp  # delta ramped 0.05 -> 0.25
    # pitch and each oscillator's pitch modulation held; Voice's noise level with its curve (see generate.py)
    python train.py --synth voice --delta 0.25 --keep pitch-mod --out runs/voice_keep_pitch_mod
    python train.py --synth voice --delta 0.25 --noise-curve --out runs/voice_noise_curve
    python train.py --resume runs/cpu --epochs 4  # continue a run exactly where its last checkpoint stopped
    python train.py --epochs 0 --out runs/random  # the paper's "Random Init." baseline: an untrained encoder
    python train.py --data /path/to/audio --positives aug --out runs/real_aug  # real audio (a VGGSound-style folder)
    python train.py --data /path/to/audio --positives mix5 --out runs/real_mix5  # positives from mixing (VGGSound-Mix)
    python train.py --benchmark --batch-size 64  # speed: on-the-fly synthesis vs the same batches pre-generated

A run folder holds config.json, log.csv, checkpoint.pt (written atomically after each epoch's training, after its
validation, and every --save-every minutes) and encoder.pt, a TorchScript file: torch.jit.load(path) maps a float32
(B, T) 16 kHz mono waveform to (B, 512). The checkpoint holds the step and the validated epochs, and the lr is a
function of the epoch, so a run killed at any instant resumes to the same log rows and weights. It loads with
weights_only=True: no code runs. While a job trains the folder, .lock holds its pid; a second job on it is refused.
"""
import argparse
import contextlib
import csv
import errno
import fcntl
import glob
import io
import json
import math
import os
import queue
import random
import resource
import signal
import stat
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchaudio
import torchvision

# === 1. the paper ===
# A log-mel frontend + ResNet18, Wang & Isola's (2020) loss over the global batch, SGD with a step lr schedule.
SAMPLE_RATE = 16000
N_FRAMES, N_MELS = 96, 64  # VGGish input: 0.96 s of 10-ms frames x 64 mel bands
TRAIN, VAL = 0, 1  # data streams: key spaces of the training batches and of the held-out ones


class LogMel(nn.Module):  # VGGish: 25 ms periodic Hann, 10 ms hop, 64 HTK mel bands 125-7500 Hz, log(mel + 0.01)
    def __init__(self):
        super().__init__()
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=SAMPLE_RATE, n_fft=512, win_length=400, hop_length=160, f_min=125.0, f_max=7500.0,
            n_mels=N_MELS, window_fn=torch.hann_window, power=1.0, center=False, mel_scale="htk")
        self.n_frames = N_FRAMES  # attributes, not globals: TorchScript compiles forward()

    def forward(self, x):  # (B, 16000) -> (B, 1, 96, 64)
        mel = self.mel(x)[:, :, :self.n_frames]  # 98 frames in 1 s without centering; VGGish keeps 96
        return torch.log(mel + 0.01).transpose(1, 2).unsqueeze(1)


class Encoder(nn.Module):
    """Waveform (B, T) at 16 kHz -> embedding (B, 512). Sounds shorter than 1 s are zero-padded; longer ones are cut
    into 1-s windows (a last partial window is kept if at least 0.5 s long, zero-padded), their embeddings averaged."""

    def __init__(self, dim: int = 512, init: str = "pytorch"):
        super().__init__()
        self.frontend = LogMel()
        self.sample_rate = SAMPLE_RATE
        self.net = torchvision.models.resnet18(num_classes=dim)  # fc 512 -> 512, as the authors' code
        self.net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)  # 1 channel in
        # torchvision's Kaiming normal (fan_out) weights are ~1.7x PyTorch's defaults: under BatchNorm, smaller
        # effective steps, and at a CPU budget the encoder barely moves from random init (README, "Does it learn?")
        if init == "pytorch":
            for m in self.net.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
                    m.reset_parameters()

    def embed(self, x):  # exactly 1-s inputs, as in training
        return self.net(self.frontend(x))

    def forward(self, x):
        B, T = x.shape
        sr = self.sample_rate
        n = max(1, T // sr + int(T % sr >= sr // 2))
        x = F.pad(x, (0, max(0, n * sr - T)))[:, :n * sr]
        e = self.embed(x.reshape(B * n, sr))
        return e.reshape(B, n, -1).mean(dim=1)


def align_loss(x, y, alpha=2.0):
    return (x - y).norm(p=2, dim=1).pow(alpha).mean()


def uniform_loss(x, t=2.0):
    return torch.pdist(x, p=2).pow(2).mul(-t).exp().mean().log()  # over distinct pairs i < j


def gather(x):  # all ranks' embeddings, with gradients, so uniformity spans the global batch
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    import torch.distributed.nn.functional as dist_fn
    return torch.cat(dist_fn.all_gather(x), dim=0)


def contrastive_loss(e_a, e_b, align_alpha=2.0, unif_t=2.0, align_w=1.0, unif_w=1.0):
    # DDP averages gradients over ranks: the local alignment mean becomes the global mean, and the sum that
    # all_gather's backward takes over every rank's (identical) uniformity term becomes one global term's gradient.
    e_a, e_b = F.normalize(e_a.float(), dim=1), F.normalize(e_b.float(), dim=1)
    align = align_loss(e_a, e_b, align_alpha)
    unif = (uniform_loss(gather(e_a), unif_t) + uniform_loss(gather(e_b), unif_t)) / 2
    return align_w * align + unif_w * unif, align, unif


def all_mean(*xs):  # the mean over ranks of each scalar: the same numbers on every rank
    t = torch.stack([x.detach().float() for x in xs])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


def milestone_epochs(args):
    return sorted({max(1, round(f * args.epochs)) for f in args.milestones})


def learning_rate(epoch, args):  # the paper's step schedule, a pure function of the epoch (no scheduler state to lose)
    return args.lr * args.gamma ** sum(epoch >= m for m in milestone_epochs(args))


def train_one_epoch(model, embed_pair, optimizer, scaler, batches, epoch, steps_per_epoch, args, log_row, save):
    """SGD over one epoch's batches (all, or up to --max-steps) -> (step, the last step's losses on all ranks)."""
    model.train()
    last_save = time.time()
    for s, a, b in batches:
        e_a, e_b = embed_pair(a, b)
        loss, align, unif = contrastive_loss(e_a, e_b, args.align_alpha, args.unif_t, args.align_w, args.unif_w)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # fp16's gradient scaler; disabled in fp32 and bf16: the step is plain SGD
        last = all_mean(loss, align, unif)
        if not math.isfinite(last[0]):
            kept = os.path.exists(os.path.join(args.out, "checkpoint.pt"))
            raise FloatingPointError(f"non-finite loss at step {s}; stopping"
                                     + (f", {args.out}/checkpoint.pt (earlier) is kept" if kept else ""))
        scaler.step(optimizer)  # fp16: skipped, and the scale halved, where the scaled gradients overflow
        scaler.update()
        step = s + 1
        if step % args.log_every == 0 and step % steps_per_epoch != 0:  # the epoch's last row is its validation's
            log_row(step, epoch, last)
        if time.time() - last_save > 60 * args.save_every:
            save(step, epoch, last)
            last_save = time.time()
    save(step, epoch, last)  # the epoch's training (or the run's last step) is on disk before validation starts
    return step, last


@torch.no_grad()
def validate(model, embed_pair, source, val_steps, rank, augment, args):
    """Alignment and uniformity on the fixed held-out batches -> (val_align, val_unif)."""
    model.eval()
    va, vu = [], []
    for _, a, b in prefetch(source, range(val_steps), rank, VAL, augment):
        _, align, unif = contrastive_loss(*embed_pair(a, b), args.align_alpha, args.unif_t)
        va.append(align), vu.append(unif)
    return all_mean(torch.stack(va).mean(), torch.stack(vu).mean())


def export_encoder(state_dict, path, config):  # TorchScript with the config inside: loads with torch.jit.load alone
    enc = Encoder()
    enc.load_state_dict(state_dict)  # SyncBatchNorm and BatchNorm share their state-dict keys
    if config["readout"] == "pool":  # the 512-d pooled layer; "fc" keeps the trained head on top of it
        enc.net.fc = nn.Identity()
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(enc.cpu().eval()), buf, _extra_files={"config.json": json.dumps(config)})
    atomic_write(path, buf.getvalue())


# === 2. beyond the paper ===
# The batches, drawn in a thread: a source's batch(step, rank, stream) is a pure function of its arguments and the
# seed, so ranks never share batches and a resumed run sees the same stream. bf16, --benchmark, real-audio baselines.
def prefetch(source, steps, rank, stream, augment=None, depth=3):
    """Draws batches in a background thread (a forked DataLoader worker deadlocks once JAX has run). On a CPU
    JAX fills the step's serial gaps: on the fly runs at 0.97-1.0 of the bound 1 / (1/train + 1/synthesis)."""
    q = queue.Queue(maxsize=depth)

    def work():
        try:
            for step in steps:
                a, b = (torch.from_numpy(np.asarray(x)) for x in source.batch(step, rank, stream))
                if augment is not None:  # each view augmented independently, seeded by its step
                    seed = hash((stream, rank, step)) % 2**63
                    torch.manual_seed(seed), random.seed(seed)  # the library draws from both, the main thread neither
                    a, b = augment(a), augment(b)
                q.put((step, a, b))
        except BaseException as e:  # surface it in the main thread instead of hanging
            q.put(e)

    threading.Thread(target=work, daemon=True).start()
    for _ in steps:
        if isinstance(item := q.get(), BaseException):
            raise item
        yield item


def make_source(args, ckpt, steps_per_epoch):  # -> (synthetic pairs or real audio, augment, schedule)
    from generate import PairSampler, synthesis_device
    augment = make_augment(args.ir_dir, args.seed) if args.aug or (args.data and args.positives == "aug") else None
    # the ramp spans the epochs the run was started with, kept in its config: --resume --epochs N extends
    # the run at the final delta instead of redrawing the pairs of steps already trained
    ramp_steps = ckpt["config"]["delta_schedule_steps"] if ckpt else steps_per_epoch * args.epochs
    schedule = None if args.delta_schedule is None else (args.delta_schedule, ramp_steps)
    if args.data is not None:
        return RealAudio(args.data, args.positives, args.batch_size, args.seed), augment, schedule
    return PairSampler(args.synth, args.delta, args.batch_size, SAMPLE_RATE, 1.0, args.seed, args.delta_group,
                       args.keep, schedule, synthesis_device(int(os.environ.get("LOCAL_RANK", 0))),
                       noise_curve=args.noise_curve), augment, schedule


def choose_precision(amp, device):  # auto: fp16 on CUDA GPUs without native bf16 (Volta, Turing: fp16 tensor cores)
    if amp != "auto":
        return "fp32" if amp == "off" else amp
    return "bf16" if native_bf16(device) else "fp16" if device.type == "cuda" else "fp32"


def native_bf16(device):  # bf16 pays on Ampere+ GPUs, AMX / AVX512-BF16 CPUs (~1.5x fp32); emulated on AVX2 ~40x slower
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return any(getattr(torch.cpu, f"_is_{isa}_supported", lambda: False)() for isa in ("amx_tile", "avx512_bf16"))


def peak_memory_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def benchmark(args, source, embed_pair, optimizer, rank, augment, precision, device):
    """Sounds/s per precision: pre-generated, on the fly, and the perfect overlap bound where both share the CPU."""
    n, sounds = args.benchmark_steps, 2 * args.batch_size
    scalers = {p: torch.amp.GradScaler(device.type, enabled=p == "fp16") for p in ("fp32", "bf16", "fp16")}

    def train_step(a, b, precision):
        loss = contrastive_loss(*embed_pair(a, b, precision), args.align_alpha, args.unif_t)[0]
        optimizer.zero_grad(set_to_none=True)
        scalers[precision].scale(loss).backward()
        scalers[precision].step(optimizer)
        scalers[precision].update()
        return loss.item()  # waits for the device

    def timed(work):  # -> (what work() returns, the seconds it took)
        t0 = time.time()
        return work(), time.time() - t0

    first, gen_s = timed(lambda: [torch.from_numpy(x) for x in source.batch(0, rank)])
    batches, synth_s = timed(lambda: [[torch.from_numpy(x) for x in source.batch(s, rank)] for s in range(1, n + 1)])
    synth = sounds * n / synth_s
    print(f"batch {args.batch_size} pairs ({sounds} sounds) per step, first batch incl. compile {gen_s:.1f} s")
    print(f"synthesis alone: {synth:.1f} sounds/s")
    print(f"{'sounds/s':10s} {'pre-generated':>14s} {'on-the-fly':>11s} {'bound':>8s} {'on-the-fly / bound':>19s}")
    # fp32, and the half precision that runs (bf16 beside fp16 where native): emulated, 10 steps take minutes
    rows = ["fp32"] + ["bf16"] * (precision == "bf16" or precision == "fp16" and native_bf16(device)) \
        + ["fp16"] * (precision == "fp16")
    fly = {}
    for p in rows:
        for _ in range(2):
            train_step(*first, p)  # warm-up (oneDNN and cuDNN pick their kernels, fp16's scale settles)
        pre = sounds * n / timed(lambda: [train_step(a, b, p) for a, b in batches])[1]
        fly[p] = sounds * n / timed(lambda: [train_step(a, b, p) for _, a, b in
                                             prefetch(source, range(n + 1, 2 * n + 1), rank, TRAIN, augment)])[1]
        bound = 1 / (1 / pre + 1 / synth)
        print(f"{p:10s} {pre:14.1f} {fly[p]:11.1f} {bound:8.1f} {fly[p] / bound:19.3f}")
    for p in rows[1:]:
        print(f"{p} / fp32 on the fly: {fly[p] / fly['fp32']:.2f}x")
    if "bf16" not in rows and args.amp != "off":
        print("bf16: not measured, this hardware has no native bf16 (AMX or AVX512-BF16 on a CPU, Ampere+ on a GPU) "
              "and would emulate it (~40x slower on a CPU); --amp bf16 measures it anyway")
    print(f"default precision here (--amp {args.amp}): {precision}; peak memory {peak_memory_mb():.0f} MB")


class RealAudio:  # the real-audio baselines: a folder of audio files; a pair is two views of random 1-s crops of a file
    EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")

    def __init__(self, root, positives, batch_size, seed):
        files = sorted(f for f in glob.glob(os.path.join(glob.escape(root), "**", "*"), recursive=True)
                       if f.lower().endswith(self.EXTENSIONS) and os.path.isfile(f))  # a folder take1.wav is a folder
        if not files:
            raise ValueError(f"no audio files ({', '.join(self.EXTENSIONS)}) under {root}")
        self.info = []
        for f in files:  # every file's length now, so a broken one is refused before training starts
            try:
                i = sf.info(os.fsencode(f))
            except Exception as e:
                raise ValueError(f"unreadable audio file {f}: {first_line(e)}") from None
            if i.frames == 0:
                raise ValueError(f"empty audio file {f}")
            self.info.append((f, i.samplerate, i.frames))
        order = np.random.default_rng(seed).permutation(len(files))
        n_val = max(1, len(files) // 10) if len(files) > 1 else 0  # 90/10 split by file
        self.splits = {VAL: order[:n_val], TRAIN: order[n_val:]} if n_val else {TRAIN: order, VAL: order}
        self.positives, self.batch_size, self.seed = positives, batch_size, seed

    def crop(self, i, rng):  # a random 1-s crop of file i, zero-padded if the file is shorter
        path, sr, frames = self.info[i]
        x = torch.from_numpy(read_audio(path, start=int(rng.integers(0, max(1, frames - sr + 1))), frames=sr))
        return F.pad(x, (0, max(0, SAMPLE_RATE - len(x))))[:SAMPLE_RATE]

    def view(self, i, rng, k):  # k layered crops of file i (the paper's VGGSound-Mix), peak-normalized if it clips
        x = sum(self.crop(i, rng) for _ in range(k))
        return x / max(1.0, float(x.abs().max()))

    def batch(self, step, rank=0, stream=TRAIN):
        rng = np.random.default_rng([self.seed, stream, rank, step])
        a, b = [], []
        for i in rng.choice(self.splits[stream], size=self.batch_size):
            if self.positives == "aug":  # two augmentations of one crop
                x = self.crop(i, rng)
                a.append(x), b.append(x.clone())
            elif self.positives == "jitter":  # two crops of one file
                a.append(self.crop(i, rng)), b.append(self.crop(i, rng))
            else:  # mix5 / mix10
                k = int(self.positives[3:])
                a.append(self.view(i, rng, k)), b.append(self.view(i, rng, k))
        return torch.stack(a).numpy(), torch.stack(b).numpy()


# The paper's augmentations (App. B) by torch-audiomentations. Its IR loader needs the removed torchaudio.info; its
# PitchShift reaches only +-0.41 semitones at 16 kHz: soundfile reads the IRs, pitch_shift draws uniformly in +-2.
def load_irs(ir_dir):
    check_path(ir_dir, "--ir-dir", must_exist=True)
    exts = {"." + f.lower() for f in sf.available_formats()}  # what soundfile can decode
    paths = sorted(p for p in Path(ir_dir).rglob("*") if p.is_file() and p.suffix.lower() in exts)
    if not paths:
        raise ValueError(f"--ir-dir {ir_dir} contains no audio files that soundfile reads (.wav, .flac, ...)")
    irs = [torch.from_numpy(read_audio(p)) for p in paths]
    if silent := [p for p, ir in zip(paths, irs) if ir.abs().max() == 0]:  # unit energy (below) would divide by 0
        raise ValueError(f"impulse response {silent[0]} is silent")
    return irs


def synthetic_irs(sample_rate, n=32, seed=0):  # decaying noise, RT60 ~ U(0.1, 1.0) s, plus a direct-path impulse
    g = torch.Generator().manual_seed(seed)
    irs = []
    for rt60 in (0.1 + 0.9 * torch.rand(n, generator=g)).tolist():
        t = torch.arange(int(rt60 * sample_rate)) / sample_rate
        ir = torch.randn(len(t), generator=g) * 10 ** (-3 * t / rt60)  # -60 dB at t = rt60
        ir[0] = 1.0
        irs.append(ir)
    return irs


def pitch_shift(x, semitones, n_fft=512, hop=128):
    """Shift x (..., T) by `semitones` keeping its length: phase-vocoder stretch to L = T * 2^(st/12) samples, then
    FFT resampling back to T, exact to 1/T (torchaudio's sinc resampling builds a ~1 GB kernel per call)."""
    T = x.shape[-1]
    L = round(T * 2 ** (semitones / 12))
    if L == T:
        return x
    window = torch.hann_window(n_fft, device=x.device)
    spec = torch.stft(x, n_fft, hop, window=window, return_complex=True)
    phase_advance = torch.linspace(0, math.pi * hop, spec.shape[-2], device=x.device)[:, None]
    spec = torchaudio.functional.phase_vocoder(spec, T / L, phase_advance)
    y = torch.istft(spec, n_fft, hop, window=window, length=L)
    return torch.fft.irfft(torch.fft.rfft(y), T) * (T / L)  # irfft to T samples crops or zero-pads the spectrum


def make_transforms(ir_dir=None, seed=0, p=0.5):
    from torch_audiomentations import ApplyImpulseResponse, HighPassFilter, LowPassFilter, Shift
    from torch_audiomentations.core.transforms_interface import BaseWaveformTransform
    from torch_audiomentations.utils.io import Audio
    from torch_audiomentations.utils.object_dict import ObjectDict

    class InMemoryImpulseResponse(ApplyImpulseResponse):  # fed tensors: its Audio() loader takes sample dicts
        def __init__(self, irs, sample_rate, p=0.5):
            BaseWaveformTransform.__init__(self, p=p, sample_rate=sample_rate, output_type="dict")  # skip path scan
            # unit energy, so reverb roughly preserves loudness whatever the source level of the IR
            self.ir_paths = [{"samples": (ir / ir.norm())[None], "sample_rate": sample_rate} for ir in irs]
            self.audio = Audio(sample_rate, mono=True)
            self.convolve_mode = "full"  # library defaults; output is cropped to the input length
            self.compensate_for_propagation_delay = False

    class UniformPitchShift(BaseWaveformTransform):  # per-example semitones ~ U(-2, 2); the base class draws p
        supports_target = False

        def randomize_parameters(self, samples=None, sample_rate=None, targets=None, target_rate=None):
            self.transform_parameters["semitones"] = (-2.0 + 4.0 * torch.rand(len(samples))).tolist()

        def apply_transform(self, samples=None, sample_rate=None, targets=None, target_rate=None):
            out = torch.stack([pitch_shift(s, st) for s, st in zip(samples, self.transform_parameters["semitones"])])
            return ObjectDict(samples=out, sample_rate=sample_rate, targets=targets, target_rate=target_rate)

    irs = load_irs(ir_dir) if ir_dir is not None else synthetic_irs(SAMPLE_RATE, seed=seed)
    kw = dict(p=p, sample_rate=SAMPLE_RATE, output_type="dict")  # "dict": no deprecation warnings
    return {
        "highpass": HighPassFilter(min_cutoff_freq=20.0, max_cutoff_freq=800.0, **kw),
        "lowpass": LowPassFilter(min_cutoff_freq=1200.0, max_cutoff_freq=8000.0, **kw),
        "pitch": UniformPitchShift(**kw),
        "shift": Shift(min_shift=-0.25, max_shift=0.25, shift_unit="fraction", rollover=True, **kw),
        "reverb": InMemoryImpulseResponse(irs, SAMPLE_RATE, p=p),
    }


def make_augment(ir_dir=None, seed=0):
    from torch_audiomentations import Compose
    chain = Compose(list(make_transforms(ir_dir, seed).values()), output_type="dict")

    def augment(x):  # (B, T) float32 on any device -> (B, T); each transform applied per example with p=0.5
        assert x.ndim == 2, f"expected (B, T), got {tuple(x.shape)}"
        return torch.cat([chain(c[:, None], sample_rate=SAMPLE_RATE).samples[:, 0]  # library wants (B, C, T)
                          for c in x.split(100)])

    return augment


# === 3. plumbing ===
RUN_FILES = ("config.json", "log.csv", "checkpoint.pt", "encoder.pt")
LOG_FIELDS = ["step", "epoch", "lr", "loss", "align", "unif", "val_align", "val_unif", "sounds_per_s"]


def parse_args(argv=None):  # -> (args, the flags given)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = fail  # a bad flag is one line on stderr, exit 2, as every other bad input
    g = p.add_argument_group("data")
    g.add_argument("--synth", default="voice", help="voice (78 params), voicefm (130) or parametric (340)")
    g.add_argument("--delta", type=number(high=1), default=0.25, help="perturbation size delta of the doppelgänger "
                   "pairs, in [0, 1] (beyond 1 most of theta_i sits on a clip bound, whatever delta is)")
    g.add_argument("--delta-group", action="append", metavar="NAME=VALUE", help="delta VALUE for one synthax module "
                   "(keyboard, vco_1, ...) or parameter (keyboard.midi_f0) instead of --delta; repeatable")
    g.add_argument("--keep", action="append", metavar="SET", help="hold a set of parameters equal within a pair "
                   "(repeatable): pitch (every keyboard's midi_f0 and oscillator's tuning), pitch-mod (pitch and "
                   "every oscillator's mod_depth)")
    g.add_argument("--noise-curve", action="store_true", help="apply the synth's level curves per element (synthax "
                   "0.2.2 drops Voice's noise-level curve, as in the paper's data; see generate.py)")
    g.add_argument("--delta-schedule", type=number(high=1), metavar="START", help="delta ramps linearly from START "
                   "at step 0 to --delta at the last step (per-group values scale with it); validation uses --delta")
    g.add_argument("--data", help="train on a folder of real audio instead of a synth (read recursively)")
    g.add_argument("--positives", default="aug", choices=["aug", "jitter", "mix5", "mix10"], help="real audio: "
                   "two augmentations of a crop, two crops of a file, or two layerings of 5 / 10 crops (VGGSound-Mix)")
    g.add_argument("--aug", action="store_true", help="the paper's effects on both views (on with --positives aug)")
    g.add_argument("--ir-dir", help="impulse responses for the reverb augmentation (default: synthetic rooms)")
    g.add_argument("--sounds-per-epoch", type=number(int, above=True), default=100_000,
                   help="pairs per epoch, split 90/10 train/val")
    g = p.add_argument_group("optimisation (paper defaults)")
    g.add_argument("--epochs", type=number(int), default=200)
    g.add_argument("--batch-size", type=number(int, 2), default=768, help="pairs per process; global = procs x this")
    g.add_argument("--lr", type=number(above=True), default=None, help="default 0.12 x global batch / 256")
    g.add_argument("--momentum", type=number(), default=0.9, help="SGD momentum; the paper is silent, the authors' "
                   "code uses 0, Wang & Isola 0.9, the usual choice with this loss and lr scaling")
    g.add_argument("--weight-decay", type=number(), default=1e-6)
    g.add_argument("--init", default="pytorch", choices=["pytorch", "torchvision"], help="ResNet weight init: each "
                   "layer's PyTorch default (learns far more at small budgets, see README) or torchvision's Kaiming")
    g.add_argument("--milestones", type=number(high=1), nargs="+", default=[0.775, 0.85, 0.925],
                   help="lr x gamma at these fractions of the epochs")
    g.add_argument("--gamma", type=number(above=True), default=0.1)
    g = p.add_argument_group("loss (Wang & Isola's names)")
    g.add_argument("--align-alpha", type=number(above=True), default=2.0, help="alignment exponent")
    g.add_argument("--unif-t", type=number(above=True), default=2.0, help="uniformity temperature")
    g.add_argument("--align-w", type=number(low=-math.inf), default=1.0, help="weight of the alignment term")
    g.add_argument("--unif-w", type=number(low=-math.inf), default=1.0, help="weight of the uniformity term")
    g = p.add_argument_group("run")
    g.add_argument("--out", default="runs/default", help="run folder")
    g.add_argument("--resume", metavar="RUN", help="continue RUN from its checkpoint (other flags may extend --epochs)")
    g.add_argument("--seed", type=number(int, 0, 2**32 - 1), default=0)
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"], help="autocast of the ResNet (the "
                   "log-mel and the loss stay float32); auto: bf16 where the hardware has it natively (Ampere+ GPUs, "
                   "CPUs with AMX or AVX512-BF16), fp16 with a gradient scaler on older CUDA GPUs (V100, T4), else off")
    g.add_argument("--log-every", type=number(int, 1), default=50, help="steps between log rows")
    g.add_argument("--save-every", type=number(), default=30.0, help="minutes between mid-epoch checkpoints")
    g.add_argument("--max-steps", type=number(int), default=None, help="stop after this many steps (checkpoint kept)")
    g.add_argument("--readout", default="pool", choices=["pool", "fc"], help="what encoder.pt outputs: the 512-d "
                   "pooled layer (probes better, as a layer below a projection head does) or the fc head of the loss")
    g.add_argument("--benchmark", action="store_true", help="sounds/s per precision: pre-generated, on the fly, bound")
    g.add_argument("--benchmark-steps", type=number(int, 1), default=10)
    args = p.parse_args(argv)
    for a in p._actions:  # a second pass with no defaults tells which flags were given
        a.default = argparse.SUPPRESS
    return args, set(vars(p.parse_args(argv)))


class RunFolder:  # run state that main() makes and passes down: rank 0's lock on the run folder, whether it is new
    path, lock, made, new = None, None, False, False  # set by own() and check_args()

    def own(self, folder, create):
        if not os.path.isdir(folder):
            if not create:
                raise ValueError(f"no checkpoint to resume at {os.path.join(folder, 'checkpoint.pt')}")
            try:
                os.makedirs(folder)
            except OSError as e:
                raise ValueError(f"cannot create --out {folder}: {e.strerror}") from None
            self.made = True
        self.path, self.lock = folder, FolderLock(folder)

    def abandon(self):  # a new run failed before its first checkpoint: its files, its lock and a folder made for it go
        if self.new and not os.path.exists(os.path.join(self.path, "checkpoint.pt")):
            for f in RUN_FILES:
                Path(self.path, f).unlink(missing_ok=True)
            self.lock.release()
            with contextlib.suppress(OSError):
                if self.made:
                    os.rmdir(self.path)


def check_args(args, given, run):
    """-> (args, ckpt): what argparse cannot check, before anything is made, on every rank, none waiting for another."""
    from generate import SYNTHS
    if bad := [k for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE") if not os.environ.get(k, "0").isdigit()]:
        raise ValueError(f"environment variable {bad[0]}={os.environ[bad[0]]!r} is not a whole number; torchrun sets "
                         "it, a plain python train.py needs it unset")
    first = int(os.environ.get("RANK", 0)) == 0  # rank 0 owns the run folder
    check_path(args.resume or args.out, "--resume" if args.resume else "--out", "run folder")
    if args.resume and first:  # owned before it is read: no other process writes it meanwhile
        run.own(args.resume, create=False)
    ckpt = load_checkpoint(args.resume) if args.resume else None
    args = resumed_args(args, given, ckpt["config"]) if ckpt else args
    if args.data is None and args.synth not in SYNTHS:
        raise ValueError(f"unknown synth {args.synth!r} (choose from {', '.join(SYNTHS)})")
    if args.data is not None:
        check_path(args.data, "--data", must_exist=True)
        if args.delta_group or args.keep or args.delta_schedule is not None or args.noise_curve:
            raise ValueError("--delta-group, --keep, --delta-schedule and --noise-curve shape synthetic pairs, "
                             "not --data")
    if args.delta_schedule is not None and not args.delta > 0:
        raise ValueError("--delta-schedule START must be >= 0 and --delta > 0 (delta ramps from START to --delta)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no GPU")
    check_new_run(args)
    if not args.resume and not args.benchmark and first:
        run.own(args.out, create=True)
        check_new_run(args)  # again, now that the folder is ours: another run may have finished here meanwhile
        run.new = True  # the run files written here from now on are this run's
    return args, ckpt


def check_new_run(args):
    held = [f for f in RUN_FILES if os.path.exists(os.path.join(args.out, f))]
    if not args.resume and held and not args.benchmark:  # a run folder is never overwritten, whatever is left of it
        raise ValueError(f"{args.out} already holds a run ({', '.join(held)}); continue it with --resume {args.out} "
                         f"or pick another --out")


def load_checkpoint(run):  # weights_only=True: tensors, numbers, strings, lists, dicts; no code runs
    path = os.path.join(run, "checkpoint.pt")
    if not os.path.isfile(path):
        raise ValueError(f"no checkpoint to resume at {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "looks like a TorchScript archive": the line below says it
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        unsafe = []
        with contextlib.suppress(Exception):  # what loading it would call: named from its opcodes, never imported
            unsafe = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(path)))
        if unsafe:
            raise ValueError(f"{path} is refused: loading it would call {', '.join(unsafe[:3])}"
                             f"{' ...' * (len(unsafe) > 3)}, and train.py never runs code from a checkpoint") from None
        raise ValueError(f"{path} is not a readable checkpoint ({first_line(e)})") from None
    keys = {"model", "optimizer", "step", "val_epochs", "last", "config", "rng"}
    if not isinstance(ckpt, dict) or not keys <= ckpt.keys() or not isinstance(ckpt["config"], dict) \
            or not isinstance(ckpt["step"], int):
        raise ValueError(f"{path} is not a train.py checkpoint (no {', '.join(sorted(keys))})")
    return ckpt


def resumed_args(args, given, config):  # the run's own config wins; only these may change, the device is this machine's
    if missing := sorted(set(vars(args)) - config.keys()):  # an earlier train.py's: today's flags would fill gaps
        raise ValueError(f"{args.resume} is a run of an earlier train.py (its config has no {', '.join(missing)})")
    mine = given & {"epochs", "max_steps", "log_every", "save_every", "amp", "readout"} | {"resume", "device"}
    saved = {k: v for k, v in config.items() if k in vars(args) and k not in mine}
    return argparse.Namespace(**{**vars(args), **saved, "out": args.resume})


def setup_ddp(device_name):  # DDP from torchrun's environment; a plain `python train.py` is a world of one
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, local_rank, world = (int(os.environ.get(k, d))
                               for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    device = torch.device("cuda", local_rank) if device_name.startswith("cuda") else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if ddp:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if rank != 0:
        sys.stdout = open(os.devnull, "w")  # one voice in the console
    return ddp, rank, world, device


def open_run(out, config, step, val_epochs):
    """config.json, and log.csv cut back to the checkpoint (a validation row only if it has that epoch validated)."""
    log_path, rows = os.path.join(out, "log.csv"), []
    if step and os.path.exists(log_path):  # read before anything is rewritten: a bad log.csv changes nothing
        try:  # a spreadsheet may have saved it with a BOM and CRLF line ends: the same rows
            with open(log_path, newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                if reader.fieldnames != LOG_FIELDS:
                    raise ValueError(f"columns {', '.join(reader.fieldnames or [])}, not {', '.join(LOG_FIELDS)}")
                rows = [r for r in reader if int(r["step"]) <= step
                        and (r["val_align"] == "" or int(r["epoch"]) < val_epochs)]
        except (ValueError, TypeError, csv.Error) as e:  # UnicodeDecodeError too
            raise ValueError(f"{log_path} is not a train.py log.csv ({first_line(e)}); move it away to resume "
                             f"without its rows") from None
    for stale in glob.glob(os.path.join(glob.escape(out), ".*.tmp[0-9]*")):  # atomic_write's, left by a kill -9
        os.remove(stale)
    atomic_write(os.path.join(out, "config.json"), json.dumps(config, indent=2).encode())
    w = csv.DictWriter(buf := io.StringIO(), fieldnames=LOG_FIELDS)
    w.writeheader()
    w.writerows(rows)
    atomic_write(log_path, buf.getvalue().encode())
    return log_path


def log(path, step, epoch, lr, last, rate, val=None):  # a row of log.csv (path: rank 0's, else None), a console line
    if path:
        buf = io.StringIO()
        csv.writer(buf).writerow([step, epoch, lr, *last, *(val or ["", ""]), f"{rate:.1f}"])  # as LOG_FIELDS
        data = memoryview(buf.getvalue().encode())
        with open(path, "ab", buffering=0) as f:  # unbuffered: a failed write is known here, not at close
            end = f.seek(0, os.SEEK_END)
            try:
                while data:
                    data = data[f.write(data):]
            except OSError as e:  # e.g. a full disk: no half row is left for the next --resume to read
                f.truncate(end)
                raise OSError(e.errno, e.strerror, str(path)) from None
    head = f"epoch {epoch} done: loss {last[0]:.4f} val align {val[0]:.4f} val unif {val[1]:.4f}" if val \
        else f"step {step} epoch {epoch} loss {last[0]:.4f} align {last[1]:.4f} unif {last[2]:.4f}"
    print(f"{head} {rate:.0f} sounds/s")


def save_checkpoint(out, model, optimizer, scaler, step, val_epochs, last, config):
    name, key, *rest = np.random.get_state()  # its key as a tensor: the checkpoint loads with weights_only=True
    rng = {"torch": torch.get_rng_state(), "numpy": (name, torch.from_numpy(key.astype(np.int64)), *rest),
           "python": random.getstate()}
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "step": step, "val_epochs": val_epochs, "last": last, "config": config, "rng": rng}, buf)
    atomic_write(os.path.join(out, "checkpoint.pt"), buf.getvalue())


def restore(run, ckpt, model, optimizer, scaler):
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler.is_enabled() and ckpt.get("scaler"):  # an fp16 run's scale; a run resumed in fp16 starts one
            scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        name, key, *rest = ckpt["rng"]["numpy"]
        np.random.set_state((name, key.numpy().astype(np.uint32), *rest))
        random.setstate(ckpt["rng"]["python"])
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{run}/checkpoint.pt does not fit this model ({first_line(e)})") from None
    return ckpt["step"], ckpt["val_epochs"], ckpt["last"]


def main(argv=None):
    run = RunFolder()
    try:
        args, ckpt = check_args(*parse_args(argv), run)
        ddp, rank, world, device = setup_ddp(args.device)
        master = rank == 0
        precision = choose_precision(args.amp, device)
        global_batch = args.batch_size * world
        args.lr = args.lr if args.lr is not None else 0.12 * global_batch / 256
        steps_per_epoch, val_steps = (max(1, int(f * args.sounds_per_epoch) // global_batch) for f in (0.9, 0.1))
        stop_at = min(steps_per_epoch * args.epochs, math.inf if args.max_steps is None else args.max_steps)
        torch.manual_seed(args.seed)
        random.seed(args.seed)
        np.random.seed(args.seed)
        source, augment, schedule = make_source(args, ckpt, steps_per_epoch)

        # channels_last: the layout oneDNN's and cuDNN's fast convolutions use (CPU fp32 ~1.2x here, bf16 more)
        model = Encoder(init=args.init).to(device, memory_format=torch.channels_last)
        if ddp and device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BN statistics over the global batch
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                    weight_decay=args.weight_decay)
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")  # bf16 needs none: fp32's range
        step, val_epochs, last = restore(args.resume, ckpt, model, optimizer, scaler) if ckpt else (0, 0, None)
        # DDP wraps the ResNet only: the frontend has no weights, and outside autocast logs small mel energies in fp32
        ids = [device.index] if device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model.net, device_ids=ids) if ddp else model.net

        def embed_pair(a, b, precision=precision):  # one forward over both views: BatchNorm sees the whole pair batch
            spec = model.frontend(torch.cat([a, b]).to(device, non_blocking=True))
            half = torch.float16 if precision == "fp16" else torch.bfloat16
            with torch.autocast(device.type, dtype=half, enabled=precision != "fp32"):
                e = net(spec.contiguous(memory_format=torch.channels_last))
            return e[: len(a)], e[len(a):]

        if args.benchmark:
            return benchmark(args, source, embed_pair, optimizer, rank, augment, precision, device)
        config = {**vars(args), "world_size": world, "global_batch": global_batch, "steps_per_epoch": steps_per_epoch,
                  "val_steps": val_steps, "milestones_epochs": milestone_epochs(args),
                  "delta_schedule_steps": schedule[1] if schedule else None, "precision": precision}
        log_path = open_run(args.out, config, step, val_epochs) if master else None
        if ddp:
            print(f"DDP: {world} processes ({dist.get_backend()}), each drawing its own batches")
        print(f"training {args.synth if args.data is None else args.data} on {device} x {world}: global batch "
              f"{global_batch}, lr {args.lr:g}, {steps_per_epoch} steps/epoch, {args.epochs} epochs, from step {step}, "
              f"{config['precision']}")
        t0, step0 = time.time(), step

        def log_row(step, epoch, last, val=None):  # at the sounds/s this process has trained so far
            rate = 2 * global_batch * (step - step0) / (time.time() - t0)
            log(log_path, step, epoch, learning_rate(epoch, args), last, rate, val)

        def save(step, val_epochs, last):  # the one place the checkpoint is written
            if master:
                save_checkpoint(args.out, model, optimizer, scaler, step, val_epochs, last, config)

        # from the first epoch not validated; one trained before a kill is validated even if --epochs shrank below it
        for epoch in range(val_epochs, max(args.epochs, step // steps_per_epoch)):
            for group in optimizer.param_groups:  # the lr is a function of the epoch: no scheduler state to lose
                group["lr"] = learning_rate(epoch, args)
            steps = range(step, min(stop_at, (epoch + 1) * steps_per_epoch))  # empty if trained before a kill
            if steps:
                batches = prefetch(source, steps, rank, TRAIN, augment)
                step, last = train_one_epoch(model, embed_pair, optimizer, scaler, batches, epoch, steps_per_epoch,
                                             args, log_row, save)
            if step < (epoch + 1) * steps_per_epoch:  # --max-steps ended the run mid-epoch
                break
            log_row(step, epoch, last, validate(model, embed_pair, source, val_steps, rank, augment, args))
            save(step, epoch + 1, last)
        if not ckpt and step == 0:  # --epochs 0: the random initialisation is the run
            save(step, val_epochs, last)
        if master:
            export_encoder(model.state_dict(), os.path.join(args.out, "encoder.pt"), config)
            print(f"wrote {os.path.join(args.out, 'encoder.pt')} (step {step}); peak memory {peak_memory_mb():.0f} MB")
        if ddp:
            del net  # free DDP's reducer (and its hold on the process group) while every rank is still here
            dist.all_reduce(torch.zeros(1, device=device))  # leave together: no rank tears down while another exports
            dist.destroy_process_group()
    except (KeyboardInterrupt, FloatingPointError, ValueError, OSError, torch.OutOfMemoryError) as e:
        run.abandon()  # a new run that has no checkpoint yet is removed, so it blocks no retry
        if isinstance(e, KeyboardInterrupt):
            exit_interrupted(e, "what was written is whole (continue a run with --resume RUN)")
        if isinstance(e, torch.OutOfMemoryError):  # e.g. a batch too large for the GPU; what is on disk is whole
            fail(f"out of memory ({first_line(e)}); lower --batch-size, or --resume on a larger device", 1)
        if isinstance(e, OSError):  # e.g. a full disk or a folder made read-only mid-run; what is on disk is whole
            fail(f"{e.filename}: {e.strerror}" if e.filename else first_line(e))
        fail(e, 1 if isinstance(e, FloatingPointError) else 2)  # 1: a non-finite loss
    finally:
        if run.lock:
            run.lock.release()


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


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, interrupted)
    main()
