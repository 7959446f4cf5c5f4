"""MovieLens-layout loaders: the MovieLens-100k files (``u.data`` + ``u.item``) and atomic files
(``<name>.inter`` + ``<name>.item``); item text = title + genres + year."""
from __future__ import annotations

import os
import re
import warnings
from typing import Dict, Iterable, List, Sequence, Tuple

from .dataset import DataFormatError, RecDataset

# ----------------------------------------------------------------------------------------------------------------
# MovieLens-100k layout (u.data + u.item) and atomic files (.inter + .item)
# ----------------------------------------------------------------------------------------------------------------
MOVIELENS_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
                    "War", "Western")
_YEAR_IN_TITLE = re.compile(r"\s*\((\d{4})\)\s*$")


def movie_text(title: str, genres: Sequence[str], year: str) -> str:
    """Item text for a movie: title, genres, year."""
    title = _YEAR_IN_TITLE.sub("", title).strip()
    parts = [title, " ".join(g.lower() for g in genres) if genres else "", year]
    return " . ".join(p for p in parts if p)


def _read_lines(path: str) -> Iterable[Tuple[int, str]]:
    # MovieLens 100k ships latin-1 titles; latin-1 decodes any byte, so it never fails on odd bytes.
    with open(path, "r", encoding="latin-1") as handle:
        for number, line in enumerate(handle, start=1):
            line = line.rstrip("\r\n")
            if line.strip():
                yield number, line


def _parse_int(path: str, number: int, name: str, text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise DataFormatError(f"{path}:{number}: {name} must be an integer, got {text!r}") from None


def _parse_float(path: str, number: int, name: str, text: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise DataFormatError(f"{path}:{number}: {name} must be a number, got {text!r}") from None


def _assemble(name: str, raw_items: Dict[str, str], events: List[Tuple[str, str, float, int]],
              events_path: str) -> RecDataset:
    """Map raw ids to contiguous ones and order each user's events by time (file order breaks ties)."""
    item_index = {raw: index for index, raw in enumerate(raw_items)}
    user_events: Dict[str, List[Tuple[float, int, int]]] = {}
    for raw_user, raw_item, timestamp, line_number in events:
        if raw_item not in item_index:
            raise DataFormatError(f"{events_path}:{line_number}: item id {raw_item!r} is not in the item file")
        user_events.setdefault(raw_user, []).append((timestamp, line_number, item_index[raw_item]))
    sequences = [[item for _, _, item in sorted(evs)] for evs in user_events.values()]
    impressions = [[() for _ in seq] for seq in sequences]
    return RecDataset(name=name, item_texts=list(raw_items.values()), sequences=sequences, impressions=impressions)


def _load_ml100k(directory: str) -> RecDataset:
    genre_names = list(MOVIELENS_GENRES)
    genre_path = os.path.join(directory, "u.genre")
    if os.path.exists(genre_path):
        genre_names = []
        for number, line in _read_lines(genre_path):
            fields = line.split("|")
            if len(fields) != 2:
                raise DataFormatError(f"{genre_path}:{number}: expected 'name|index', got {line!r}")
            genre_names.append(fields[0])

    item_path = os.path.join(directory, "u.item")
    items: Dict[str, str] = {}
    for number, line in _read_lines(item_path):
        fields = line.split("|")
        if len(fields) != 5 + len(genre_names):
            raise DataFormatError(
                f"{item_path}:{number}: expected {5 + len(genre_names)} '|'-separated fields (id, title, release "
                f"date, video release date, URL, {len(genre_names)} genre flags), got {len(fields)}")
        raw_id = str(_parse_int(item_path, number, "movie id", fields[0]))
        flags = fields[5:]
        if any(flag.strip() not in ("0", "1") for flag in flags):
            raise DataFormatError(f"{item_path}:{number}: genre flags must be 0 or 1, got {flags!r}")
        if raw_id in items:
            raise DataFormatError(f"{item_path}:{number}: duplicate movie id {raw_id}")
        title = fields[1].strip()
        match = _YEAR_IN_TITLE.search(title)
        year = match.group(1) if match else (fields[2].strip()[-4:] if fields[2].strip() else "")
        genres = [g for g, flag in zip(genre_names, flags) if flag.strip() == "1"]
        items[raw_id] = movie_text(title, genres, year)

    data_path = os.path.join(directory, "u.data")
    events = []
    for number, line in _read_lines(data_path):
        fields = line.split("\t")
        if len(fields) != 4:
            raise DataFormatError(f"{data_path}:{number}: expected 4 tab-separated fields (user id, item id, "
                                  f"rating, timestamp), got {len(fields)}: {line!r}")
        user = str(_parse_int(data_path, number, "user id", fields[0]))
        item = str(_parse_int(data_path, number, "item id", fields[1]))
        _parse_float(data_path, number, "rating", fields[2])
        timestamp = _parse_float(data_path, number, "timestamp", fields[3])
        events.append((user, item, timestamp, number))
    if not events:
        raise DataFormatError(f"{data_path}: no interactions")
    return _assemble("movielens", items, events, data_path)


def _atomic_header(path: str, line: str, wanted: Dict[str, Sequence[str]], required: Sequence[str]) -> Dict[str, int]:
    """Column index by role from an atomic-file header such as ``user_id:token<TAB>item_id:token``."""
    names = [column.split(":", 1)[0].strip() for column in line.split("\t")]
    found = {}
    for role, candidates in wanted.items():
        for candidate in candidates:
            if candidate in names:
                found[role] = names.index(candidate)
                break
    missing = [role for role in required if role not in found]
    if missing:
        raise DataFormatError(f"{path}:1: header lacks column(s) {', '.join(wanted[r][0] for r in missing)}; "
                              f"got {names}")
    return found


def _load_atomic(inter_path: str, item_path: str) -> RecDataset:
    lines = _read_lines(item_path)
    header = next(lines, None)
    if header is None:
        raise DataFormatError(f"{item_path}: empty file")
    columns = _atomic_header(item_path, header[1], {"item": ("item_id",), "title": ("movie_title", "title"),
                                                    "year": ("release_year", "year"),
                                                    "genre": ("genre", "genres", "class")}, ("item", "title"))
    width = len(header[1].split("\t"))
    items: Dict[str, str] = {}
    for number, line in lines:
        fields = line.split("\t")
        if len(fields) != width:
            raise DataFormatError(f"{item_path}:{number}: expected {width} tab-separated fields, got {len(fields)}")
        raw_id = fields[columns["item"]].strip()
        if raw_id in items:
            raise DataFormatError(f"{item_path}:{number}: duplicate item id {raw_id!r}")
        genres = fields[columns["genre"]].split() if "genre" in columns else []
        year = fields[columns["year"]].strip() if "year" in columns else ""
        items[raw_id] = movie_text(fields[columns["title"]].strip(), genres, year)

    lines = _read_lines(inter_path)
    header = next(lines, None)
    if header is None:
        raise DataFormatError(f"{inter_path}: empty file")
    columns = _atomic_header(inter_path, header[1], {"user": ("user_id",), "item": ("item_id",),
                                                     "time": ("timestamp",)}, ("user", "item"))
    if "time" not in columns:
        warnings.warn(f"{inter_path}: no timestamp column; each user's interactions are taken in file order",
                      stacklevel=2)
    width = len(header[1].split("\t"))
    events = []
    for number, line in lines:
        fields = line.split("\t")
        if len(fields) != width:
            raise DataFormatError(f"{inter_path}:{number}: expected {width} tab-separated fields, got {len(fields)}")
        timestamp = _parse_float(inter_path, number, "timestamp", fields[columns["time"]]) if "time" in columns else 0.0
        events.append((fields[columns["user"]].strip(), fields[columns["item"]].strip(), timestamp, number))
    if not events:
        raise DataFormatError(f"{inter_path}: no interactions")
    return _assemble("movielens", items, events, inter_path)


def write_movielens_layout(dataset: RecDataset, directory: str) -> str:
    """Write ``dataset`` as a MovieLens-100k layout (``u.item`` + ``u.data``, 1-based ids, one rating 4 per click,
    timestamps in click order) so the loader and every command can be exercised where the real files cannot be
    downloaded. A synthetic item's category becomes its genre flag; the title is its text."""
    os.makedirs(directory, exist_ok=True)
    category = (dataset.item_attributes or {}).get("category")
    with open(os.path.join(directory, "u.item"), "w", encoding="latin-1") as handle:
        for item, text in enumerate(dataset.item_texts):
            flags = ["0"] * len(MOVIELENS_GENRES)
            flags[1 + int(category[item]) % (len(MOVIELENS_GENRES) - 1) if category is not None else 0] = "1"
            handle.write(f"{item + 1}|{text.replace('|', ' ')}|||http://localhost/{item + 1}|{'|'.join(flags)}\n")
    with open(os.path.join(directory, "u.data"), "w", encoding="latin-1") as handle:
        for user, clicks in enumerate(dataset.sequences):
            for step, item in enumerate(clicks):
                handle.write(f"{user + 1}\t{item + 1}\t4\t{880000000 + 60 * step}\n")
    return directory


def load_movielens(path: str) -> RecDataset:
    """Load a MovieLens-layout log from a directory holding ``u.data`` + ``u.item`` (MovieLens 100k) or one
    ``<name>.inter`` + ``<name>.item`` pair (atomic files). Item text = title + genres + year; every rating counts
    as an interaction, ordered by timestamp."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"MovieLens path {path!r} is not a directory (expected u.data + u.item, or "
                                "<name>.inter + <name>.item)")
    if os.path.exists(os.path.join(path, "u.data")) and os.path.exists(os.path.join(path, "u.item")):
        return _load_ml100k(path)
    inter = sorted(f for f in os.listdir(path) if f.endswith(".inter"))
    if len(inter) == 1:
        item_file = inter[0][: -len(".inter")] + ".item"
        if os.path.exists(os.path.join(path, item_file)):
            return _load_atomic(os.path.join(path, inter[0]), os.path.join(path, item_file))
        raise FileNotFoundError(f"{os.path.join(path, inter[0])} has no matching {item_file} beside it")
    raise FileNotFoundError(f"{path!r} holds neither u.data + u.item nor exactly one <name>.inter + <name>.item")
