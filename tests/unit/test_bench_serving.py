"""The serving bench's arithmetic: seeded Poisson arrivals, goodput against each request's deadline, the
burst's figures, and the headline rows made from them."""
import statistics

import pytest

from bench.serving import MIX, Outcome, burst_figures, poisson_plan, summarise
from docs.gen.performance import serving_rows


def test_arrivals_are_a_seeded_poisson_process_of_the_mix_at_the_rate_asked():
    plan = poisson_plan(2.0, 4000, seed=3)
    assert plan == poisson_plan(2.0, 4000, seed=3) and plan != poisson_plan(2.0, 4000, seed=4)
    gaps = [b - a for (a, _), (b, _) in zip(plan, plan[1:])]
    assert statistics.mean(gaps) == pytest.approx(0.5, rel=0.06)  # exponential gaps of mean 1 / rate
    assert statistics.stdev(gaps) == pytest.approx(0.5, rel=0.1)
    shares = {kind: sum(request.kind == kind for _, request in plan) / len(plan) for kind, _, _ in MIX}
    for kind, share, _ in MIX:
        assert shares[kind] == pytest.approx(share, abs=0.03)
    assert len({request.index for _, request in plan}) == len(plan)  # a unique prompt each


def test_goodput_counts_only_requests_answered_ok_within_their_own_deadline():
    outcomes = [Outcome("chat", 1.0, ttft_s=0.1, e2e_s=0.9, tokens=32, gaps_s=[0.02] * 31),  # good
                Outcome("chat", 1.0, ttft_s=0.2, e2e_s=1.1, tokens=32, gaps_s=[0.03] * 31),  # late
                Outcome("chat_1000", 3.0, ttft_s=1.0, e2e_s=2.5, tokens=32, gaps_s=[0.04] * 31),  # good
                Outcome("chat", 1.0, status="DEADLINE_EXCEEDED")]
    row = summarise(outcomes, elapsed_s=10.0)
    assert row["goodput_share"] == 0.5 and row["goodput_req_s"] == 0.2
    assert row["statuses"] == {"OK": 3, "DEADLINE_EXCEEDED": 1}
    assert row["throughput_req_s"] == pytest.approx(0.3) and row["throughput_tok_s"] == pytest.approx(9.6)
    assert row["ttft"]["p50_ms"] == pytest.approx(200) and row["e2e"]["p99_ms"] <= 2500


def test_a_bursts_figures_run_from_submission_to_the_last_token():
    outcomes = [Outcome("chat", 600, ttft_s=0.1 * (index + 1), e2e_s=2.0, tokens=64, gaps_s=[0.02] * 62 + [0.06])
                for index in range(8)]
    figures = burst_figures(outcomes, elapsed_s=2.0)
    assert figures["tok_s"] == 256 and figures["ttft_last_over_first"] == pytest.approx(8)
    assert figures["inter_token_p50_ms"] == pytest.approx(20)


def test_the_headline_shows_the_burst_and_goodput_at_each_rate():
    figures = {"tok_s": 260.0, "ttft_first_ms": 120.0, "ttft_last_ms": 400.0, "ttft_last_over_first": 3.3,
               "inter_token_p99_ms": 60.0, "inter_token_p99_over_p50": 2.5}
    rate = {"goodput_share": 0.9, "goodput_req_s": 1.2, "ttft": {"p50_ms": 300, "p90_ms": 500, "p99_ms": 800}}
    serving = {"burst": figures, "burst_hf_generate": dict(figures, tok_s=100.0), "goodput_at_1_5x_over_peak": 0.85,
               "rates": [{"fraction_of_capacity": 1.5, "rate_req_s": 1.8, "mesh": rate,
                          "hf_generate": dict(rate, goodput_share=0.2)}]}
    rows = dict(serving_rows(serving))
    assert any("260 tok/s" in value and "100 tok/s" in value for value in rows.values())
    assert any("90% within deadline" in value and "`generate` 20%" in value and "300 / 500 / 800 ms" in value
               for value in rows.values())
    assert rows["goodput at 1.5x capacity, against the peak"] == "85%"
    assert serving_rows(None) == []
