"""Few-shot split files and the seeded N-way K-shot episode sampler."""

import pytest

from stadapter.fewshot.episodes import EpisodeSampler, Split, check_disjoint, read_split, read_splits


def write(path, lines):
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return str(path)


def test_read_split_classes_from_folders_and_extensions(tmp_path):
    (tmp_path / "jump").mkdir()
    (tmp_path / "jump" / "v1.mp4").write_bytes(b"")
    split = read_split(write(tmp_path / "train.txt", ["jump/v1", "run/v2.avi", "", "# comment", "jump/v3"]),
                       str(tmp_path))
    assert split.class_names == ["jump", "run"]
    assert split.labels == [0, 1, 0]
    # An id without extension finds the file on disk; others keep their own path.
    assert split.paths == [str(tmp_path / "jump" / "v1.mp4"), str(tmp_path / "run" / "v2.avi"),
                           str(tmp_path / "jump" / "v3")]
    assert split.samples()[1] == (str(tmp_path / "run" / "v2.avi"), 1)


def test_read_split_bare_ids_need_labels(tmp_path):
    path = write(tmp_path / "test.txt", ["1001", "1002"])
    with pytest.raises(ValueError, match="test.txt:1: video id '1001' has no class folder"):
        read_split(path, str(tmp_path))
    split = read_split(path, str(tmp_path), labels={"1001": "pushing", "1002": "pulling"})
    assert split.class_names == ["pulling", "pushing"] and split.labels == [1, 0]
    with pytest.raises(ValueError, match="test.txt:2: video id '1002' is not in labels"):
        read_split(path, str(tmp_path), labels={"1001": "pushing"})


def test_splits_must_be_class_disjoint(tmp_path):
    files = {"train": write(tmp_path / "a.txt", ["a/1", "b/2"]), "test": write(tmp_path / "b.txt", ["c/3"])}
    splits = read_splits(files, str(tmp_path))
    assert splits["test"].class_names == ["c"]
    files["val"] = write(tmp_path / "c.txt", ["b/4"])
    with pytest.raises(ValueError, match="splits 'train' and 'val' share classes \\['b'\\]"):
        read_splits(files, str(tmp_path))


def labels(classes=8, per_class=7):
    return [c for c in range(classes) for _ in range(per_class)]


@pytest.mark.parametrize("way,shot,queries", [(5, 1, 3), (5, 5, 2), (3, 2, 1)])
def test_episodes_have_exact_counts(way, shot, queries):
    video_labels = labels() + [99]  # a class with one video is never eligible
    sampler = EpisodeSampler(video_labels, way, shot, queries, episodes=20, seed=1)
    assert len(sampler) == 20
    episodes = list(sampler)
    assert len(episodes) == 20
    for episode in episodes:
        assert len(set(episode.classes)) == way and 99 not in episode.classes
        assert len(episode.support) == way * shot and len(episode.query) == way * queries
        assert len(set(episode.support + episode.query)) == way * (shot + queries)  # all distinct
        for n, label in enumerate(episode.classes):
            assert [video_labels[i] for i in episode.support[n * shot:(n + 1) * shot]] == [label] * shot
        assert [episode.classes[t] for t in episode.query_targets] == [video_labels[i] for i in episode.query]
    assert len({tuple(e.classes) for e in episodes}) > 1


def test_episodes_are_seeded_and_resumable():
    first = EpisodeSampler(labels(), 5, 1, 2, episodes=6, seed=3)
    again = EpisodeSampler(labels(), 5, 1, 2, episodes=6, seed=3)
    other = EpisodeSampler(labels(), 5, 1, 2, episodes=6, seed=4)
    assert list(first) == list(again)
    assert list(first) != list(other)
    assert first.episode(4) == list(again)[4]


def test_sampler_bad_input():
    with pytest.raises(ValueError, match="way=9 needs 9 classes with at least shot \\+ queries = 3"):
        EpisodeSampler(labels(), 9, 1, 2, episodes=1)
    with pytest.raises(ValueError, match="shot must be a positive int"):
        EpisodeSampler(labels(), 5, 0, 2, episodes=1)


def test_check_disjoint_accepts_disjoint_splits():
    check_disjoint({"train": Split.from_pairs([("x", "a")]), "test": Split.from_pairs([("y", "b")])})
