"""Data for the KARMA model layer: a seeded synthetic retail log, a MovieLens-layout loader, a word tokenizer,
(the leave-one-out split is ``karma.split``).

Everything here is numpy/python; tensors are built by ``karma.train`` from the arrays this module returns.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np


class DataFormatError(ValueError):
    """A data file does not have the expected layout; the message names the file and the line."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def check_config_fields(section: str, cls, values: dict):
    """Build dataclass ``cls`` from ``values``, naming ``section.field`` for an unknown or mistyped field."""
    if not isinstance(values, dict):
        raise ConfigError(f"{section}: expected a mapping of field names to values, got {type(values).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    for name, value in values.items():
        if name not in known:
            raise ConfigError(f"{section}.{name}: unknown field (known: {', '.join(sorted(known))})")
    try:
        return cls(**values)
    except TypeError as exc:  # a wrong type surfacing from __post_init__ arithmetic
        raise ConfigError(f"{section}: {exc}") from exc


# ----------------------------------------------------------------------------------------------------------------
# Dataset containers
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class RecDataset:
    """Items (text, optional image feature) and each user's clicks in time order.

    ``impressions[u][t]`` are the items shown but not clicked at the user's t-th click (hard negatives), or an
    empty tuple where the log has no impressions (MovieLens).
    """
    name: str
    item_texts: List[str]
    sequences: List[List[int]]
    impressions: List[List[Tuple[int, ...]]]
    image_features: Optional[np.ndarray] = None  # [num_items, image_dim] float32
    item_attributes: Optional[Dict[str, np.ndarray]] = None  # synthetic only: attribute index per item

    @property
    def num_items(self) -> int:
        return len(self.item_texts)

    @property
    def num_users(self) -> int:
        return len(self.sequences)

    @property
    def has_impressions(self) -> bool:
        return any(len(shown) > 0 for user in self.impressions for shown in user)


# ----------------------------------------------------------------------------------------------------------------
# Synthetic retail catalog and behaviour log
# ----------------------------------------------------------------------------------------------------------------
CATEGORIES = ("jacket", "sneaker", "backpack", "watch", "lamp", "mug", "sofa", "headphones", "dress", "tent",
              "blender", "notebook")
BRANDS = ("northpeak", "urbanloom", "solace", "kestrel", "brightwell", "marlowe", "tidewater", "ironbark", "velora",
          "cobalt", "fernhill", "aurelia")
MATERIALS = ("leather", "cotton", "wool", "steel", "ceramic", "bamboo", "nylon", "linen", "oak", "glass")
STYLES = ("vintage", "minimalist", "sporty", "classic", "rugged", "modern", "bohemian", "industrial")
COLOURS = ("black", "white", "red", "navy", "olive", "beige", "grey", "mustard", "teal", "burgundy")
PRICE_BANDS = ("budget", "midrange", "premium", "luxury")
ATTRIBUTE_VOCAB = {"category": CATEGORIES, "brand": BRANDS, "material": MATERIALS, "style": STYLES,
                   "colour": COLOURS, "price": PRICE_BANDS}


@dataclass
class SyntheticConfig:
    num_items: int = 1500
    num_users: int = 800
    sessions_per_user: Tuple[int, int] = (2, 4)   # inclusive range
    clicks_per_session: Tuple[int, int] = (3, 6)  # inclusive range
    impression_size: int = 10                     # items shown per step, the click included
    image_dim: int = 32
    image_noise: float = 0.5
    drift: float = 0.6                            # chance that a new session moves the user's focus
    # Cold start: this fraction of the catalog are new arrivals, shown only at each user's last two steps (the
    # validation and test targets), so they have no training clicks and only their text (and image) describes them.
    new_item_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.num_items, int) or self.num_items < 2:
            raise ConfigError(f"data.num_items must be an integer >= 2, got {self.num_items!r}")
        if not isinstance(self.num_users, int) or self.num_users < 1:
            raise ConfigError(f"data.num_users must be an integer >= 1, got {self.num_users!r}")
        for name in ("sessions_per_user", "clicks_per_session"):
            low_high = tuple(getattr(self, name))
            valid = len(low_high) == 2 and all(isinstance(v, int) for v in low_high)
            if not valid or not 1 <= low_high[0] <= low_high[1]:
                raise ConfigError(f"data.{name} must be two integers 1 <= low <= high, got {getattr(self, name)!r}")
            setattr(self, name, low_high)
        if not isinstance(self.impression_size, int) or not 1 <= self.impression_size <= self.num_items:
            raise ConfigError(f"data.impression_size must be an integer in [1, num_items], "
                              f"got {self.impression_size!r}")
        if not isinstance(self.image_dim, int) or self.image_dim < 1:
            raise ConfigError(f"data.image_dim must be an integer >= 1, got {self.image_dim!r}")
        if not 0.0 <= self.drift <= 1.0:
            raise ConfigError(f"data.drift must be in [0, 1], got {self.drift!r}")
        if not 0.0 <= self.new_item_fraction < 1.0:
            raise ConfigError(f"data.new_item_fraction must be in [0, 1), got {self.new_item_fraction!r}")
        if self.image_noise < 0:
            raise ConfigError(f"data.image_noise must be >= 0, got {self.image_noise!r}")


def item_text(attributes: Dict[str, int]) -> str:
    """Title-like text of a synthetic item: every word carries one latent attribute."""
    word = {name: ATTRIBUTE_VOCAB[name][index] for name, index in attributes.items()}
    return (f"{word['brand']} {word['colour']} {word['material']} {word['style']} {word['category']} , "
            f"{word['price']}")


def generate_synthetic(config: SyntheticConfig = SyntheticConfig()) -> RecDataset:
    """A retail catalog and behaviour log whose clicks follow the items' semantics.

    Items: category, brand (each category stocks a few brands), material (category dependent), style, colour and a
    price band (each brand has a typical band). The image feature is a sum of per-attribute latent vectors for the
    visible attributes plus noise. A ``new_item_fraction`` of the items are new arrivals that only the last two
    steps of each user show (cold items: no training clicks). Users: a lasting taste (colours, price bands,
    brands) and a session focus (category + style) that drifts between sessions. Each step shows
    ``impression_size`` items, half from the focus category and half by popularity (new arrivals of the focus
    category join at the last two steps), and the user clicks the best by taste plus Gumbel noise.
    """
    rng = np.random.default_rng(config.seed)
    n = config.num_items
    n_cat, n_brand, n_mat = len(CATEGORIES), len(BRANDS), len(MATERIALS)
    n_style, n_col, n_price = len(STYLES), len(COLOURS), len(PRICE_BANDS)

    brands_of_category = [rng.choice(n_brand, size=4, replace=False) for _ in range(n_cat)]
    material_probs = rng.dirichlet(np.full(n_mat, 0.4), size=n_cat)
    price_of_brand = rng.integers(0, n_price, size=n_brand)

    category = rng.integers(0, n_cat, size=n)
    brand = np.array([rng.choice(brands_of_category[c]) for c in category])
    material = np.array([rng.choice(n_mat, p=material_probs[c]) for c in category])
    style = rng.integers(0, n_style, size=n)
    colour = rng.integers(0, n_col, size=n)
    price = np.clip(price_of_brand[brand] + rng.integers(-1, 2, size=n), 0, n_price - 1)
    attributes = {"category": category, "brand": brand, "material": material, "style": style, "colour": colour,
                  "price": price}
    texts = [item_text({k: int(v[i]) for k, v in attributes.items()}) for i in range(n)]

    dim = config.image_dim
    visual = {name: rng.normal(size=(len(ATTRIBUTE_VOCAB[name]), dim)) for name in
              ("category", "material", "style", "colour")}
    image = sum(visual[name][attributes[name]] for name in visual)
    image = image + config.image_noise * rng.normal(size=image.shape)
    image = (image - image.mean(0)) / (image.std(0) + 1e-6)

    is_new = np.zeros(n, dtype=bool)
    is_new[rng.choice(n, int(round(config.new_item_fraction * n)), replace=False)] = True
    popularity = (rng.pareto(1.5, size=n) + 1.0) * ~is_new      # new arrivals have no popularity yet
    popularity /= popularity.sum()
    old_of_category = [np.flatnonzero((category == c) & ~is_new) for c in range(n_cat)]
    new_of_category = [np.flatnonzero((category == c) & is_new) for c in range(n_cat)]
    category_weight = np.array([len(ix) for ix in old_of_category], dtype=np.float64) + 1e-9
    category_weight /= category_weight.sum()

    sequences, impressions = [], []
    size = config.impression_size
    for _ in range(config.num_users):
        taste_colour = np.log(rng.dirichlet(np.full(n_col, 0.3)) + 1e-3)
        taste_price = np.log(rng.dirichlet(np.full(n_price, 0.5)) + 1e-3)
        taste_brand = rng.normal(scale=1.0, size=n_brand)
        taste_category = rng.dirichlet(np.full(n_cat, 0.3)) * 0.7 + 0.3 * category_weight
        focus_category = rng.choice(n_cat, p=taste_category)
        focus_style = rng.integers(0, n_style)
        clicks, shown_lists = [], []
        sessions = [int(rng.integers(config.clicks_per_session[0], config.clicks_per_session[1] + 1))
                    for _ in range(rng.integers(config.sessions_per_user[0], config.sessions_per_user[1] + 1))]
        total = sum(sessions)
        for session, session_clicks in enumerate(sessions):
            if session > 0 and rng.random() < config.drift:
                focus_category = rng.choice(n_cat, p=taste_category)
                focus_style = rng.integers(0, n_style)
            for _ in range(session_clicks):
                in_focus = old_of_category[focus_category]
                n_focus = min(len(in_focus), (size + 1) // 2)
                shown = set(rng.choice(in_focus, size=n_focus, replace=False).tolist()) if n_focus else set()
                arrivals = new_of_category[focus_category]
                if len(clicks) >= total - 2 and len(arrivals):   # the last two steps also show new arrivals
                    n_new = min(len(arrivals), (n_focus + 1) // 2, size - n_focus)
                    shown.update(rng.choice(arrivals, size=n_new, replace=False).tolist())
                while len(shown) < size:
                    shown.add(int(rng.choice(n, p=popularity)))
                shown = np.fromiter(shown, dtype=np.int64)
                utility = (2.0 * (category[shown] == focus_category) + 1.5 * (style[shown] == focus_style)
                           + taste_colour[colour[shown]] + taste_price[price[shown]] + taste_brand[brand[shown]]
                           + rng.gumbel(size=len(shown)))
                clicked = int(shown[np.argmax(utility)])
                clicks.append(clicked)
                shown_lists.append(tuple(int(i) for i in shown if i != clicked))
        sequences.append(clicks)
        impressions.append(shown_lists)
    return RecDataset(name="synthetic", item_texts=texts, sequences=sequences, impressions=impressions,
                      image_features=image.astype(np.float32), item_attributes=attributes)


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


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")


class WordTokenizer:
    """Lower-cased word-level tokenizer whose vocabulary is built from the catalog (no downloads)."""
    SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")

    def __init__(self, vocab: Sequence[str]):
        if tuple(vocab[: len(self.SPECIALS)]) != self.SPECIALS:
            raise ValueError(f"WordTokenizer: vocab must start with {self.SPECIALS}")
        self.vocab = list(vocab)
        self.index = {word: i for i, word in enumerate(self.vocab)}
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = range(4)

    @staticmethod
    def words(text: str) -> List[str]:
        return _WORD.findall(text.lower())

    @classmethod
    def build(cls, texts: Iterable[str], min_count: int = 1) -> "WordTokenizer":
        counts: Dict[str, int] = {}
        for text in texts:
            for word in cls.words(text):
                counts[word] = counts.get(word, 0) + 1
        kept = sorted(w for w, c in counts.items() if c >= min_count)
        return cls(list(cls.SPECIALS) + kept)

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, max_len: Optional[int] = None, add_eos: bool = True) -> List[int]:
        ids = [self.index.get(w, self.unk_id) for w in self.words(text)]
        if max_len is not None:
            ids = ids[: max_len - 1] if add_eos else ids[:max_len]
        return ids + [self.eos_id] if add_eos else ids

    def decode(self, ids: Iterable[int]) -> str:
        words = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i not in (self.pad_id, self.bos_id):
                words.append(self.vocab[i] if 0 <= i < len(self.vocab) else "<unk>")
        return " ".join(words)

    def encode_batch(self, texts: Sequence[str], max_len: int) -> np.ndarray:
        """[len(texts), max_len] int64 token ids (text + eos), right-padded with pad_id."""
        out = np.full((len(texts), max_len), self.pad_id, dtype=np.int64)
        for row, text in enumerate(texts):
            ids = self.encode(text, max_len)
            out[row, : len(ids)] = ids
        return out

    def save(self, path: str):
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.vocab, handle)

    @classmethod
    def load(cls, path: str) -> "WordTokenizer":
        with open(path, "r", encoding="utf-8") as handle:
            return cls(json.load(handle))
