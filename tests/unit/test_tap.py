"""
C{twistd fedserver}'s process set-up: the limit of open files it raises so
the inward listener can hold C{[limits] max_connections} connections.  The
integration test C{tests/integration/test_connections.py} starts twistd
with a soft limit of 1024 and holds 1,000 connections.
"""

from __future__ import annotations

import resource
from typing import List, Tuple

from twisted.logger import capturedLogs, formatEvent

from fedserver.tap import raise_open_file_limit

INFINITY = resource.RLIM_INFINITY


class Limits:
    """The process's RLIMIT_NOFILE, as the tests set it."""

    def __init__(self, soft: int, hard: int, *, refuse: bool = False) -> None:
        self.soft, self.hard, self.refuse = soft, hard, refuse
        self.set: List[Tuple[int, int]] = []

    def getrlimit(self, which: int) -> Tuple[int, int]:
        assert which == resource.RLIMIT_NOFILE
        return self.soft, self.hard

    def setrlimit(self, which: int, limits: Tuple[int, int]) -> None:
        assert which == resource.RLIMIT_NOFILE
        if self.refuse:
            raise ValueError("not allowed to raise maximum limit")
        self.set.append(limits)
        self.soft, self.hard = limits


def _raise(limits: Limits, wanted: int) -> Tuple[int, List[str]]:
    with capturedLogs() as events:
        soft = raise_open_file_limit(wanted, limits.getrlimit, limits.setrlimit)
    return soft, [formatEvent(e) for e in events]


def test_a_low_soft_limit_is_raised_to_what_is_wanted() -> None:
    limits = Limits(1024, 524288)
    soft, messages = _raise(limits, 2048)
    assert soft == 2048 and limits.set == [(2048, 524288)]
    assert messages == ["raised the limit of open files from 1024 to 2048"]


def test_an_unlimited_hard_limit_is_kept() -> None:
    limits = Limits(1024, INFINITY)
    assert _raise(limits, 5000)[0] == 5000
    assert limits.set == [(5000, INFINITY)]


def test_a_soft_limit_high_enough_is_left_alone() -> None:
    for soft in (4096, INFINITY):
        limits = Limits(soft, INFINITY)
        assert _raise(limits, 2048) == (soft, [])
        assert limits.set == []


def test_the_hard_limit_caps_the_raise_and_is_named() -> None:
    limits = Limits(256, 1500)
    soft, messages = _raise(limits, 2048)
    assert soft == 1500 and limits.set == [(1500, 1500)]
    assert messages[0] == "raised the limit of open files from 256 to 1500"
    assert "hard limit of open files is 1500, below the 2048" in messages[1]
    assert "LimitNOFILE=" in messages[1] and "max_connections" in messages[1]


def test_a_soft_limit_already_at_a_low_hard_limit_warns_only() -> None:
    limits = Limits(1024, 1024)
    soft, messages = _raise(limits, 2048)
    assert soft == 1024 and limits.set == []
    assert len(messages) == 1 and "hard limit of open files is 1024" in messages[0]


def test_a_refused_raise_is_reported_and_changes_nothing() -> None:
    limits = Limits(1024, 4096, refuse=True)
    soft, messages = _raise(limits, 2048)
    assert soft == 1024 and (limits.soft, limits.hard) == (1024, 4096)
    assert messages == ["could not raise the limit of open files from 1024 to 2048: "
                        "not allowed to raise maximum limit"]


def test_the_process_limit_is_read_for_real() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # what this process already has is enough: nothing changes
    assert raise_open_file_limit(min(soft, 64)) == soft
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (soft, hard)
