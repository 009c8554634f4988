"""``instantrec``: every pipeline step, serving and evaluation from the command line.

Machine-readable results go to stdout as JSON (``--json``) or as plain text; logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from serving.errors import InstantrecError
from serving.layout import bundle_cache, embedding_cache
from serving.schema import ITEM_ID
from serving.settings import Settings, load_settings


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(home=args.home, encoder_path=getattr(args, "encoder", None))


def _emit(payload: Any) -> None:
    # NaN and infinities are not JSON: a figure that was not measured must fail loudly first
    print(json.dumps(payload, indent=2, default=str, allow_nan=False))


def cmd_ingest(args: argparse.Namespace) -> None:
    from pipelines.steps import run_ingest

    _emit(run_ingest(_settings(args), args.catalogue))


def cmd_embed(args: argparse.Namespace) -> None:
    from pipelines.steps import run_embed, yield_cpu

    settings = _settings(args)
    yield_cpu(settings)
    _emit(run_embed(settings, args.shard, args.shards, progress=True))


def cmd_index(args: argparse.Namespace) -> None:
    from pipelines.steps import run_index

    _emit(run_index(_settings(args)))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from pipelines.steps import run_evaluate

    _emit(run_evaluate(_settings(args), args.bundle, args.golden, args.judgments))


def cmd_publish(args: argparse.Namespace) -> None:
    from pipelines.steps import run_publish

    _emit(run_publish(_settings(args), args.bundle))


def cmd_register(args: argparse.Namespace) -> None:
    from pipelines.steps import run_register

    _emit(run_register(_settings(args), args.release))


def _not_a_directory(path: Path | None, what: str) -> None:
    """Refuse a file argument that names a directory, saying so (before, some of them said
    "does not exist", which sends an operator looking for a file that is there)."""
    if path is not None and Path(path).is_dir():
        raise ValueError(f"{what} {path} is a directory, expected a file")


def cmd_build(args: argparse.Namespace) -> None:
    from pipelines.steps import run_build, yield_cpu

    _not_a_directory(args.catalogue, "catalogue")
    _not_a_directory(args.golden, "golden queries file")
    settings = _settings(args)
    yield_cpu(settings)  # a build is a batch job: requests served beside it go first
    _emit(run_build(settings, args.catalogue, args.golden, register=not args.no_register,
                    progress=True))


def cmd_recommend(args: argparse.Namespace) -> None:
    from serving.recommender import Recommender

    filters: dict[str, Any] = {}
    if args.category:
        filters["category"] = args.category
    if args.min_price is not None:
        filters["min_price"] = args.min_price
    if args.max_price is not None:
        filters["max_price"] = args.max_price
    if args.in_stock:
        filters["in_stock"] = True
    rec = Recommender.load(settings=_settings(args), watch=False)
    if args.session:
        rec.restore_session(args.session)  # a one-shot process has no session memory
    results = rec.recommend(args.query, k=args.k, filters=filters or None,
                            session_id=args.session)
    if args.json:
        _emit({"query": args.query, "session": args.session, "release_id": rec.release_id,
               "ranker_checkpoint": rec.ranker_seq, "results": [r.to_dict() for r in results]})
        return
    label = repr(args.query) if args.query is not None else f"browsing session {args.session!r}"
    print(f"{label}  (release {rec.release_id}, ranker checkpoint {rec.ranker_seq})")
    for r in results:
        price = f"${r.price:,.2f}" if r.price is not None else "-"
        stock = "" if r.in_stock else "  [out of stock]"
        print(f"  {r.rank:>2}. {r.score:.3f}  {r.item_id:<12} {r.title}  ({r.category}, "
              f"{price}){stock}")


def cmd_serve(args: argparse.Namespace) -> None:
    from serving.api import serve

    settings = load_settings(home=args.home, encoder_path=getattr(args, "encoder", None),
                             http_host=args.host, http_port=args.port)
    settings.check_scaled_out()  # at start, not at the first event
    print(f"instantrec serving {settings.home} on http://{settings.http_host}:"
          f"{settings.http_port}/ (storefront), /docs (API)", file=sys.stderr)
    serve(settings, log_level="debug" if args.verbose else "info", server=args.server)


def cmd_record(args: argparse.Namespace) -> int:
    from serving.recommender import Recommender

    _not_a_directory(args.file, "events file")  # before loading a release to record with
    rec = Recommender.load(settings=_settings(args), watch=False)
    if args.file:
        return _record_file(rec, Path(args.file))
    if not (args.session and args.item and args.type):
        raise ValueError("record needs --session, --item and --type (or --file)")
    one = {"session_id": args.session, ITEM_ID: args.item, "type": args.type}
    for key, value in (("query", args.query), ("position", args.position),
                       ("user_id", args.user), ("event_id", args.event_id)):
        if value is not None:
            one[key] = value
    stored, result = rec.record_batch([one])
    _emit({"recorded": result.accepted, "duplicates": result.duplicates,
           "event_ids": [e.event_id for e in stored]})
    return 0


def cmd_forget(args: argparse.Namespace) -> None:
    from serving.recommender import Recommender

    rec = Recommender.load(settings=_settings(args), watch=False)
    try:
        _emit(rec.forget(args.user))
    finally:
        rec.close()


def cmd_prune(args: argparse.Namespace) -> None:
    from serving.retention import prune_releases

    settings = _settings(args)
    keep = args.keep if args.keep is not None else settings.keep_releases
    pruned = prune_releases(settings.releases_dir, keep, settings.home, dry_run=args.dry_run)
    _emit({"releases_dir": str(settings.releases_dir), "keep": keep,
           "dry_run": args.dry_run, "pruned": pruned})


RECORD_BATCH = 1000


def _record_file(rec: Any, path: Path) -> int:
    """Record a JSON-lines file: every valid line is stored (in batches of
    :data:`RECORD_BATCH`), every bad one reported by its line number and reason; exit status 1
    when any line was rejected."""
    from serving.events import EventError, parse_event

    _not_a_directory(path, "events file")
    if not path.is_file():
        raise ValueError(f"events file {path} does not exist or is not a file")
    key, max_chars = rec.settings.user_key(), rec.settings.max_query_chars
    recorded = duplicates = 0
    rejected: list[dict[str, Any]] = []
    batch: list[Any] = []

    def flush() -> None:
        nonlocal recorded, duplicates
        if batch:
            _, result = rec.record_batch(batch)
            recorded += result.accepted
            duplicates += result.duplicates
            batch.clear()

    with path.open(encoding="utf-8", errors="surrogateescape", newline="") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                batch.append(parse_event(json.loads(line), key, max_chars))
            except (ValueError, RecursionError) as exc:  # JSON errors are ValueErrors too
                field = exc.field if isinstance(exc, EventError) else None
                reason = str(exc) if isinstance(exc, EventError) else f"not JSON: {exc}"
                rejected.append({"line": number, "field": field, "error": reason[:300]})
            if len(batch) >= RECORD_BATCH:
                flush()
    flush()
    _emit({"recorded": recorded, "duplicates": duplicates, "rejected": len(rejected),
           "rejected_lines": rejected[:100]})
    for bad in rejected[:20]:
        print(f"instantrec record: {path}:{bad['line']}: {bad['error']}", file=sys.stderr)
    return 1 if rejected else 0


def cmd_nearline(args: argparse.Namespace) -> None:
    from pipelines.learning.nearline import run_nearline

    _emit(run_nearline(_settings(args), once=args.once, max_seconds=args.max_seconds))


def cmd_bench(args: argparse.Namespace) -> None:
    from pipelines import benchmarks

    result = benchmarks.load(args.what).run(_settings(args), args)
    benchmarks.check_finite(result, f"bench {args.what}")
    if args.json:
        _emit(result)
    else:
        for key, value in result.items():
            print(f"{key:>24}: {value}")


def cmd_retrain(args: argparse.Namespace) -> None:
    from pipelines.steps import run_retrain

    _emit(run_retrain(_settings(args), holdout=args.holdout, epochs=args.epochs))


def cmd_finetune(args: argparse.Namespace) -> None:
    from pipelines.steps import run_finetune

    result = run_finetune(_settings(args), args.products, args.judgments, holdout=args.holdout,
                          fold=args.fold, max_steps=args.max_steps, epochs=args.epochs,
                          promote=not args.no_promote, min_gain=args.min_gain,
                          hybrid=args.hybrid, eval_max_items=args.eval_max_items,
                          threads=args.threads)
    if args.json:
        _emit(result)
        return
    if "reason" in result:
        print(f"not fine-tuned: {result['reason']}")
        return
    t, ev, reg = result["train"], result["evaluation"], result["register"]
    print(f"encoder {t['encoder_id']}: {t['steps']} steps on {t['train_pairs']} pairs "
          f"({t['train_queries']} queries) in {t['seconds']}s")
    for name, res in ev["sets"].items():
        print(f"  held-out {name} ({res['scored_queries']} queries): " + "  ".join(
            f"{m} {res['incumbent'][m]:.4f} -> {res['candidate'][m]:.4f}"
            for m in ("ndcg@10", "recall@100", "mrr")))
    print(f"registered {reg['model_name']} v{reg['version']}; "
          f"{'promoted' if reg['promoted'] else 'not promoted'} ({reg['gate']})")


def cmd_eval(args: argparse.Namespace) -> None:
    from pipelines.offline.evaluation import evaluate_judged
    from serving.encoder import Encoder

    _not_a_directory(args.products, "products file")  # before loading the encoder
    _not_a_directory(args.judgments, "judgments file")
    settings = _settings(args)
    # queries encoded as serving encodes them (the ONNX query model, when it serves)
    encoder = Encoder(settings.encoder_path, max_length=settings.item_max_tokens,
                      precision=settings.embed_precision, backend=settings.encoder_backend,
                      query_precision=settings.query_precision)
    report = evaluate_judged(Path(args.products), Path(args.judgments), args.protocol, encoder,
                             embedding_cache(settings.home),
                             per_query=args.per_query,
                             relevant_threshold=args.relevant_threshold,
                             query_steps=args.query_steps, methods=args.methods,
                             retrieval=args.retrieval, bundles=bundle_cache(settings.home),
                             seed=settings.index_seed,
                             recall_target=settings.index_recall_target)
    if not args.no_chart:
        from pipelines.offline.evaluation import write_eval_chart

        data_set = Path(args.judgments).resolve().parent.name
        chart = args.chart or settings.home / f"eval-{data_set}-{args.protocol}.png"
        title = f"{data_set}: {args.protocol} protocol, {report['n_queries']} queries"
        report["chart"] = str(write_eval_chart(report, chart, title=title))
    if args.json:
        _emit(report)
        return
    print(f"protocol {report['protocol']}, {report['n_queries']} queries, retrieval "
          f"{report['retrieval']['name']}: {report['retrieval']['description']}")
    for method, metrics in report["methods"].items():
        print(f"  {method:<8} " + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()))


def cmd_simulate(args: argparse.Namespace) -> None:
    from pipelines.offline.simulate import simulate

    report = simulate(_settings(args), args.products, args.judgments, sessions=args.sessions,
                      rounds=args.rounds, seed=args.seed, max_queries=args.max_queries,
                      shift_sessions=args.shift_sessions, chart=args.chart,
                      retrain_every=args.retrain_every)
    if args.json:
        _emit(report)
        return
    print(f"{report['n_seen_queries']} seen / {report['n_unseen_queries']} unseen queries, "
          f"{report['events']['learning']} events, chart {report['chart']}")
    for name in ("seen", "unseen"):
        before, after = report[name]["before"], report[name]["after"]
        print(f"  {name:<7} " + "  ".join(f"{m} {before[m]:.3f} -> {after[m]:.3f}"
                                          for m in ("ndcg@10", "recall@100", "mrr")))
    for key, label in (("intent_shift", "trained"), ("intent_shift_untrained", "untrained")):
        shift = report[key]
        if shift.get("sessions"):
            print(f"  intent shift ({label} ranker): recovers after "
                  f"{shift['interactions_to_recover']} interaction(s) (mean "
                  f"{shift['interactions_to_recover_mean']}), old need's share of the top 10 "
                  f"{shift['old_need_share_top10']:.3f} (fresh "
                  f"{shift['old_need_share_top10_fresh']:.3f})")


def _catalogue_commands(sub: Any) -> None:
    """The catalogue refresh, step by step and whole: ingest .. register, build."""
    p = sub.add_parser("ingest", help="validate and upsert a catalogue snapshot")
    p.add_argument("--catalogue", type=Path, default=None, help="CSV/Parquet (default: demo)")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("embed", help="embed new/changed items (one shard)")
    p.add_argument("--shard", type=int, default=0)
    p.add_argument("--shards", type=int, default=1)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("index", help="store embedded shards and stage a release bundle")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("evaluate", help="evaluate a staged bundle and decide its gate")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--golden", type=Path, default=None)
    p.add_argument("--judgments", type=Path, default=None)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("publish", help="publish an evaluated bundle; move the pointer if it passed")
    p.add_argument("--bundle", type=Path, required=True)
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("register", help="log and register a published release in MLflow")
    p.add_argument("--release", type=Path, required=True)
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("build", help="ingest + embed + index + evaluate + publish + register")
    p.add_argument("--catalogue", type=Path, default=None, help="CSV/Parquet (default: demo)")
    p.add_argument("--golden", type=Path, default=None, help="golden queries JSON")
    p.add_argument("--no-register", action="store_true", help="skip the MLflow registry")
    p.set_defaults(func=cmd_build)


def _serving_commands(sub: Any) -> None:
    """Serving from the command line: recommend, serve, record."""
    p = sub.add_parser("recommend", help="recommendations for a query from the live release")
    p.add_argument("query", nargs="?", default=None,
                   help="the query (omit with --session to browse from session interest)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--category", action="append", default=None)
    p.add_argument("--min-price", type=float, default=None)
    p.add_argument("--max-price", type=float, default=None)
    p.add_argument("--in-stock", action="store_true")
    p.add_argument("--session", default=None, help="session id: its recent events shape results")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_recommend)

    p = sub.add_parser("serve", help="the HTTP service and demo storefront (FastAPI, uvicorn)")
    p.add_argument("--host", default=None,
                   help="address to bind (default: $INSTANTREC_HTTP_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, default=None,
                   help="port (default: $INSTANTREC_HTTP_PORT or 8000)")
    p.add_argument("--server", choices=["uvicorn", "granian"], default="uvicorn",
                   help="HTTP server (uvicorn by measurement: see `bench http`)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("record", help="record feedback events (one, or a JSON-lines file)")
    p.add_argument("--file", type=Path, default=None, help="JSON lines, one event per line")
    p.add_argument("--session", default=None)
    p.add_argument("--item", default=None)
    p.add_argument("--type", choices=["impression", "click", "add_to_cart", "purchase"])
    p.add_argument("--query", default=None)
    p.add_argument("--position", type=int, default=None)
    p.add_argument("--user", default=None, help="raw user id; only its keyed hash is stored")
    p.add_argument("--event-id", default=None, help="re-sending the same id is a no-op")
    p.set_defaults(func=cmd_record)


def _forget_command(sub: Any) -> None:
    p = sub.add_parser("forget", help="remove a user's events and session state")
    p.add_argument("--user", required=True, help="the raw user id, as the shop sent it")
    p.set_defaults(func=cmd_forget)
    p = sub.add_parser("prune", help="delete old releases and their ranker checkpoints, keeping "
                                     "the live one and the newest --keep others")
    p.add_argument("--keep", type=int, default=None,
                   help="old releases to keep (default INSTANTREC_KEEP_RELEASES, 5; at least 1)")
    p.add_argument("--dry-run", action="store_true", help="name what would go, delete nothing")
    p.set_defaults(func=cmd_prune)


def _learning_commands(sub: Any) -> None:
    """Learning from feedback: nearline, retrain, finetune."""
    p = sub.add_parser("nearline", help="fold feedback events into the ranker continuously")
    p.add_argument("--once", action="store_true", help="process what is pending, then exit")
    p.add_argument("--max-seconds", type=float, default=None, help="stop after this long")
    p.set_defaults(func=cmd_nearline)

    p = sub.add_parser("retrain", help="retrain the ranker on all feedback; promote it if better")
    p.add_argument("--epochs", type=int, default=5, help="passes over the examples")
    p.add_argument("--holdout", type=float, default=0.2,
                   help="share of the most recent events held out to compare with the champion")
    p.set_defaults(func=cmd_retrain)

    p = sub.add_parser("finetune", help="fine-tune the encoder on positive pairs; promote it "
                                        "if it wins on held-out queries")
    p.add_argument("--products", type=Path, default=None, help="judged data: products file")
    p.add_argument("--judgments", type=Path, default=None, help="judged data: judgments file")
    p.add_argument("--max-steps", type=int, default=200, help="optimiser steps at most")
    p.add_argument("--epochs", type=int, default=1, help="passes over the training pairs")
    p.add_argument("--holdout", type=float, default=0.2,
                   help="share of queries (by a hash of the query) held out for the gate")
    p.add_argument("--fold", type=int, default=0,
                   help="which holdout-wide slice of the query hash is held out (k-fold)")
    p.add_argument("--min-gain", type=float, default=None,
                   help="held-out nDCG@10 gain needed to promote (default 0.002)")
    p.add_argument("--no-promote", action="store_true", help="register, never promote")
    p.add_argument("--hybrid", action="store_true",
                   help="also score the BM25 + dense hybrid on the judged held-out queries")
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads (1 when other jobs keep the cores busy)")
    p.add_argument("--eval-max-items", type=int, default=None,
                   help="evaluate on the held-out queries' judged items plus a fixed sample "
                        "of the rest, N items in all (cheaper; default: whole catalogue)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_finetune)


def _bench_commands(sub: Any) -> None:
    """One subcommand per benchmark module (`instantrec bench NAME`)."""
    p = sub.add_parser("bench", help="benchmarks that print figures (never pass/fail)")
    bench = p.add_subparsers(dest="what", required=True, metavar="BENCHMARK")
    from pipelines import benchmarks

    for name in benchmarks.available():
        module = benchmarks.load(name)
        b = bench.add_parser(name, help=(module.__doc__ or name).strip().splitlines()[0])
        module.add_arguments(b)
        b.add_argument("--json", action="store_true")
        b.set_defaults(func=cmd_bench)


def _offline_commands(sub: Any) -> None:
    """Offline evaluation on judged data: eval, simulate."""
    p = sub.add_parser("eval", help="offline evaluation on judged product-search data")
    p.add_argument("--products", type=Path, required=True)
    p.add_argument("--judgments", type=Path, required=True)
    p.add_argument("--protocol", choices=["rerank", "retrieval"], default="retrieval")
    p.add_argument("--retrieval", choices=["served", "exact"], default="served",
                   help="retrieval protocol: 'served' retrieves as serving does (a release "
                        "bundle of the catalogue, Annoy + BM25, cached under <home>/cache/"
                        "bundles); 'exact' is the exact-search reference, not the served path")
    p.add_argument("--relevant-threshold", type=float, default=None,
                   help="label counted as relevant (default: from the label scale)")
    p.add_argument("--per-query", action="store_true")
    p.add_argument("--query-steps", default=None,
                   help="query-understanding steps, comma-separated (units, dimensions, "
                        "compounds, spelling), or 'none' (default: the serving defaults)")
    p.add_argument("--methods", default=None,
                   help="comma-separated subset of bm25, dense, fusion, hybrid, ranker (default: all)")
    p.add_argument("--chart", type=Path, default=None,
                   help="PNG of the figures (default: <home>/eval-<data set>-<protocol>.png)")
    p.add_argument("--no-chart", action="store_true", help="write no PNG")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("simulate", help="simulated shoppers on judged queries through the real "
                                        "feedback loop; nDCG@10 of seen and unseen queries")
    p.add_argument("--products", type=Path, required=True)
    p.add_argument("--judgments", type=Path, required=True)
    p.add_argument("--sessions", type=int, default=2500, help="simulated sessions per round")
    p.add_argument("--rounds", type=int, default=8,
                   help="rounds of sessions, each followed by a nearline update and a measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-queries", type=int, default=None,
                   help="use only the first M judged queries (by query id) with a relevant product")
    p.add_argument("--shift-sessions", type=int, default=200, help="intent-shift sessions")
    p.add_argument("--retrain-every", type=int, default=4,
                   help="run the batch retrain (position-debiased relevance model from the "
                        "feedback, then the ranker) after every N rounds; 0: never")
    p.add_argument("--chart", type=Path, default=None,
                   help="PNG of the learning curve (default: <home>/simulate.png)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_simulate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="instantrec", description=__doc__)
    parser.add_argument("--home", type=Path, default=None,
                        help="artefact root (default: $INSTANTREC_HOME or ./artefacts)")
    parser.add_argument("--encoder", type=Path, default=None,
                        help="local transformers encoder directory (default: all-MiniLM-L6-v2)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    for add_commands in (_catalogue_commands, _serving_commands, _forget_command,
                         _learning_commands,
                         _bench_commands, _offline_commands):
        add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # This process's stdout carries results: MLflow must not print run links there (it does
    # against a tracking server), nor report telemetry. An operator's own setting wins.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # One query at a time: the tokenizer's thread pool only adds hand-offs (unseen requests
    # through `serve` took 1.5-2 ms longer with it). Batch embedding sorts and pads itself.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except (InstantrecError, ValueError) as exc:
        print(f"instantrec {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
