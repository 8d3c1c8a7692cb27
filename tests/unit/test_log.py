"""vfiopy's loggers follow the application's structlog configuration, and stay quiet without one."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import structlog
from structlog.testing import LogCapture, capture_logs

from vfiopy._log import defer_configuration, forget_deferred_configuration, get_logger


@pytest.fixture(autouse=True)
def _unconfigured() -> Iterator[None]:
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


def test_unconfigured_warnings_to_stderr_and_nothing_else(
    capsys: pytest.CaptureFixture[str],
) -> None:
    log = get_logger("vfiopy.test")
    log.debug("device opened", bdf="0000:01:00.0")
    log.info("release.device", bdf="0000:01:00.0")
    log.bind(domain="0000:01").warning("release.session_close_deferred", reason="x")
    log.error("release.domain_timeout", bdf="0000:02:00.0", errno=110)
    out, err = capsys.readouterr()
    assert out == ""
    assert "device opened" not in err and "release.device" not in err
    assert "release.session_close_deferred" in err and "domain=0000:01" in err
    assert "release.domain_timeout" in err and "errno=110" in err


def test_configured_application_gets_every_event() -> None:
    log = get_logger("vfiopy.test")
    with capture_logs() as events:
        log.debug("device opened", bdf="0000:01:00.0")
        log.bind(domain="0000:01").info("release.device")
    assert [(e["event"], e["log_level"]) for e in events] == [
        ("device opened", "debug"),
        ("release.device", "info"),
    ]
    assert events[1]["domain"] == "0000:01"


@pytest.fixture
def deferred() -> Iterator[tuple[list[int], LogCapture]]:
    """A command line's set-up (events at info and above, into ``capture``), deferred; the
    list counts the times it ran."""
    runs: list[int] = []
    capture = LogCapture()

    def configure() -> None:
        runs.append(1)
        structlog.configure(
            processors=[capture],
            wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        )

    defer_configuration(logging.INFO, configure)
    yield runs, capture
    forget_deferred_configuration()


def test_a_deferred_set_up_waits_for_an_event_it_keeps(
    deferred: tuple[list[int], LogCapture], capsys: pytest.CaptureFixture[str]
) -> None:
    runs, capture = deferred
    log = get_logger("vfiopy.test")
    bound = log.bind(domain="0000:01")
    log.debug("device opened", bdf="0000:01:00.0")
    bound.debug("release.step")
    assert runs == [] and capture.entries == []
    bound.info("release.device", bdf="0000:01:00.0")
    log.warning("release.session_close_deferred")
    bound.debug("release.step")
    assert runs == [1]  # once, at the first event it keeps
    assert [(e["event"], e.get("domain")) for e in capture.entries] == [
        ("release.device", "0000:01"),
        ("release.session_close_deferred", None),
    ]
    assert capsys.readouterr() == ("", "")


def test_a_bind_after_the_set_up_is_structlogs(deferred: tuple[list[int], LogCapture]) -> None:
    runs, capture = deferred
    log = get_logger("vfiopy.test")
    log.error("release.domain_timeout", errno=110)
    log.bind(domain="0000:02").bind(bdf="0000:02:00.0").info("release.device")
    assert runs == [1]
    assert capture.entries[1]["domain"] == "0000:02"
    assert capture.entries[1]["bdf"] == "0000:02:00.0"


def test_a_forgotten_set_up_never_runs(
    deferred: tuple[list[int], LogCapture], capsys: pytest.CaptureFixture[str]
) -> None:
    runs, capture = deferred
    forget_deferred_configuration()
    get_logger("vfiopy.test").error("release.domain_timeout", errno=110)
    assert runs == [] and capture.entries == []
    assert "release.domain_timeout" in capsys.readouterr().err  # the unconfigured default
