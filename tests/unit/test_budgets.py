"""The budget policy file, observed latencies and one request's budget."""
import time

import pytest

from gateway.budgets import HOPS, BudgetPolicy, BudgetPolicyError, ObservedLatency, RequestBudget
from gateway.settings import GatewaySettings
from gateway.timings import HopTiming, server_timing
from meshkit.errors import DeadlineExceeded
from tests.budget_policy import RAISED, ROOMY_MS, roomy_budgets

BASE = 'default_total_ms = 1000\n[hops]\ncache = 5\ntemplate = 50\ntokenizer = 50\n"inference.ttft" = 300\ninference = 900\n'


def policy(tmp_path, text=BASE) -> BudgetPolicy:
    path = tmp_path / "budgets.toml"
    path.write_text(text)
    return BudgetPolicy.load(path)


def test_the_shipped_policy_loads_with_a_budget_for_every_hop():
    shipped = BudgetPolicy.load(GatewaySettings().budgets_file)
    assert set(shipped.hops) == set(HOPS)
    assert shipped.for_template("clinical_note_summary").budget_for("inference") > shipped.budget_for("inference")


def test_the_test_meshes_roomy_policy_is_the_shipped_one_with_three_hops_raised():
    shipped, roomy = BudgetPolicy.load(GatewaySettings().budgets_file), BudgetPolicy.load(roomy_budgets())
    assert {hop: roomy.budget_for(hop) for hop in RAISED} == dict.fromkeys(RAISED, ROOMY_MS)
    assert all(shipped.budget_for(hop) < ROOMY_MS for hop in RAISED)
    for template in (None, *shipped.templates):
        mine, theirs = (p if template is None else p.for_template(template) for p in (roomy, shipped))
        assert mine.default_total_ms == theirs.default_total_ms
        assert {h: mine.budget_for(h) for h in HOPS if h not in RAISED} == \
            {h: theirs.budget_for(h) for h in HOPS if h not in RAISED}


def test_a_template_overrides_only_what_it_names(tmp_path):
    loaded = policy(tmp_path, BASE + '[templates.summary]\ndefault_total_ms = 5000\ninference = 4000\n')
    summary = loaded.for_template("summary")
    assert (summary.default_total_ms, summary.budget_for("inference"), summary.budget_for("template")) == (5000, 4000, 50)
    assert loaded.for_template("other") is loaded


def test_the_longest_total_is_the_largest_of_the_default_and_every_template(tmp_path):
    base = policy(tmp_path).default_total_ms
    longer = policy(tmp_path, BASE + f'[templates.long]\ndefault_total_ms = {base + 7000:g}\n')
    assert longer.longest_total_ms == base + 7000  # what a channel replaced mid-call must wait for
    assert policy(tmp_path, BASE + '[templates.short]\ndefault_total_ms = 1\n').longest_total_ms == base


@pytest.mark.parametrize("text", [
    BASE.replace("cache = 5", "cache = 0"),
    BASE.replace("cache = 5", 'cache = "fast"'),
    BASE.replace("cache = 5\n", ""),
    BASE + "renderer = 5\n",
    BASE.replace("[hops]", "[hops]\nrender = 3"),
    BASE + "[templates.x]\nrender = 3\n",
    "default_total_ms = [",
])
def test_a_malformed_policy_is_refused(tmp_path, text):
    with pytest.raises(BudgetPolicyError):
        policy(tmp_path, text)


def test_the_total_is_the_shortest_of_deadline_budget_ms_and_policy(tmp_path):
    loaded, observed = policy(tmp_path), ObservedLatency()
    assert RequestBudget(loaded, observed, None, 0).total_ms == 1000
    assert RequestBudget(loaded, observed, None, 400).total_ms == 400
    assert RequestBudget(loaded, observed, 0.2, 400).total_ms == pytest.approx(200)
    assert RequestBudget(loaded, observed, 9.0, 0).total_ms == 1000


def test_a_hop_deadline_is_its_budget_or_the_time_left_whichever_is_shorter(tmp_path):
    budget = RequestBudget(policy(tmp_path), ObservedLatency(), None, 100)
    assert budget.deadline_s("template") == pytest.approx(0.05)
    assert budget.deadline_s("inference") == pytest.approx(0.1, abs=0.005)


def test_a_spent_budget_raises_naming_the_hop(tmp_path):
    budget = RequestBudget(policy(tmp_path), ObservedLatency(), None, 1, started=time.perf_counter() - 1)
    with pytest.raises(DeadlineExceeded) as caught:
        budget.deadline_s("tokenizer")
    assert caught.value.hop == "tokenizer"


def test_cover_is_judged_by_observed_latency(tmp_path):
    observed = ObservedLatency(min_samples=3)
    budget = RequestBudget(policy(tmp_path), observed, None, 100)
    budget.ensure_can_cover(["template", "tokenizer", "inference.ttft"])  # nothing observed yet: no verdict
    for _ in range(3):
        observed.record("template", 2.0)
        observed.record("inference.ttft", 150.0)
    with pytest.raises(DeadlineExceeded) as caught:
        budget.ensure_can_cover(["template", "tokenizer", "inference.ttft"])
    assert caught.value.hop == "inference"
    RequestBudget(policy(tmp_path), observed, None, 500).ensure_can_cover(["template", "inference.ttft"])


def test_server_timing_shows_budgets_and_overruns():
    text = server_timing([HopTiming("cache", 0.41, 5), HopTiming("inference.ttft", 320.0, 300), HopTiming("x", 1.0)])
    assert text == 'cache;dur=0.410;desc="budget 5", inference.ttft;dur=320.000;desc="budget 300 over", x;dur=1.000'
