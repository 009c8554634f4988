"""The lexical channel: BM25 over item text (bm25s, Snowball stemming, English stop words).

Catches what embeddings blur: exact terms, brands, model numbers. Scores are raw BM25
(k1 1.5, b 0.75); callers normalise per query before fusing with dense similarity.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _stemmer():
    import Stemmer

    return Stemmer.Stemmer("english")


class LexicalIndex:
    """BM25 over a fixed list of documents; row i is document i."""

    def __init__(self, retriever, n_docs: int) -> None:
        self._retriever = retriever
        self._stemmer = _stemmer()
        self.n_docs = n_docs

    @classmethod
    def build(cls, texts: Sequence[str]) -> LexicalIndex:
        import bm25s

        tokens = bm25s.tokenize(list(texts), stopwords="en", stemmer=_stemmer(),
                                show_progress=False)
        retriever = bm25s.BM25(k1=1.5, b=0.75)
        retriever.index(tokens, show_progress=False)
        return cls(retriever, len(texts))

    def save(self, directory: Path) -> None:
        self._retriever.save(str(directory), show_progress=False)
        (directory / "n_docs.txt").write_text(str(self.n_docs))

    @classmethod
    def load(cls, directory: Path) -> LexicalIndex:
        import bm25s

        retriever = bm25s.BM25.load(str(directory), show_progress=False)
        return cls(retriever, int((directory / "n_docs.txt").read_text()))

    def tokens(self, query: str) -> list[str]:
        import bm25s

        return bm25s.tokenize([query], stopwords="en", stemmer=self._stemmer,
                              return_ids=False, show_progress=False)[0]

    @property
    def vocab(self) -> dict[str, int]:
        return self._retriever.vocab_dict

    def term_scores(self, token: str) -> np.ndarray:
        """BM25 contribution of one (already tokenised) term to every document."""
        return np.asarray(self._retriever.get_scores([token]), dtype=np.float32)

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every document for ``query`` (zeros if no query term is known)."""
        tokens = [t for t in self.tokens(query) if t in self._retriever.vocab_dict]
        if not tokens:
            return np.zeros(self.n_docs, dtype=np.float32)
        return np.asarray(self._retriever.get_scores(tokens), dtype=np.float32)

    def search(self, query: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows and scores of the top ``k`` documents with a positive score, best first."""
        scores = self.scores(query)
        k = min(k, self.n_docs)
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        keep = scores[top] > 0
        return top[keep], scores[top][keep]
