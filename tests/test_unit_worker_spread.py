"""The client's spreading of its connections over a gateway's workers
(gateway/client/worker_spread.py), without sockets."""
from __future__ import annotations

from gateway.client.worker_spread import Seat, WorkerSpread, crowded, workers_held

NODE = "127.0.0.2:50001"


def seats(*workers: str | None, gateway: str = "g1", count: int = 4, node: str = NODE) -> dict[int, Seat | None]:
    """Connection i on `workers[i]` of one gateway of `count` workers (None: not connected)."""
    return {i: Seat(node, gateway, w, count) if w is not None else None for i, w in enumerate(workers)}


def test_nothing_moves_when_every_connection_has_a_worker_of_its_own():
    assert crowded(seats("0", "1", "2", "3")) is None
    assert crowded(seats("2", "0")) is None


def test_a_connection_sharing_a_worker_moves_while_a_worker_holds_none():
    assert crowded(seats("1", "1")) == 1  # the last of the crowded worker's: the lowest stay put
    assert crowded(seats("0", "2", "2", "2")) == 3
    assert crowded(seats("3", "0", "3", None)) == 2


def test_more_connections_than_workers_need_only_every_worker_held():
    assert crowded(seats("0", "1", "0", "1", "0", count=2)) is None  # 3 and 2 is as good as it gets
    assert crowded(seats("0", "0", "0", count=2)) == 2


def test_a_gateway_of_one_worker_or_an_older_gateway_gives_nothing_to_spread():
    assert crowded(seats("0", "0", count=1)) is None
    assert crowded(seats("", "", count=0)) is None  # WELCOME without workers


def test_two_gateways_behind_one_address_are_two_gateways():
    both = {0: Seat(NODE, "g1", "0", 2), 1: Seat(NODE, "g2", "0", 2)}
    assert crowded(both) is None
    assert workers_held(both) == 2
    # Two nodes are two gateways too.
    assert crowded({0: Seat(NODE, "g1", "0", 2), 1: Seat("127.0.0.3:50001", "g3", "0", 2)}) is None


def test_it_plans_moves_until_spread():
    spread = WorkerSpread()
    assert spread.plan(seats("1", "1", "3", count=4)) == 1
    assert spread.plan(seats("1", "1", "3", count=4)) == 1  # landed where it was: again
    assert spread.plan(seats("1", "0", "3", count=4)) is None
    assert spread.misses == 0


def test_it_gives_up_after_tries_per_worker_misses_and_starts_again_when_placement_changes():
    spread = WorkerSpread(tries_per_worker=2)
    crowded_seats = seats("0", "0", count=2)
    planned = [spread.plan(crowded_seats) for _ in range(6)]
    # 2 workers x 2 tries: four moves that reached no new worker, then none.
    assert planned == [1, 1, 1, 1, None, None]
    assert spread.given_up
    # A connection lost and back (or another gateway answering): worth trying again.
    assert spread.plan(seats("0", None, count=2)) is None
    assert spread.plan(crowded_seats) == 1 and not spread.given_up
    # So is a reconnect the agent saw (an operator's drain, a worker respawned) though
    # the placement looks the same.
    while spread.plan(crowded_seats) is not None:
        pass
    assert spread.given_up and spread.plan(crowded_seats, reconnects=1) == 1


def test_a_move_that_reaches_a_new_worker_resets_the_count():
    spread = WorkerSpread(tries_per_worker=1)
    assert spread.plan(seats("0", "0", "0", count=4)) == 2
    assert spread.plan(seats("0", "0", "0", count=4)) == 2  # one miss
    assert spread.plan(seats("0", "0", "1", count=4)) == 1  # reached worker 1: no miss counted
    assert spread.misses == 0
