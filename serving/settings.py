"""Typed settings, read from the environment (prefix ``INSTANTREC_``) once and passed down.

Nothing here runs at import time; call :func:`load_settings` where a process starts.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from serving import layout
from serving.errors import ConfigurationError
from serving.query import DEFAULT_STEPS, parse_steps

# The nearline updater's consumer-group lease (also serving.redis_backends' default).
REDIS_GROUP_LEASE_S = 10.0


class Settings(BaseSettings):
    """Everything a deployment may want to change, with embedded defaults."""

    model_config = SettingsConfigDict(env_prefix="INSTANTREC_", extra="ignore")

    home: Path = Field(Path("artefacts"), description="Root of warehouse, releases and registry.")
    encoder_path: Path | None = Field(
        None, description="Local transformers encoder directory; None = packaged all-MiniLM-L6-v2."
    )
    encoder_backend: Literal["torch", "onnx"] = Field(
        "onnx", description="Query encoding in serving: ONNX Runtime (same vectors, ~3x faster) or "
        "PyTorch; falls back to PyTorch if the ONNX model cannot be built or disagrees.")
    query_precision: Literal["fp32", "int8"] = Field(
        "int8", description="Arithmetic of the ONNX query model: int8 (the matrix products' "
        "weights quantised per channel: one query about twice as fast, dense nDCG@10 within "
        "0.0005 of fp32 on the judged data) or fp32 (PyTorch's vectors within float error).")
    item_max_tokens: int = Field(128, ge=8, le=512, description="Token budget of an item's text.")
    embed_batch_size: int = Field(64, ge=1, le=4096)
    embed_nice: int = Field(
        10, ge=0, le=19, description="Niceness the batch processes that embed the catalogue "
        "take on (`nice`: the DAG's embed task, `instantrec build` and `embed`): on a box they "
        "share with serving, they yield the CPU when a request needs it (0: unchanged).")
    embed_threads: int = Field(
        0, ge=0, le=256, description="torch threads of a batch process that embeds the "
        "catalogue (the DAG's embed task, `instantrec build` and `embed`); 0: torch's default "
        "(every core). With several Celery workers on one host, give each cores / workers: "
        "shards side by side with every core each run slower than one at a time.")
    embed_precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Catalogue embedding arithmetic: bf16 (matrix products in bfloat16, "
        "~1.6-1.9x faster where the CPU has native bf16; vectors within cosine 0.9999 of fp32), "
        "fp32, or auto (bf16 only on CPUs with native bf16).")
    max_reject_share: float = Field(0.05, ge=0.0, le=1.0, description="Ingest fails above this.")
    max_delist_share: float = Field(
        0.2, ge=0.0, le=1.0, description="Ingest fails when a snapshot would delist more than "
        "this share of the listed items (a truncated export), changing nothing.")
    index_seed: int = 42
    index_recall_target: float = Field(0.95, gt=0.0, le=1.0, description="recall@10 vs exact.")
    gate_min_golden_recall: float = Field(0.9, ge=0.0, le=1.0)
    gate_min_judged_ndcg: float = Field(0.0, ge=0.0, le=1.0)
    golden_queries: Path | None = Field(None, description="Golden queries JSON for the gate.")
    judgments: Path | None = Field(None, description="Judged queries (Parquet/CSV) for the gate.")
    relevance_source: Literal["auto", "judgments", "feedback"] = Field(
        "auto", description="What the batch retrain fits the relevance model on: judgments "
        "(human labels), feedback (position-debiased clicks; judgments, if set, then only "
        "gate it), or auto (judgments if set, else feedback).")
    mlflow_tracking_uri: str | None = Field(None, description="None = SQLite under home/mlflow.")
    model_name: str = "instantrec"
    max_query_chars: int = Field(256, ge=1)
    reload_interval_s: float = Field(1.0, gt=0.0, description="How often serving checks the pointer.")
    keep_releases: int = Field(
        5, ge=1, description="Old releases kept beside the live one (and the one the nearline "
        "updater's rankers/LATEST names): a publish that moves the pointer, and a replica's "
        "sync, delete older release directories and their ranker checkpoints "
        "(`instantrec prune` does it by hand). At least 1: processes still serving the "
        "release live before need it until they reload.")
    release_store: str | None = Field(
        None, description="Object store the publish step also pushes each live release to "
        "(bundle files, then its manifest, then the pointer releases/CURRENT), and the "
        "nearline updater each ranker checkpoint (the file, then the pointer rankers/LATEST; "
        "the newest 5 kept): a path, file:///abs/path or s3://bucket/prefix (endpoint and "
        "credentials from boto3's AWS_* variables); None = the home's releases/ and rankers/ "
        "only.")
    release_source: Literal["home", "store", "mlflow"] = Field(
        "home", description="Where serving takes its releases from: the home's releases/ "
        "(home), the release_store's pointer (store), or the registered model's champion "
        "version (mlflow, at mlflow_tracking_uri); store and mlflow download the release into "
        "this home's releases/, verify it and serve it from there. With store, and with "
        "mlflow when release_store is set, ranker checkpoints also come from the store's "
        "rankers/LATEST (copied into this home's rankers/), so replicas serve the nearline "
        "updater's online learning.")
    candidates: int = Field(100, ge=1, le=1000, description="Retrieval depth the ranker re-scores.")
    query_steps: str = Field(
        ",".join(DEFAULT_STEPS),
        description="Query understanding in serving: comma list of units, dimensions, compounds, "
                    "spelling (or 'none'); see serving/query.py.")
    user_id_key: SecretStr | None = Field(
        None, description="Key of the user-id hash; None = a random key kept under home/secrets.")
    events_backend: Literal["sqlite", "redis"] = "sqlite"
    sessions_backend: Literal["memory", "redis"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "instantrec"
    redis_group: str | None = Field(
        None, description="Consumer group through which the nearline updater reads a Redis "
        "event log (one updater per group; the updaters of two homes on one Redis need two); "
        "None = '<redis_prefix>:nearline'.")
    redis_group_lease_s: float = Field(
        REDIS_GROUP_LEASE_S, gt=0.0, le=3600.0, description="The updater holds its consumer "
        "group's lease in Redis, renewed while it runs: a second live updater on the group is "
        "refused after waiting twice this long; a crashed one's successor takes over at once on the same "
        "host, after the lease expired on another.")
    session_max: int = Field(100_000, ge=1, description="Sessions kept in memory (LRU).")
    session_ttl_s: float = Field(1800.0, gt=0.0)
    checkpoint_every_events: int = Field(500, ge=1)
    checkpoint_every_s: float = Field(0.5, gt=0.0)
    abuse_max_clicks: int = Field(10, ge=1, description="Positive events per window per session/user.")
    abuse_window_s: float = Field(10.0, gt=0.0)
    bot_filter: bool = Field(
        True, description="Drop bot and fake-click traffic before learning "
        "(pipelines/learning/abuse.py): positives on items never shown, purchases without a "
        "click, clicks at positions never shown, made-up result pages, replayed and clockwork "
        "sessions. False keeps only the rate limit (a shop that logs no impressions).")
    bot_window_s: float = Field(
        900.0, gt=0.0, description="How far back the bot filter looks (event time), and how "
        "long a session or user it caught stays dropped; the nearline updater's warm-up "
        "replay after a restart grows by twice this.")
    bot_page_min_passed: int = Field(
        1, ge=0, description="A click on an item of a new session's page is dropped unless "
        "this many of the query's other recent new sessions were shown it and chose another "
        "item (or nearly all were shown it): else the client made the page up.")
    bot_depth_min_share: float = Field(
        0.01, ge=0.0, le=1.0, description="A click at a position fewer than this share of "
        "recent sessions were shown at all is dropped (deeper than the shop's pages go).")
    bot_regular_events: int = Field(
        8, ge=3, description="Positives of one session, user or (query, item) whose "
        "intervals are checked for clockwork regularity.")
    bot_regular_cv: float = Field(
        0.05, ge=0.0, description="Below this coefficient of variation of those intervals the "
        "positives are a script's.")
    http_host: str = Field("127.0.0.1", description="Address `instantrec serve` binds (loopback "
                           "by default; 0.0.0.0 exposes it to the network).")
    http_port: int = Field(8000, ge=0, le=65535, description="Port of `instantrec serve`.")
    http_max_body_bytes: int = Field(1_048_576, ge=1024, description="Largest request body "
                                     "accepted (413 above it).")
    http_max_events: int = Field(1000, ge=1, description="Events in one POST /events batch.")
    http_rate_recommend: float = Field(
        10.0, gt=0.0, description="POST /recommend requests a second per session (bursts of "
        "twice that); past it 429.")
    http_rate_events: float = Field(
        50.0, gt=0.0, description="POST /events requests a second per session and per user "
        "(bursts of twice that); past it 429.")
    http_threads: int = Field(4, ge=1, le=64, description="Threads answering /recommend in "
                              "one `instantrec serve` process.")

    @field_validator("query_steps")
    @classmethod
    def _known_steps(cls, value: str) -> str:
        return ",".join(parse_steps(value)) or "none"

    @property
    def warehouse_path(self) -> Path:
        return layout.warehouse_path(self.home)

    @property
    def releases_dir(self) -> Path:
        return layout.releases_dir(self.home)

    @property
    def work_dir(self) -> Path:
        return layout.work_dir(self.home)

    @property
    def events_path(self) -> Path:
        return layout.events_path(self.home)

    @property
    def scaled_out(self) -> bool:
        """Whether processes on several hosts share this deployment's state (a Redis event log
        or session store)."""
        return self.events_backend == "redis" or self.sessions_backend == "redis"

    def check_scaled_out(self) -> None:
        """Refuse a scaled-out process without a configured user-id key: a key created under
        this host's home would hash one user's id differently on every replica."""
        if self.scaled_out and self.user_id_key is None:
            raise ConfigurationError(
                "a scaled-out process (events_backend or sessions_backend 'redis') needs the "
                "user-id key shared by every replica: set INSTANTREC_USER_ID_KEY (e.g. "
                "python -c 'import secrets; print(secrets.token_hex(32))'), the same everywhere")

    def user_key(self) -> bytes:
        """The user-id hashing key: configured, or created once (0600) under home/secrets
        (never for a scaled-out process: :meth:`check_scaled_out`)."""
        if self.user_id_key is not None:
            return self.user_id_key.get_secret_value().encode()
        self.check_scaled_out()
        path = layout.user_key_path(self.home)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".key-{os.getpid()}-{secrets.token_hex(4)}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32))
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)  # atomic: of several racing processes, exactly one wins
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        return path.read_text().strip().encode()

    @property
    def tracking_uri(self) -> str:
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        return f"sqlite:///{(layout.mlflow_dir(self.home) / 'mlflow.db').resolve()}"

    @property
    def mlflow_artifact_root(self) -> Path:
        return (layout.mlflow_dir(self.home) / "artifacts").resolve()


def load_settings(**overrides: object) -> Settings:
    """Read the environment once; keyword overrides (e.g. from CLI flags) win when not None."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})
