#!/usr/bin/env bash
# Builds the OpenZFS test guest: a Debian bookworm root image with OpenZFS 2.1 (zfsutils-linux and a
# zfs.ko built by zfs-dkms for the guest's own kernel), sshd, and a key for root; plus the kernel and
# initrd that QEMU boots directly. tests/support/openzfs.py boots it; docs/openzfs-guest.md explains why.
#
# Usage (as root): tests/openzfs/build-guest.sh
# Prints the guest's directory as the last line of stdout; progress and errors go to stderr.
#
# The result is cached outside the clone, in ${ZERFAUX_CACHE_DIR:-/var/cache/zerfaux}/openzfs-<hash>,
# where <hash> is this file's sha256: a second run returns at once, an edited recipe builds anew.
# The build happens in a temporary directory renamed into place at the end, so a build killed halfway
# is never taken for a finished one. Packages come from the Debian mirror (and proxy) apt uses here,
# or from ZERFAUX_DEBIAN_MIRROR.
set -euo pipefail
export LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive

suite=bookworm
image_size=3G
recipe_hash=$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)
cache_root=${ZERFAUX_CACHE_DIR:-/var/cache/zerfaux}
final=$cache_root/openzfs-$recipe_hash

log() { printf '[build-guest +%4ds] %s\n' "$SECONDS" "$*" >&2; }

if [ -f "$final/ready" ]; then
  log "cached: $final"
  echo "$final"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  log "FAILED at step 'preflight': must run as root to build (no cached guest at $final)"
  exit 1
fi

mkdir -p "$cache_root"
exec 9>"$cache_root/openzfs-$recipe_hash.lock"
flock 9  # one build at a time; whoever waited finds the other's result below
if [ -f "$final/ready" ]; then
  log "cached (built meanwhile): $final"
  echo "$final"
  exit 0
fi

work=$(mktemp -d "$cache_root/.openzfs-$recipe_hash.tmp.XXXXXX")
chmod 755 "$work"
root=$work/rootfs
buildlog=$work/build.log
step=preflight
step_started=$SECONDS

unmount_under() {  # deepest mounts first; never follow a mount when deleting
  local dir=$1 m
  for m in $(awk -v d="$dir/" 'index($2, d) == 1 {print $2}' /proc/mounts | sort -r); do
    umount -l "$m" 2>/dev/null || true
  done
}

finish() {
  local rc=$?
  unmount_under "$work"
  if [ $rc != 0 ]; then
    log "FAILED at step '$step' (exit $rc) after $((SECONDS - step_started))s in that step"
    if [ -s "$buildlog" ]; then
      log "last lines of $buildlog:"
      tail -n 40 "$buildlog" >&2
    fi
  fi
  rm -rf --one-file-system "$work"
}
trap finish EXIT

begin() {
  [ "$step" = preflight ] || log "done: $step ($((SECONDS - step_started))s)"
  step=$1
  step_started=$SECONDS
  log "step: $step"
}

stamp() { while IFS= read -r line; do printf '%(%H:%M:%S)T %s\n' -1 "$line"; done; }

in_root() { chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
  LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive HOME=/root "$@"; }

# Stale temp dirs of builds that were killed: unmount first, then delete within one filesystem.
for stale in "$cache_root"/.openzfs-*.tmp.*; do
  [ -d "$stale" ] && [ "$stale" != "$work" ] || continue
  unmount_under "$stale"
  rm -rf --one-file-system "$stale"
done

begin "find the Debian mirror"
mirror=${ZERFAUX_DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then
  mirror=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE) $(TARGET_OF)' \
    | awk -v s="$suite" '$2 == s && $3 == "deb" {print $1; exit}')
fi
[ -n "$mirror" ] || { log "no apt source for $suite found; set ZERFAUX_DEBIAN_MIRROR"; exit 1; }
# apt's own proxy settings, so debootstrap (wget) and the chroot's apt go the same way as the host's.
proxy=$(apt-config dump --format '%v%n' Acquire::http::Proxy 2>/dev/null | head -n1 || true)
[ -n "$proxy" ] && [ "$proxy" != DIRECT ] && export http_proxy=$proxy
log "mirror $mirror${proxy:+ via proxy}"

begin "debootstrap $suite"
debootstrap --variant=minbase --components=main,contrib --merged-usr \
  --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
  "$suite" "$root" "$mirror" 2>&1 | stamp >>"$buildlog"

begin "configure apt and dpkg in the chroot"
cat >"$root/etc/apt/sources.list" <<EOF
deb $mirror $suite main contrib
EOF
{
  echo 'APT::Install-Recommends "false";'
  echo 'APT::Install-Suggests "false";'
  apt-config dump Acquire::http::Proxy Acquire::https::Proxy \
    Acquire::Check-Valid-Until Acquire::Check-Date 2>/dev/null | grep -E '^Acquire::' || true
} >"$root/etc/apt/apt.conf.d/90zerfaux"
cat >"$root/etc/dpkg/dpkg.cfg.d/90zerfaux" <<'EOF'
force-unsafe-io
path-exclude=/usr/share/man/*
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-include=/usr/share/locale/locale.alias
EOF
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"  # no daemons start in the chroot
chmod +x "$root/usr/sbin/policy-rc.d"
# The kernel's postinst and a later trigger would each build an initrd; build it once, at the end.
in_root dpkg-divert --local --rename --divert /usr/sbin/update-initramfs.zerfaux \
  --add /usr/sbin/update-initramfs >>"$buildlog"
printf '#!/bin/sh\nexit 0\n' >"$root/usr/sbin/update-initramfs"
chmod +x "$root/usr/sbin/update-initramfs"
mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"

packages=(linux-image-amd64 linux-headers-amd64 systemd-sysv udev zstd openssh-server
          zfsutils-linux zfs-dkms)
begin "download packages"
in_root apt-get update -q 2>&1 | stamp >>"$buildlog"
in_root apt-get install -y -q --download-only "${packages[@]}" 2>&1 | stamp >>"$buildlog"

begin "install kernel, sshd, OpenZFS (zfs-dkms builds zfs.ko for the guest kernel)"
in_root apt-get install -y -q "${packages[@]}" 2>&1 | stamp >>"$buildlog"
kver=$(basename "$(ls -d "$root"/lib/modules/*/ | sort -V | tail -n1)")
zfs_ko=$(find "$root/lib/modules/$kver" -name 'zfs.ko*' | head -n1)
[ -n "$zfs_ko" ] || { log "zfs.ko was not built for $kver (see dkms output above)"; exit 1; }
log "kernel $kver, ${zfs_ko#"$root"}"

begin "configure the guest"
echo zerfaux-openzfs >"$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 zerfaux-openzfs\n' >"$root/etc/hosts"
echo '/dev/vda / ext4 defaults,noatime 0 0' >"$root/etc/fstab"
cat >"$root/etc/systemd/network/20-wired.network" <<'EOF'
[Match]
Name=en* eth*

[Network]
DHCP=ipv4
EOF
# Pools are made anew by each run, so nothing is imported or mounted at boot; the module loads
# beside the rest of the boot instead of behind udev-settle.
cat >"$root/etc/systemd/system/zerfaux-zfs-module.service" <<'EOF'
[Unit]
Description=Load the ZFS module

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/sbin/modprobe zfs

[Install]
WantedBy=multi-user.target
EOF
in_root systemctl enable systemd-networkd ssh zerfaux-zfs-module >>"$buildlog" 2>&1
# Nothing should wait on a network or run housekeeping in a guest that lives for one test run.
in_root systemctl mask systemd-networkd-wait-online.service systemd-udev-settle.service \
  zfs-load-module.service zfs-import-cache.service zfs-import-scan.service zfs-mount.service \
  zfs-share.service zfs-volume-wait.service getty-static.service e2scrub_reap.service \
  apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer >>"$buildlog" 2>&1
mkdir -p "$root/etc/ssh/sshd_config.d"
cat >"$root/etc/ssh/sshd_config.d/zerfaux.conf" <<'EOF'
PermitRootLogin prohibit-password
PasswordAuthentication no
UseDNS no
# Without PAM a login skips the systemd user session: 2 s less per connection under emulation.
UsePAM no
EOF
ssh-keygen -q -t ed25519 -N '' -C zerfaux-openzfs-guest -f "$work/guest_key"
install -d -m 700 "$root/root/.ssh"
install -m 600 "$work/guest_key.pub" "$root/root/.ssh/authorized_keys"
# Host keys made now (not at first boot) so the tests can pin them without a keyscan.
rm -f "$root"/etc/ssh/ssh_host_*
ssh-keygen -q -t ed25519 -N '' -C '' -f "$root/etc/ssh/ssh_host_ed25519_key"
cp "$root/etc/ssh/ssh_host_ed25519_key.pub" "$work/host_key.pub"
rm -f "$root/usr/sbin/policy-rc.d"
: >"$root/etc/machine-id"

begin "make the initrd"
rm "$root/usr/sbin/update-initramfs"
in_root dpkg-divert --local --rename --remove /usr/sbin/update-initramfs >>"$buildlog"
# Only what finds the root disk: a small initrd builds and boots faster than MODULES=most.
sed -i 's/^MODULES=.*/MODULES=list/' "$root/etc/initramfs-tools/initramfs.conf"
printf '%s\n' virtio_pci virtio_blk virtio_net ext4 crc32c_generic >>"$root/etc/initramfs-tools/modules"
in_root update-initramfs -c -k "$kver" 2>&1 | stamp >>"$buildlog"
cp "$root/boot/vmlinuz-$kver" "$work/vmlinuz"
cp "$root/boot/initrd.img-$kver" "$work/initrd.img"
in_root dpkg-query -W zfsutils-linux zfs-dkms >"$work/zfs-version"

begin "trim the root tree"
in_root apt-get clean >>"$buildlog" 2>&1
# The guest never builds a module again: its sources and headers only slow down mkfs.
rm -rf "${root:?}"/var/lib/apt/lists/* "$root"/var/lib/dkms/zfs/*/build "$root"/var/cache/debconf/*-old \
  "${root:?}"/usr/src/*
unmount_under "$work"

begin "make root.img ($image_size sparse ext4)"
truncate -s "$image_size" "$work/root.img"
mkfs.ext4 -q -F -L zerfaux-root -d "$root" "$work/root.img" >>"$buildlog" 2>&1
rm -rf --one-file-system "$root"

begin "publish"
cat >"$work/guest.env" <<EOF
RECIPE_HASH=$recipe_hash
KERNEL_VERSION=$kver
KERNEL_CMDLINE="root=/dev/vda rw console=ttyS0 net.ifnames=0 mitigations=off fsck.mode=skip"
EOF
touch "$work/ready"
mv -T "$work" "$final"
log "done: publish; built $final in ${SECONDS}s"

# Guests of earlier recipes (about 1 GB each) go, unless a build holds their lock or a process
# (a guest still running from another checkout) has a file of theirs open.
for old in "$cache_root"/openzfs-*; do
  [ -d "$old" ] && [ "$old" != "$final" ] || continue
  if ls -l /proc/[0-9]*/fd 2>/dev/null | grep -qF -- "$old/"; then
    log "kept $old: in use"
    continue
  fi
  (flock -n 8 && rm -rf --one-file-system "$old" && rm -f "$old.lock" && log "removed $old (an earlier recipe)") \
    8>"$old.lock" || log "kept $old: locked"
done
echo "$final"
