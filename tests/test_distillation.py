"""difflab distill end to end on the digits: each progressive stage beats the teacher's DDIM at the same steps, a
run resumes mid-stage bit-identically, distilled models sample with their own settings, and bad input is one line."""

import json
import shutil
import warnings

import pytest
import torch

import difflab
from difflab.cli import main
from difflab.denoisers import ConsistencyParameterization
from difflab.devices import autocast
from difflab.training.checkpoint import list_checkpoints, load_tensors

FAST = dict(batch_size=64, log_every=10, sample_every=0, num_samples=8, progress=False)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A v-prediction tiny U-Net, 400 steps on the digits (about 30 s on 2 cores)."""
    return difflab.train(steps=400, prediction="v", checkpoint_every=1000, sample_steps=8,
                         out=str(tmp_path_factory.mktemp("teacher")), name="digits", **FAST)


@pytest.fixture(scope="module")
def progressive(teacher, tmp_path_factory):
    """16 -> 8 -> 4 DDIM steps, 120 updates per halving (about 40 s)."""
    return difflab.distill(teacher, from_steps=16, to_steps=4, updates=120, lr=5e-4,
                           out=str(tmp_path_factory.mktemp("student")), **FAST)


def _ddim(model, steps, n=256):
    with autocast(model.device):
        return difflab.generate(model, n, sampler="ddim", steps=steps, spacing="trailing", seed=7)


def test_each_stage_is_closer_to_the_teachers_2k_steps_than_the_teachers_k_steps(teacher, progressive):
    model = difflab.load_model(teacher, device="cpu")
    for k in (8, 4):
        stage = progressive / f"stage_{k}_steps"
        student = difflab.load_model(stage, device="cpu")
        assert student.distillation["steps"] == k and student.distillation["method"] == "progressive"
        assert student.parameterization.prediction == "v" and (stage / "samples.png").is_file()
        with autocast(student.device):
            mine = difflab.generate(student, 256, seed=7)  # its own settings: DDIM, k steps, trailing grid
        reference, teachers_k = _ddim(model, 2 * k), _ddim(model, k)
        student_error = (mine - reference).square().mean().item()
        teacher_error = (teachers_k - reference).square().mean().item()
        assert student_error < 0.7 * teacher_error, (k, student_error, teacher_error)
    rows = [json.loads(line) for line in (progressive / "log.jsonl").read_text().splitlines()]
    assert [r["student_steps"] for r in rows if "student_steps" in r][::12] == [8.0, 4.0]  # stage boundaries in the log
    config = json.loads((progressive / "config.json").read_text())
    assert config["task"] == "distill" and config["run"]["steps"] == 240 and config["run"]["dataset"] == "digits"


def test_the_run_samples_at_its_distilled_step_count_and_warns_otherwise(progressive, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # its own settings: no warning
        assert main(["sample", str(progressive), "-n", "4", "--quiet", "--out", str(progressive / "gen")]) == 0
    assert "4 network evaluations" in capsys.readouterr().out
    with pytest.warns(UserWarning, match=r"distilled for ddim with 4 step\(s\).*each step replaces 4 of its teacher's"):
        assert main(["sample", str(progressive), "-n", "4", "--steps", "50", "--quiet", "--out",
                     str(progressive / "gen")]) == 0
    assert warnings.formatwarning("text", UserWarning, "f.py", 1) == "warning: text\n"  # one line on the CLI


def test_progressive_resumes_mid_stage_bit_identically(teacher, tmp_path):
    """A run of 3 stages (x0 student: a v -> x0 conversion first) is cut back to a checkpoint in the middle of
    stage 2 -- its later checkpoints and stage folders deleted, as if it had stopped there -- and resumed."""
    settings = dict(from_steps=16, to_steps=4, updates=4, student_prediction="x0", checkpoint_every=2, keep=0, **FAST)
    full = difflab.distill(teacher, out=str(tmp_path), name="full", **settings)
    assert [s.name for s in sorted(full.glob("stage_*"))] == ["stage_16_steps", "stage_4_steps", "stage_8_steps"]
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    for checkpoint in list_checkpoints(cut):
        if int(checkpoint.name.split("_")[1]) > 6:
            shutil.rmtree(checkpoint)
    for stage in ("stage_8_steps", "stage_4_steps"):
        shutil.rmtree(cut / stage)
    assert (cut / "checkpoints" / "step_0000006" / "teacher.safetensors").is_file()  # stage 2's teacher travels along
    shutil.rmtree(cut / "stage_16_steps")  # so the resumed run needs no stage folder
    difflab.distill(resume=cut, progress=False)
    for part in ("checkpoints/step_0000012", "stage_8_steps", "stage_4_steps"):
        for weights in ("model.safetensors", "ema.safetensors"):
            a, b = load_tensors(full / part / weights), load_tensors(cut / part / weights)
            assert all(torch.equal(a[k], b[k]) for k in a), (part, weights)
    assert json.loads((cut / "stage_4_steps" / "config.json").read_text())["parameterization"]["prediction"] == "x0"


def test_consistency_distillation_resumes_exactly_and_keeps_its_boundary(teacher, tmp_path):
    settings = dict(method="consistency", updates=4, convert_updates=2, grid_points=6, checkpoint_every=3, keep=0,
                    **FAST)
    full = difflab.distill(teacher, out=str(tmp_path), name="full", **settings)  # v teacher: no conversion stage
    assert json.loads((full / "config.json").read_text())["run"]["steps"] == 4
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(list_checkpoints(cut)[-1])  # back to step 3
    shutil.rmtree(cut / "stage_consistency")
    difflab.distill(resume=cut, progress=False)
    for weights in ("model.safetensors", "ema.safetensors", "ema_target.safetensors"):
        a, b = (load_tensors(run / "checkpoints" / "step_0000004" / weights) for run in (full, cut))
        assert all(torch.equal(a[k], b[k]) for k in a), weights
    model = difflab.load_model(full, device="cpu")
    assert isinstance(model.parameterization, ConsistencyParameterization)
    assert model.sampling() == ("consistency", 1, "trailing")
    x = torch.randn(3, 1, 8, 8) * 2
    with torch.no_grad():
        assert torch.equal(model.denoiser(x, torch.full((3,), model.parameterization.sigma_min)), x)
    stats = {}
    images = difflab.generate(model, 4, stats=stats)
    assert images.shape == (4, 1, 8, 8) and stats["nfe"] == 1
    two = difflab.generate(model, 4, sigmas=[model.parameterization.sigma_max, 2.0], stats=stats)
    assert stats["nfe"] == 2 and not torch.equal(two, images)


def test_consistency_from_an_eps_teacher_converts_to_v_first(tmp_path):
    eps = difflab.train(steps=2, out=str(tmp_path), name="eps", **FAST)
    run = difflab.distill(eps, method="consistency", updates=2, convert_updates=2, grid_points=4, out=str(tmp_path),
                          **FAST)
    assert run.name == "eps-consistency"
    conversion = difflab.load_model(run / "stage_conversion", device="cpu")
    assert conversion.parameterization.prediction == "v" and conversion.distillation["method"] == "conversion"
    final = difflab.load_model(run, device="cpu")
    assert final.parameterization.base.prediction == "v"


def test_the_consistency_sampler_is_listed(capsys):
    assert main(["samplers"]) == 0
    assert "consistency" in capsys.readouterr().out


def _fake_checkpoint(folder, config):
    folder.mkdir(parents=True)
    for name in ("model.safetensors", "ema.safetensors"):
        (folder / name).write_bytes(b"")
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_bad_input_is_one_line(teacher, tmp_path, one_line):
    t = str(teacher)
    one_line(["distill", "--out", str(tmp_path)], "give the teacher")
    clf = _fake_checkpoint(tmp_path / "clf", {"format": "difflab-classifier-2"})
    one_line(["distill", str(clf), "--out", str(tmp_path)], "noise-aware classifier", "difflab train")
    vae = _fake_checkpoint(tmp_path / "vae", {"format": "difflab-vae-1"})
    one_line(["distill", str(vae), "--out", str(tmp_path)], "autoencoder")
    one_line(["distill", t, "--to-steps", "3", "--from-steps", "64", "--out", str(tmp_path)],
             "--to-steps 3 cannot be reached by halving from --from-steps 64")
    one_line(["distill", t, "--to-steps", "4", "--from-steps", "4", "--out", str(tmp_path)], "halving")
    one_line(["distill", t, "--steps", "100", "--out", str(tmp_path)], "--steps is set by")
    one_line(["distill", t, "--guidance-scale", "3", "--out", str(tmp_path)], "unconditional")
    one_line(["distill", t, "--method", "distil", "--out", str(tmp_path)], "--method must be one of")
    one_line(["distill", t, "--student-prediction", "eps", "--out", str(tmp_path)], "v or x0")
    one_line(["distill", str(tmp_path / "nowhere"), "--out", str(tmp_path)], "no run or checkpoint")
    run = difflab.distill(teacher, from_steps=8, to_steps=4, updates=1, out=str(tmp_path), name="short", **FAST)
    one_line(["distill", "--resume", str(run), "--method", "consistency"], "cannot change method")
    one_line(["sample", str(run), "--sigmas", "1,2", "--quiet"], "--sigmas must be strictly decreasing")
    one_line(["sample", str(run), "--sigmas", "1,x", "--quiet"], "comma-separated numbers")
    one_line(["distill", str(run), "--out", str(tmp_path)], "trained by 'distill'")
    one_line(["sample", str(run), "--sigmas", "80,0.001", "--quiet"], "within the model's noise levels")
    one_line(["sample", str(run), "--sigmas", "80,1", "--steps", "2", "--quiet"], "leave out --steps")
    one_line(["distill", t, "--lr-schedule", "cosine", "--out", str(tmp_path)], "constant rate")
    no_null = difflab.train(steps=1, conditional=True, label_dropout=0.0, out=str(tmp_path), name="nonull", **FAST)
    one_line(["distill", str(no_null), "--guidance-scale", "3", "--out", str(tmp_path)], "untrained")
    with pytest.warns(UserWarning, match="and eta 0.5 uses it where it was not trained"):
        difflab.sample(run, 1, eta=0.5)
