"""Unit tests of staged config rollouts: gateway/rollout/ (spec, plan, stats,
state_file), the rollout parts of gateway/config.py and gateway/config_view.py,
and gateway/groupconfig.check_allowed. Pure: files in tmp_path only, no
sockets, no processes."""
from __future__ import annotations

import logging
import os
from bisect import bisect_left
from pathlib import Path

import orjson
import pytest

from gateway.config import load_gateway_config
from gateway.config_view import diff_configs, effective_config
from gateway.groupconfig import Upstream, check_allowed, parse_upstreams
from gateway.history import BOUNDS, percentile
from gateway.rollout.plan import (
    HISTORY, LATENCY_FLOOR, Book, ClientState, Figures, GroupView, canary_order,
)
from gateway.rollout.spec import RolloutSpec, parse_rollout
from gateway.rollout.state_file import load_book, save_book, state_path
from gateway.rollout.stats import RolloutStats
from gateway.settings import ConfigError

KEY = "groups.g1.rollout"
SPEC = RolloutSpec(canary=1, bake=60.0, max_error_rate=0.05, max_latency_ratio=2.0, min_requests=20)
T0 = 1000.0  # when the rollout of v2 starts; its bake ends at T0 + 60
AFTER = T0 + 61.0


# -- helpers ---------------------------------------------------------------------


def cfg(version: str) -> str:
    return f'{{"config":"{version}"}}'


def views(version: str, spec: RolloutSpec | None = SPEC, group: str = "g1") -> dict[str, GroupView]:
    return {group: GroupView(version, cfg(version), spec)}


def pinned_book(spec: RolloutSpec = SPEC) -> Book:
    """A book that has seen g1 at v1 (its stable version), nothing baking."""
    book = Book()
    assert book.reconcile({}, views("v1", spec), {}, T0 - 100) == []
    return book


def baking_book(clients=("a", "b", "c"), spec: RolloutSpec = SPEC) -> Book:
    """A book whose g1 rollout v1 -> v2 started at T0 with `clients` connected."""
    book = pinned_book(spec)
    book.reconcile(views("v1", spec), views("v2", spec), {"g1": list(clients)}, T0)
    return book


def figures(requests: int, errors: int = 0, seconds: float = 0.005) -> Figures:
    """`requests` requests that each took `seconds`, `errors` of them 5xx."""
    return Figures(requests, errors, {bisect_left(BOUNDS, seconds): requests} if requests else {})


def sides(canary: Figures, rest: Figures | None = None) -> dict[str, tuple[Figures, Figures]]:
    return {"g1": (canary, rest if rest is not None else figures(100))}


def acks(version: str, clients=("a", "b", "c"), **special: ClientState) -> dict[str, dict[str, ClientState]]:
    states = {c: ClientState(version) for c in clients}
    states.update(special)
    return {"g1": states}


def canary_of(book: Book) -> str:
    return book.rollouts["g1"].canary[0]


def rest_of(book: Book, clients=("a", "b", "c")) -> list[str]:
    return [c for c in clients if c not in book.rollouts["g1"].canary]


def parse_error(raw: dict) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_rollout(raw, "f.toml", KEY)
    return info.value


# -- spec: parse_rollout -----------------------------------------------------------


def test_no_rollout_table_is_none():
    assert parse_rollout(None, "f.toml", KEY) is None


def test_empty_table_gives_the_defaults():
    assert parse_rollout({}, "f.toml", KEY) == RolloutSpec(canary=1, share=0.0, bake=60.0, max_error_rate=0.05,
                                                           max_latency_ratio=2.0, min_requests=20)


def test_full_table_with_canary_as_a_number():
    raw = {"canary": 3, "bake": 30, "max_error_rate": 0.1, "max_latency_ratio": 1.5, "min_requests": 0}
    assert parse_rollout(raw, "f.toml", KEY) == RolloutSpec(canary=3, share=0.0, bake=30.0, max_error_rate=0.1,
                                                            max_latency_ratio=1.5, min_requests=0)


@pytest.mark.parametrize("text,share", [("25%", 0.25), ("100%", 1.0), ("12.5%", 0.125), ("0.5%", 0.005)])
def test_canary_as_a_share(text, share):
    spec = parse_rollout({"canary": text}, "f.toml", KEY)
    assert (spec.canary, spec.share) == (0, share)


def test_boundary_values_are_accepted():
    raw = {"bake": 0, "max_error_rate": 1, "max_latency_ratio": 1, "min_requests": 0}
    spec = parse_rollout(raw, "f.toml", KEY)
    assert (spec.bake, spec.max_error_rate, spec.max_latency_ratio, spec.min_requests) == (0.0, 1.0, 1.0, 0)


def test_not_a_table_names_the_key():
    with pytest.raises(ConfigError) as info:
        parse_rollout(5, "f.toml", KEY)
    assert (info.value.file, info.value.key) == ("f.toml", KEY)


BAD_VALUES = [
    ("canary", 0), ("canary", -1), ("canary", True), ("canary", 1.5), ("canary", "3"), ("canary", "0%"),
    ("canary", "150%"), ("canary", "25 %"), ("canary", "%"), ("canary", "-5%"), ("canary", [1]),
    ("bake", -1), ("bake", "60"), ("bake", True), ("bake", float("inf")), ("bake", float("nan")),
    ("max_error_rate", -0.1), ("max_error_rate", 1.5), ("max_error_rate", "5%"), ("max_error_rate", False),
    ("max_error_rate", float("nan")),
    ("max_latency_ratio", 0.5), ("max_latency_ratio", 0), ("max_latency_ratio", True),
    ("max_latency_ratio", float("inf")), ("max_latency_ratio", "2"),
    ("min_requests", -1), ("min_requests", 2.5), ("min_requests", 20.0), ("min_requests", True),
    ("min_requests", "20"),
]


@pytest.mark.parametrize("name,value", BAD_VALUES, ids=[f"{n}={v!r}" for n, v in BAD_VALUES])
def test_bad_value_names_file_and_key(name, value):
    exc = parse_error({name: value})
    assert (exc.file, exc.key) == ("f.toml", f"{KEY}.{name}")
    assert "got" in exc.message and len(exc.errors) == 1


def test_unknown_key_is_named_with_the_nearest_known_one():
    exc = parse_error({"canry": 2})
    assert exc.key == f"{KEY}.canry"
    assert "'canary'" in exc.message


def test_every_error_is_reported_together():
    exc = parse_error({"canary": 0, "bake": -1, "max_error_rate": 2, "max_latency_ratio": 0.1,
                       "min_requests": -3, "oops": 1})
    assert {e.key for e in exc.errors} == {f"{KEY}.{k}" for k in
                                           ("oops", "canary", "bake", "max_error_rate", "max_latency_ratio",
                                            "min_requests")}
    assert len(str(exc).splitlines()) == 6 and all(line.startswith("f.toml: ") for line in str(exc).splitlines())


# -- spec: canary_size, to_json ------------------------------------------------------


@pytest.mark.parametrize("spec", [RolloutSpec(canary=2), RolloutSpec(canary=0, share=0.5)])
def test_no_clients_no_canary(spec):
    assert spec.canary_size(0) == 0


@pytest.mark.parametrize("spec", [RolloutSpec(canary=3), RolloutSpec(canary=0, share=0.01),
                                  RolloutSpec(canary=0, share=1.0)])
def test_the_only_client_is_the_canary(spec):
    assert spec.canary_size(1) == 1


@pytest.mark.parametrize("share,clients,size", [(0.25, 4, 1), (0.25, 5, 2), (0.01, 50, 1), (0.5, 9, 5),
                                                (0.1, 30, 3)])
def test_share_rounds_up(share, clients, size):
    assert RolloutSpec(canary=0, share=share).canary_size(clients) == size


@pytest.mark.parametrize("spec,clients,size", [(RolloutSpec(canary=5), 3, 2), (RolloutSpec(canary=2), 2, 1),
                                               (RolloutSpec(canary=0, share=1.0), 2, 1),
                                               (RolloutSpec(canary=0, share=0.9), 10, 9),
                                               (RolloutSpec(canary=2), 10, 2)])
def test_never_all_clients_of_a_group_of_two_or_more(spec, clients, size):
    assert spec.canary_size(clients) == size


def test_share_of_a_round_number_is_exact():
    spec = parse_rollout({"canary": "7%"}, "f.toml", KEY)
    assert spec.canary_size(100) == 7


def test_to_json_with_a_number_of_clients():
    assert RolloutSpec(canary=2, bake=30.0).to_json() == {"canary": 2, "bake": 30.0, "max_error_rate": 0.05,
                                                          "max_latency_ratio": 2.0, "min_requests": 20}


@pytest.mark.parametrize("text", ["25%", "12.5%", "100%"])
def test_to_json_with_a_share_parses_back_the_same(text):
    spec = parse_rollout({"canary": text, "bake": 5, "min_requests": 3}, "f.toml", KEY)
    assert spec.to_json()["canary"] == text
    assert parse_rollout(spec.to_json(), "f.toml", KEY) == spec


# -- plan: canary_order ------------------------------------------------------------------


def test_canary_order_ignores_input_order_and_duplicates():
    assert canary_order("g1", "v2", ["a", "b", "c", "a"]) == canary_order("g1", "v2", ["c", "b", "a"])
    assert sorted(canary_order("g1", "v2", ["a", "b", "c", "a"])) == ["a", "b", "c"]


def test_a_client_joining_moves_nobody_else():
    before = canary_order("g1", "v2", [f"c{i}" for i in range(20)])
    after = canary_order("g1", "v2", [f"c{i}" for i in range(21)])
    assert [c for c in after if c != "c20"] == before


def test_canary_order_depends_on_the_version():
    clients = [f"c{i}" for i in range(20)]
    assert canary_order("g1", "v2", clients) != canary_order("g1", "v3", clients)


# -- plan: reconcile -------------------------------------------------------------------------


def test_group_without_rollout_table_is_not_in_the_book():
    book = Book()
    assert book.reconcile(views("v1", None), views("v2", None), {"g1": ["a"]}, T0) == []
    assert (book.stable, book.rollouts) == ({}, {})
    assert book.assigned("g1", "a") is None


def test_first_sight_at_start_pins_the_file_version_without_a_rollout():
    book = pinned_book()
    assert book.stable == {"g1": ("v1", cfg("v1"))} and book.rollouts == {}


def test_gaining_a_rollout_table_pins_the_old_config_and_starts_a_rollout():
    book = Book()
    events = book.reconcile(views("v1", None), views("v2"), {"g1": ["a", "b"]}, T0)
    assert book.stable["g1"] == ("v1", cfg("v1"))
    r = book.rollouts["g1"]
    assert (r.old, r.new, r.old_config, r.new_config, r.state) == ("v1", "v2", cfg("v1"), cfg("v2"), "baking")
    assert [e["event"] for e in events] == ["started"]


def test_changed_version_starts_a_rollout_with_canaries_in_rendezvous_order():
    clients = ["a", "b", "c", "d", "e"]
    book = baking_book(clients, RolloutSpec(canary=2, bake=60.0))
    r = book.rollouts["g1"]
    assert r.canary == canary_order("g1", "v2", clients)[:2]
    assert (r.started, r.deadline, r.state) == (T0, T0 + 60.0, "baking")


def test_started_event_names_group_version_and_canary():
    book = pinned_book()
    events = book.reconcile(views("v1"), views("v2"), {"g1": ["a", "b"]}, T0)
    assert events == [{"group": "g1", "event": "started", "version": "v2",
                       "reason": f"canary {book.rollouts['g1'].canary}, bake 60s"}]


def test_reload_to_the_version_baking_changes_nothing():
    book = baking_book()
    before = book.to_json()
    assert book.reconcile(views("v2"), views("v2"), {"g1": ["a", "b", "c", "d"]}, T0 + 5) == []
    assert book.to_json() == before


def test_a_reload_changing_only_the_rollout_table_applies_it_to_the_rollout_baking():
    book = baking_book()
    shorter = RolloutSpec(canary=1, bake=5.0)
    revision = book.revision
    assert book.reconcile(views("v2"), views("v2", shorter), {"g1": ["a", "b", "c"]}, T0 + 1) == []
    r = book.rollouts["g1"]
    assert r.spec == shorter and r.deadline == T0 + 5.0 and r.started == T0 and book.revision == revision + 1


def test_reload_to_a_third_version_replaces_the_rollout_from_the_stable_version():
    book = baking_book()
    events = book.reconcile(views("v2"), views("v3"), {"g1": ["a", "b", "c"]}, T0 + 5)
    assert [e["event"] for e in events] == ["replaced", "started"]
    assert book.history["g1"][0]["state"] == "replaced" and book.history["g1"][0]["new"] == "v2"
    r = book.rollouts["g1"]
    assert (r.old, r.new, r.old_config, r.started) == ("v1", "v3", cfg("v1"), T0 + 5)
    assert book.stable["g1"][0] == "v1" and book.rejected == {}


def test_file_back_at_stable_ends_the_rollout_rolled_back_rejecting_nothing():
    book = baking_book()
    events = book.reconcile(views("v2"), views("v1"), {"g1": ["a", "b", "c"]}, T0 + 5)
    assert [(e["event"], e["version"]) for e in events] == [("rolled_back", "v2")]
    assert book.rollouts["g1"].state == "rolled_back"
    assert book.rejected == {}
    assert book.stable["g1"] == ("v1", cfg("v1"))


def test_a_rejected_version_is_not_retried():
    book = baking_book()
    book.roll_back("g1", T0 + 5, "by hand")
    before = book.to_json()
    assert book.reconcile(views("v2"), views("v2"), {"g1": ["a", "b", "c"]}, T0 + 10) == []
    assert book.to_json() == before and book.rejected == {"g1": "v2"}


def test_a_rejected_version_is_tried_again_after_the_file_changed():
    book = baking_book()
    book.roll_back("g1", T0 + 5, "by hand")
    book.reconcile(views("v2"), views("v3"), {"g1": ["a"]}, T0 + 10)
    book.reconcile(views("v3"), views("v2"), {"g1": ["a"]}, T0 + 20)
    assert (book.rollouts["g1"].new, book.rollouts["g1"].state) == ("v2", "baking")
    assert book.rejected == {}


def test_file_back_at_stable_after_a_rollback_clears_rejected():
    book = baking_book()
    book.roll_back("g1", T0 + 5, "by hand")
    assert book.reconcile(views("v2"), views("v1"), {"g1": ["a"]}, T0 + 10) == []
    assert book.rejected == {}


def test_removing_the_rollout_table_forgets_the_group_keeping_its_history():
    book = baking_book()
    book.roll_back("g1", T0 + 5, "by hand")
    book.reconcile(views("v2"), views("v2", None), {"g1": ["a"]}, T0 + 10)
    assert (book.stable, book.rollouts, book.rejected) == ({}, {}, {})
    assert book.assigned("g1", "a") is None
    assert book.history["g1"][0]["new"] == "v2"


def test_removing_the_group_forgets_its_history_too():
    book = baking_book()
    book.roll_back("g1", T0 + 5, "by hand")
    book.reconcile(views("v2"), views("v1", group="g2"), {}, T0 + 10)
    assert "g1" not in book.history and "g1" not in book.stable


def test_group_with_no_client_connected_gets_canaries_at_a_tick():
    book = baking_book(clients=())
    assert book.rollouts["g1"].canary == []
    revision = book.revision
    book.tick({}, acks("v1", ("a", "b")), T0 + 1)
    assert book.rollouts["g1"].canary == canary_order("g1", "v2", ["a", "b"])[:1]
    assert book.revision > revision


def test_started_event_says_when_no_client_is_connected():
    book = pinned_book()
    events = book.reconcile(views("v1"), views("v2"), {}, T0)
    assert "(none connected yet)" in events[0]["reason"]


def test_top_up_adds_canaries_as_the_group_grows_keeping_the_first():
    book = baking_book(clients=("a", "b"), spec=RolloutSpec(canary=0, share=0.5, bake=60.0))
    first = list(book.rollouts["g1"].canary)
    clients = ("a", "b", "c", "d", "e", "f")
    book.tick({}, acks("v1", clients), T0 + 1)
    canary = book.rollouts["g1"].canary
    assert canary[:len(first)] == first and len(canary) == 3


def test_top_up_does_not_change_a_full_canary():
    book = baking_book()
    revision, canary = book.revision, list(book.rollouts["g1"].canary)
    book.tick({}, acks("v1", ("a", "b", "c", "d")), T0 + 1)
    assert book.rollouts["g1"].canary == canary and book.revision == revision


# -- plan: assigned ---------------------------------------------------------------------------


def test_canary_gets_the_new_version_while_baking_the_rest_the_stable_one():
    book = baking_book()
    assert book.assigned("g1", canary_of(book)) == ("v2", cfg("v2"))
    assert {book.assigned("g1", c) for c in rest_of(book)} == {("v1", cfg("v1"))}
    assert book.assigned("g1", "newcomer") == ("v1", cfg("v1"))


def test_group_not_in_the_book_is_assigned_nothing():
    assert baking_book().assigned("other", "a") is None


def test_canary_gets_the_stable_version_once_rolling_back():
    book = baking_book()
    book.roll_back("g1", T0 + 1, "by hand")
    assert book.assigned("g1", canary_of(book)) == ("v1", cfg("v1"))


# -- plan: tick and _judge --------------------------------------------------------------------


def test_refusal_by_a_canary_halts_and_rejects_the_version():
    book = baking_book()
    c = canary_of(book)
    events = book.tick({}, acks("v1", **{c: ClientState("v1", "v2", "bad rule")}), T0 + 1)
    r = book.rollouts["g1"]
    assert (r.state, book.rejected) == ("halted", {"g1": "v2"})
    assert [e["event"] for e in events] == ["halted"]
    assert c in r.reason and "bad rule" in r.reason
    assert book.assigned("g1", c) == ("v1", cfg("v1"))


def test_refusal_of_another_version_does_not_halt():
    book = baking_book()
    c = canary_of(book)
    book.tick({}, acks("v1", **{c: ClientState("v1", "v0", "old news")}), T0 + 1)
    assert book.rollouts["g1"].state == "baking"


def test_halted_is_acknowledged_once_the_canary_runs_the_old_version():
    book = baking_book()
    c = canary_of(book)
    book.tick({}, acks("v1", **{c: ClientState("v1", "v2", "bad")}), T0 + 1)
    book.tick({}, acks("v1", **{c: ClientState("v1", "v2", "bad")}), T0 + 2)
    r = book.rollouts["g1"]
    assert (r.state, r.acknowledged) == ("halted", True)


def test_error_rate_over_the_maximum_rolls_back():
    book = baking_book()
    c = canary_of(book)
    events = book.tick(sides(figures(20, errors=2)), acks("v1", **{c: ClientState("v2")}), T0 + 1)
    r = book.rollouts["g1"]
    assert [e["event"] for e in events] == ["rolling_back"] and r.state == "rolling_back"
    assert "10.0%" in r.reason and "2 of 20" in r.reason
    assert book.rejected == {"g1": "v2"} and not r.acknowledged


def test_rolled_back_once_every_canary_acknowledged_the_old_version():
    book = baking_book()
    c = canary_of(book)
    book.tick(sides(figures(20, errors=2)), acks("v1", **{c: ClientState("v2")}), T0 + 1)
    book.tick({}, acks("v1", **{c: ClientState("v2")}), T0 + 2)
    assert book.rollouts["g1"].state == "rolling_back"
    events = book.tick({}, acks("v1"), T0 + 3)
    assert [(e["event"], e["version"]) for e in events] == [("rolled_back", "v2")]
    r = book.rollouts["g1"]
    assert (r.state, r.acknowledged) == ("rolled_back", True)


def test_a_canary_gone_counts_as_acknowledged():
    book = baking_book()
    book.tick(sides(figures(20, errors=20)), acks("v2"), T0 + 1)
    book.tick({}, {"g1": {}}, T0 + 2)
    assert book.rollouts["g1"].state == "rolled_back"


def test_error_rate_at_the_maximum_is_not_over_it():
    book = baking_book()
    book.tick(sides(figures(20, errors=1)), acks("v1"), T0 + 1)  # 5.0%
    assert book.rollouts["g1"].state == "baking"


def test_error_rate_is_not_judged_below_min_requests():
    book = baking_book()
    book.tick(sides(figures(19, errors=19)), acks("v1"), T0 + 1)
    assert book.rollouts["g1"].state == "baking"


def test_error_rate_is_judged_from_the_first_request_with_min_requests_zero():
    book = baking_book(spec=RolloutSpec(canary=1, bake=60.0, min_requests=0))
    book.tick(sides(figures(1, errors=1)), acks("v2"), T0 + 1)
    assert book.rollouts["g1"].state == "rolling_back"


def test_latency_ratio_over_the_maximum_rolls_back():
    book = baking_book()
    book.tick(sides(figures(20, seconds=0.1), figures(20, seconds=0.02)), acks("v2"), T0 + 1)
    r = book.rollouts["g1"]
    assert r.state == "rolling_back" and "p99" in r.reason and "over 2x" in r.reason


def test_latency_under_the_floor_is_not_a_regression():
    assert percentile({bisect_left(BOUNDS, 0.008): 20}, 0.99) < LATENCY_FLOOR  # the premise: both under the floor
    book = baking_book()
    book.tick(sides(figures(20, seconds=0.008), figures(20, seconds=0.001)), acks("v1"), T0 + 1)
    assert book.rollouts["g1"].state == "baking"


def test_latency_floor_also_applies_to_the_rest():
    book = baking_book()  # canary ~30 ms vs rest ~1 ms (counted as 10 ms): ~3x
    book.tick(sides(figures(20, seconds=0.03), figures(20, seconds=0.001)), acks("v2"), T0 + 1)
    assert book.rollouts["g1"].state == "rolling_back"


def test_latency_is_not_compared_while_the_rest_has_too_few_requests():
    book = baking_book()
    book.tick(sides(figures(20, seconds=0.1), figures(19, seconds=0.02)), acks("v1"), T0 + 1)
    assert book.rollouts["g1"].state == "baking"


def test_within_thresholds_before_the_bake_ends_still_bakes():
    book = baking_book()
    assert book.tick(sides(figures(100)), acks("v1"), T0 + 59) == []
    assert (book.rollouts["g1"].state, book.rollouts["g1"].reason) == ("baking", "baking")


def test_too_few_requests_after_the_bake_still_bakes_saying_how_many_more():
    book = baking_book()
    assert book.tick(sides(figures(5)), acks("v1"), AFTER) == []
    r = book.rollouts["g1"]
    assert r.state == "baking" and "15 more canary request(s)" in r.reason


def test_no_request_at_all_after_the_bake_waits_for_one_with_min_requests_zero():
    book = baking_book(spec=RolloutSpec(canary=1, bake=60.0, min_requests=0))
    book.tick({}, acks("v1"), AFTER)
    r = book.rollouts["g1"]
    assert r.state == "baking" and "1 more canary request(s)" in r.reason


def test_within_thresholds_after_the_bake_promotes():
    book = baking_book()
    events = book.tick(sides(figures(20, errors=1)), acks("v1"), AFTER)
    assert [(e["event"], e["version"]) for e in events] == [("promoted", "v2")]
    assert book.rollouts["g1"].state == "promoted"
    assert book.stable["g1"] == ("v2", cfg("v2"))
    assert {book.assigned("g1", c) for c in ("a", "b", "c", "new")} == {("v2", cfg("v2"))}


def test_figures_are_kept_as_last_judged():
    book = baking_book()
    book.tick(sides(figures(20, errors=1), figures(40)), acks("v1"), T0 + 1)
    f = book.rollouts["g1"].figures
    assert (f["canary"]["requests"], f["canary"]["errors"], f["rest"]["requests"]) == (20, 1, 40)


def test_promoted_is_acknowledged_once_every_connected_client_runs_it():
    book = baking_book()
    c = canary_of(book)
    book.tick(sides(figures(20)), acks("v1", **{c: ClientState("v2")}), AFTER)
    book.tick({}, acks("v1", **{c: ClientState("v2")}), AFTER + 1)
    assert not book.rollouts["g1"].acknowledged
    revision = book.revision
    book.tick({}, acks("v2"), AFTER + 2)
    assert book.rollouts["g1"].acknowledged and book.revision > revision


def test_tick_leaves_an_acknowledged_rollout_alone():
    book = baking_book()
    book.tick(sides(figures(20)), acks("v2"), AFTER)
    book.tick({}, acks("v2"), AFTER + 1)
    before = book.to_json()
    assert book.tick(sides(figures(20, errors=20)), acks("v1"), AFTER + 2) == []
    assert book.to_json() == before


# -- plan: promote and roll back by hand ---------------------------------------------------------


def test_promote_by_hand_before_the_bake_ends():
    book = baking_book()
    events = book.promote("g1", T0 + 1, "looks fine")
    assert [(e["event"], e["reason"]) for e in events] == [("promoted", "looks fine")]
    assert book.stable["g1"][0] == "v2" and book.rollouts["g1"].ended == T0 + 1


def test_promote_with_nothing_to_promote_is_a_lookup_error():
    book = pinned_book()
    with pytest.raises(LookupError):
        book.promote("g1", T0, "why")
    with pytest.raises(LookupError):
        book.promote("nope", T0, "why")
    book = baking_book()
    book.promote("g1", T0 + 1, "once")
    with pytest.raises(LookupError):
        book.promote("g1", T0 + 2, "twice")


def test_roll_back_with_nothing_to_roll_back_is_a_lookup_error():
    with pytest.raises(LookupError):
        pinned_book().roll_back("g1", T0, "why")
    book = baking_book()
    book.roll_back("g1", T0 + 1, "once")
    with pytest.raises(LookupError):
        book.roll_back("g1", T0 + 2, "twice")


def test_roll_back_by_hand_while_baking_concerns_only_the_canary():
    book = baking_book()
    events = book.roll_back("g1", T0 + 1, "by hand")
    r = book.rollouts["g1"]
    assert [e["event"] for e in events] == ["rolling_back"] and not r.undo
    book.tick({}, acks("v1", **{canary_of(book): ClientState("v2")}), T0 + 2)
    assert r.state == "rolling_back"
    book.tick({}, acks("v2", **{canary_of(book): ClientState("v1")}), T0 + 3)  # the rest is not concerned
    assert r.state == "rolled_back"


def test_rolling_back_a_promoted_rollout_undoes_it_for_every_client():
    book = baking_book()
    book.promote("g1", T0 + 1, "go")
    book.tick({}, acks("v2"), T0 + 2)
    book.roll_back("g1", T0 + 3, "undo")
    r = book.rollouts["g1"]
    assert (r.state, r.undo, book.rejected) == ("rolling_back", True, {"g1": "v2"})
    assert {book.assigned("g1", c) for c in ("a", "b", "c")} == {("v1", cfg("v1"))}
    book.tick({}, acks("v2", rest_of(book), **{canary_of(book): ClientState("v1")}), T0 + 4)
    assert r.state == "rolling_back"  # the canary alone is not enough
    book.tick({}, acks("v1"), T0 + 5)
    assert (r.state, r.acknowledged) == ("rolled_back", True)


# -- plan: history ---------------------------------------------------------------------------------


def test_history_keeps_one_entry_per_rollout_the_rolled_back_one():
    book = baking_book()
    book.tick(sides(figures(20, errors=20)), acks("v2"), T0 + 1)
    assert [h["state"] for h in book.history["g1"]] == ["rolling_back"]
    book.tick({}, acks("v1"), T0 + 2)
    assert [h["state"] for h in book.history["g1"]] == ["rolled_back"]
    entry = book.history["g1"][0]
    assert (entry["old"], entry["new"], entry["started"], entry["ended"]) == ("v1", "v2", T0, T0 + 1)
    assert entry["canary"] == book.rollouts["g1"].canary and entry["figures"]["canary"]["errors"] == 20


def test_history_is_newest_first_and_bounded():
    book = pinned_book()
    for i in range(HISTORY + 3):
        book.reconcile(views(f"v{i + 1}"), views(f"v{i + 2}"), {"g1": ["a", "b"]}, T0 + i)
    # each reload replaced the one before: HISTORY + 2 ended, the last still baking
    history = book.history["g1"]
    assert len(history) == HISTORY
    assert [h["new"] for h in history] == [f"v{i + 2}" for i in range(HISTORY + 1, 1, -1)]
    assert all(h["state"] == "replaced" for h in history)


def test_history_loaded_longer_than_kept_is_cut():
    raw = {"history": {"g1": [{"new": f"v{i}"} for i in range(HISTORY + 5)]}}
    assert len(Book.from_json(raw).history["g1"]) == HISTORY


# -- plan: JSON and revision -------------------------------------------------------------------------


def busy_book() -> Book:
    """g1 baking v3 (with figures) after v2 was rolled back by hand; g2 promoted."""
    half = RolloutSpec(canary=0, share=0.5, bake=30.0)
    clients = {"g1": ["a", "b", "c", "d"], "g2": ["x", "y"]}

    def both(v1: str, v2: str) -> dict[str, GroupView]:
        return views(v1, half) | views(v2, group="g2")

    book = Book()
    book.reconcile({}, both("v1", "w1"), {}, T0 - 100)
    book.reconcile(both("v1", "w1"), both("v2", "w2"), clients, T0)
    book.roll_back("g1", T0 + 1, "by hand")
    book.promote("g2", T0 + 1, "by hand")
    book.reconcile(both("v2", "w2"), both("v3", "w2"), clients, T0 + 2)
    book.tick(sides(figures(3, errors=1, seconds=0.02)), acks("v1", clients["g1"]), T0 + 3)
    assert (book.rollouts["g1"].state, book.rollouts["g2"].state) == ("baking", "promoted")
    return book


def test_book_survives_a_round_trip_through_json():
    book = busy_book()
    again = Book.from_json(orjson.loads(orjson.dumps(book.to_json())))
    assert again.to_json() == book.to_json()
    assert (again.stable, again.rollouts, again.rejected, again.history, again.revision) == \
        (book.stable, book.rollouts, book.rejected, book.history, book.revision)
    for g, c in [("g1", x) for x in "abcde"] + [("g2", "x"), ("g2", "z"), ("g3", "a")]:
        assert again.assigned(g, c) == book.assigned(g, c)


def test_book_after_a_round_trip_decides_the_same():
    book = busy_book()
    again = Book.from_json(orjson.loads(orjson.dumps(book.to_json())))
    for b in (book, again):
        b.tick(sides(figures(40, errors=1)), acks("v1", ("a", "b", "c", "d")), T0 + 40)
    assert again.to_json() == book.to_json() and book.rollouts["g1"].state == "promoted"


def test_empty_book_from_empty_json():
    book = Book.from_json({})
    assert (book.stable, book.rollouts, book.rejected, book.history, book.revision) == ({}, {}, {}, {}, 0)


def test_revision_increases_on_every_change():
    book = Book()
    seen = [book.revision]

    def changed(*_):
        assert book.revision > seen[-1]
        seen.append(book.revision)

    changed(book.reconcile({}, views("v1"), {}, T0))
    changed(book.reconcile(views("v1"), views("v2"), {}, T0))            # started
    changed(book.tick({}, acks("v1", ("a", "b")), T0 + 1))               # canary topped up
    changed(book.tick(sides(figures(20)), acks("v1", ("a", "b")), AFTER))  # promoted
    changed(book.tick({}, acks("v2", ("a", "b")), AFTER + 1))            # acknowledged
    changed(book.roll_back("g1", AFTER + 2, "undo"))                     # rolling back
    changed(book.tick({}, acks("v1", ("a", "b")), AFTER + 3))            # rolled back
    changed(book.reconcile(views("v2"), views("v2", None), {}, AFTER + 4))  # forgotten


def test_revision_stays_when_nothing_changes():
    book = baking_book()
    revision = book.revision
    book.reconcile(views("v2"), views("v2"), {"g1": ["a", "b", "c"]}, T0 + 1)
    book.tick(sides(figures(3)), acks("v1"), T0 + 2)
    assert book.revision == revision


def test_revision_increases_when_the_file_back_at_stable_clears_rejected():
    book = baking_book()
    book.roll_back("g1", T0 + 1, "by hand")
    before, revision = book.to_json(), book.revision
    book.reconcile(views("v2"), views("v1"), {"g1": ["a"]}, T0 + 2)
    assert book.to_json() != before
    assert book.revision > revision


# -- stats ------------------------------------------------------------------------------------------------


def watched(canary=("a",)) -> RolloutStats:
    stats = RolloutStats()
    stats.watch({"g1": ("v2", list(canary))})
    return stats


def test_requests_count_on_the_canary_or_the_rest_by_client_id():
    stats = watched()
    stats.add("g1", "a", 200, 0.005)
    stats.add("g1", "a", 503, 0.005)
    stats.add("g1", "b", 404, 0.02)
    snap = stats.snapshot()["g1"]
    k5, k20 = str(bisect_left(BOUNDS, 0.005)), str(bisect_left(BOUNDS, 0.02))
    assert snap == {"version": "v2", "canary": {"requests": 2, "errors": 1, "bins": {k5: 2}},
                    "rest": {"requests": 1, "errors": 0, "bins": {k20: 1}}}


def test_request_without_client_id_or_of_a_group_not_baking_is_not_counted():
    stats = watched()
    stats.add("g1", "", 502, 0.1)
    stats.add("g2", "a", 500, 0.1)
    snap = stats.snapshot()
    assert list(snap) == ["g1"] and snap["g1"]["canary"]["requests"] == snap["g1"]["rest"]["requests"] == 0


def test_a_new_version_starts_from_zero():
    stats = watched()
    stats.add("g1", "a", 200, 0.005)
    stats.watch({"g1": ("v3", ["a"])})
    snap = stats.snapshot()["g1"]
    assert snap["version"] == "v3" and snap["canary"]["requests"] == 0


def test_more_canaries_for_the_same_version_keep_the_figures():
    stats = watched()
    stats.add("g1", "a", 200, 0.005)
    stats.watch({"g1": ("v2", ["a", "b"])})
    stats.add("g1", "b", 200, 0.005)
    assert stats.snapshot()["g1"]["canary"]["requests"] == 2


def test_a_group_no_longer_baking_is_dropped():
    stats = watched()
    stats.add("g1", "a", 200, 0.005)
    stats.watch({})
    stats.add("g1", "a", 200, 0.005)
    assert stats.snapshot() == {} and stats.watching == {}


def test_snapshot_is_json_able():
    stats = watched()
    stats.add("g1", "b", 500, 1.0)
    assert orjson.loads(orjson.dumps(stats.snapshot())) == stats.snapshot()


def test_two_workers_figures_add_up_exactly():
    one, two, both = watched(), watched(), watched()
    requests = [("a", 200, 0.004), ("b", 500, 0.3), ("a", 502, 0.05), ("c", 200, 0.0001), ("a", 200, 2.0),
                ("b", 201, 0.004), ("a", 200, 500.0)]
    for i, (client, status, seconds) in enumerate(requests):
        (one if i % 2 else two).add("g1", client, status, seconds)
        both.add("g1", client, status, seconds)
    for side in ("canary", "rest"):
        added, whole = Figures(), Figures()
        for snap in (one.snapshot(), two.snapshot()):
            added.add(orjson.loads(orjson.dumps(snap))["g1"][side])
        whole.add(both.snapshot()["g1"][side])
        assert added == whole and added.requests > 0
        assert added.p99 == percentile(whole.bins, 0.99) is not None
    assert (added.requests, added.errors) == (3, 1)  # the rest's: b, b, c


def test_figures_json():
    f = figures(200, errors=3, seconds=0.1)
    assert f.to_json() == {"requests": 200, "errors": 3, "error_rate": 0.015, "p99_ms": round(f.p99 * 1000, 2)}
    assert Figures().to_json() == {"requests": 0, "errors": 0, "error_rate": 0.0, "p99_ms": None}


# -- state_file -------------------------------------------------------------------------------------------


def test_state_path_defaults():
    assert state_path("/var/lib/r.json", "/etc/gw.toml") == "/var/lib/r.json"
    assert state_path("", "/etc/gw.toml") == "/etc/gw.toml.rollouts.json"
    assert state_path("", "") == ""


def test_book_survives_save_and_load(tmp_path):
    path = str(tmp_path / "gw.toml.rollouts.json")
    book = busy_book()
    save_book(path, book)
    loaded = load_book(path)
    assert loaded.to_json() == book.to_json()
    assert loaded.assigned("g1", canary_of(book)) == book.assigned("g1", canary_of(book))


def test_save_replaces_the_file_leaving_no_temp_file(tmp_path):
    path = str(tmp_path / "state.json")
    save_book(path, pinned_book())
    save_book(path, baking_book())
    assert os.listdir(tmp_path) == ["state.json"]
    assert load_book(path).rollouts["g1"].new == "v2"


def test_no_path_keeps_nothing(tmp_path):
    save_book("", baking_book())
    assert load_book("") is None
    assert os.listdir(tmp_path) == []


def test_missing_file_is_no_book_and_no_error(tmp_path, caplog):
    with caplog.at_level(logging.ERROR, logger="gateway.rollout"):
        assert load_book(str(tmp_path / "none.json")) is None
    assert caplog.records == []


@pytest.mark.parametrize("content", [b"{not json", b"", b'{"stable": {"g1": 5}}', b'{"revision": "x"}',
                                     b'{"rollouts": {"g1": {"spec": {"nope": 1}}}}'])
def test_unreadable_file_is_no_book_and_logged(tmp_path, caplog, content):
    path = tmp_path / "state.json"
    path.write_bytes(content)
    with caplog.at_level(logging.ERROR, logger="gateway.rollout"):
        assert load_book(str(path)) is None
    assert [r.levelno for r in caplog.records] == [logging.ERROR]
    assert "rollout state not read" in caplog.records[0].getMessage()


@pytest.mark.parametrize("content", [b"[]", b"null", b'{"stable": []}'])
def test_file_of_the_wrong_shape_is_no_book(tmp_path, content):
    path = tmp_path / "state.json"
    path.write_bytes(content)
    assert load_book(str(path)) is None


def test_save_into_a_missing_directory_raises_oserror(tmp_path):
    with pytest.raises(OSError):
        save_book(str(tmp_path / "missing" / "state.json"), baking_book())
    assert os.listdir(tmp_path) == []


def test_save_that_cannot_rename_raises_oserror_and_leaves_no_temp_file(tmp_path):
    (tmp_path / "state.json").mkdir()  # the rename onto a directory fails after the temp file is written
    with pytest.raises(OSError):
        save_book(str(tmp_path / "state.json"), baking_book())
    assert os.listdir(tmp_path) == ["state.json"]


# -- groupconfig.check_allowed ------------------------------------------------------------------------


def ups(*servers: str) -> dict[str, Upstream]:
    return {"web": Upstream("web", servers)}


def refusal(servers: tuple[str, ...], patterns: tuple[str, ...]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        check_allowed(ups(*servers), patterns, "gateway config abc")
    return info.value


def test_no_patterns_allow_everything():
    check_allowed(ups("http://anything.example:1234", "https://10.0.0.1"), (), "src")


@pytest.mark.parametrize("server,pattern", [
    ("http://127.0.0.1:9000", "127.0.0.1:*"), ("https://api.internal:8443", "*.internal:*"),
    ("http://api.internal", "*.internal:80"), ("https://api.internal", "api.internal:443"),
    ("http://API.Internal:8080/", "api.internal:8080"), ("http://[::1]:8080", "*:8080"),
    ("http://[::1]", "*:80"), ("https://[2001:db8::1]", "*:443"),
])
def test_allowed_server(server, pattern):
    check_allowed(ups(server.rstrip("/")), ("other:1", pattern), "src")


@pytest.mark.parametrize("server,pattern", [
    ("http://127.0.0.2:9000", "127.0.0.1:*"), ("http://api.internal", "api.internal:443"),
    ("https://api.internal", "api.internal:80"), ("http://api.internal:8080", "api.internal:80"),
    ("http://[::1]:8080", "[::1]:80"), ("http://[::2]", "[::1]:*"), ("http://internal.evil:80", "*.internal:80"),
])
def test_refused_server(server, pattern):
    exc = refusal((server,), (pattern,))
    assert server in exc.message and pattern in exc.message


@pytest.mark.parametrize("server,pattern", [("http://[::1]:8080", "[::1]:8080"), ("http://[::1]:8080", "[::1]:*"),
                                            ("http://[::1]", "[::1]:80"),
                                            ("https://[2001:db8::1]", "[2001:db8::1]:443")])
def test_allowed_ipv6_server(server, pattern):
    check_allowed(ups(server), (pattern,), "src")


def test_refusal_names_the_upstream_key_and_the_source():
    up = {"ok": Upstream("ok", ("http://127.0.0.1:1",)), "bad": Upstream("bad", ("http://127.0.0.1:1", "http://x:2"))}
    with pytest.raises(ConfigError) as info:
        check_allowed(up, ("127.0.0.1:*",), "gateway config abc")
    assert (info.value.file, info.value.key) == ("gateway config abc", "upstreams.bad.servers")
    assert "http://x:2" in info.value.message


@pytest.mark.parametrize("server,pattern", [("http://127.0.0.1:80@evil.example", "127.0.0.1:*"),
                                            ("http://evil.example?.internal:443", "*.internal:443")])
def test_server_whose_real_host_is_outside_the_patterns_is_refused(server, pattern):
    from gateway.http.upstream_connection import Server
    assert Server(server).host == "evil.example"  # where the requests would really go
    upstreams = parse_upstreams({"web": {"servers": [server]}}, "gateway.toml", "groups.g1.upstreams")
    with pytest.raises(ConfigError):
        check_allowed(upstreams, (pattern,), "gateway config abc")


# -- config: the rollout table, effective_config, diff_configs -----------------------------------------


def gateway_file(tmp_path: Path, name: str, server: str = "http://127.0.0.1:9000", rollout: str = "") -> str:
    text = f"""
[groups.g1]
tokens = ["s3cret"]

[[groups.g1.rules]]
name = "all"
upstream = "web"

[groups.g1.upstreams.web]
servers = ["{server}"]

[groups.g2]
tokens = ["t2"]
{rollout}
"""
    path = tmp_path / name
    path.write_text(text)
    return str(path)


G1_ROLLOUT = "[groups.g1.rollout]\ncanary = {canary}\nbake = 30\n"


def g1_with(tmp_path, name, canary="1", server="http://127.0.0.1:9000"):
    return gateway_file(tmp_path, name, server, G1_ROLLOUT.format(canary=canary))


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("TUNNEL_"):
            monkeypatch.delenv(name)


def test_rollout_table_is_read_into_the_group(tmp_path):
    config = load_gateway_config(g1_with(tmp_path, "gw.toml", canary='"25%"'))
    assert config.groups["g1"].rollout == RolloutSpec(canary=0, share=0.25, bake=30.0)
    assert config.groups["g2"].rollout is None


def test_bad_rollout_table_names_the_file_and_every_key(tmp_path):
    path = gateway_file(tmp_path, "gw.toml", rollout="[groups.g1.rollout]\ncanary = 0\nbake = -5\nmin_request = 3\n")
    with pytest.raises(ConfigError) as info:
        load_gateway_config(path)
    assert {(e.file, e.key) for e in info.value.errors} == {(path, f"{KEY}.canary"), (path, f"{KEY}.bake"),
                                                            (path, f"{KEY}.min_request")}
    assert str(info.value).startswith(f"{path}: {KEY}.")


def test_rollout_that_is_not_a_table_names_the_key(tmp_path):
    path = gateway_file(tmp_path, "gw.toml", rollout="rollout = 3")
    with pytest.raises(ConfigError) as info:
        load_gateway_config(path)
    assert (info.value.file, info.value.key) == (path, "groups.g2.rollout")


def test_effective_config_shows_each_groups_rollout(tmp_path):
    view = effective_config(load_gateway_config(g1_with(tmp_path, "gw.toml", canary="2")))
    assert view["groups"]["g1"]["rollout"] == {"canary": 2, "bake": 30.0, "max_error_rate": 0.05,
                                               "max_latency_ratio": 2.0, "min_requests": 20}
    assert view["groups"]["g2"]["rollout"] is None
    assert orjson.loads(orjson.dumps(view))["groups"]["g1"]["rollout"]["canary"] == 2


def test_effective_config_shows_a_share_as_written(tmp_path):
    view = effective_config(load_gateway_config(g1_with(tmp_path, "gw.toml", canary='"12.5%"')))
    assert view["groups"]["g1"]["rollout"]["canary"] == "12.5%"


def diff_lines(tmp_path, old_path: str, new_path: str) -> tuple[list[str], str, str]:
    old, new = load_gateway_config(old_path), load_gateway_config(new_path)
    lines = diff_configs(effective_config(old), effective_config(new))
    return lines, old.groups["g1"].client.version, new.groups["g1"].client.version


def test_diff_says_the_canary_gets_the_new_config_first(tmp_path):
    lines, before, after = diff_lines(tmp_path, g1_with(tmp_path, "old.toml"),
                                      g1_with(tmp_path, "new.toml", server="http://127.0.0.1:9001"))
    assert before != after
    assert f"groups.g1: its canary (1 client(s)) gets config {after} first, the rest after a 30 s bake " \
           f"(now {before})" in lines


def test_diff_names_a_canary_share(tmp_path):
    lines, before, after = diff_lines(tmp_path, g1_with(tmp_path, "old.toml", canary='"25%"'),
                                      g1_with(tmp_path, "new.toml", canary='"25%"', server="http://127.0.0.1:9001"))
    assert f"groups.g1: its canary (25% of its clients) gets config {after} first, the rest after a 30 s bake " \
           f"(now {before})" in lines


def test_diff_without_a_rollout_table_says_every_client_gets_it(tmp_path):
    lines, before, after = diff_lines(tmp_path, gateway_file(tmp_path, "old.toml"),
                                      gateway_file(tmp_path, "new.toml", server="http://127.0.0.1:9001"))
    assert f"groups.g1: its clients get config {after} (now {before})" in lines
    assert not any("canary" in line for line in lines)


def test_diff_of_the_rollout_table_alone_names_it_without_a_new_config(tmp_path):
    lines, before, after = diff_lines(tmp_path, g1_with(tmp_path, "old.toml", canary="1"),
                                      g1_with(tmp_path, "new.toml", canary="2"))
    assert before == after
    assert lines == ["groups.g1.rollout.canary: 1 -> 2"]
