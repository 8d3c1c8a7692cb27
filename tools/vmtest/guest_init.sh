#!/bin/busybox sh
# PID 1 of the vmtest guest (busybox sh in the initramfs). vmtest.py describes the protocol
# spoken through the shared results directory.
/bin/busybox --install -s /bin
export PATH=/bin
R=/newroot
C=/results/.vmtest

say() { echo "vmtest: $*"; }
uptime_s() { cut -d' ' -f1 /proc/uptime; }
die() {
	say "FATAL: $*"
	[ -d "$C" ] && echo "$*" > "$C/fatal"
	poweroff -f
	echo o > /proc/sysrq-trigger
	exit 1 # the kernel panics, panic=-1 reboots, QEMU's -no-reboot exits
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/shm /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t devpts devpts /dev/pts
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
say "init at $(uptime_s) s"

while read -r m; do
	insmod "/lib/modules/$m" || say "insmod $m failed"
done < /etc/vmtest-modules

opts=trans=virtio,version=9p2000.L,msize=512000
# cache=loose on the read-only root: much faster imports under TCG. The price: a host file
# changed after the guest read it may look stale here; exchange data through the results share.
mount -t 9p -o "$opts,ro,cache=loose" vmroot $R || die "cannot mount the host root (9p vmroot)"
# A second view of the host root that the tmpfs mounts below do not cover.
mkdir -p /hostroot && mount -o bind $R /hostroot || die "cannot bind the host root"
mount -t 9p -o "$opts" vmresults /results || die "cannot mount the results directory (9p vmresults)"
[ -f $C/conf ] || die "no $C/conf"
. $C/conf

# Bind the test devices to vfio-pci. driver_override first, so no other driver can take them
# between unbind and probe.
for d in $VMTEST_BIND; do
	p=/sys/bus/pci/devices/$d
	if [ ! -e "$p" ]; then
		say "device $d not present"
		continue
	fi
	echo vfio-pci > "$p/driver_override"
	[ -e "$p/driver" ] && echo "$d" > "$p/driver/unbind"
	echo "$d" > /sys/bus/pci/drivers_probe
done
for d in $VMTEST_UNBIND; do
	p=/sys/bus/pci/devices/$d
	[ -e "$p/driver" ] && echo "$d" > "$p/driver/unbind"
done
for e in $VMTEST_RESET; do
	d=${e%%=*}
	f=/sys/bus/pci/devices/$d/reset_method
	if [ ! -e "$f" ] && [ -e "/sys/bus/pci/devices/$d" ]; then
		# Before Linux 5.15 there is no reset_method: the kernel's fixed order applies.
		say "no reset_method in this kernel: $d keeps the kernel's own reset order, not '${e#*=}'"
		continue
	fi
	echo "${e#*=}" > "$f" || say "cannot set reset_method=${e#*=} on $d"
done
: > $C/devices.tmp
for d in $VMTEST_BIND; do
	p=/sys/bus/pci/devices/$d
	[ -e "$p" ] || continue
	drv=-; grp=-; rm=-
	[ -e "$p/driver" ] && drv=$(basename "$(readlink "$p/driver")")
	[ -e "$p/iommu_group" ] && grp=$(basename "$(readlink "$p/iommu_group")")
	# "?": the kernel has no reset_method attribute (before 5.15); "-": no reset method.
	if [ -e "$p/reset_method" ]; then rm=$(tr ' ' , < "$p/reset_method"); else rm='?'; fi
	echo "$d $drv $grp ${rm:--}" >> $C/devices.tmp
done
mv $C/devices.tmp $C/devices

# The chroot: host root read-only, guest kernel filesystems, fresh tmpfs where programs write.
mount -o rbind /proc $R/proc || die "bind /proc"
mount -o rbind /sys $R/sys || die "bind /sys"
mount -o rbind /dev $R/dev || die "bind /dev"
for t in /tmp /run /var/tmp; do
	[ -d "$R$t" ] && mount -t tmpfs -o mode=1777 tmpfs "$R$t"
done
# Host paths under those (a checkout in /tmp, its venv) stay visible, read-only as the rest.
for k in $VMTEST_KEEP; do
	mkdir -p "$R$k" && mount -o bind "/hostroot$k" "$R$k" || die "cannot keep $k visible"
done
mkdir -p "$R$VMTEST_RESULTS" 2>/dev/null
mount -o bind /results "$R$VMTEST_RESULTS" || die "cannot bind the results directory at $VMTEST_RESULTS"

# Kill what a job left behind and wait until it is gone: its device files must be released
# (and their resets done) before the next job starts.
reap() {
	local i p pid comm left strays=0
	for i in $(seq 1 200); do
		left=
		for p in /proc/[0-9]*; do
			pid=${p#/proc/}
			[ "$pid" = 1 ] && continue
			[ -e "$p/exe" ] || continue # kernel threads have no executable
			left="$left $pid"
			# busybox's timeout watchdog outlives the job by up to 1 s: not the job's stray
			read -r comm < "$p/comm" 2>/dev/null
			[ "$i" = 1 ] && [ "$comm" != timeout ] && strays=$((strays + 1))
		done
		[ -z "$left" ] && break
		kill -9 $left 2>/dev/null
		usleep 50000
	done
	echo $strays
}

# A job stuck in the kernel (D state) cannot be killed and would only show as silence: let the
# hung-task detector name it with its stack on the console within 30 s (boot stays quiet).
echo 30 > /proc/sys/kernel/hung_task_timeout_secs 2>/dev/null
echo 7 > /proc/sys/kernel/printk
uptime_s > $C/ready.tmp && mv $C/ready.tmp $C/ready
say "ready at $(uptime_s) s"
n=1
while :; do
	J=$C/jobs/$n
	if [ -e "$J/go" ]; then
		. "$J/params"
		say "job $n starts at $(uptime_s) s"
		uptime_s > "$J/start"
		timeout -s KILL "$JOB_TIMEOUT" chroot $R /bin/sh "$VMTEST_RESULTS/.vmtest/jobs/$n/job.sh" \
			> "$J/stdout" 2> "$J/stderr" < /dev/null
		rc=$?
		uptime_s > "$J/end"
		reap > "$J/strays"
		echo $rc > "$J/status.tmp"
		mv "$J/status.tmp" "$J/status"
		say "job $n done at $(uptime_s) s"
		n=$((n + 1))
	elif [ -e $C/shutdown ]; then
		break
	else
		usleep 20000
	fi
done
say "powering off at $(uptime_s) s"
sync
poweroff -f
echo o > /proc/sysrq-trigger
