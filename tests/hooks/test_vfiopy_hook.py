"""contrib/vfiopy-hook run as libvirt and Proxmox run it, against stub commands."""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

import pytest
from hook_stubs import (
    HOOK,
    MDEV_HOSTDEV,
    NET_HOSTDEV,
    NO_HOSTDEV,
    PCI_HOSTDEV,
    USB_HOSTDEV,
    Host,
    alive,
    hostdev_xml,
    wait_until,
)

LAUNCHERS = ["setsid", "systemd-run"]
GUEST = "vm1"
XML = hostdev_xml(GUEST, PCI_HOSTDEV)


def assert_quiet_success(r: subprocess.CompletedProcess[str]) -> None:
    """Exit 0 and nothing on stdout (libvirt reads it for the migrate and restore operations)."""
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""


def assert_guardian_of(host: Host, g: dict[str, Any], vmm_pid: int) -> None:
    assert g["argv"] == ["--pid", str(vmm_pid), "--watch", "--json"]
    # Detached: its own session, its stdio on none of the hook's pipes.
    assert g["sid"] == g["pid"] != os.getsid(0)
    assert g["stdio"][0] == "/dev/null"
    assert not any(s.startswith("pipe:") for s in g["stdio"]), g["stdio"]


def started_one(host: Host, launcher: str, vmm_pid: int) -> dict[str, Any]:
    (g,) = host.wait_guardians(1)
    assert_guardian_of(host, g, vmm_pid)
    assert alive(g["pid"]) and not host.finished(g)
    if launcher == "systemd-run":
        (run,) = host.systemd_runs()
        assert "--unit=vfiopy-guard-libvirt-vm1" in run or "--unit=vfiopy-guard-pve-100" in run
        assert "--collect" in run and "--property=KillMode=mixed" in run
        assert run[run.index("--") + 1 :] == ["vfiopy-release", *g["argv"]]
    else:
        assert host.systemd_runs() == []
        assert g["stdio"][1].endswith(".json") and g["stdio"][2].endswith(".log")
    return g


# --- libvirt ------------------------------------------------------------------------------


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_started_starts_one_detached_guardian(host: Host, launcher: str) -> None:
    vmm = host.vmm(host.libvirt_dir / f"{GUEST}.pid")
    r = host.hook(GUEST, "started", "begin", "-", xml=XML, launcher=launcher)
    assert_quiet_success(r)
    # The hook has returned (and closed its pipes) while the guardian runs on.
    g = started_one(host, launcher, vmm.pid)

    # Started again (libvirtd's reconnect, a repeated call): still one guardian.
    for op in ("started", "reconnect"):
        assert_quiet_success(host.hook(GUEST, op, "begin", "-", xml=XML, launcher=launcher))
    assert [x["pid"] for x in host.guardians()] == [g["pid"]]
    assert sum("started as" in line for line in host.log_lines()) == 1
    assert sum("runs already" in line for line in host.log_lines()) == 2


def releasing_guardian(host: Host, launcher: str) -> dict[str, Any]:
    """A guardian started at `started` whose QEMU has exited: it releases, held at the gate."""
    vmm = host.vmm(host.libvirt_dir / f"{GUEST}.pid")
    assert_quiet_success(host.hook(GUEST, "started", "begin", "-", xml=XML, launcher=launcher))
    (g,) = host.wait_guardians(1)
    vmm.kill()
    vmm.wait()
    return g


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_stopped_waits_for_the_guardian(host: Host, launcher: str) -> None:
    g = releasing_guardian(host, launcher)
    # `stopped` must not return while the guardian releases.
    hook = host.spawn_hook(GUEST, "stopped", "end", "-", launcher=launcher)
    assert wait_until(lambda: any("waiting up to 600s" in x for x in host.log_lines()))
    assert hook.poll() is None and not host.finished(g)
    host.open_gate()
    out, err = hook.communicate(timeout=120)
    assert (hook.returncode, out) == (0, ""), err
    assert host.finished(g)
    assert any("has finished" in line for line in host.log_lines())
    assert not (host.run_dir / f"libvirt-{GUEST}.pid").exists()


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_stopped_gives_up_after_the_bound(host: Host, launcher: str) -> None:
    g = releasing_guardian(host, launcher)
    r = host.hook(GUEST, "stopped", "end", "-", launcher=launcher, VFIOPY_STOP_WAIT="1")
    assert_quiet_success(r)
    assert alive(g["pid"]) and not host.finished(g)  # the gate never opened
    assert any("still runs after 1s" in line for line in host.log_lines())


def test_stopped_after_the_guardian_finished(host: Host) -> None:
    # A fast release ends before libvirt calls `stopped`: said the same way, pid file gone.
    g = releasing_guardian(host, "setsid")
    host.open_gate()
    assert wait_until(lambda: host.finished(g) and not alive(g["pid"]))
    assert_quiet_success(host.hook(GUEST, "stopped", "end", "-"))
    assert any("has finished" in line for line in host.log_lines())
    assert not (host.run_dir / f"libvirt-{GUEST}.pid").exists()


def test_stopped_without_guardian_returns_at_once(host: Host) -> None:
    assert_quiet_success(host.hook(GUEST, "stopped", "end", "-"))
    assert host.log_lines() == []


@pytest.mark.parametrize("op", ["prepare", "start", "release", "migrate", "restore", "attach"])
def test_other_operations_do_nothing(host: Host, op: str) -> None:
    host.vmm(host.libvirt_dir / f"{GUEST}.pid")
    assert_quiet_success(host.hook(GUEST, op, "begin", "-", xml=XML, launcher="systemd-run"))
    assert_quiet_success(host.hook(GUEST, op, "begin", "-", xml=XML, launcher="setsid"))
    assert host.systemd_runs() == [] and host.log_lines() == []
    assert not host.run_dir.exists()


@pytest.mark.parametrize(
    ("devices", "guarded"),
    [
        (PCI_HOSTDEV, True),
        (MDEV_HOSTDEV, True),
        (NET_HOSTDEV, True),
        (NO_HOSTDEV, False),
        (USB_HOSTDEV, False),
    ],
    ids=["pci", "mdev", "interface-hostdev", "none", "usb-only"],
)
def test_only_guests_with_vfio_devices(host: Host, devices: str, guarded: bool) -> None:
    vmm = host.vmm(host.libvirt_dir / f"{GUEST}.pid")
    r = host.hook(GUEST, "started", "begin", "-", xml=hostdev_xml(GUEST, devices))
    assert_quiet_success(r)
    if guarded:
        (g,) = host.wait_guardians(1)
        assert_guardian_of(host, g, vmm.pid)
    else:
        assert host.log_lines() == [] and not host.run_dir.exists()


def test_a_guest_name_with_blanks_and_dashes(host: Host) -> None:
    name = "web front-1"
    vmm = host.vmm(host.libvirt_dir / f"{name}.pid")
    xml = hostdev_xml(name, PCI_HOSTDEV)
    assert_quiet_success(host.hook(name, "started", "begin", "-", xml=xml, launcher="systemd-run"))
    (g,) = host.wait_guardians(1)
    assert_guardian_of(host, g, vmm.pid)
    if shutil.which("systemd-escape"):
        (run,) = host.systemd_runs()
        assert "--unit=vfiopy-guard-libvirt-web\\x20front\\x2d1" in run


# --- never in the way of the VM ------------------------------------------------------------


@pytest.mark.parametrize(
    ("setup", "extra", "message"),
    [
        ("vmm", {"VFIOPY_RELEASE": "/nonexistent/vfiopy-release"}, "not found"),
        ("none", {}, "no running QEMU"),
        ("dead", {}, "no running QEMU"),
        ("vmm", {"VFIOPY_LAUNCHER": "nohup-please"}, "use auto, systemd-run or setsid"),
        ("vmm", {"VFIOPY_RUN_DIR": "/proc/vfiopy-cannot-be"}, "cannot create"),
        ("vmm", {"VFIOPY_LAUNCHER": "systemd-run", "FAKE_SYSTEMD_RUN_FAIL": "1"}, "failed"),
    ],
    ids=[
        "no-release-command",
        "no-pid-file",
        "dead-pid",
        "bad-launcher",
        "no-run-dir",
        "systemd-run-fails",
    ],
)
def test_failures_are_logged_never_fatal(
    host: Host, setup: str, extra: dict[str, str], message: str
) -> None:
    pid_file = host.libvirt_dir / f"{GUEST}.pid"
    if setup == "vmm":
        host.vmm(pid_file)
    elif setup == "dead":
        p = subprocess.Popen(["true"])
        p.wait()
        pid_file.write_text(f"{p.pid}\n")
    r = host.hook(GUEST, "started", "begin", "-", xml=XML, **extra)
    assert_quiet_success(r)
    assert any(message in line for line in host.log_lines()), host.log_lines()
    assert message in r.stderr
    assert host.guardians() == []


def test_settings_come_from_the_config_file(host: Host) -> None:
    vmm = host.vmm(host.root / "elsewhere.pid")
    (host.root / "elsewhere").mkdir()
    (host.root / "elsewhere.pid").rename(host.root / "elsewhere" / f"{GUEST}.pid")
    config = host.root / "vfiopy-guard"
    config.write_text(
        f"VFIOPY_LIBVIRT_PID_DIR={host.root / 'elsewhere'}\n"
        "VFIOPY_RELEASE_ARGS='--timeout 30 --quiet'\n"
    )
    r = host.hook(GUEST, "started", "begin", "-", xml=XML, VFIOPY_CONFIG=str(config))
    assert_quiet_success(r)
    (g,) = host.wait_guardians(1)
    assert g["argv"] == ["--pid", str(vmm.pid), "--watch", "--json", "--timeout", "30", "--quiet"]


# --- Proxmox VE ----------------------------------------------------------------------------

VMID = "100"
PVE_CONF = "boot: order=scsi0\nhostpci0: 0000:03:00,pcie=1\nmemory: 8192\n"


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_proxmox_phases(host: Host, launcher: str) -> None:
    host.qm_config(100, PVE_CONF)
    assert_quiet_success(host.hook(VMID, "pre-start", launcher=launcher))
    vmm = host.vmm(host.pve_dir / f"{VMID}.pid")
    assert_quiet_success(host.hook(VMID, "post-start", launcher=launcher))
    g = started_one(host, launcher, vmm.pid)
    assert_quiet_success(host.hook(VMID, "pre-stop", launcher=launcher))
    assert [x["pid"] for x in host.guardians()] == [g["pid"]]

    vmm.kill()
    vmm.wait()
    hook = host.spawn_hook(VMID, "post-stop", launcher=launcher)
    assert wait_until(lambda: any("waiting up to" in x for x in host.log_lines()))
    assert hook.poll() is None
    host.open_gate()
    out, err = hook.communicate(timeout=120)
    assert (hook.returncode, out) == (0, ""), err
    assert host.finished(g)


def test_proxmox_pre_stop_guards_a_vm_started_without_the_hook(host: Host) -> None:
    host.qm_config(100, PVE_CONF)
    vmm = host.vmm(host.pve_dir / f"{VMID}.pid")
    assert_quiet_success(host.hook(VMID, "pre-stop"))
    (g,) = host.wait_guardians(1)
    assert_guardian_of(host, g, vmm.pid)


def test_proxmox_vm_without_hostpci(host: Host) -> None:
    host.qm_config(100, "boot: order=scsi0\nmemory: 8192\n#hostpci0: 0000:03:00\n")
    host.vmm(host.pve_dir / f"{VMID}.pid")
    for phase in ("pre-start", "post-start", "pre-stop", "post-stop"):
        assert_quiet_success(host.hook(VMID, phase))
    assert host.guardians() == [] and host.log_lines() == []


def test_proxmox_without_qm_guards_every_vm(host: Host) -> None:
    vmm = host.vmm(host.pve_dir / f"{VMID}.pid")
    assert_quiet_success(host.hook(VMID, "post-start", VFIOPY_QM="/nonexistent/qm"))
    (g,) = host.wait_guardians(1)
    assert_guardian_of(host, g, vmm.pid)
    assert any("not checking for hostpci" in line for line in host.log_lines())


# --- the script itself ---------------------------------------------------------------------


def test_shellcheck_clean() -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    r = subprocess.run(["shellcheck", "--shell=sh", str(HOOK)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


@pytest.mark.parametrize("shell", ["dash", "bash", "busybox"])
def test_parses_in_posix_shells(shell: str) -> None:
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed")
    argv = [shell, "sh", "-n"] if shell == "busybox" else [shell, "-n"]
    r = subprocess.run([*argv, str(HOOK)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
