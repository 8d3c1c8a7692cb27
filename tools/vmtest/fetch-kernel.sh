#!/bin/sh
# Unpack Debian's newest linux-image-SERIES.*-amd64-unsigned (default 6.12) under DIR without
# installing it, for booting the vmtest guest on another kernel than the host's. Prints
#   export VFIOPY_VMTEST_KERNEL=...  and  export VFIOPY_VMTEST_MODULES=...
# for `eval`. Needs apt's package lists (apt-get update), dpkg and depmod; no root for apt-get
# download itself. Idempotent: an unpacked release is reused.
set -eu

series=${1:-6.12}
dir=${2:-${TMPDIR:-/tmp}/vfiopy-kernel-$series}

pattern="^linux-image-$(printf '%s' "$series" | sed 's/\./\\./g')\.[0-9]+\+deb[0-9]+-amd64-unsigned\$"
pkg=$(apt-cache search --names-only "$pattern" | cut -d' ' -f1 | sort -V | tail -n 1)
if [ -z "$pkg" ]; then
	echo "fetch-kernel: no linux-image-$series.*-amd64-unsigned in apt's lists (run apt-get update)" >&2
	exit 1
fi
release=${pkg#linux-image-}
release=${release%-unsigned}
root=$dir/root
if [ ! -f "$root/lib/modules/$release/modules.dep" ]; then
	mkdir -p "$dir"
	(cd "$dir" && apt-get download -qq "$pkg" >&2)
	dpkg -x "$dir/${pkg}_"*.deb "$root"
	depmod -b "$root" "$release"
	rm -f "$dir/${pkg}_"*.deb
fi
echo "export VFIOPY_VMTEST_KERNEL=$root/boot/vmlinuz-$release"
echo "export VFIOPY_VMTEST_MODULES=$root/lib/modules/$release"
