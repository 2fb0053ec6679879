"""The `slide` command: its first line shows the resolved settings, and eval / predict say which mode answered."""

from __future__ import annotations

import json

from engine.cli import main
from engine.synth import generate_to_files


def lines(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_train_eval_predict_report_resolutions_and_modes(tmp_path, capsys):
    train, test = generate_to_files("tiny", tmp_path / "data", seed=0, num_train=1200, num_test=100)
    model = str(tmp_path / "model")
    args = ["train", "--train", str(train), "--test", str(test), "--out", model, "--quiet"]
    assert main([*args, "--epochs", "2", "--hidden", "16", "--seed", "1", "--sample-output", "true"]) == 0
    out = lines(capsys)
    resolved = out[0]["resolved"]
    assert (
        resolved["val_points"] == 120 and resolved["train_points"] == 1080 and resolved["layers"]["1"]["hash_l"] == 50
    )
    assert resolved["sample_output"] is True
    assert out[-1]["done"] and out[-1]["served_step"] >= 1 and out[-1]["eval_mode"] == "exact"
    assert [r["epoch"] for r in out if "val_p_at_1" in r] == [1, 2]

    assert main(["eval", "--model", model, "--test", str(test)]) == 0
    auto = lines(capsys)[-1]
    assert auto["mode"] == "exact" and auto["requested_mode"] == "auto"
    assert main(["eval", "--model", model, "--test", str(test), "--mode", "lsh", "--recall"]) == 0
    sampled = lines(capsys)[-1]
    assert sampled["mode"] == "lsh" and 0 < sampled["recall_at_5_vs_exact"] <= 1
    assert main(["eval", "--model", model, "--test", str(test), "--mode", "exact"]) == 0
    assert lines(capsys)[-1]["p_at_1"] == auto["p_at_1"]

    assert main(["predict", "--model", model, "--input", str(test), "--k", "3"]) == 0
    predictions = lines(capsys)
    assert len(predictions) == 100 and {p["mode"] for p in predictions} == {"exact"}
    assert all(len(p["labels"]) == 3 for p in predictions)
