"""`scripts/bench.py`'s pure parts."""

from __future__ import annotations

from bench import median_round


def rounds(*tok_s: float) -> list[dict]:
    return [{"output_throughput": t, "p50_ttft_ms": t / 100} for t in tok_s]


def test_the_median_round_counts_and_every_round_is_listed():
    assert median_round(rounds(2300, 1200, 1900)) == {"output_throughput": 1900, "p50_ttft_ms": 19.0,
                                                       "rounds_tok_s": [2300, 1200, 1900]}


def test_of_two_rounds_the_slower_counts():
    assert median_round(rounds(2300, 1200))["output_throughput"] == 1200


def test_one_round_is_reported_as_it_is():
    assert median_round(rounds(1500)) == {"output_throughput": 1500, "p50_ttft_ms": 15.0}
