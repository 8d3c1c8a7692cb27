"""``python -m vfiopy.release`` with random arguments against the simulator: exit 0, 1 or 2,
never a traceback; with --json exactly one JSON document on stdout; no fd left open; no
device reset that was not asked for.

The CLI runs in this process with a simulated process as its kernel, so nothing reaches this
machine's devices or processes whatever the arguments say (``--pid 1`` is the simulator's).
"""

from __future__ import annotations

import contextlib
import io
import json
import os

import structlog
from hypothesis import event, given
from hypothesis import strategies as st
from mock_vfio import Machine, spawn_qemu
from prop_helpers import budget, wait_until

from vfiopy.release.cli import main

VMM_HOLDS = ["0000:03:00.0", "0000:03:00.1"]  # the first GPU and its audio function
IDLE = ["0000:04:00.0", "0000:04:00.1"]  # the second: bound to vfio-pci, not in use
PIDS = ["VMM", "SHELL", "CLI", "0", "-1", "1", "424242", "4194305", "2147483648", "x", ""]


def option(name: str, values: list[str]) -> st.SearchStrategy[list[str]]:
    return st.sampled_from(values).map(lambda v: [name, v])


ADDRESSES = [*VMM_HOLDS, *IDLE, "04:00.0"]
# Arguments a user means: a flow (addresses, --pid, or --simulate-vmm) and good options.
GOOD_OPTIONS = st.one_of(
    st.sampled_from([["--json"], ["--dry-run"], ["-q"], ["-v"]]),
    option("--signal", ["TERM", "INT", "KILL", "HUP", "9"]),
    option("--grace", ["0", "0.01"]),
    option("--timeout", ["5", "0.5"]),
    option("--max-parallel", ["1", "2", "4096"]),
    option("--backend", ["container", "iommufd"]),
)
FLOWS = st.one_of(
    st.lists(st.sampled_from(ADDRESSES), min_size=1, max_size=4),
    option("--pid", ["VMM", "VMM", "SHELL", "CLI"]),
    st.just(["--simulate", "gpus:2", "--simulate-vmm"]),
)
MEANT = st.tuples(FLOWS, st.lists(GOOD_OPTIONS, max_size=4)).map(
    lambda t: t[0] + [a for o in t[1] for a in o]
)
# And anything else, from the same words and some bad ones.
ANY_ARG = st.one_of(
    st.sampled_from([*ADDRESSES, "0000:99:00.0", "3b:00", "../x", ""]).map(lambda a: [a]),
    option("--pid", PIDS),
    st.sampled_from(
        [["--json"], ["--dry-run"], ["-q"], ["-v"], ["--simulate-vmm"], ["--bogus"], ["--"]]
    ),
    option("--signal", ["TERM", "INT", "KILL", "SIGHUP", "9", "0", "32", "33", "64", "BOGUS"]),
    option("--grace", ["0", "0.01", "-1", "nan", "inf", "x"]),
    option("--timeout", ["5", "0.5", "0", "-1", "nan", "inf", "x"]),
    option("--max-parallel", ["1", "2", "4096", "0", "-1", "x"]),
    option("--backend", ["container", "iommufd", "bogus"]),
    option("--simulate", ["gpus:2", "", " ", "nosuch", "gpus:x"]),
    option("--kernel-model", ["devset", "legacy", "bogus"]),
    option("--reset-model", ["current", "pre-6.3", "bogus"]),
    option("--time-scale", ["0", "-1", "nan", "x"]),
)
NOISE = st.lists(ANY_ARG, max_size=6).map(lambda parts: [a for p in parts for a in p])
ARGVS = st.one_of(
    MEANT,
    MEANT,
    NOISE,
    st.tuples(MEANT, ANY_ARG).map(lambda t: t[0] + t[1]),  # one thing wrong, at the end
    st.tuples(ANY_ARG, MEANT).map(lambda t: t[0] + t[1]),
)


def own_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@given(ARGVS, st.booleans())
@budget(1.5)
def test_any_arguments_exit_0_1_or_2_without_a_traceback(argv: list[str], json_flag: bool) -> None:
    if json_flag:
        argv = ["--json", *argv]
    # A short grace unless one is given: the simulated VMM ignores SIGINT, and the default
    # 10 s before SIGKILL would spend the budget waiting.
    argv = ["--grace", "0.05", *argv]
    m = Machine("gpus:2", time_scale=0)
    try:
        vmm = spawn_qemu(m, VMM_HOLDS)
        shell = m.spawn(name="shell")
        cli = m.spawn(name="cli")
        pids = {"VMM": vmm.getpid(), "SHELL": shell.getpid(), "CLI": cli.getpid()}
        argv = [str(pids.get(a, a)) for a in argv]
        since = len(m.trace)
        fds = own_fds()
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv, kernel=cli)
        structlog.reset_defaults()
        stdout, stderr = out.getvalue(), err.getvalue()
        event(f"exit {code}")

        assert code in (0, 1, 2), (code, stderr)
        assert "Traceback" not in stderr, stderr
        options = argv[: argv.index("--")] if "--" in argv else argv  # then addresses only
        if "--json" in options:
            text = stdout.strip()
            doc, end = json.JSONDecoder().raw_decode(text)
            assert not text[end:].strip(), f"more than one document: {stdout!r}"
            assert isinstance(doc, dict) and doc["schema"] == 1
            assert doc["ok"] is (code == 0), (code, doc)
        # Whatever happened, the CLI's simulated process holds nothing, and this one has no fd
        # more than before: the run's wake-up eventfd is closed by the last of the loop and
        # the workers to leave, which may be a worker just after the run returned.
        assert len(cli.fd_table()) == 0, cli.fd_table()
        assert wait_until(lambda: own_fds() <= fds), (own_fds(), fds)
        # No reset of a device not asked for: the addresses given, or the VMM's devices when
        # its pid was (or --simulate-vmm spawned another VMM, with every device).
        asked = {a if a.startswith("0000:") else "0000:" + a for a in argv if ":" in a}
        if "--simulate-vmm" in argv:
            asked |= set(VMM_HOLDS + IDLE)
        if str(vmm.getpid()) in argv:
            asked |= set(VMM_HOLDS)
        reset = {e.device for e in m.trace[since:] if e.kind == "reset"}
        assert reset <= asked, (reset, argv)
    finally:
        m.faults.clear()
        m.close()
