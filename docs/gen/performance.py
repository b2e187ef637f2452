"""Writes the measured figures of docs/performance.md and the README's headline table from one bench JSON.

    make bench                                   # writes bench/results/bench-<time>.json
    python -m docs.gen.performance --newest      # copies the newest of those to bench/results/latest.json
    make docs                                    # renders latest.json into the two pages, builds the site

Only the text between the markers is generated; the prose around it is written by hand. The figures come
from bench/results/latest.json, the one results file the repository keeps; without it, the sections say
which commands fill them. `--check` exits 1 when a page differs from what latest.json gives.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS = REPO_ROOT / "bench" / "results"
LATEST = RESULTS / "latest.json"
PAGE = REPO_ROOT / "docs" / "performance.md"
README = REPO_ROOT / "README.md"
TABLE_MARKERS = ("<!-- bench-table:start -->", "<!-- bench-table:end -->")
HEADLINE_MARKERS = ("<!-- headline:start -->", "<!-- headline:end -->")
FILL = ("No bench results are committed yet: `make bench`, then `.venv/bin/python -m docs.gen.performance "
        "--newest` and `make docs` fill this {what}.")


def headline(results: dict) -> list[tuple[str, str]]:
    """(figure, value) for what a newcomer asks first; each only where the run measured it."""
    rows = serving_rows(results.get("serving")) + coalescing_rows(results.get("coalescing"))
    hits = results.get("cache_hits", {})
    if "cache_hit_c1[default]" in hits:
        row = hits["cache_hit_c1[default]"]
        rows.append(("prompt-cache hit through the gateway, p50 / p99",
                     f"{row['p50_ms']:.2f} / {row['p99_ms']:.2f} ms"))
    if "grpc_empty_rpc_c1" in hits:
        rows.append(("an empty gRPC call to the gateway (one hop's floor), p50",
                     f"{hits['grpc_empty_rpc_c1']['p50_ms']:.2f} ms"))
    if "throughput_rps" in hits.get("cache_hit_c16", {}):
        rows.append(("prompt-cache hits, 16 callers at once", f"{hits['cache_hit_c16']['throughput_rps']:.0f} req/s"))
    # What callers get: streams submitted together through the gateway, from the first request to the last
    # token, later streams' prefills included (not the engine's window with every stream decoding).
    burst = results.get("generation", {}).get("decode", {})
    ends = list(burst)[:1] + list(burst)[1:][-1:]  # one stream and the most streams
    for name, row in ((name, burst[name]) for name in ends):
        streams = name.split("_")[0]
        rows.append((f"{streams} stream{'s' if streams != '1' else ''} submitted at once through the gateway, "
                     "tok/s in all (p50)",
                     f"{row['gateway_tok_s']['p50']:.1f} tok/s, {row['ratio_to_hf_generate']:.2f}x transformers' "
                     "`generate` (its decode only)"))
    for name, row in results.get("engine", {}).get("decode", {}).items():
        if "llama_cpp_tok_s" in row:
            rows.append((f"the engine against llama.cpp, {name.split('_')[0]} stream",
                         f"{row['engine_ratio_to_llama_cpp']:.2f}x"))
    ttft = results.get("generation", {}).get("ttft_300", {})
    if "cold" in ttft:
        rows.append(("time to first token, 300-token prompt, cold (p50)", f"{ttft['cold']['p50_ms']:.0f} ms"))
    for name, label in (("local_prefix_hit", "270 tokens in this replica's prefix tier"),
                        ("redis_prefix_hit", "270 tokens in Redis from another replica")):
        if "ratio_to_cold_p50" in ttft.get(name, {}):
            rows.append((f"the same, {label} (p50)",
                         f"{ttft[name]['p50_ms']:.0f} ms, {ttft[name]['ratio_to_cold_p50']:.2f}x cold"))
    for model, row in results.get("models", {}).items():
        one, many = row["decode"]["1_streams"], row["decode"]["8_streams"]
        rows.append((f"{model} ({row['precision']}): 1 and 8 streams through the gateway, tok/s in all (p50)",
                     f"{one['gateway_tok_s']['p50']:.1f} and {many['gateway_tok_s']['p50']:.1f} tok/s, "
                     f"{one['ratio_to_hf_generate']:.2f}x and {many['ratio_to_hf_generate']:.2f}x `generate`"))
        ttft = row["ttft_300"]
        rows.append((f"{model}: time to first token, 300-token prompt, cold, through the gateway (p50)",
                     f"{ttft['gateway']['p50_ms']:.0f} ms, the gateway's part {ttft['gateway_adds_p50_ms']:.1f} ms"))
    routing = results.get("routing", {}).get("routing", {})
    if {"affine", "round_robin"} <= routing.keys():
        rows.append(("time to first token, 2 replicas, prefix-affine against round_robin (p50)",
                     f"{routing['affine']['ttft']['p50_ms']:.0f} against "
                     f"{routing['round_robin']['ttft']['p50_ms']:.0f} ms"))
    guided = results.get("guided")
    if guided:
        tok_s, extra = guided["decode_tok_s"], guided["first_token_extra_ms"]
        rows.append((f"guided decoding ({guided['fields']}-field JSON Schema) against free decoding, decode tok/s "
                     "at 1 and 8 streams",
                     f"{tok_s['guided_over_free_c1']:.3f}x and {tok_s['guided_over_free_c8']:.3f}x"))
        rows.append(("guided decoding's first token over a free one's (p50), grammar cache cold and warm",
                     f"{extra['guided_cold']:+.1f} and {extra['guided_warm']:+.1f} ms"))
    embeddings = results.get("embeddings")
    if embeddings:
        for size, mesh_name in (("1 text", "mesh_b1"), ("32 texts", "mesh_b32")):
            row = embeddings[mesh_name]
            rows.append((f"Embed through the gateway, {size} a call, against sentence-transformers in process "
                         f"(the replica in {embeddings['precision']})",
                         f"{row['texts_per_s']:.0f} texts/s, {row['ratio_to_st']:.2f}x (its float32), "
                         f"{row['ratio_to_st_bf16']:.2f}x (its bfloat16); p50 {row['p50_ms']:.1f} ms"))
    return rows


def serving_rows(serving: dict | None) -> list[tuple[str, str]]:
    """What callers see under traffic (bench/serving.py): the burst, and goodput under deadlines."""
    if not serving:
        return []
    burst, baseline = serving["burst"], serving["burst_hf_generate"]
    llama = serving.get("burst_llama_cpp")
    also = f"; llama.cpp, one at a time: {llama['tok_s']:.0f} tok/s" if llama else ""
    rows = [("a burst of 8 streams of 64 tokens through the gateway, tok/s in all, submission to last token",
             f"{burst['tok_s']:.0f} tok/s (transformers' `generate`, batched: {baseline['tok_s']:.0f} tok/s{also})"),
            ("... its first tokens, earliest to latest; inter-token p99",
             f"{burst['ttft_first_ms']:.0f} to {burst['ttft_last_ms']:.0f} ms ({burst['ttft_last_over_first']:.1f}x); "
             f"{burst['inter_token_p99_ms']:.0f} ms ({burst['inter_token_p99_over_p50']:.1f}x p50)")]
    for row in serving["rates"]:
        mesh, hf = row["mesh"], row["hf_generate"]
        ttft = mesh["ttft"]
        rows.append((f"Poisson arrivals at {row['fraction_of_capacity']:g}x capacity ({row['rate_req_s']:.2f} req/s, "
                     "mixed prompts): goodput; TTFT p50 / p90 / p99",
                     f"{100 * mesh['goodput_share']:.0f}% within deadline ({mesh['goodput_req_s']:.2f} req/s; "
                     f"`generate` {100 * hf['goodput_share']:.0f}%"
                     + (f", llama.cpp {100 * row['llama_cpp']['goodput_share']:.0f}%" if "llama_cpp" in row else "")
                     + "); "
                     f"{ttft.get('p50_ms', 0):.0f} / {ttft.get('p90_ms', 0):.0f} / {ttft.get('p99_ms', 0):.0f} ms"))
    rows.append(("goodput at 1.5x capacity, against the peak", f"{100 * serving['goodput_at_1_5x_over_peak']:.0f}%"))
    return rows


def coalescing_rows(coalescing: dict | None) -> list[tuple[str, str]]:
    """Identical requests at once (bench/coalescing.py): the generations they cost, the slowest against the leader."""
    one, two = (coalescing or {}).get("one_gateway"), (coalescing or {}).get("two_gateways")
    if not one or not two:
        return []
    return [(f"{one['requests']} identical requests at once, through one gateway and through two sharing Redis: "
             "generations; slowest answer against the leader's",
             f"{one['generations']:g} and {two['generations']:g}; "
             f"{one['slowest_to_leader']:.3f}x and {two['slowest_to_leader']:.3f}x")]


def headline_table(results: dict | None, link: str) -> str:
    if not results:
        return FILL.format(what="table") + f" What each figure means: [{link.split('#')[0]}]({link})."
    lines = ["| figure | measured |", "|---|---|"]
    lines += [f"| {figure} | {value} |" for figure, value in headline(results)]
    return "\n".join(lines)


def full_section(results: dict | None) -> str:
    if not results:
        return FILL.format(what="section")
    from bench.run import table  # the bench's own tables, as `make bench` prints them

    runs = results.get("parts_when")
    when = ("; ".join(f"{part} run {at}" for part, at in runs.items()) if runs
            else f"run {results.get('when', '?')}")
    parts = [f"From `bench/results/latest.json` ({when}).", "",
             headline_table(results, ""), "", "Every figure of that run, as `make bench` printed it:", "",
             "```text", table(results), "```"]
    return "\n".join(parts)


def splice(text: str, markers: tuple[str, str], content: str) -> str:
    start, end = markers
    head, found, rest = text.partition(start)
    if not found or end not in rest:
        raise ValueError(f"the markers {start} ... {end} are missing")
    return f"{head}{start}\n{content}\n{end}{rest.partition(end)[2]}"


def load(path: Path = LATEST) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def rendered(results: dict | None) -> dict[Path, str]:
    return {PAGE: splice(PAGE.read_text(), TABLE_MARKERS, full_section(results)),
            README: splice(README.read_text(), HEADLINE_MARKERS,
                           headline_table(results, "docs/performance.md#what-each-figure-means"))}


def take_newest(merge: bool = False) -> Path:
    """Makes the newest bench run latest.json; with ``merge``, only the parts that run measured replace
    those of latest.json (a `--only` run), each part keeping the time of its own run."""
    runs = sorted(RESULTS.glob("bench-*.json"), key=lambda path: path.stat().st_mtime)
    if not runs:
        raise SystemExit("no bench/results/bench-*.json: run `make bench` first")
    if not merge or not LATEST.is_file():
        shutil.copyfile(runs[-1], LATEST)
        return runs[-1]
    newest, latest = json.loads(runs[-1].read_text()), json.loads(LATEST.read_text())
    when = latest.pop("parts_when", None) or {part: latest["when"] for part in latest if part not in _RUN_FIELDS}
    for part, value in newest.items():
        if part not in _RUN_FIELDS:
            latest[part], when[part] = value, newest["when"]
    latest.update(when=newest["when"], machine=newest["machine"], parts_when=when)
    LATEST.write_text(json.dumps(latest, indent=2))
    return runs[-1]


_RUN_FIELDS = ("when", "machine", "parts_when")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m docs.gen.performance", description=__doc__.split("\n")[0])
    parser.add_argument("--newest", action="store_true",
                        help="first copy the newest bench/results/bench-*.json to bench/results/latest.json")
    parser.add_argument("--merge", action="store_true",
                        help="with --newest: keep latest.json's parts the newest run did not measure (a --only run)")
    parser.add_argument("--check", action="store_true", help="exit 1 if a page differs, write nothing")
    args = parser.parse_args(argv)
    if args.newest:
        print(f"bench/results/latest.json is now {take_newest(args.merge).name}{' (merged)' if args.merge else ''}")
    stale = []
    for path, text in rendered(load()).items():
        if path.read_text() == text:
            continue
        if args.check:
            stale.append(str(path.relative_to(REPO_ROOT)))
        else:
            path.write_text(text)
            print(f"written {path.relative_to(REPO_ROOT)}")
    if stale:
        print(f"stale: {', '.join(stale)}: run `make docs`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
