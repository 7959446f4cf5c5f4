"""A word-level tokenizer whose vocabulary is built from the catalog (no downloads)."""
from __future__ import annotations

import json
import re
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

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
