"""The API's per-key rate limiter: a sliding minute, keys apart, bounded memory."""

from __future__ import annotations

from agentkit.services.ratelimit import RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_key_gets_its_limit_per_sliding_minute() -> None:
    clock = Clock()
    limiter = RateLimiter(3, clock)
    allowed = []
    for _ in range(3):
        allowed.append(limiter.allow("a"))
        clock.now += 10  # requests at 0, 10 and 20 s
    assert allowed == [True, True, True] and not limiter.allow("a")  # at 30 s
    clock.now = 1000.0 + 59.9
    assert not limiter.allow("a")  # the first request is not a minute old yet
    clock.now = 1000.0 + 60
    assert limiter.allow("a") and not limiter.allow("a")  # it was, and freed one slot


def test_keys_are_counted_apart_and_refusals_do_not_count() -> None:
    limiter = RateLimiter(1, Clock())
    assert limiter.allow("a") and not limiter.allow("a") and not limiter.allow("a")
    assert limiter.allow("b")
    assert len(limiter._recent["a"]) == 1  # refused requests are not remembered


def test_zero_means_no_limit() -> None:
    limiter = RateLimiter(0, Clock())
    assert all(limiter.allow("a") for _ in range(1000)) and limiter._recent == {}
