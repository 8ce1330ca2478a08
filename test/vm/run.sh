#!/bin/bash
# test/vm/run.sh: run the VFIO bind path against a real Linux kernel under QEMU.
#
# What it does, in order:
#   1. installs the Debian packages it needs when they are missing (root only);
#   2. fetches the Debian kernel package once and caches, under test/vm/out/kernel/,
#      the uncompressed vmlinux (booted through its PVH entry point) and the modules
#      the test needs (vfio, vfio-pci, vfio_iommu_type1, e1000, e1000e and whatever
#      modprobe says they depend on);
#   3. builds a static Go test binary from test/vm/guest and an initramfs holding
#      busybox, test/vm/init, the binary and the modules;
#   4. boots it under QEMU (TCG by default) with an emulated Intel IOMMU and NICs laid
#      out to give single, bridge-shared and multifunction IOMMU groups;
#   5. turns the guest's verdict into the exit status.
#
# Exit status: 0 when the guest printed "VFIO-TEST-RESULT: PASS" and left QEMU through
# isa-debug-exit with the pass code; non-zero for a FAIL, a timeout, a kernel panic, or
# any QEMU or build error. The serial log is printed whenever the run does not pass.
#
# Environment (all optional):
#   VM_ACCEL=tcg|kvm     accelerator (default tcg; kvm needs a real /dev/kvm)
#   VM_TIMEOUT=seconds   wall-clock limit for the guest (default 150)
#   VM_MEM=256M VM_SMP=1 guest memory and CPUs
#   VM_APPEND="..."      extra kernel command-line words (e.g. vmtest.verbose=1)
#   VM_VERBOSE=1         print the whole serial log even when the run passes
#   VM_NO_INSTALL=1      never call apt-get; fail if something is missing
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
OUT=$HERE/out
ROOTFS=$HERE/rootfs
KCACHE=$OUT/kernel
GO=${GO:-go}

# isa-debug-exit turns a byte V written to port 0xf4 into QEMU exit status (V<<1)|1.
# /init writes 0x10 on pass (33) and 0x01 on failure (3).
PASS_STATUS=33
FAIL_STATUS=3

# Modules to load in the guest; modprobe resolves their dependencies at build time.
MODULES=(e1000 e1000e nvme vfio vfio_iommu_type1 vfio-pci)

log() { printf '=== [%5ss] %s\n' "$SECONDS" "$*"; }
die() { printf 'test-vm: FAIL: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------------------
# 1. Host packages
# ---------------------------------------------------------------------------
apt_updated=
apt_update() {
	if [ -z "$apt_updated" ]; then
		log "apt-get update"
		apt-get update -q >"$OUT/apt.log" 2>&1 || { cat "$OUT/apt.log"; die "apt-get update failed"; }
		apt_updated=1
	fi
}

pkg_installed() {
	dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

ensure_packages() {
	local missing=() p
	for p in qemu-system-x86 busybox-static cpio kmod xz-utils; do
		pkg_installed "$p" || missing+=("$p")
	done
	[ ${#missing[@]} -eq 0 ] && return 0
	[ -n "${VM_NO_INSTALL:-}" ] && die "missing Debian packages: ${missing[*]} (VM_NO_INSTALL is set)"
	[ "$(id -u)" = 0 ] || die "missing Debian packages: ${missing[*]}; run as root or install them"
	apt_update
	log "apt-get install ${missing[*]}"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" \
		>>"$OUT/apt.log" 2>&1 || { cat "$OUT/apt.log"; die "apt-get install failed"; }
}

# ---------------------------------------------------------------------------
# 2. Kernel and modules (cached)
# ---------------------------------------------------------------------------
# The kernel is taken from the linux-image-amd64 package without installing it:
# installing would run update-initramfs and change the host's /boot for nothing.
# The cache holds:
#   $KCACHE/release            the kernel release, e.g. 6.1.0-56-amd64
#   $KCACHE/vmlinux            uncompressed ELF (CONFIG_PVH=y lets QEMU boot it directly,
#                              which skips seconds of XZ decompression under TCG)
#   $KCACHE/modules/lib/modules/<release>/...   the needed .ko files, depmod'ed
# Delete test/vm/out (make clean) to fetch the newest kernel again.
ensure_kernel() {
	if [ -s "$KCACHE/release" ] && [ -s "$KCACHE/vmlinux" ]; then
		KREL=$(cat "$KCACHE/release")
		# A cache made before a module joined MODULES is made again.
		local m cached=1
		for m in "${MODULES[@]}"; do
			modprobe -d "$KCACHE/modules" -S "$KREL" --show-depends "$m" >/dev/null 2>&1 || cached=
		done
		[ -n "$cached" ] && return 0
	fi
	[ -n "${VM_NO_INSTALL:-}" ] && die "no cached kernel in $KCACHE and VM_NO_INSTALL is set"
	local pkg work deb off
	pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}') || true
	if [ -z "$pkg" ]; then
		[ "$(id -u)" = 0 ] || die "apt does not know linux-image-amd64; run as root so apt-get update can run"
		apt_update
		pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
	fi
	[ -n "$pkg" ] || die "cannot find the kernel package linux-image-amd64 depends on"
	log "fetching $pkg (cached afterwards in $KCACHE)"
	rm -rf "$KCACHE"
	work=$OUT/kernel.tmp
	rm -rf "$work"
	mkdir -p "$work/x"
	# apt's sandbox user cannot write into the work tree; the download is a plain
	# public package, so say so rather than print apt's warning.
	(cd "$work" && apt-get download -q -o APT::Sandbox::User=root "$pkg") >>"$OUT/apt.log" 2>&1 ||
		{ cat "$OUT/apt.log"; die "apt-get download $pkg failed"; }
	deb=$(ls "$work"/*.deb)
	dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$work/x" ./boot ./lib/modules
	KREL=$(ls "$work/x/lib/modules")
	[ -f "$work/x/boot/vmlinuz-$KREL" ] || die "$pkg has no /boot/vmlinuz-$KREL"
	depmod -b "$work/x" "$KREL"

	local mods=$KCACHE/modules/lib/modules/$KREL m f rel
	mkdir -p "$mods"
	for m in "${MODULES[@]}"; do
		modprobe -d "$work/x" -S "$KREL" --show-depends "$m" || die "modprobe cannot resolve $m in $KREL"
	done | awk '$1 == "insmod" {print $2}' | sort -u | while read -r f; do
		rel=${f#"$work/x/lib/modules/$KREL/"}
		mkdir -p "$mods/$(dirname "$rel")"
		cp "$f" "$mods/$rel"
	done
	cp "$work/x/lib/modules/$KREL"/modules.{order,builtin,builtin.modinfo} "$mods/"
	depmod -b "$KCACHE/modules" "$KREL"
	cp "$work/x/boot/config-$KREL" "$KCACHE/config"

	# The Debian bzImage carries an XZ stream; the ELF inside it is what we boot.
	off=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$work/x/boot/vmlinuz-$KREL" | head -1 | cut -d: -f1)
	[ -n "$off" ] || die "no XZ payload in vmlinuz-$KREL"
	tail -c +$((off + 1)) "$work/x/boot/vmlinuz-$KREL" | xz -dc --single-stream >"$KCACHE/vmlinux.tmp" 2>/dev/null || true
	[ "$(head -c 4 "$KCACHE/vmlinux.tmp" | od -An -tx1 | tr -d ' ')" = 7f454c46 ] ||
		die "could not extract an ELF vmlinux from vmlinuz-$KREL"
	mv "$KCACHE/vmlinux.tmp" "$KCACHE/vmlinux"
	echo "$KREL" >"$KCACHE/release"
	rm -rf "$work"
	log "kernel $KREL cached: $(find "$mods" -name '*.ko*' | wc -l) modules"
}

# ---------------------------------------------------------------------------
# 3. Guest binary and initramfs
# ---------------------------------------------------------------------------
build_initramfs() {
	log "building guest binary and initramfs"
	rm -rf "$ROOTFS"
	mkdir -p "$ROOTFS"/{bin,proc,sys,dev,lib}
	(cd "$ROOT" && CGO_ENABLED=0 GOOS=linux GOARCH=amd64 "$GO" build -trimpath -ldflags='-s -w' \
		-o "$ROOTFS/bin/vmtest" ./test/vm/guest) || die "building test/vm/guest failed"
	cp /bin/busybox "$ROOTFS/bin/busybox"
	# A dynamically linked busybox (package busybox) would not run in the guest.
	dpkg -S /bin/busybox 2>/dev/null | grep -q '^busybox-static:' ||
		die "/bin/busybox does not come from busybox-static; it must be statically linked"
	install -m 0755 "$HERE/init" "$ROOTFS/init"
	cp -a "$KCACHE/modules/lib/modules" "$ROOTFS/lib/"
	(cd "$ROOTFS" && find . | LC_ALL=C sort | cpio -o -H newc --quiet) >"$OUT/initramfs.cpio"
}

# ---------------------------------------------------------------------------
# 4. Boot
# ---------------------------------------------------------------------------
# Device layout (see README.md for the IOMMU groups it gives):
#   00:02.0, 00:03.0   e1000e on the root bus: one group each (Intel RCiEPs count as
#                      ACS-isolated)
#   00:04.0            pcie-pci-bridge with two e1000 behind it: one group, bridge included
#   00:05.0            pci-bridge with two e1000 behind it: one group, bridge included
#   00:06.0            pcie-root-port with a two-function e1000e behind it: the two
#                      functions share a group, the root port (ACS) has its own
# Every NIC gets a "none" netdev so QEMU does not warn about NICs without a peer.
run_vm() {
	local accel
	case ${VM_ACCEL:-tcg} in
	tcg) accel=(-accel tcg,thread=multi -cpu max) ;;
	kvm) accel=(-accel kvm -cpu host) ;;
	*) die "VM_ACCEL must be tcg or kvm" ;;
	esac
	local nics=() i=0 spec
	for spec in \
		e1000e,bus=pcie.0,addr=0x2 \
		e1000e,bus=pcie.0,addr=0x3 \
		e1000,bus=br0,addr=0x1 \
		e1000,bus=br0,addr=0x2 \
		e1000,bus=br1,addr=0x1 \
		e1000,bus=br1,addr=0x2 \
		e1000e,bus=rp0,addr=0x0.0,multifunction=on \
		e1000e,bus=rp0,addr=0x0.1; do
		nics+=(-netdev "hubport,id=n$i,hubid=$i" -device "$spec,netdev=n$i")
		i=$((i + 1))
	done
	# intel-iommu must be created before the devices it translates for;
	# intremap=on needs the split irqchip, and without interrupt remapping
	# vfio_iommu_type1 refuses VFIO_SET_IOMMU.
	QEMU_CMD=(timeout --foreground -k 5 "${VM_TIMEOUT:-150}"
		qemu-system-x86_64 "${accel[@]}" -smp "${VM_SMP:-1}" -m "${VM_MEM:-256M}"
		-machine q35,kernel-irqchip=split
		-device intel-iommu,intremap=on,caching-mode=on
		-nodefaults -display none -monitor none -no-reboot
		-serial "file:$OUT/serial.log"
		-device isa-debug-exit,iobase=0xf4,iosize=0x04
		-kernel "$KCACHE/vmlinux" -initrd "$OUT/initramfs.cpio"
		-append "console=ttyS0 intel_iommu=on iommu=pt panic=-1 quiet ${VM_APPEND:-}"
		-device pcie-pci-bridge,id=br0,bus=pcie.0,addr=0x4
		-device pci-bridge,id=br1,bus=pcie.0,addr=0x5,chassis_nr=1,shpc=off
		-device pcie-root-port,id=rp0,bus=pcie.0,addr=0x6,chassis=2
		-device nvme-subsys,id=nvmes0
		-device nvme,serial=sriov0,subsys=nvmes0,bus=pcie.0,addr=0x7,sriov_max_vfs=2,sriov_vq_flexible=4,sriov_vi_flexible=2,max_ioqpairs=6,msix_qsize=3
		"${nics[@]}")
	log "booting $(cat "$KCACHE/release") under ${VM_ACCEL:-tcg} (limit ${VM_TIMEOUT:-150}s)"
	: >"$OUT/serial.log"
	local start=$SECONDS
	set +e
	"${QEMU_CMD[@]}" </dev/null >"$OUT/qemu.log" 2>&1
	QEMU_STATUS=$?
	set -e
	VM_SECONDS=$((SECONDS - start))
}

# ---------------------------------------------------------------------------
# 5. Verdict
# ---------------------------------------------------------------------------
verdict() {
	local clean=$OUT/serial.txt reason=
	tr -d '\r' <"$OUT/serial.log" >"$clean"
	# The check lines, whatever happens.
	grep -E '^(OK|FAIL|INFO|KERNEL):' "$clean" || true

	if [ "$QEMU_STATUS" = 124 ] || [ "$QEMU_STATUS" = 137 ]; then
		reason="timeout: the guest did not finish within ${VM_TIMEOUT:-150}s"
	elif grep -qx 'VFIO-TEST-RESULT: FAIL' "$clean"; then
		reason="the guest reported FAIL"
	elif ! grep -qx 'VFIO-TEST-RESULT: PASS' "$clean"; then
		reason="the guest printed no VFIO-TEST-RESULT line (QEMU exit status $QEMU_STATUS)"
	elif grep -q '^FAIL:' "$clean"; then
		reason="the guest printed FAIL lines"
	elif [ "$QEMU_STATUS" != "$PASS_STATUS" ]; then
		reason="QEMU exit status $QEMU_STATUS, want $PASS_STATUS (isa-debug-exit pass code)"
	fi

	if [ -n "$reason" ] || [ -n "${VM_VERBOSE:-}" ]; then
		echo "----- serial log ($OUT/serial.log) -----"
		cat "$clean"
		echo "----- QEMU output ($OUT/qemu.log) -----"
		cat "$OUT/qemu.log"
		echo "----- end -----"
	fi
	if [ -n "$reason" ]; then
		[ "$QEMU_STATUS" = "$FAIL_STATUS" ] && reason="$reason (isa-debug-exit fail code)"
		die "$reason; VM ${VM_SECONDS}s, total ${SECONDS}s"
	fi
	log "PASS: VM ${VM_SECONDS}s, total ${SECONDS}s"
	# The plain summary line CI reads.
	sed -nE 's/^INFO: ([0-9]+) checks passed, ([0-9]+) failed.*/test-vm: \1 passed, \2 failed/p' "$clean"
}

mkdir -p "$OUT"
ensure_packages
ensure_kernel
build_initramfs
run_vm
verdict
