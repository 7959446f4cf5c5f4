"""karma.data: the synthetic log's structure, the tokenizer, the MovieLens-layout loaders and the split."""
import dataclasses
import os

import numpy as np
import pytest

from karma.data import (ATTRIBUTE_VOCAB, ConfigError, DataFormatError, RecDataset, SyntheticConfig,
                        WordTokenizer, generate_synthetic, load_movielens)
from karma.split import leave_one_out

SMALL = SyntheticConfig(num_items=120, num_users=60, impression_size=6, image_dim=8, seed=3)


@pytest.fixture(scope="module")
def synthetic():
    return generate_synthetic(SMALL)


def test_synthetic_is_seeded(synthetic):
    again = generate_synthetic(SMALL)
    assert again.item_texts == synthetic.item_texts and again.sequences == synthetic.sequences
    np.testing.assert_array_equal(again.image_features, synthetic.image_features)
    other = generate_synthetic(SyntheticConfig(num_items=120, num_users=60, impression_size=6, image_dim=8, seed=4))
    assert other.sequences != synthetic.sequences


def test_synthetic_text_and_image_carry_the_attributes(synthetic):
    attrs = synthetic.item_attributes
    for item in range(synthetic.num_items):
        words = WordTokenizer.words(synthetic.item_texts[item])
        for name, values in ATTRIBUTE_VOCAB.items():
            assert values[attrs[name][item]] in words
    # The image feature is built from the visible attributes: same-category items are closer than others.
    image = synthetic.image_features
    distance = ((image[:, None] - image[None]) ** 2).sum(-1)
    same = attrs["category"][:, None] == attrs["category"][None]
    off_diagonal = ~np.eye(len(image), dtype=bool)
    assert distance[same & off_diagonal].mean() < 0.8 * distance[~same].mean()


def test_synthetic_behaviour_follows_semantics(synthetic):
    category = synthetic.item_attributes["category"]
    same = [category[s[i]] == category[s[i - 1]] for s in synthetic.sequences for i in range(1, len(s))]
    chance = 1.0 / len(ATTRIBUTE_VOCAB["category"])
    assert np.mean(same) > 3 * chance
    for clicks, shown in zip(synthetic.sequences, synthetic.impressions):
        assert len(clicks) == len(shown) >= 6  # >= 2 sessions x >= 3 clicks
        for click, negatives in zip(clicks, shown):
            assert len(negatives) == SMALL.impression_size - 1 and click not in negatives
            assert all(0 <= n < synthetic.num_items for n in negatives)
    assert synthetic.has_impressions


def test_tokenizer_round_trip(tmp_path, synthetic):
    tokenizer = WordTokenizer.build(synthetic.item_texts)
    text = synthetic.item_texts[5]
    ids = tokenizer.encode(text)
    assert ids[-1] == tokenizer.eos_id and tokenizer.decode(ids) == " ".join(WordTokenizer.words(text))
    assert tokenizer.encode("a zebra-coloured thing", add_eos=False).count(tokenizer.unk_id) >= 2
    batch = tokenizer.encode_batch([text, "black"], max_len=4)
    assert batch.shape == (2, 4) and batch[0, -1] == tokenizer.eos_id and batch[1, 2] == tokenizer.pad_id
    tokenizer.save(str(tmp_path / "tok.json"))
    assert WordTokenizer.load(str(tmp_path / "tok.json")).vocab == tokenizer.vocab


def test_leave_one_out_has_no_leakage(synthetic):
    split = leave_one_out(synthetic, max_history=4, max_negatives=3)
    for name, examples in (("valid", split.valid), ("test", split.test)):
        for row in range(len(examples)):
            user, position = examples.user[row], examples.position[row]
            clicks = synthetic.sequences[user]
            expected_history = clicks[max(0, position - 4):position]   # strictly before the target
            history = examples.history[row][examples.history[row] >= 0].tolist()
            assert history == expected_history, name
            assert examples.target[row] == clicks[position]
            negatives = examples.negatives[row][examples.negatives[row] >= 0].tolist()
            assert negatives == list(synthetic.impressions[user][position][:3])
            assert position == len(clicks) - (2 if name == "valid" else 1)
    assert len(split.test) == len(split.valid) == synthetic.num_users
    # training windows: every click 1 .. n-3 of every user is a target exactly once, from the clicks before it
    covered = {}
    inputs, targets, negatives = split.train.inputs_targets(np.arange(len(split.train)))
    assert inputs.shape[1] <= 4
    for row, user in enumerate(split.train.user):
        clicks = synthetic.sequences[user]
        window = clicks[split.train.start[row] - split.train.log.offsets[user]:
                        split.train.end[row] - split.train.log.offsets[user]]
        real = targets[row] >= 0
        assert inputs[row][real].tolist() == window[:-1] and targets[row][real].tolist() == window[1:]
        first = split.train.start[row] - split.train.log.offsets[user]
        for j, t in enumerate(range(first + 1, first + len(window))):
            covered[(user, t)] = covered.get((user, t), 0) + 1
            shown = negatives[row][real][j]
            assert shown[shown >= 0].tolist() == list(synthetic.impressions[user][t][:3])
    expected = {(u, t) for u, s in enumerate(synthetic.sequences) for t in range(1, len(s) - 2)}
    assert set(covered) == expected and set(covered.values()) == {1}
    assert split.train.num_targets == len(expected)


def test_split_storage_is_linear_in_clicks():
    # one user with 8k clicks: the old per-example prefix copies were O(n^2); windows and the log are O(n)
    clicks = list(np.random.default_rng(0).integers(0, 50, 8000))
    dataset = RecDataset("long", [f"item {i}" for i in range(50)], [clicks, clicks[:5]], [[()] * 8000, [()] * 5])
    split = leave_one_out(dataset, max_history=50, max_negatives=0)
    assert len(split.train.log.items) == 7998 + 3
    assert len(split.train) == int(np.ceil(7997 / 50)) + 1 and split.train.num_targets == 7997 + 2
    inputs, targets, _ = split.train.inputs_targets([0, len(split.train) - 1])
    assert inputs.shape == (2, 50) and (targets[0] >= 0).sum() == 50
    np.testing.assert_array_equal(split.test.histories()[0], clicks[-51:-1])


def test_cold_item_split_and_synthetic_new_arrivals(synthetic):
    split = leave_one_out(synthetic, max_history=4, cold_item_fraction=0.3, seed=1)
    assert len(split.cold_items) == round(0.3 * synthetic.num_items)
    assert not np.isin(split.train.log.items, split.cold_items).any()
    assert (split.train_counts[split.cold_items] == 0).all()
    # the generator's new arrivals: shown only at the last two steps, so never a training click
    plain = leave_one_out(synthetic, max_history=4)
    new_targets = plain.train_counts[plain.test.target] == 0
    assert 0.05 < new_targets.mean() < 0.9
    without = leave_one_out(generate_synthetic(dataclasses.replace(SMALL, new_item_fraction=0.0)), max_history=4)
    assert (without.train_counts[without.test.target] == 0).mean() < new_targets.mean() / 2


def test_leave_one_out_rejects_bad_sizes(synthetic):
    with pytest.raises(ConfigError, match="max_history"):
        leave_one_out(synthetic, max_history=0)


@pytest.mark.parametrize("field, value", [("num_items", 1), ("impression_size", 0), ("drift", 1.5),
                                          ("sessions_per_user", (3, 2))])
def test_synthetic_config_errors_name_the_field(field, value):
    with pytest.raises(ConfigError, match=f"data.{field}"):
        SyntheticConfig(**{field: value})


# ---------------------------------------------------------------------------------------------------------------
# MovieLens layouts, written here
# ---------------------------------------------------------------------------------------------------------------
ML_ITEMS = [
    "1|Toy Story (1995)|01-Jan-1995||http://x|0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0",
    "2|GoldenEye (1995)|01-Jan-1995||http://x|0|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0|1|0|0",
    "3|Four Rooms (1995)|01-Jan-1995||http://x|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|1|0|0",
]
ML_DATA = ["7\t2\t3\t881250950", "7\t1\t5\t881250949", "7\t3\t4\t881250960", "9\t3\t2\t891717742",
           "9\t1\t4\t891717740"]


def write_ml100k(directory, items=ML_ITEMS, data=ML_DATA):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "u.item"), "w", encoding="latin-1") as handle:
        handle.write("\n".join(items) + "\n")
    with open(os.path.join(directory, "u.data"), "w", encoding="latin-1") as handle:
        handle.write("\n".join(data) + "\n")
    return str(directory)


def test_ml100k_loader(tmp_path):
    dataset = load_movielens(write_ml100k(tmp_path / "ml"))
    assert dataset.item_texts[0] == "Toy Story . animation children's comedy . 1995"
    assert dataset.item_texts[1] == "GoldenEye . action adventure thriller . 1995"
    assert dataset.sequences == [[0, 1, 2], [0, 2]]  # ordered by timestamp, ids in u.item order
    assert not dataset.has_impressions and dataset.image_features is None


def test_atomic_loader(tmp_path):
    directory = tmp_path / "atomic"
    directory.mkdir()
    (directory / "ml.item").write_text("item_id:token\tmovie_title:token_seq\trelease_year:token\tgenre:token_seq\n"
                                       "10\tHeat\t1995\tAction Crime\n11\tCasino\t1995\tDrama\n")
    (directory / "ml.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                                        "u1\t11\t4\t20\nu1\t10\t5\t10\n")
    dataset = load_movielens(str(directory))
    assert dataset.item_texts == ["Heat . action crime . 1995", "Casino . drama . 1995"]
    assert dataset.sequences == [[0, 1]]
    (directory / "ml.inter").write_text("user_id:token\titem_id:token\nu1\t11\nu1\t10\n")
    with pytest.warns(UserWarning, match="no timestamp column; .* file order"):
        assert load_movielens(str(directory)).sequences == [[1, 0]]


@pytest.mark.parametrize("items, data, where, what", [
    (ML_ITEMS, ML_DATA[:2] + ["7\t3\t4"], "u.data:3", "4 tab-separated"),
    (ML_ITEMS, ML_DATA[:3] + ["9\tabc\t2\t891717742"], "u.data:4", "item id must be an integer"),
    (ML_ITEMS, ML_DATA + ["9\t99\t2\t891717742"], "u.data:6", "not in the item file"),
    (ML_ITEMS[:1] + ["2|GoldenEye (1995)|01-Jan-1995||http://x|0|1"], ML_DATA, "u.item:2", "fields"),
    (ML_ITEMS[:2] + [ML_ITEMS[2].replace("|1|0|0", "|7|0|0")], ML_DATA, "u.item:3", "genre flags"),
])
def test_malformed_movielens_names_file_and_line(tmp_path, items, data, where, what):
    directory = write_ml100k(tmp_path / "bad", items, data)
    with pytest.raises(DataFormatError, match=what) as info:
        load_movielens(directory)
    assert where in str(info.value)


def test_atomic_header_errors(tmp_path):
    (tmp_path / "x.item").write_text("item_id:token\tmovie_title:token_seq\n1\tHeat\n")
    (tmp_path / "x.inter").write_text("user:token\titem_id:token\nu\t1\n")
    with pytest.raises(DataFormatError, match=r"x\.inter:1: header lacks column\(s\) user_id"):
        load_movielens(str(tmp_path))


def test_missing_files_are_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="u.data"):
        load_movielens(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_movielens(str(tmp_path / "nope"))


def test_movielens_layout_writer_round_trips(tmp_path, synthetic):
    from karma.data import write_movielens_layout

    loaded = load_movielens(write_movielens_layout(synthetic, str(tmp_path / "ml")))
    assert loaded.num_items == synthetic.num_items and loaded.sequences == synthetic.sequences
    category = synthetic.item_attributes["category"]
    assert all(text.startswith(original) for text, original in zip(loaded.item_texts, synthetic.item_texts))
    genres = [text.split(" . ")[1] for text in loaded.item_texts]
    assert len(set(zip(genres, category))) == len(set(category))     # the genre word names the category
