"""The `stadapter` command line: help, bad input (exit code 2, a message naming the problem),
and a train -> eval round trip from a YAML config on mp4 files."""

from __future__ import annotations

import json

import pytest


from test_train import TINY_VIT, write_tiny_videos

from stadapter.cli import main


def run_cli(argv, capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    return write_tiny_videos(tmp_path_factory.mktemp("cli_digits"))


def write_yaml(path, train_dir, test_dir, output_dir, **extra) -> str:
    import yaml

    settings = {"train-data": train_dir, "val_data": test_dir, "backbone": "vit_tiny_patch16_224",
                "backbone_kwargs": TINY_VIT, "num_frames": 4, "crop_size": 32, "train_scale": [32, 32],
                "bottleneck": 8, "batch_size": 2, "num_workers": 0, "epochs": 1, "output_dir": str(output_dir),
                "progress": False, "threads": 1, "log_every": 1, **extra}
    path.write_text(yaml.safe_dump(settings))
    return str(path)


@pytest.mark.parametrize("command", ["", "bench", "train", "eval", "demo"])
def test_help(command, capsys):
    code, out, _ = run_cli([command, "--help"] if command else ["--help"], capsys)
    assert code == 0 and "usage:" in out
    if command == "train":
        assert "--train-data" in out and "--num-temporal-views" in out and "--config" in out


def test_bad_input_exits_2_with_a_message(videos, tmp_path, capsys):
    code, _, err = run_cli(["frobnicate"], capsys)
    assert code == 2 and "invalid choice: 'frobnicate'" in err
    code, _, err = run_cli(["train", "--bogus-flag", "1"], capsys)
    assert code == 2 and "unrecognized arguments: --bogus-flag" in err
    code, _, err = run_cli(["train", "--batch-size", "many"], capsys)
    assert code == 2 and "--batch-size" in err and "invalid int value" in err
    code, _, err = run_cli(["train", "--train-data", str(tmp_path / "missing.txt")], capsys)
    assert code == 2 and "train_data: no such file or folder" in err and "missing.txt" in err
    code, _, err = run_cli(["train"], capsys)
    assert code == 2 and "train_data is required" in err
    bad_key = write_yaml(tmp_path / "bad_key.yaml", *videos, tmp_path / "out", learning_rat=0.1)
    code, _, err = run_cli(["train", "--config", bad_key], capsys)
    assert code == 2 and "unknown key 'learning_rat'" in err and "bad_key.yaml" in err
    bad_value = write_yaml(tmp_path / "bad_value.yaml", *videos, tmp_path / "out", amp="half")
    code, _, err = run_cli(["train", "--config", bad_value], capsys)
    assert code == 2 and "amp must be one of" in err
    (tmp_path / "list.txt").write_text("clip.mp4 zero\n")
    code, _, err = run_cli(["train", "--train-data", str(tmp_path / "list.txt")], capsys)
    assert code == 2 and "list.txt:1" in err
    code, _, err = run_cli(["eval", "--checkpoint", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and "nowhere" in err


def test_train_then_eval_from_a_yaml_config(videos, tmp_path, capsys):
    output = tmp_path / "run"
    config = write_yaml(tmp_path / "run.yaml", *videos, output, epochs=5)
    code, out, err = run_cli(["train", "--config", config, "--max-steps", "2"], capsys)  # the flag wins
    assert code == 0, err
    assert "trained 2 steps" in out and "clips/s" in out and "peak RSS" in out
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2]
    assert {"loss", "lr", "clips_per_s", "skipped_videos"} <= set(records[0])
    result_file = tmp_path / "eval.json"
    code, out, err = run_cli(["eval", "--checkpoint", str(output), "--num-temporal-views", "2",
                              "--json", str(result_file)], capsys)
    assert code == 0, err
    result = json.loads(result_file.read_text())
    assert result["views"] == 2 and result["videos"] == 4 and 0 <= result["top1"] <= 100
    assert result["checkpoint"].endswith("step-00000002") and "top-1" in out
    # A damaged checkpoint named by --resume is refused with the reason.
    newest = output / "checkpoints" / "step-00000002"
    (newest / "train_state.pt").write_bytes(b"")
    code, _, err = run_cli(["train", "--config", config, "--resume", str(newest)], capsys)
    assert code == 2 and "step-00000002: train_state.pt is 0 bytes" in err
