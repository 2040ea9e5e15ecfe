import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import soundfile as sf
import torch

import train
from conftest import ROOT, assert_one_line_error, run, run_here

TINY = ["--synth", "voice", "--batch-size", "4", "--sounds-per-epoch", "40", "--log-every", "1"]


def test_loss_matches_direct_formulas():
    g = torch.Generator().manual_seed(0)
    e_a, e_b = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    loss, align, unif = train.contrastive_loss(e_a, e_b, align_alpha=2.0, unif_t=2.0, align_w=1.0, unif_w=1.0)
    a = (e_a / e_a.norm(dim=1, keepdim=True)).double().numpy()
    b = (e_b / e_b.norm(dim=1, keepdim=True)).double().numpy()
    align_ref = np.mean([np.linalg.norm(a[i] - b[i]) ** 2 for i in range(6)])

    def unif_ref(x):
        return np.log(np.mean([np.exp(-2 * np.sum((x[i] - x[j]) ** 2)) for i in range(6) for j in range(i + 1, 6)]))
    unif_direct = (unif_ref(a) + unif_ref(b)) / 2
    assert align.item() == pytest.approx(align_ref, rel=1e-5)
    assert unif.item() == pytest.approx(unif_direct, rel=1e-5)
    assert loss.item() == pytest.approx(align_ref + unif_direct, rel=1e-5)
    # alpha, t and the weights are honoured
    loss2, align2, unif2 = train.contrastive_loss(e_a, e_b, align_alpha=1.0, unif_t=2.0, align_w=0.5, unif_w=2.0)
    assert align2.item() == pytest.approx(np.mean([np.linalg.norm(a[i] - b[i]) for i in range(6)]), rel=1e-5)
    assert loss2.item() == pytest.approx(0.5 * align2.item() + 2 * unif_direct, rel=1e-5)


def test_a_few_steps_on_a_fixed_batch_lower_the_loss():
    torch.manual_seed(0)
    model = train.Encoder()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    t = torch.linspace(0, 1, 16000)
    base = torch.stack([torch.sin(2 * torch.pi * f * t) for f in (110, 220, 440, 880, 1760, 3520)])
    a, b = base, base * 0.8 + 0.05 * torch.randn(base.shape)
    losses = []
    for _ in range(6):
        e = model(torch.cat([a, b]))
        loss = train.contrastive_loss(e[:6], e[6:])[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


def test_frontend_is_vggish_shaped():
    spec = train.LogMel()(torch.zeros(2, 16000))
    assert spec.shape == (2, 1, 96, 64)
    assert torch.allclose(spec, torch.log(torch.tensor(0.01)))  # log(mel + 0.01) of silence
    model = train.Encoder()
    assert model.net.conv1.in_channels == 1 and model.net.fc.out_features == 512


WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[1])
    import train
    g = torch.Generator().manual_seed(0)
    full_a, full_b = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    # single process, whole batch (before the process group exists: nothing to gather)
    fa, fb = full_a.clone().requires_grad_(), full_b.clone().requires_grad_()
    ref = train.contrastive_loss(fa, fb)[0]
    ref.backward()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    # this rank's half, uniformity over the gathered global batch
    sl = slice(rank * 4, rank * 4 + 4)
    la, lb = full_a[sl].clone().requires_grad_(), full_b[sl].clone().requires_grad_()
    loss, align, unif = train.contrastive_loss(la, lb)
    loss.backward()
    mean_align = align.detach().clone()
    dist.all_reduce(mean_align)
    global_loss = mean_align / world + unif.detach()
    assert torch.allclose(global_loss, ref.detach(), atol=1e-6), (global_loss, ref)
    # each rank's gradient is world x the single-process gradient, which DDP's averaging undoes
    assert torch.allclose(la.grad, world * fa.grad[sl], atol=1e-6)
    assert torch.allclose(lb.grad, world * fb.grad[sl], atol=1e-6)
    print(f"rank {rank} ok {global_loss.item():.6f} {ref.item():.6f}")
    dist.destroy_process_group()
""")


def torchrun(*args, **kw):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=600, **kw)


def test_two_process_loss_equals_one_process_loss_on_the_concatenated_batch(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    p = torchrun(worker, ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count(" ok ") == 2


def test_torchrun_two_processes_train_and_export(tmp_path):
    out = tmp_path / "ddp"
    p = torchrun("train.py", *TINY, "--epochs", "1", "--sounds-per-epoch", "24", "--out", out)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "DDP: 2 processes (gloo), each drawing its own batches" in p.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2 and config["global_batch"] == 8
    assert config["lr"] == pytest.approx(0.12 * 8 / 256)
    rows = (out / "log.csv").read_text().splitlines()
    assert rows[0] == "step,epoch,lr,loss,align,unif,val_align,val_unif,sounds_per_s"
    assert len(rows) == 1 + 2  # 24 * 0.9 // 8 = 2 steps, one logged each
    assert rows[-1].split(",")[6] != ""  # validation at the end of the epoch
    assert torch.jit.load(str(out / "encoder.pt"))(torch.zeros(1, 16000)).shape == (1, 512)


def test_resume_continues_exactly(tmp_path):
    run(ROOT / "train.py", *TINY, "--epochs", "1", "--max-steps", "4", "--out", tmp_path / "straight")
    run(ROOT / "train.py", *TINY, "--epochs", "1", "--max-steps", "2", "--out", tmp_path / "stopped")
    assert torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=False)["step"] == 2
    run(ROOT / "train.py", "--resume", tmp_path / "stopped", "--max-steps", "4")
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    log_a = (tmp_path / "straight" / "log.csv").read_text().splitlines()
    log_b = (tmp_path / "stopped" / "log.csv").read_text().splitlines()
    assert [r.split(",")[:6] for r in log_a] == [r.split(",")[:6] for r in log_b]  # same losses, no duplicate rows


def test_readout_fc_exports_the_trained_head(tmp_path):
    state = train.Encoder().state_dict()
    x = torch.randn(2, 16000)
    for readout in ("pool", "fc"):
        train.export_encoder(state, tmp_path / f"{readout}.pt", {"readout": readout})
    pool, fc = (torch.jit.load(str(tmp_path / f"{r}.pt")).eval() for r in ("pool", "fc"))
    model = train.Encoder().eval()
    model.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(fc(x), model(x))
        torch.testing.assert_close(model.net.fc(pool(x)), fc(x), rtol=1e-4, atol=1e-5)


def test_exported_encoder_loads_without_train_py(tmp_path):
    out = tmp_path / "random"
    run(ROOT / "train.py", "--epochs", "0", "--out", out)
    probe = textwrap.dedent(f"""
        import sys, torch, numpy as np
        enc = torch.jit.load({str(out / 'encoder.pt')!r})
        torch.manual_seed(1)
        xs = [torch.randn(2, T) for T in (8000, 16000, 80000)]
        with torch.no_grad():
            np.savez({str(tmp_path / 'emb.npz')!r}, *[enc(x).numpy() for x in xs])
        assert "train" not in sys.modules
    """)
    subprocess.run([sys.executable, "-c", probe], check=True, cwd=tmp_path, timeout=300)
    embs = np.load(tmp_path / "emb.npz")
    model = train.Encoder()
    model.load_state_dict(torch.load(out / "checkpoint.pt", weights_only=False)["model"])
    model.net.fc = torch.nn.Identity()  # the default readout: the pooled layer below the trained head
    model.eval()
    torch.manual_seed(1)
    for i, T in enumerate((8000, 16000, 80000)):
        x = torch.randn(2, T)
        assert embs[f"arr_{i}"].shape == (2, 512)
        with torch.no_grad():
            np.testing.assert_allclose(embs[f"arr_{i}"], model(x).numpy(), rtol=1e-4, atol=1e-4)
    # 5 s = the mean of five 1-s windows; 0.5 s = zero-padded to 1 s
    x = torch.randn(1, 80000)
    with torch.no_grad():
        windows = torch.stack([model.embed(x[:, i * 16000:(i + 1) * 16000]) for i in range(5)]).mean(0)
        torch.testing.assert_close(model(x), windows, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model(x[:, :8000]), model.embed(torch.nn.functional.pad(x[:, :8000], (0, 8000))))


def write_audio_folder(d):
    d.mkdir()
    (d / "sub").mkdir()
    t = np.arange(int(2.5 * 16000)) / 16000
    for i, f0 in enumerate((220, 330, 440, 550)):
        sf.write(d / f"tone{i}.wav", (0.5 * np.sin(2 * np.pi * f0 * t)).astype(np.float32), 16000)
    t44 = np.arange(int(1.5 * 44100)) / 44100
    stereo = np.stack([np.sin(2 * np.pi * 300 * t44), np.sin(2 * np.pi * 600 * t44)], axis=1) * 0.3
    sf.write(d / "sub" / "stereo44k.flac", stereo.astype(np.float32), 44100)
    sf.write(d / "short.wav", np.zeros(4000, np.float32), 16000)  # shorter than 1 s: zero-padded


@pytest.mark.parametrize("positives", ["jitter", "mix5", "aug"])
def test_real_audio_folder_trains(tmp_path, positives):
    write_audio_folder(tmp_path / "audio")
    source = train.RealAudio(str(tmp_path / "audio"), positives, 4, 0)
    assert len(source.info) == 6
    a, b = source.batch(0)
    assert a.shape == b.shape == (4, 16000) and np.isfinite(a).all() and np.abs(a).max() <= 1.0
    a2, _ = source.batch(0)
    np.testing.assert_array_equal(a, a2)  # a batch is a function of (seed, stream, rank, step)
    out = tmp_path / "run"
    run(ROOT / "train.py", "--data", tmp_path / "audio", "--positives", positives, "--batch-size", "4",
        "--epochs", "1", "--sounds-per-epoch", "10", "--out", out)
    assert (out / "encoder.pt").is_file()


def test_non_finite_loss_stops_with_a_clear_message(tmp_path):
    # t = 1e9 makes every uniformity term exp(-huge) = 0, so the loss is log(0) = -inf
    p = run(ROOT / "train.py", *TINY, "--epochs", "1", "--unif-t", "1e9", "--out", tmp_path / "r", check=False)
    assert p.returncode == 1 and "non-finite loss at step 0" in p.stderr
    assert not (tmp_path / "r" / "checkpoint.pt").exists() and not (tmp_path / "r" / "encoder.pt").exists()


@pytest.mark.parametrize("args,needle", [
    (["--synth", "nope"], "unknown synth"),
    (["--delta", "-1"], "--delta"),
    (["--batch-size", "1"], "--batch-size"),
    (["--data", "/nonexistent/folder"], "not a folder"),
    (["--data", "EMPTY"], "no audio files"),
    (["--data", "BROKEN"], "unreadable audio file"),
    (["--resume", "/nonexistent/run"], "no checkpoint"),
    (["--aug", "--ir-dir", "/nonexistent/irs"], "--ir-dir /nonexistent/irs does not exist"),
    (["--epochs", "-1"], "--epochs"),
    (["--device", "cuda"], "no GPU"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, args, needle):
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.wav").write_bytes(b"RIFF not really a wav")
    args = [{"EMPTY": tmp_path / "empty", "BROKEN": tmp_path / "broken"}.get(a, a) for a in args]
    p = run_here(ROOT / "train.py", "--out", tmp_path / "out", *args)
    assert needle in assert_one_line_error(p)


def test_refuses_to_overwrite_a_run(random_run):
    before = (random_run / "checkpoint.pt").read_bytes()
    p = run(ROOT / "train.py", "--epochs", "0", "--out", random_run, check=False)
    assert "already holds a run" in assert_one_line_error(p)
    assert (random_run / "checkpoint.pt").read_bytes() == before


def test_learning_rate_is_the_papers_multistep_schedule():
    args, _ = train.parse_args(["--lr", "0.72", "--epochs", "200"])
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.72)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[155, 170, 185], gamma=0.1)  # 77.5/85/92.5 %
    for epoch in range(200):
        assert train.learning_rate(epoch, args) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12), epoch
        opt.step()
        sched.step()


def test_loss_flags_take_wang_and_isola_names_and_not_the_old_ones():
    args, given = train.parse_args(["--align-alpha", "1", "--unif-t", "3", "--align-w", "0.5", "--unif-w", "2"])
    assert (args.align_alpha, args.unif_t, args.align_w, args.unif_w) == (1, 3, 0.5, 2)
    assert {"align_alpha", "unif_t", "align_w", "unif_w"} <= given
    for old in ("--alpha", "--t", "--lam-align", "--lam-unif"):  # this project's earlier names are gone
        p = run_here(ROOT / "train.py", old, "1")
        assert f"unrecognized arguments: {old} 1" in assert_one_line_error(p)


def test_augmentation_library_is_imported_only_when_asked_for():
    code = "import sys, train; assert 'torch_audiomentations' not in sys.modules; train.make_augment(); " \
           "assert 'torch_audiomentations' in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=300)


RECIPE = ["--keep", "pitch", "--delta-group", "vco_1=0.1", "--delta-schedule", "0.05"]


def test_recipe_is_recorded_and_a_resumed_run_keeps_it(tmp_path):
    # 36 training pairs / 4 = 9 steps per epoch, 2 epochs: delta ramps from 0.05 at step 0 to 0.25 at step 17
    run(ROOT / "train.py", *TINY, *RECIPE, "--epochs", "2", "--max-steps", "3", "--out", tmp_path / "straight")
    run(ROOT / "train.py", *TINY, *RECIPE, "--epochs", "2", "--max-steps", "2", "--out", tmp_path / "stopped")
    config = json.loads((tmp_path / "stopped" / "config.json").read_text())
    assert config["keep"] == ["pitch"] and config["delta_group"] == ["vco_1=0.1"] and config["delta_schedule"] == 0.05
    assert config["delta_schedule_steps"] == 18
    # the run's own recipe wins over flags given on --resume, and more epochs do not stretch the ramp
    run(ROOT / "train.py", "--resume", tmp_path / "stopped", "--max-steps", "3", "--epochs", "3",
        "--keep", "nope", "--delta-group", "keyboard=0", "--delta-schedule", "0.2", "--noise-curve")
    resumed = json.loads((tmp_path / "stopped" / "config.json").read_text())
    recipe = ("keep", "delta_group", "delta_schedule", "delta_schedule_steps", "noise_curve")
    assert {k: resumed[k] for k in recipe} == {k: config[k] for k in recipe} and resumed["noise_curve"] is False
    assert resumed["epochs"] == 3
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 3
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    # the sampler train.py builds from this config: START at step 0, --delta at the last step, pitch kept
    import generate
    s = generate.PairSampler("voice", config["delta"], 2, delta_group=config["delta_group"], keep=config["keep"],
                             delta_schedule=(config["delta_schedule"], config["delta_schedule_steps"]))
    first, last = s.delta_at(0), s.delta_at(17)
    other = s.columns["lfo_1.frequency"]
    assert first[other] == np.float32(0.05) and last[other] == np.float32(0.25)
    assert last[s.columns["vco_1.mod_depth"]] == np.float32(0.1) and last[s.kept_columns("pitch")].max() == 0


def test_resume_of_a_run_from_before_the_recipe_flags_is_refused():
    args, given = train.parse_args(["--resume", "runs/old", "--keep", "pitch", "--delta-schedule", "0.1"])
    old = {"synth": "voice", "delta": 0.25, "epochs": 4}  # config.json written before these flags existed
    with pytest.raises(ValueError, match=r"runs/old is a run of an earlier train.py \(its config has no .*delta_group"):
        train.resumed_args(args, given, old)  # today's flags would silently fill the gaps in its recipe


@pytest.mark.parametrize("args,needle", [
    (["--delta-group", "nope=0.1"], "unknown --delta-group name 'nope' for voice"),
    (["--delta-group", "keyboard=-1"], "NAME=VALUE"),
    (["--keep", "tone"], "choose from pitch"),
    (["--delta-schedule", "-0.1"], "--delta-schedule"),
    (["--delta", "0", "--delta-schedule", "0.1"], "--delta > 0"),
    (["--data", "DATA", "--keep", "pitch"], "not --data"),
    (["--data", "DATA", "--noise-curve"], "not --data"),
    (["--keep", "pitch", "--keep", "pitch-modulation"], "choose from pitch, pitch-mod"),
])
def test_bad_recipe_is_one_line_exit_2(tmp_path, args, needle):
    args = [str(tmp_path) if a == "DATA" else a for a in args]
    p = run_here(ROOT / "train.py", "--out", tmp_path / "out", *args)
    assert needle in assert_one_line_error(p)
    assert not (tmp_path / "out").exists()


def test_each_rank_synthesizes_on_its_own_gpu_and_on_the_cpu_without_one():
    import types
    import generate
    gpu = [types.SimpleNamespace(platform="gpu", id=i) for i in range(2)]
    assert generate.synthesis_device(0, gpu) is gpu[0] and generate.synthesis_device(1, gpu) is gpu[1]
    assert generate.synthesis_device(3, gpu) is gpu[1]  # more ranks than GPUs: wrap around, never all on 0
    cpu = generate.synthesis_device(1)  # JAX here has no GPU plugin
    assert cpu.platform == "cpu"
    s = generate.PairSampler("voice", 0.25, 2, seconds=0.1, device=cpu)
    a, b = s.batch(0)
    assert a.shape == (2, 1600) and not np.allclose(a, b)


def test_precision_is_chosen_by_the_hardware_and_recorded(tmp_path):
    native = train.native_bf16(torch.device("cpu"))
    assert isinstance(native, bool)
    p = run(ROOT / "train.py", *TINY, "--epochs", "1", "--max-steps", "1", "--out", tmp_path / "auto")
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["precision"] == ("bf16" if native else "fp32")
    assert ("bf16" if native else "fp32") in p.stdout.splitlines()[0]
    run(ROOT / "train.py", *TINY, "--epochs", "1", "--max-steps", "1", "--amp", "off", "--out", tmp_path / "off")
    assert json.loads((tmp_path / "off" / "config.json").read_text())["precision"] == "fp32"
    p = run(ROOT / "train.py", *TINY, "--epochs", "1", "--max-steps", "1", "--amp", "fp16", "--out", tmp_path / "fp16")
    assert json.loads((tmp_path / "fp16" / "config.json").read_text())["precision"] == "fp16"
    assert "fp16" in p.stdout.splitlines()[0]


@pytest.mark.parametrize("device,native,expected", [("cuda", True, "bf16"), ("cuda", False, "fp16"),
                                                    ("cpu", True, "bf16"), ("cpu", False, "fp32")])
def test_auto_precision_per_hardware(monkeypatch, device, native, expected):
    """Ampere+ GPUs and CPUs with AMX / AVX512-BF16 get bf16, older GPUs (V100, T4) fp16, other CPUs fp32."""
    monkeypatch.setattr(train, "native_bf16", lambda d: native)
    assert train.choose_precision("auto", torch.device(device)) == expected
    assert [train.choose_precision(a, torch.device(device)) for a in ("bf16", "fp16", "off")] == ["bf16", "fp16", "fp32"]


def test_fp16_skips_a_step_whose_scaled_gradients_overflow_instead_of_stopping(tmp_path):
    """Loss weights of 1e4 overflow fp16's scaled gradients: the scaler skips those steps and halves its scale; the
    loss itself (float32) is finite, so the run goes on, and the scale it reached is in the checkpoint."""
    p = run(ROOT / "train.py", *TINY, "--epochs", "1", "--amp", "fp16", "--align-w", "1e4", "--unif-w", "1e4",
            "--out", tmp_path / "run")
    assert "non-finite" not in p.stderr
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == ckpt["config"]["steps_per_epoch"] and ckpt["scaler"]["scale"] < 65536.0  # halved per skip


def test_benchmark_prints_each_precision_beside_the_overlap_bound():
    p = run(ROOT / "train.py", "--benchmark", "--batch-size", "4", "--benchmark-steps", "1", "--amp", "off")
    row = next(l for l in p.stdout.splitlines() if l.startswith("fp32"))
    pre, fly, bound, ratio = map(float, row.split()[1:])
    synth = float(next(l for l in p.stdout.splitlines() if l.startswith("synthesis alone")).split()[2])
    # pre, synth and bound are each printed rounded to 0.1 sounds/s: the bound recomputed from the rounded
    # inputs can be off by 0.05 * ((b/pre)^2 + (b/synth)^2 + 1) <= 0.15 (CI once saw 33.5 against 33.57)
    b = 1 / (1 / pre + 1 / synth)
    assert bound == pytest.approx(b, abs=0.05 * ((b / pre) ** 2 + (b / synth) ** 2 + 1) + 1e-9) and ratio == pytest.approx(fly / bound, rel=0.1)
    assert "bf16" not in p.stdout.split("sounds/s", 1)[1].split("default precision")[0]  # --amp off: fp32 only


def test_benchmark_prints_an_fp16_row_when_asked():
    p = run(ROOT / "train.py", "--benchmark", "--batch-size", "4", "--benchmark-steps", "1", "--amp", "fp16")
    rows = [l.split()[0] for l in p.stdout.split("sounds/s", 1)[1].splitlines() if l[:4] in ("fp32", "bf16", "fp16")]
    assert rows[0] == "fp32" and rows[-1] == "fp16" and "fp16 / fp32 on the fly" in p.stdout
    assert "default precision here (--amp fp16): fp16" in p.stdout
