"""The client's spreading and moving decisions (gateway/client/fleet.py), without sockets."""
from __future__ import annotations

import pytest

from gateway.client.fleet import Move, NodeSet, home_offset, server_list

A, B, C = "127.0.0.2:5000", "127.0.0.3:5000", "127.0.0.4:5000"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_server_list_accepts_one_or_several_and_drops_repeats():
    assert server_list(A) == A
    assert server_list(f"{B}, {A},{B}") == f"{B},{A}"
    for bad in ("", "x", f"{A},", f"{A},nohost", 5):
        with pytest.raises(ValueError):
            server_list(bad)


def test_a_fresh_start_puts_connection_i_on_node_i_mod_n():
    nodes = NodeSet([B, A, C])
    placed: dict[int, str | None] = {i: None for i in range(4)}
    for i in range(4):
        placed[i] = nodes.target(i, placed)
    assert placed == {0: A, 1: B, 2: C, 3: A}  # by the sorted addresses, whatever order given


def test_clients_of_one_connection_each_have_their_homes_spread():
    homes = [NodeSet([A, B, C], offset=home_offset("g1", f"edge-{n}")).target(0, {0: None}) for n in range(60)]
    assert {A, B, C} == set(homes) and min(homes.count(n) for n in (A, B, C)) >= 10, homes
    # Stable: the same identity, the same home (a restart changes nothing).
    assert NodeSet([C, A, B], offset=home_offset("g1", "edge-7")).target(0, {0: None}) == homes[7]
    # The offset turns the homes, the spread of one client's connections stays i mod n.
    nodes = NodeSet([A, B, C], offset=1)
    placed: dict[int, str | None] = {i: None for i in range(3)}
    for i in range(3):
        placed[i] = nodes.target(i, placed)
    assert placed == {0: B, 1: C, 2: A}
    assert nodes.plan_move({0: B, 1: B, 2: A}) == Move(1, C, "spread")  # 1's home is C


def test_a_drained_connection_goes_elsewhere_on_a_tie_only():
    nodes = NodeSet([A, B])
    assert nodes.target(0, {0: None}) == A  # its home
    assert nodes.target(0, {0: None}, drained_by=A) == B  # an operator moved it off A
    # Not when the other node is fuller: the client's own spread comes first.
    assert nodes.target(0, {0: None, 1: B}, drained_by=A) == A
    assert nodes.target(1, {0: A, 1: None}, drained_by=B) == B


def test_one_node_known_then_told_of_another_moves_one_connection():
    nodes = NodeSet([A])
    placed: dict[int, str | None] = {0: A, 1: A}
    assert nodes.plan_move(placed) is None
    assert nodes.learn([A, B]) == [A, B]  # the first list: all new
    assert nodes.plan_move(placed) == Move(1, B, "spread")  # 1's home is B
    placed[1] = B
    assert nodes.plan_move(placed) is None
    assert nodes.learn([]) == [] and nodes.known() == [A, B]  # an empty list tells nothing


def test_a_failed_node_sends_its_connection_to_the_next_and_comes_back_after_a_while():
    clock = Clock()
    nodes = NodeSet([A, B], clock=clock, down_for=3.0)
    nodes.mark_down(A)
    placed: dict[int, str | None] = {0: None, 1: B}
    assert nodes.target(0, placed) == B
    placed[0] = B
    assert nodes.plan_move(placed) is None  # A is down: nowhere better
    clock.now += 3.0
    assert nodes.plan_move(placed) == Move(0, A, "spread")


def test_a_node_told_again_is_tried_at_once():
    clock = Clock()
    nodes = NodeSet([A], clock=clock)
    nodes.learn([A, B])
    nodes.mark_down(A)
    nodes.learn([B])  # A left the fleet's view (killed)
    assert nodes.usable() == [B]
    assert nodes.learn([A, B]) == [A]  # back: not left alone until its mark ends
    assert nodes.usable() == [A, B]


def test_all_down_still_tries_the_one_back_soonest():
    clock = Clock()
    nodes = NodeSet([A, B], clock=clock)
    nodes.mark_down(B)
    clock.now += 1
    nodes.mark_down(A)
    assert nodes.target(0, {0: None}) == B
    single = NodeSet([A], clock=clock)
    single.mark_down(A)
    assert single.target(0, {0: None}) == A and single.plan_move({0: A}) is None


def test_connections_leave_a_node_that_left_the_fleet_or_went_down():
    nodes = NodeSet([A])
    nodes.learn([A, B, C])
    nodes.learn([A, B])  # C left (it was only told, not configured)
    assert nodes.known() == [A, B]
    assert nodes.plan_move({0: A, 1: C}) == Move(1, B, "node left the fleet")
    nodes.mark_down(B)
    assert nodes.plan_move({0: A, 1: B}) == Move(1, A, "node down")


def test_spread_moves_only_when_uneven_by_more_than_one():
    nodes = NodeSet([A, B, C])
    assert nodes.plan_move({0: A, 1: B, 2: B, 3: C}) is None  # 1, 2, 1: spread enough
    assert nodes.plan_move({0: A, 1: A, 2: B}) == Move(1, C, "spread")  # 2, 1, 0
    assert nodes.plan_move({0: A, 1: A, 2: A}) == Move(1, B, "spread")  # the emptiest first, 1's home
    assert nodes.plan_move({0: A, 1: B, 2: C, 3: A, 4: None}) is None
