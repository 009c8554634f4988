"""The code of instantrec's MLflow pyfunc models, logged as models from code.

MLflow copies this file into every model it logs (``pipelines.registry.log_pyfunc``) and runs
it when the model is loaded, with ``serving/`` beside it as the model's ``code_paths``. It
imports nothing from ``pipelines``, so a consumer needs only the model's own requirements:
no checkout, no ``instantrec`` install, no pickled class to resolve. The ``model`` key of the
model's ``model_config`` names the class (:data:`MODELS`) the file hands to MLflow.

Imported as ``pipelines.pyfunc_models`` (for the classes or :data:`MODELS`) it does nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd

from serving.schema import ITEM_ID


class ReleasePyfunc(mlflow.pyfunc.PythonModel):
    """A release bundle as an MLflow pyfunc: input rows with ``query`` (and optional ``k``,
    default 10), output one row per recommendation (``request`` = the input row, ``query``,
    ``rank`` from 1, ``item_id``, ``title``, ``score``).

    Artefacts: ``release`` (the bundle directory) and, for a release embedded with a
    non-default encoder, ``encoder`` (that encoder's directory). Serving settings
    (``INSTANTREC_*``, e.g. ``QUERY_STEPS`` or ``ENCODER_BACKEND``) come from the environment of
    the process that loads the model.
    """

    def load_context(self, context: Any) -> None:
        from serving.recommender import Recommender
        from serving.settings import Settings

        encoder_dir = context.artifacts.get("encoder")
        settings = Settings(encoder_path=Path(encoder_dir)) if encoder_dir else Settings()
        self._rec = Recommender.from_bundle(Path(context.artifacts["release"]), settings=settings)

    def predict(self, context: Any, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        rows = []
        for i, rec in enumerate(model_input.to_dict("records")):
            k = rec.get("k")
            k = 10 if k is None or pd.isna(k) else int(k)
            for r in self._rec.recommend(rec["query"], k=k):
                rows.append({"request": i, "query": rec["query"], "rank": r.rank,
                             ITEM_ID: r.item_id, "title": r.title, "score": r.score})
        return pd.DataFrame(rows, columns=["request", "query", "rank", ITEM_ID, "title",
                                           "score"])


class RankerPyfunc(mlflow.pyfunc.PythonModel):
    """A ranker checkpoint as an MLflow pyfunc.

    Input rows: ``query_vector`` (the blended query vector the recommender searches with),
    ``item_vector`` (the candidate's vector from the release), ``row`` (the candidate's row in
    the release, for its item bias) and optionally ``session_vector`` (the session signal, or
    missing/None for no session), ``lexical`` (relative BM25 score), ``query`` (the query
    text, for the ranker's memory of what that query's shoppers chose) and ``relevance`` (the
    relevance model's logit for the candidate, :func:`serving.retrieval.relevance_scores`,
    which stands in for the dense and lexical terms when given). Output per row:
    ``logit`` (as :meth:`Ranker.logits`) and ``score`` (its sigmoid, the click probability).
    """

    def load_context(self, context: Any) -> None:
        from serving.ranker import Ranker

        self._ranker = Ranker.load(Path(context.artifacts["checkpoint"]))

    def predict(self, context: Any, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        from serving.ranker import query_key, sigmoid
        from serving.text import normalise_query

        logits = []
        for rec in model_input.to_dict("records"):
            s = rec.get("session_vector")
            s = None if s is None or np.ndim(s) == 0 else np.asarray(s, dtype=np.float64)
            lex = rec.get("lexical")
            lex = None if lex is None or pd.isna(lex) else np.array([float(lex)])
            query = rec.get("query")
            qkey = (query_key(normalise_query(query, 10_000))
                    if isinstance(query, str) and query.strip() else None)
            rel = rec.get("relevance")
            rel = None if rel is None or pd.isna(rel) else np.array([float(rel)])
            z, _ = self._ranker.logits(np.asarray(rec["query_vector"], dtype=np.float64),
                                       np.asarray(rec["item_vector"], dtype=np.float64)[None, :],
                                       s, np.array([int(rec["row"])]), lex, qkey, rel)
            logits.append(float(z[0]))
        z = np.asarray(logits, dtype=np.float64)
        return pd.DataFrame({"logit": z, "score": sigmoid(z)})


class EncoderPyfunc(mlflow.pyfunc.PythonModel):
    """An encoder directory (artefact ``encoder``) as an MLflow pyfunc: input rows with
    ``text``, output one unit vector (``vector``, float64) per row."""

    def load_context(self, context: Any) -> None:
        from serving.encoder import Encoder

        self._encoder = Encoder(Path(context.artifacts["encoder"]))

    def predict(self, context: Any, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        vecs = self._encoder.encode([str(t) for t in model_input["text"].tolist()])
        return pd.DataFrame({"vector": list(vecs.astype(np.float64))})


MODELS: dict[str, type[mlflow.pyfunc.PythonModel]] = {
    "release": ReleasePyfunc, "ranker": RankerPyfunc, "encoder": EncoderPyfunc}

if __name__ != "pipelines.pyfunc_models":  # run by MLflow as a model's code
    mlflow.models.set_model(MODELS[mlflow.models.ModelConfig().get("model")]())
