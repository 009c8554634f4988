"""``instantrec bench embed``: FLOP accounting and the CPU peak by hand (known answers on given
inputs, never this machine's)."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.benchmarks import embed


def test_text_flops_known_answer():
    shape = {"layers": 2, "hidden": 4, "params_non_embedding": 100}
    # 2 * 100 * 10 (weights) + 4 * 2 * 10^2 * 4 (attention) = 2000 + 3200
    assert embed.text_flops(np.array([10, 1]), shape).tolist() == [5200.0, 2 * 100 + 4 * 2 * 4]


def test_padded_share_known_answer():
    tokens = np.array([4, 2, 3, 1])
    # sorted: batches (4, 3) -> 2 * 4 and (2, 1) -> 2 * 2: 12 slots for 10 tokens
    assert embed.padded_share(tokens, np.array([0, 2, 1, 3]), 2) == pytest.approx(0.2)
    # unsorted: (4, 2) -> 8 and (3, 1) -> 6: 14 slots
    assert embed.padded_share(tokens, np.arange(4), 2) == pytest.approx(0.4)


def _cpuinfo(vendor: str, family: str, flags: str, mhz: float, cores: int) -> str:
    block = ("processor\t: {i}\nvendor_id\t: {vendor}\ncpu family\t: {family}\n"
             "model name\t: test cpu\nphysical id\t: 0\ncore id\t: {i}\n"
             "cpu MHz\t\t: {mhz}\nflags\t\t: {flags}\n\n")
    return "".join(block.format(i=i, vendor=vendor, family=family, mhz=mhz, flags=flags)
                   for i in range(cores))


def test_cpu_peak_known_answers():
    # AMD Zen 4: AVX-512 on 256-bit datapaths, 2 FMA x 8 lanes x 2 = 32 FLOP/cycle; bf16 doubles
    zen4 = embed.cpu_peak(_cpuinfo("AuthenticAMD", "25", "fma avx2 avx512f avx512_bf16",
                                   2600.0, 2))
    assert zen4["fp32_flops_per_cycle_per_core"] == 32
    assert zen4["physical_cores"] == 2 and zen4["clock_ghz"] == 2.6
    assert zen4["peak_gflops"] == pytest.approx(166.4)
    assert zen4["peak_gflops_bf16"] == pytest.approx(332.8)
    assert zen4["clock_source"] == "cpu MHz"
    # Intel AVX-512, full-width: 64 FLOP/cycle; the max clock wins over cpu MHz when known
    intel = embed.cpu_peak(_cpuinfo("GenuineIntel", "6", "fma avx2 avx512f", 2000.0, 4),
                           max_khz=3_000_000)
    assert intel["fp32_flops_per_cycle_per_core"] == 64
    assert intel["peak_gflops"] == pytest.approx(4 * 3.0 * 64)
    assert intel["peak_gflops_bf16"] == intel["peak_gflops"]  # no native bf16
    assert intel["clock_source"] == "cpuinfo_max_freq"
    # AVX2 + FMA: 32; plain AVX without FMA: 16
    assert embed.cpu_peak(_cpuinfo("GenuineIntel", "6", "fma avx avx2", 1000.0, 1))[
        "fp32_flops_per_cycle_per_core"] == 32
    assert embed.cpu_peak(_cpuinfo("GenuineIntel", "6", "avx", 1000.0, 1))[
        "fp32_flops_per_cycle_per_core"] == 16
