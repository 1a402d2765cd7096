"""Meta-training, checkpoints and resume, episodic evaluation with its CI, and the CLI, on a few
tiny moving-digits mp4 files and tiny random backbones."""

import json
import math

import pytest
import timm
import torch

from stadapter import add_st_adapters
from stadapter.data import ClipConfig, VideoDataset
from stadapter.demo.digits import MotionClass, write_moving_digits
from stadapter.fewshot.cli import main
from stadapter.fewshot.episodes import Split
from stadapter.fewshot.model import MACLIP, FramePrototypes
from stadapter.fewshot.train import (TrainConfig, confidence_interval, evaluate, load_tunable, meta_train,
                                     save_checkpoint, video_features)

FRAMES, SIZE = 4, 32
BACKBONE_KWARGS = {"img_size": SIZE, "patch_size": 16, "embed_dim": 32, "depth": 1, "num_heads": 2}


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    classes = [MotionClass(m, d) for d in (1, 2) for m in ("left", "right", "up")]
    samples = write_moving_digits(str(root), classes, 3, num_frames=FRAMES, size=SIZE, seed=0)
    split = Split.from_pairs([(path, classes[label].name) for path, label in samples])
    clip = ClipConfig(num_frames=FRAMES, crop_size=SIZE, train_scale=(SIZE, SIZE), flip=False)
    return root, split, VideoDataset(split.samples(), clip=clip, train=True, class_names=split.class_names)


def tiny_backbone():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **BACKBONE_KWARGS).eval()


def maclip():
    return MACLIP(tiny_backbone(), text_dim=8, tpcm_heads=2, tpcm_hidden=16)


def text_table(split):
    return torch.randn(len(split.class_names), 8, generator=torch.Generator().manual_seed(0))


CONFIG = TrainConfig(way=3, shot=1, queries=1, episodes=4, warmup=1, log_every=2, checkpoint_every=2)


def test_meta_train_writes_metrics_and_a_tunable_only_checkpoint(videos, tmp_path):
    _, split, data = videos
    model = maclip()
    summary = meta_train(model, data, text_table(split), CONFIG, out_dir=str(tmp_path), progress=False)
    assert summary["episodes"] == 4 and summary["episodes_per_second"] > 0 and math.isfinite(summary["loss"])
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["episode"] for r in records] == [2, 4]
    assert all(math.isfinite(r["loss"]) and 0 <= r["train_acc"] <= 1 for r in records)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "tunable.safetensors"))
    assert set(saved) == set(model.tunable_parameters())
    assert not any(name.startswith("backbone.") for name in saved)
    fresh = maclip()
    load_tunable(str(tmp_path), fresh)
    for name, p in fresh.tunable_parameters().items():
        torch.testing.assert_close(p, model.tunable_parameters()[name])


def test_meta_train_resume_matches_uninterrupted(videos, tmp_path):
    _, split, data = videos
    text = text_table(split)
    torch.manual_seed(0)
    straight = maclip()
    torch.manual_seed(1)
    meta_train(straight, data, text, CONFIG, progress=False)

    class Stop(Exception):
        pass

    torch.manual_seed(0)
    interrupted = maclip()
    torch.manual_seed(1)
    original_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def step_then_crash(self, *args, **kwargs):
        if calls["n"] == 3:  # the checkpoint of episode 2 exists; episode 3's update never lands
            raise Stop
        calls["n"] += 1
        return original_step(self, *args, **kwargs)

    torch.optim.AdamW.step = step_then_crash
    try:
        with pytest.raises(Stop):
            meta_train(interrupted, data, text, CONFIG, out_dir=str(tmp_path), progress=False)
    finally:
        torch.optim.AdamW.step = original_step
    assert json.loads((tmp_path / "state.json").read_text())["episode"] == 2
    torch.manual_seed(0)
    resumed = maclip()
    summary = meta_train(resumed, data, text, CONFIG, out_dir=str(tmp_path), resume=True, progress=False)
    assert summary["episodes"] == 2
    for name, p in resumed.tunable_parameters().items():
        torch.testing.assert_close(p, straight.tunable_parameters()[name], msg=lambda m: f"{name}: {m}")


def test_resume_without_checkpoint_is_a_clear_error(videos, tmp_path):
    _, split, data = videos
    with pytest.raises(FileNotFoundError, match="resume needs a checkpoint"):
        meta_train(maclip(), data, text_table(split), CONFIG, out_dir=str(tmp_path), resume=True)


def test_load_tunable_names_mismatches(tmp_path):
    save_checkpoint(str(tmp_path), maclip())
    other = MACLIP(tiny_backbone(), text_dim=8, tpcm_heads=2, tpcm_hidden=16, metric="trx",
                   metric_options={"hidden": 8})
    with pytest.raises(ValueError, match="does not fit the model: missing \\['metric"):
        load_tunable(str(tmp_path), other)


def test_evaluate_matches_full_episode_forwards(videos):
    """Per-video features computed once give the same predictions as whole-episode forwards."""
    _, split, data = videos
    test = VideoDataset(split.samples(), clip=data.clip, train=False, class_names=split.class_names)
    text = text_table(split)
    torch.manual_seed(0)
    model = maclip().eval()
    result = evaluate(model, test, text, way=3, shot=2, queries=1, episodes=5, seed=3)
    from stadapter.data import normalize_clips
    from stadapter.fewshot.episodes import EpisodeSampler
    from stadapter.fewshot.model import episode_probabilities

    accuracies = []
    support_frames, query_frames = video_features(model, test, text)
    for episode in EpisodeSampler(test.labels, 3, 2, 1, 5, 3):
        clips = lambda ids: normalize_clips(torch.stack([test[i]["clip"][0] for i in ids]))
        with torch.no_grad():
            output = model(clips(episode.support), clips(episode.query), text[episode.classes], 2)
            torch.testing.assert_close(model.support_features(clips(episode.support),
                                                              text[episode.classes].repeat_interleave(2, 0)),
                                       support_frames[episode.support], rtol=1e-4, atol=1e-5)
        predicted = episode_probabilities(output, model.alpha).argmax(-1)
        accuracies.append((predicted == torch.tensor(episode.query_targets)).float().mean().item() * 100)
    mean, half = confidence_interval(accuracies)
    assert result["accuracy"] == pytest.approx(mean) and result["ci95"] == pytest.approx(half)
    assert result["episodes"] == 5 and result["shot"] == 2


def test_confidence_interval():
    mean, half = confidence_interval([60.0, 80.0, 100.0, 80.0])
    assert mean == 80.0
    assert half == pytest.approx(1.96 * math.sqrt(800 / 3) / 2)


def test_st_adapter_baseline_trains_and_frozen_baseline_has_nothing_to_train(videos):
    _, split, data = videos
    vit = tiny_backbone()
    add_st_adapters(vit, bottleneck=8)
    model = FramePrototypes(vit)
    assert model.tunable_parameters() and all("st_adapter" in n for n in model.tunable_parameters())
    before = {n: p.detach().clone() for n, p in model.tunable_parameters().items()}
    meta_train(model, data, text_table(split), CONFIG, progress=False)
    assert any(not torch.equal(p, before[n]) for n, p in model.tunable_parameters().items())
    with pytest.raises(ValueError, match="no trainable parameters"):
        meta_train(FramePrototypes(tiny_backbone().requires_grad_(False)), data, text_table(split), CONFIG)


def test_cli_train_then_eval(videos, tmp_path):
    root, split, _ = videos
    ids = [f"{path.split('/')[-2]}/{path.split('/')[-1]}" for path in split.paths]
    split_file = tmp_path / "train.txt"
    split_file.write_text("\n".join(ids) + "\n")
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({i: split.class_names[label] for i, label in zip(ids, split.labels)}))
    weights = tmp_path / "backbone.pt"
    torch.save(tiny_backbone().state_dict(), weights)
    out = tmp_path / "run"
    common = ["--root", str(root), "--labels", str(labels), "--way", "3", "--queries", "1", "--workers", "0",
              "--frames", str(FRAMES)]
    model_flags = ["--backbone", "timm:vit_tiny_patch16_224", "--backbone-kwargs",
                   json.dumps({**BACKBONE_KWARGS, "num_classes": 0}), "--weights", str(weights),
                   "--text-encoder", "minilm", "--bottleneck", "8"]
    assert main(["train", "--train-split", str(split_file), "--episodes", "2", "--out", str(out),
                 *common, *model_flags]) == 0
    assert (out / "tunable.safetensors").is_file() and (out / "args.json").is_file()
    result_file = tmp_path / "eval.json"
    # eval rebuilds the model from args.json: no model flags needed.
    assert main(["eval", "--test-split", str(split_file), "--checkpoint", str(out), "--episodes", "3",
                 "--json", str(result_file), *common]) == 0
    result = json.loads(result_file.read_text())
    assert result["episodes"] == 3 and 0 <= result["accuracy"] <= 100


def test_cli_demo_tiny_run_writes_table_json_and_plot(tmp_path, capsys):
    report, figure = tmp_path / "demo.json", tmp_path / "demo.png"
    assert main(["demo", "--train-videos", "2", "--test-videos", "6", "--frames", "2", "--train-queries", "1",
                 "--queries", "1", "--pretrain-steps", "20", "--train-episodes", "2", "--eval-episodes", "3",
                 "--timing-episodes", "1", "--json", str(report), "--plot", str(figure)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(report.read_text())
    assert [entry["model"] for entry in result["results"]] == ["frozen + OTAM", "+ ST-Adapters",
                                                               "+ MA-CLIP adapters and TPCM"]
    for entry in result["results"]:
        assert entry["1-shot"]["episodes"] == entry["5-shot"]["episodes"] == 3
        assert f"{entry['1-shot']['accuracy']:.1f} +- {entry['1-shot']['ci95']:.1f}" in printed
    assert result["results"][0]["tunable_params"] == 0 and "meta_train" not in result["results"][0]
    for row in ("+ ST-Adapters", "+ MA-CLIP adapters and TPCM"):
        assert set(result["throughput"][row]) == {"auto", "reference"}
        assert all(v["episodes_per_second"] > 0 for v in result["throughput"][row].values())
    assert figure.stat().st_size > 0
