"""One gather-and-raise for work whose failure must stop every process: the store's split build and
`distributed.run_on_main` both use `collective.together`.  Processes are threads here (conftest's ThreadTeam),
joined by a gather that pickles what it passes, as between processes."""

from __future__ import annotations

import threading

from conftest import ThreadTeam
import mnr.distributed as distributed
from mnr.collective import picklable, together


class Unpicklable(Exception):
    def __init__(self, msg):
        super().__init__(msg)
        self.handle = threading.Lock()  # a lock does not pickle


def test_every_process_gets_every_result_in_rank_order():
    team = ThreadTeam(3, timeout=5)
    assert team.run(lambda r: together(team.gather, lambda: r * 10)) == [[0, 10, 20]] * 3


def test_the_first_failure_is_raised_on_every_process_as_itself():
    team = ThreadTeam(3, timeout=5)

    def fn(r):
        if r >= 1:
            raise ValueError(f"bad value on {r}")
        return 1

    errors = team.run(lambda r: together(team.gather, lambda: fn(r)))
    assert all(type(e) is ValueError and str(e) == "bad value on 1" for e in errors), errors


def test_an_error_that_does_not_pickle_arrives_as_a_runtime_error_with_its_message():
    assert type(picklable(ValueError("x"))) is ValueError
    assert str(picklable(Unpicklable("broke"))) == "Unpicklable: broke"


def fake_world(monkeypatch, team: ThreadTeam) -> None:
    monkeypatch.setattr(distributed, "is_main", lambda: team.local.rank == 0)
    monkeypatch.setattr(distributed, "all_gather_object", team.gather)


def test_run_on_main_raises_an_error_that_does_not_pickle_on_every_process(monkeypatch):
    team = ThreadTeam(2, timeout=5)
    fake_world(monkeypatch, team)

    def fail():
        raise Unpicklable("the export broke")

    errors = team.run(lambda r: distributed.run_on_main(fail))
    assert all(isinstance(e, RuntimeError) and str(e) == "Unpicklable: the export broke" for e in errors), errors


def test_run_on_main_shares_its_result_or_keeps_it_on_the_main_process(monkeypatch):
    team = ThreadTeam(2, timeout=5)
    fake_world(monkeypatch, team)
    assert team.run(lambda r: distributed.run_on_main(lambda: {"hash": 1}, share=True)) == [{"hash": 1}] * 2
    lock = threading.Lock()  # a result that is not shared need not pickle
    assert team.run(lambda r: distributed.run_on_main(lambda: lock)) == [lock, None]


def test_run_on_main_runs_fn_on_the_main_process_only(monkeypatch):
    team, calls = ThreadTeam(3, timeout=5), []
    fake_world(monkeypatch, team)
    team.run(lambda r: distributed.run_on_main(lambda: calls.append(r)))
    assert calls == [0]
