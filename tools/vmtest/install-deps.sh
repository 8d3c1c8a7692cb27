#!/bin/sh
# Install what the QEMU guest tier (tools/vmtest, tests/vm) needs on Debian/Ubuntu. Idempotent;
# run as root (CI) or through sudo. pciutils is optional: it gives the guest `lspci`.
set -eu

PACKAGES="qemu-system-x86 linux-image-amd64 busybox-static pciutils"

if [ "$(id -u)" != 0 ]; then
	exec sudo "$0" "$@"
fi

missing=
for p in $PACKAGES; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
done
if [ -n "$missing" ]; then
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	# shellcheck disable=SC2086 # word splitting of the package list is intended
	apt-get install -y -qq --no-install-recommends $missing
fi

# Debian installs the kernel image readable by root only; QEMU started by another user needs it.
for k in /boot/vmlinuz-*; do
	[ -e "$k" ] && chmod a+r "$k"
done
echo "vmtest dependencies present:$PACKAGES"
