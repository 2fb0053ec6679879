"""The `slide` command: its first line shows the resolved settings, and eval / predict say which mode answered."""

from __future__ import annotations

import json

import pytest

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


def test_train_reads_a_toml_file_of_groups_and_flags_over_it(tmp_path, capsys):
    """`--config file.toml` takes one table per settings group (run-level settings at the top), "auto" for null;
    a flag overrides the file. A file in the previous release's flat form still loads, a note per old name."""
    from engine.cli import build_config, make_parser
    from engine.config import ModelConfig, PredictConfig, SamplingConfig, ScheduleConfig, SlideConfig

    grouped = tmp_path / "grouped.toml"
    grouped.write_text(
        'seed = 7\n[model]\nhidden = [64, 32]\n[sampling]\nhash_l = 24\nhash_k = "auto"\nrebuild_every = "never"\n'
        '[schedule]\nepochs = 4\nearly_stop_patience = "never"\n[predict]\nhubs = "none"\n'
    )
    args = ["train", "--train", "t.txt", "--out", "m", "--config", str(grouped)]
    config = build_config(make_parser().parse_args([*args, "--epochs", "6", "--predict-probes", "2"]))
    assert config == SlideConfig(
        model=ModelConfig(hidden=(64, 32)),
        sampling=SamplingConfig(hash_l=24, hash_k=None, rebuild_every="never"),
        schedule=ScheduleConfig(epochs=6, early_stop_patience="never"),
        predict=PredictConfig(hubs="none", probes=2),
        seed=7,
    )
    assert capsys.readouterr().err == ""

    flat = tmp_path / "flat.toml"
    flat.write_text('seed = 7\nhidden = [64, 32]\nhash_l = 24\nearly_stop_patience = 0\npredict_hubs = "none"\n')
    old = build_config(make_parser().parse_args(["train", "--train", "t.txt", "--out", "m", "--config", str(flat)]))
    assert old == SlideConfig(
        model=ModelConfig(hidden=(64, 32)),
        sampling=SamplingConfig(hash_l=24),
        schedule=ScheduleConfig(early_stop_patience="never"),
        predict=PredictConfig(hubs="none"),
        seed=7,
    )
    err = capsys.readouterr().err
    assert f"slide: {flat}: hash_l is deprecated and will be refused in a later release; use sampling.hash_l" in err
    assert "schedule.early_stop_patience: 0 is deprecated" in err and "predict_hubs is deprecated" in err


def test_train_help_lists_the_flags_by_settings_group_with_their_paths(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    sampling = text.index("sampling settings (--config table [sampling]")
    assert text.index("model settings") < sampling < text.index("--hash-l N|auto sampling.hash_l; default auto")
    assert "--predict-hubs N|auto|none predict.hubs; default auto" in text[text.index("predict settings") :]
    assert "--early-stop-patience N|never schedule.early_stop_patience; default 3" in text
