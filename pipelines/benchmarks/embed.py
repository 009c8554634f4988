"""Catalogue embedding items/s against sentence-transformers' encode, and as a share of peak FLOP/s.

Both sides embed the same real catalogue texts in the same run, interleaved repeat by repeat
(the machine is shared, so only same-run ratios mean anything): ours is
``serving.encoder.Encoder.encode`` (the embed step's batch path), the peer is
``SentenceTransformer(<the same weights>).encode(normalize_embeddings=True)`` at its default
batch size, with its ``max_seq_length`` set to our item token budget so both truncate alike.
The vectors are compared (cosine) to show it is a like-for-like comparison.

FLOPs are counted from the real (useful, unpadded) token counts of each text, for a BERT-like
encoder of L layers, hidden size H and P weights in the transformer layers, over n tokens:
``2 * P * n`` (every weight multiplies and adds once per token) ``+ 4 * L * n^2 * H``
(attention scores QK^T and their product with V). The CPU's peak is
``physical cores x clock x fp32 FLOPs per cycle per core``, the latter from /proc/cpuinfo's
flags: 2 FMA units x vector lanes (16 for AVX-512, 8 for AVX2) x 2 FLOPs per FMA, except AMD
Zen 3/4 (family 0x19), whose AVX-512 runs on 256-bit datapaths (8 lanes). The clock is the
kernel's maximum frequency, or else the reported MHz (a virtual machine reports its base clock
and hides any boost, so the fraction is then an upper bound). A CPU with AVX512-BF16 does two
bf16 multiply-adds per fp32 lane per instruction (VDPBF16PS), so a bf16 run is compared with
twice the fp32 peak (``peak_gflops_bf16``).

"ours" is the encoder as the embed step configures it (``INSTANTREC_EMBED_PRECISION``:
bfloat16 matrix products on CPUs with native bf16, fp32 elsewhere); when that is bf16, the same
encoder in fp32 is timed beside it (``ours_fp32``). ``--int8 all,selective`` adds our encoder
with int8 dynamic quantisation of its Linear layers (``torch.ao.quantization.quantize_dynamic``).
``--quality`` measures what each lower-precision variant costs in dense nDCG@10 against fp32
item vectors (retrieval over all products of each ``--quality-datasets`` data set; queries are
always encoded in fp32, as the serving query path does).
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from serving.layout import embedding_cache
from serving.schema import ITEM_ID, QUERY_ID
from serving.settings import Settings

log = logging.getLogger(__name__)

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
DATASETS = ("crowdflower", "homedepot")


def dataset_texts(name: str, n: int, seed: int = 0) -> list[str]:
    """``n`` item texts sampled from a judged data set's products, built as the offline
    evaluation builds them (title, plus the description where there is one)."""
    from pipelines.offline.evaluation import product_texts
    from pipelines.offline.judged import load_products

    products = load_products(DATA / name / "products.parquet")
    if n < products.height:
        products = products.sample(n, seed=seed)
    return product_texts(products)


def cpu_peak(cpuinfo: str | None = None, max_khz: int | None = None) -> dict[str, Any]:
    """Peak fp32 FLOP/s of a CPU, and what it was computed from.

    ``cpuinfo``: the text of ``/proc/cpuinfo`` (default: this machine's); ``max_khz``: the
    maximum clock in kHz (default: this machine's ``cpuinfo_max_freq`` when the kernel has it,
    else the highest ``cpu MHz`` in ``cpuinfo``)."""
    text = Path("/proc/cpuinfo").read_text() if cpuinfo is None else cpuinfo
    if max_khz is None and cpuinfo is None:
        freq = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
        max_khz = int(freq.read_text()) if freq.is_file() else None
    flags: set[str] = set()
    cores: set[tuple[str, str]] = set()
    mhz: list[float] = []
    model = ""
    vendor, family = "", ""
    block: dict[str, str] = {}
    for line in [*text.splitlines(), ""]:
        if ":" in line:
            key, _, value = line.partition(":")
            block[key.strip()] = value.strip()
            continue
        if block:
            flags |= set(block.get("flags", "").split())
            cores.add((block.get("physical id", "0"), block.get("core id", block.get("processor", ""))))
            if "cpu MHz" in block:
                mhz.append(float(block["cpu MHz"]))
            model = block.get("model name", model)
            vendor, family = block.get("vendor_id", vendor), block.get("cpu family", family)
            block = {}
    clock_ghz = (max_khz / 1e6 if max_khz is not None
                 else (max(mhz) / 1000 if mhz else float("nan")))
    zen_256 = vendor == "AuthenticAMD" and family == "25"  # Zen 3/4: 256-bit FMA datapaths
    if "avx512f" in flags and zen_256:
        isa, lanes = "avx512f+fma on 256-bit datapaths (AMD Zen 4)", 8
    elif "avx512f" in flags:
        isa, lanes = "avx512f+fma", 16
    elif {"avx2", "fma"} <= flags:
        isa, lanes = "avx2+fma", 8
    elif "avx" in flags:
        isa, lanes = "avx (no fma)", 4   # mul and add on separate ports: same as 4-lane FMA
    else:
        isa, lanes = "sse", 2
    per_cycle = 2 * lanes * 2          # 2 FMA units x lanes x (multiply + add)
    n_cores = len(cores) or (os.cpu_count() or 1)
    peak = n_cores * clock_ghz * per_cycle
    return {"model": model, "physical_cores": n_cores, "clock_ghz": round(clock_ghz, 3),
            "clock_source": "cpuinfo_max_freq" if max_khz is not None else "cpu MHz",
            "isa": isa, "fp32_flops_per_cycle_per_core": per_cycle,
            "peak_gflops": round(peak, 1),
            "peak_gflops_bf16": round(2 * peak if "avx512_bf16" in flags else peak, 1)}


def model_shape(encoder: Any) -> dict[str, int]:
    """Layers, hidden size and weights inside the transformer layers (no embeddings, no pooler:
    embedding lookups are not multiplications and mean pooling does not use the pooler)."""
    model = encoder.model
    layers = model.encoder.layer
    params = sum(p.numel() for p in layers.parameters())
    if params == 0:  # quantised layers keep their weights as packed params, not parameters
        raise ValueError("count FLOPs on the fp32 model")
    return {"layers": len(layers), "hidden": int(model.config.hidden_size),
            "params_non_embedding": int(params)}


def text_flops(tokens: np.ndarray, shape: dict[str, int]) -> np.ndarray:
    """FLOPs to encode sequences of ``tokens`` tokens each (see the module docstring)."""
    n = tokens.astype(np.float64)
    return 2 * shape["params_non_embedding"] * n + 4 * shape["layers"] * n ** 2 * shape["hidden"]


def token_counts(encoder: Any, texts: list[str]) -> np.ndarray:
    ids = encoder.tokenizer(texts, truncation=True, max_length=encoder.max_length,
                             return_attention_mask=False, return_token_type_ids=False)["input_ids"]
    return np.array([len(x) for x in ids], dtype=np.int64)


INT8_SCHEMES = ("all", "selective")


def padded_share(tokens: np.ndarray, order: np.ndarray, batch_size: int) -> float:
    """Padding tokens as a share of useful tokens when texts go in ``order`` into batches of
    ``batch_size``, each padded to its longest item."""
    padded = 0
    for start in range(0, len(order), batch_size):
        chunk = tokens[order[start:start + batch_size]]
        padded += int(chunk.max()) * len(chunk)
    return round(padded / int(tokens.sum()) - 1, 4)


def quantised(encoder: Any, scheme: str = "all") -> Any:
    """A second encoder whose Linear layers run int8 dynamic quantisation (weights int8,
    activations quantised per batch); the original is left untouched.

    ``all``: every Linear, per-tensor weight scales (quantize_dynamic's default).
    ``selective``: per-channel weight scales, and each layer's feed-forward output projection
    kept in fp32 (its input, after GELU, has the outliers that per-tensor int8 handles worst).
    """
    import torch
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig

    from serving.encoder import Encoder

    if scheme not in INT8_SCHEMES:
        raise ValueError(f"unknown int8 scheme {scheme!r} (one of {INT8_SCHEMES})")
    q = Encoder(encoder.path, max_length=encoder.max_length)
    if scheme == "all":
        spec: Any = {torch.nn.Linear: default_dynamic_qconfig}
    else:
        spec = {name: per_channel_dynamic_qconfig for name, mod in q.model.named_modules()
                if isinstance(mod, torch.nn.Linear) and "pooler" not in name
                and not (name.endswith(".output.dense") and ".attention." not in name)}
    q.replace_model(torch.ao.quantization.quantize_dynamic(q.model, spec, dtype=torch.qint8))
    return q


def _cos(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"median": round(float(np.median(cos)), 6), "min": round(float(cos.min()), 6)}


def bench_texts(texts: list[str], systems: dict[str, Any], repeats: int,
                flops: np.ndarray, peaks: dict[str, float]) -> dict[str, Any]:
    """Interleaved timing of each system (name -> texts -> vectors) on ``texts``; ``peaks``
    is each system's peak GFLOP/s (by the precision it computes in)."""
    times: dict[str, list[float]] = {name: [] for name in systems}
    vectors: dict[str, np.ndarray] = {}
    names = list(systems)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate who goes first
            t0 = time.perf_counter()
            vectors[name] = systems[name](texts)
            times[name].append(time.perf_counter() - t0)
    out: dict[str, Any] = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = {"items_per_s": round(len(texts) / med, 2), "seconds_median": round(med, 3),
                     "seconds": [round(t, 3) for t in ts],
                     "flop_fraction": round(float(flops.sum()) / med / (peaks[name] * 1e9), 4),
                     "useful_gflops_per_s": round(float(flops.sum()) / med / 1e9, 2)}
    out["ratio_ours_over_peer"] = round(out["ours"]["items_per_s"] / out["peer"]["items_per_s"], 3)
    reference = "ours_fp32" if "ours_fp32" in vectors else "ours"
    out["ratio_per_repeat"] = [round(p / o, 3) for o, p in zip(times["ours"], times["peer"],
                                                                 strict=True)]
    out["ratio_median_of_repeats"] = statistics.median(out["ratio_per_repeat"])
    out["cosine_ours_vs_peer"] = _cos(vectors["ours"], vectors["peer"])
    for name in (n for n in vectors if n.startswith("ours_")):
        out[f"ratio_{name}_over_peer"] = round(out[name]["items_per_s"]
                                               / out["peer"]["items_per_s"], 3)
    for name in (n for n in vectors if n.startswith("ours") and n != reference):
        out[f"cosine_{name}_vs_fp32"] = _cos(vectors[name], vectors[reference])
    return out


def dense_ndcg(item_vecs: np.ndarray, query_vecs: np.ndarray, qids: list[int],
               ids: list[str], judgments: Any, depth: int = 100,
               chunk: int = 512) -> dict[str, float]:
    """Retrieval-protocol metrics of plain cosine top-``depth`` rankings."""
    from pipelines.offline.judged import score_rankings

    rankings = {}
    for start in range(0, len(qids), chunk):
        sims = query_vecs[start:start + chunk] @ item_vecs.T
        top = np.argpartition(-sims, depth - 1, axis=1)[:, :depth]
        for q, row, cand in zip(qids[start:start + chunk], sims, top, strict=True):
            rankings[q] = [ids[i] for i in cand[np.argsort(-row[cand], kind="stable")]]
    means, _ = score_rankings(rankings, judgments, "retrieval")
    return {k: round(v, 4) for k, v in means.items()}


def precision_quality(encoder: Any, variants: dict[str, Any], dataset: str, cache: Path,
                      batch_size: int) -> dict[str, Any]:
    """Dense nDCG@10 (retrieval over all of ``dataset``'s products) with fp32 item vectors and
    with each variant's (name -> texts -> vectors).

    Queries are encoded in fp32 in every case (the serving query path is fp32). fp32 item
    vectors come from the offline evaluation's cache when present (same encoder version, same
    texts); each variant's are always computed.
    """
    from pipelines.offline.evaluation import embed_cached, product_texts
    from pipelines.offline.judged import load_judgments, load_products
    from serving.text import normalise_query

    products = load_products(DATA / dataset / "products.parquet")
    judgments = load_judgments(DATA / dataset / "judgments.parquet")
    texts = product_texts(products)
    ids = products[ITEM_ID].to_list()
    fp32 = embed_cached(encoder, texts, cache, batch_size=batch_size, progress=False,
                        precision="fp32")
    queries = judgments.queries()
    qids = queries[QUERY_ID].to_list()
    qvecs = encoder.encode([normalise_query(q, 10_000) for q in queries["query"].to_list()],
                           precision="fp32")
    base = dense_ndcg(fp32, qvecs, qids, ids, judgments)
    out: dict[str, Any] = {"items": len(texts), "queries": len(qids), "fp32": base}
    for name, fn in variants.items():
        t0 = time.perf_counter()
        vecs = fn(texts)
        seconds = time.perf_counter() - t0
        quant = dense_ndcg(vecs, qvecs, qids, ids, judgments)
        out[name] = {
            **quant, "ndcg10_delta": round(quant["ndcg@10"] - base["ndcg@10"], 4),
            "within_0.005": abs(quant["ndcg@10"] - base["ndcg@10"]) <= 0.005,
            "cosine_vs_fp32": _cos(vecs, fp32), "embed_s": round(seconds, 1)}
        log.info("%s on %s: %s (fp32 %s)", name, dataset, out[name], base)
    return out


def bench_embed(settings: Settings, items: int = 1000, datasets: tuple[str, ...] = DATASETS,
                repeats: int = 3, batch_size: int | None = None, peer_batch_size: int = 32,
                int8: tuple[str, ...] = (), quality: bool = False, cache: Path | None = None,
                texts: list[str] | None = None,
                quality_datasets: tuple[str, ...] = ("crowdflower",)) -> dict[str, Any]:
    import torch
    from sentence_transformers import SentenceTransformer

    from pipelines.steps import configured_encoder

    encoder = configured_encoder(settings)
    batch_size = batch_size or settings.embed_batch_size
    peer = SentenceTransformer(str(encoder.path), device="cpu")
    peer_default_len = int(peer.max_seq_length)
    peer.max_seq_length = encoder.max_length  # same truncation as ours, or it is not like for like
    systems: dict[str, Any] = {
        "ours": lambda t: encoder.encode(t, batch_size=batch_size),
        "peer": lambda t: peer.encode(t, batch_size=peer_batch_size, normalize_embeddings=True,
                                      convert_to_numpy=True, show_progress_bar=False),
    }
    variants: dict[str, Any] = {}  # lower-precision systems, for --quality
    if encoder.precision != "fp32":
        systems["ours_fp32"] = lambda t: encoder.encode(t, batch_size=batch_size, precision="fp32")
        variants[f"ours_{encoder.precision}"] = systems["ours"]
    for scheme in int8:
        q_encoder = quantised(encoder, scheme)
        systems[f"ours_int8_{scheme}"] = variants[f"ours_int8_{scheme}"] = (
            lambda t, q_encoder=q_encoder: q_encoder.encode(t, batch_size=batch_size))
    peak = cpu_peak()
    shape = model_shape(encoder)
    warm = ["warm-up text"] * 4
    for fn in systems.values():  # first calls allocate; keep them out of the timings
        fn(warm)
    sets = {"given": texts} if texts is not None else {d: dataset_texts(d, items) for d in datasets}
    result: dict[str, Any] = {
        "encoder": encoder.version, "precision_ours": encoder.precision,
        "batch_size_ours": batch_size,
        "batch_size_peer": peer_batch_size, "max_tokens_ours": encoder.max_length,
        "peer_max_seq_length_default": peer_default_len,
        "peer_max_seq_length_used": int(peer.max_seq_length),
        "torch_threads": torch.get_num_threads(), "repeats": repeats, "cpu": peak,
        "model": shape,
        "flops_formula": "2*P*n + 4*L*n^2*H per text, n = useful tokens (no padding)",
    }
    for name, batch in sets.items():
        tokens = token_counts(encoder, batch)
        flops = text_flops(tokens, shape)
        peaks = {name: peak["peak_gflops_bf16"] if name == "ours" and encoder.precision == "bf16"
                 else peak["peak_gflops"] for name in systems}
        res = bench_texts(batch, systems, repeats, flops, peaks)
        res["texts"] = len(batch)
        res["tokens_mean"] = round(float(tokens.mean()), 1)
        res["truncated_share"] = round(float((tokens >= encoder.max_length).mean()), 3)
        res["gflop_per_text"] = round(float(flops.mean()) / 1e9, 3)
        # ours sorts by token count; sentence-transformers by character length
        res["padding_share_ours"] = padded_share(tokens, np.argsort(-tokens, kind="stable"),
                                                 batch_size)
        res["padding_share_peer"] = padded_share(
            tokens, np.argsort([-len(t) for t in batch], kind="stable"), peer_batch_size)
        result[name] = res
    if quality and variants:
        for dataset in quality_datasets:
            result[f"quality_{dataset}"] = precision_quality(
                encoder, variants, dataset, cache or embedding_cache(settings.home),
                batch_size)
    return result


def add_arguments(p: Any) -> None:
    p.add_argument("--items", type=int, default=1000, help="texts sampled per data set")
    p.add_argument("--datasets", default=",".join(DATASETS),
                   help="comma list of judged data sets to sample texts from")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timing repeats")
    p.add_argument("--batch-size", type=int, default=None,
                   help="our batch size (default: the embed step's, INSTANTREC_EMBED_BATCH_SIZE)")
    p.add_argument("--peer-batch-size", type=int, default=32, help="sentence-transformers' default")
    p.add_argument("--int8", default="",
                   help=f"comma list of int8 dynamic quantisation schemes to time too "
                        f"({', '.join(INT8_SCHEMES)})")
    p.add_argument("--quality", action="store_true",
                   help="dense nDCG@10 of each lower-precision variant (bf16, int8) vs fp32 "
                        "item vectors, over all products (minutes)")
    p.add_argument("--quality-datasets", default="crowdflower",
                   help="comma list of judged data sets for --quality")
    p.add_argument("--vectors-cache", type=Path, default=None,
                   help="DuckDB embedding cache of the offline evaluation (fp32 vectors)")


def run(settings: Settings, args: Any) -> dict[str, Any]:
    return bench_embed(settings, items=args.items,
                       datasets=tuple(d for d in args.datasets.split(",") if d),
                       repeats=args.repeats, batch_size=args.batch_size,
                       peer_batch_size=args.peer_batch_size,
                       int8=tuple(x for x in args.int8.split(",") if x),
                       quality=args.quality, cache=args.vectors_cache,
                       quality_datasets=tuple(d for d in args.quality_datasets.split(",") if d))
