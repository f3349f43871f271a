"""`difflab eval` and evaluation during training, end to end on the bundled digits (domain features)."""

from __future__ import annotations

import json

import pytest

import difflab
from difflab.cli import main
from difflab.evaluation import evaluate

TINY = dict(batch_size=32, sample_every=0, num_samples=4, sample_steps=2, model={"base_channels": 16}, progress=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_runs")
    return difflab.train(steps=40, out=str(out), eval_every=20, eval_samples=64, eval_metrics="fid,pr", **TINY)


def test_training_logs_and_plots_metrics(run):
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_fid" in r]
    assert [r["step"] for r in evals] == [20, 40]
    assert all(r["eval_fid"] > 0 and 0 <= r["eval_precision"] <= 1 for r in evals)
    assert (run / "loss.png").is_file()


def test_real_vs_real_is_perfect_and_a_model_is_worse(run):
    same = evaluate("digits", "digits", n=300, metrics=("fid", "kid", "pr"), progress=False)
    assert same["features"] == "domain-digits" and not same["comparable_to_papers"]
    assert abs(same["fid"]) < 1e-6 and same["precision"] == 1.0 and same["recall"] == 1.0
    model = evaluate("digits", str(run), n=100, metrics=("fid", "pr"), sampler="ddim", steps=5, progress=False)
    assert model["fid"] > 1.0  # 40 steps of a tiny model are far from the data
    assert model["fake"]["nfe"] == 5


def test_cli_eval_table_json_and_saved_reference(run, tmp_path, capsys):
    ref = tmp_path / "digits.safetensors"
    out = tmp_path / "result.json"
    argv = ["eval", "--real", "digits", "--fake", str(run), "-n", "64", "--steps", "4", "--metrics", "fid,kid,is,pr",
            "--save-reference", str(ref), "--json", str(out), "--quiet"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "FID" in text and "KID" in text and "Inception Score" in text and "precision / recall" in text
    first = json.loads(out.read_text())
    assert ref.is_file()
    assert main(["eval", "--real", str(ref), "--fake", str(run), "-n", "64", "--steps", "4", "--metrics", "fid",
                 "--json", str(out), "--quiet"]) == 0
    assert json.loads(out.read_text())["fid"] == pytest.approx(first["fid"], rel=1e-6)


def test_eval_bad_input_is_one_line(run, capsys):
    for argv, fragment in ((["eval", "--real", "digits", "--fake", str(run), "--metrics", "fid,bleu"], "bleu"),
                           (["eval", "--real", "digits", "--fake", str(run), "--features", "vgg"], "vgg"),
                           (["eval", "--real", "nowhere", "--fake", str(run), "-n", "8", "--steps", "2"], "nowhere")):
        assert main(argv + ["--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("difflab: error:") and fragment in err, err
