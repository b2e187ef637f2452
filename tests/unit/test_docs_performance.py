"""The Performance page and the README's headline table are generated from one bench JSON of the shape
bench/run.py writes; the README stays a front page, not a lab notebook."""
from __future__ import annotations

import json
import re

import pytest

from bench.run import table
from docs.gen import performance


def _latency(p50: float, **extra) -> dict:
    return {"n": 400, "p50_ms": p50, "p99_ms": p50 * 3, "mean_ms": p50 * 1.2, **extra}


def _rate(p50: float) -> dict:
    return {"n": 3, "p50": p50, "p99_low": p50 * 0.8}


def bench_results() -> dict:
    """A small run of every part, with the keys bench/run.py, generation.py, engine_speed.py and routing.py write."""
    return {
        "when": "RUN-TIME", "machine": "bench-host",
        "cache_hits": {
            "grpc_empty_rpc_c1": _latency(0.4),
            "redis_get_c1": _latency(0.1),
            "cache_hit_c1[default]": _latency(0.77, ratio_to_empty_rpc_p50=1.9, tracing_overhead_p50=0.03),
            "cache_hit_c1[tracing_off]": _latency(0.75, ratio_to_empty_rpc_p50=1.8),
            "cache_hit_c1[tls_edge]": _latency(0.84, ratio_to_empty_rpc_p50=2.1, tls_overhead_p50=0.09),
            "cache_hit_c16": _latency(12.8, throughput_rps=1193.0),
        },
        "generation": {
            "precision": "int4",
            "decode": {f"{n}_streams": {"gateway_tok_s": _rate(16.8 * n), "gateway_per_stream_tok_s": _rate(16.0),
                                        "hf_generate_tok_s": _rate(26.6 * n), "ratio_to_hf_generate": 0.63,
                                        "tls_edge_tok_s": _rate(16.6 * n), "tls_edge_ratio_to_plaintext": 0.99}
                       for n in (1, 4, 8)},
            "ttft_300": {"cold": _latency(577.0), "local_prefix_hit": _latency(105.0, ratio_to_cold_p50=0.18),
                         "redis_prefix_hit": _latency(115.0, ratio_to_cold_p50=0.2),
                         "hf_generate": _latency(591.0, ratio_to_cold_p50=1.02)},
        },
        "engine": {
            "precision": "int4", "threads": 2, "worker_torch_threads": 2, "max_batched_tokens": 64,
            "prefill_share": 0.5,
            "decode": {"1_streams": {"engine_tok_s": _rate(73.2), "gateway_tok_s": _rate(67.9),
                                     "hf_generate_tok_s": _rate(49.7), "engine_ratio_to_hf": 1.47,
                                     "gateway_ratio_to_hf": 1.37, "engine_aggregate_tok_s": _rate(73.0),
                                     "gateway_aggregate_tok_s": _rate(67.0), "llama_cpp_tok_s": _rate(103.2),
                                     "engine_ratio_to_llama_cpp": 0.71, "gateway_ratio_to_llama_cpp": 0.66},
                       "8_streams": {"engine_tok_s": _rate(229.5), "gateway_tok_s": _rate(195.5),
                                     "hf_generate_tok_s": _rate(190.9), "engine_ratio_to_hf": 1.2,
                                     "gateway_ratio_to_hf": 1.02, "engine_aggregate_tok_s": _rate(220.0),
                                     "gateway_aggregate_tok_s": _rate(190.0)}},
            "step_ms": {"1": {"steps": 120, "forward": 12.8, "sampling_and_text": 0.19, "delivery": 0.18}},
            "prefill_stall": {"running_stream_alone": {"n": 252, "p50_ms": 13.4, "p99_ms": 21.8, "max_ms": 23.3},
                              "beside_1000_token_prompt_default": {"n": 252, "p50_ms": 18.4, "p99_ms": 26.1,
                                                                   "max_ms": 27.0, "p99_over_alone_p50": 1.96,
                                                                   "long_prompt_ttft_p50_ms": 3717.0}},
        },
        "models": {
            model: {"precision": "int4", "revision": "0123456789abcdef",
                    "decode": {"1_streams": {"gateway_tok_s": _rate(one), "hf_generate_tok_s": _rate(one / 1.1),
                                             "ratio_to_hf_generate": 1.1},
                               "8_streams": {"gateway_tok_s": _rate(one * 4), "hf_generate_tok_s": _rate(one * 3),
                                             "ratio_to_hf_generate": 1.33}},
                    "ttft_300": {"gateway": _latency(ttft + 2.4), "inference_direct": _latency(ttft),
                                 "hf_generate": _latency(ttft * 1.1), "gateway_adds_p50_ms": 2.4}}
            for model, one, ttft in (("smollm2", 70.0, 600.0), ("gemma3", 30.0, 900.0))
        },
        "routing": {
            "replicas": 2,
            "workload": {"rounds": 3, "groups": 6, "questions": 4, "max_new_tokens": 2, "callers": 2},
            "routing": {mode: {"ttft": _latency(p50), "over_budget": 0, "prompt_tokens": 4000.0,
                               "local_prefix_hit_rate": local, "redis_prefix_hit_rate": 0.0}
                        for mode, p50, local in (("round_robin", 423.6, 0.39), ("affine", 362.3, 0.55))},
            "cache_hit_targets": {"multi_endpoint": _latency(0.844, ratio_to_single_p50=1.01),
                                  "single_endpoint": _latency(0.836)},
        },
        "coalescing": {
            "max_new_tokens": 32, "goal_ratio": 1.2,
            **{name: {"requests": 50, "gateways": gateways, "generations": 1.0,
                      "roles": {"leader": 1, "coalesced": 49}, "answered": _latency(leader * 0.99),
                      "leader_ms": leader, "slowest_to_leader": slowest, "p99_to_leader": slowest,
                      "goal_met": True}
               for name, gateways, leader, slowest in (("one_gateway", 1, 506.4, 1.0008),
                                                       ("two_gateways", 2, 523.0, 1.0226))},
        },
    }


def test_the_fixture_has_the_shape_the_bench_itself_prints():
    assert "cache_hit_c1[default]" in table(bench_results())


def test_the_headline_names_each_figure_the_run_measured():
    rows = dict(performance.headline(bench_results()))
    assert rows["prompt-cache hit through the gateway, p50 / p99"] == "0.77 / 2.31 ms"
    assert rows["prompt-cache hits, 16 callers at once"] == "1193 req/s"
    # what a caller sees: the burst through the gateway, prefills included, not the engine's steady window
    assert rows["1 stream submitted at once through the gateway, tok/s in all (p50)"].startswith("16.8 tok/s, 0.63x")
    assert rows["8 streams submitted at once through the gateway, tok/s in all (p50)"].startswith("134.4 tok/s")
    assert rows["the engine against llama.cpp, 1 stream"] == "0.71x"
    assert rows["the same, 270 tokens in this replica's prefix tier (p50)"] == "105 ms, 0.18x cold"
    assert "362 against 424 ms" in rows["time to first token, 2 replicas, prefix-affine against round_robin (p50)"]
    assert rows["50 identical requests at once, through one gateway and through two sharing Redis: generations; "
                "slowest answer against the leader's"] == "1 and 1; 1.001x and 1.023x"


def test_every_model_of_the_run_has_its_rows_in_the_headline_and_the_table():
    rows = dict(performance.headline(bench_results()))
    assert rows["gemma3 (int4): 1 and 8 streams through the gateway, tok/s in all (p50)"] == (
        "30.0 and 120.0 tok/s, 1.10x and 1.33x `generate`")
    assert rows["smollm2: time to first token, 300-token prompt, cold, through the gateway (p50)"] == (
        "602 ms, the gateway's part 2.4 ms")
    printed = table(bench_results())
    assert "gemma3 (precision int4, revision 0123456789abcdef)" in printed
    assert "the gateway adds to TTFT p50: 2.4 ms" in printed


def test_a_models_only_run_merged_keeps_the_parts_it_did_not_measure(tmp_path, monkeypatch):
    monkeypatch.setattr(performance, "RESULTS", tmp_path)
    monkeypatch.setattr(performance, "LATEST", tmp_path / "latest.json")
    earlier = bench_results()
    (tmp_path / "latest.json").write_text(json.dumps(earlier))
    newest = {"when": "LATER", "machine": "bench-host", "models": {"gemma3": earlier["models"]["gemma3"]}}
    (tmp_path / "bench-2.json").write_text(json.dumps(newest))
    performance.take_newest(merge=True)
    merged = json.loads((tmp_path / "latest.json").read_text())
    assert merged["models"] == newest["models"] and merged["cache_hits"] == earlier["cache_hits"]
    assert merged["parts_when"]["models"] == "LATER" and merged["parts_when"]["cache_hits"] == "RUN-TIME"
    assert "models run LATER" in performance.full_section(merged)
    performance.take_newest()
    assert json.loads((tmp_path / "latest.json").read_text()) == newest


def test_a_partial_run_gives_the_figures_it_has():
    results = bench_results()
    del results["engine"], results["routing"], results["generation"], results["models"]
    figures = [figure for figure, _ in performance.headline(results)]
    assert figures and not any("stream" in f or "replicas" in f or "first token" in f for f in figures)


def test_the_page_section_holds_the_headline_and_every_table_of_the_run():
    section = performance.full_section(bench_results())
    assert "| prompt-cache hit through the gateway, p50 / p99 | 0.77 / 2.31 ms |" in section
    assert table(bench_results()) in section
    assert "RUN-TIME" in section


def test_only_the_text_between_the_markers_changes():
    text = "before\n<!-- bench-table:start -->\nold\n<!-- bench-table:end -->\nafter\n"
    assert performance.splice(text, performance.TABLE_MARKERS, "new") == (
        "before\n<!-- bench-table:start -->\nnew\n<!-- bench-table:end -->\nafter\n")
    with pytest.raises(ValueError):
        performance.splice("no markers", performance.TABLE_MARKERS, "new")


def test_without_results_the_sections_say_which_commands_fill_them():
    assert "make bench" in performance.full_section(None)
    assert "make bench" in performance.headline_table(None, "docs/performance.md#what-each-figure-means")


def test_the_committed_pages_are_what_the_kept_results_give(tmp_path):
    for path, text in performance.rendered(performance.load()).items():
        assert path.read_text() == text, f"{path.name} is stale: run `make docs`"
    kept = tmp_path / "latest.json"
    kept.write_text(json.dumps(bench_results()))
    assert "0.77 / 2.31 ms" in performance.rendered(performance.load(kept))[performance.README]


def test_the_readme_starts_with_the_two_commands_and_carries_no_dated_runs_or_test_counts():
    text = performance.README.read_text()
    assert len(text.splitlines()) <= 200
    first = text.split("```sh\n", 1)[1].split("```", 1)[0]
    assert text.index("```sh") < 30 and "make demo" in first and "make test" in first
    assert not re.search(r"\b\d{4}-\d{2}-\d{2}\b", text)
    assert not re.search(r"\b\d+ (passed|failed|skipped)\b", text)


def test_every_repository_path_the_docs_name_exists():
    """A file or folder named in backticks (`gateway/affinity.py`, `deploy/k8s/`) is where the docs say
    (what the bench writes, under bench/results/, appears once it has run)."""
    root = performance.REPO_ROOT
    prefixes = ("gateway", "meshkit", "services", "promptcache", "cli", "bench", "deploy", "tests", "modelfiles",
                "protos", "docs")
    pages = [root / "README.md", *sorted((root / "docs").rglob("*.md"))]
    missing = []
    for page in pages:
        for path in re.findall(r"`([a-z_]+/[\w./-]*)`", page.read_text()):
            if path.split("/")[0] not in prefixes or "*" in path or path.startswith("bench/results/"):
                continue
            if not (root / path.split("::")[0]).exists():
                missing.append(f"{page.relative_to(root)}: {path}")
    assert not missing, missing
