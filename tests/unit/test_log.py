"""vfiopy's loggers follow the application's structlog configuration, and stay quiet without one."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog
from structlog.testing import capture_logs

from vfiopy._log import get_logger


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
