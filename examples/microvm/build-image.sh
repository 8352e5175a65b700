#!/usr/bin/env bash
# Build the example's microVM image from Debian packages: a kernel and a busybox initramfs,
# into OUT/devbox/{vmlinuz,initrd.img} (OUT defaults to ~/.cache/vessel/microvm). The qemu
# provider's `images` setting points at OUT; a plan's `image: devbox` boots it.
#
# The kernel is Debian's generic `linux-image-amd64` (what the meta-package depends on now),
# not the cloud flavour: the cloud kernel has no 9p at all, and the workspace share is
# virtio-9p (built into QEMU: no daemon beside each VM). The modules the image needs (virtio
# PCI and MMIO, virtio-net, 9p over virtio, the ACPI power button and evdev for busybox's
# acpid) are taken from the package with what they depend on, in load order. Nothing is
# installed on the host: packages are fetched with `apt-get download` and unpacked with
# `dpkg -x`. Needs: apt-get, dpkg, busybox-static (its /bin/busybox is the guest's userland).
#
# Idempotent: a build for the same kernel version and the same init is kept.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-${XDG_CACHE_HOME:-$HOME/.cache}/vessel/microvm}"
image="$out/devbox"

busybox=/bin/busybox
[ -x "$busybox" ] && "$busybox" --list | grep -x cpio >/dev/null \
  || { echo "build-image: needs busybox-static (/bin/busybox with cpio)" >&2; exit 1; }

# The kernel package the generic meta-package points at now.
resolve() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ && !n++ {print $2}'; }
kpkg="$(resolve)"
if [ -z "$kpkg" ] && [ "$(id -u)" = 0 ]; then
  apt-get update -qq >/dev/null 2>&1 || true
  kpkg="$(resolve)"
fi
[ -n "$kpkg" ] || { echo "build-image: cannot resolve linux-image-amd64 (apt-get update?)" >&2; exit 1; }
kver="${kpkg#linux-image-}"
stamp="$kver $(sha256sum "$here/init" | cut -c1-16)"
if [ -f "$image/stamp" ] && [ "$(cat "$image/stamp")" = "$stamp" ] \
  && [ -f "$image/vmlinuz" ] && [ -f "$image/initrd.img" ]; then
  echo "build-image: $image is current ($stamp)"
  exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "build-image: fetching $kpkg"
(cd "$work" && apt-get download -q "$kpkg" >/dev/null 2>&1) \
  || (cd "$work" && apt-get download "$kpkg")
dpkg -x "$work"/"$kpkg"_*.deb "$work/k"
moddir="$work/k/lib/modules/$kver/kernel"

# Modules by name, each after what it depends on (from the module's own `depends=`).
declare -A path_of=()
while IFS= read -r f; do
  n="$(basename "$f")"; n="${n%%.ko*}"; path_of["$n"]="$f"; path_of["${n//-/_}"]="$f"
done < <(find "$moddir" -name '*.ko*')
order=()
declare -A seen=()
add() {
  local m="$1" f deps d
  [ -n "${seen[$m]:-}" ] && return 0
  seen["$m"]=1
  f="${path_of[$m]:-}"
  [ -n "$f" ] || { echo "build-image: module $m not in $kpkg" >&2; exit 1; }
  case "$f" in
    *.ko.xz) xz -dc "$f" > "$work/$m.ko" ;;
    *.ko.zst) zstd -qdc "$f" > "$work/$m.ko" ;;
    *) cp "$f" "$work/$m.ko" ;;
  esac
  deps="$(grep -ao 'depends=[^[:cntrl:]]*' "$work/$m.ko" | sed -n 1p | cut -d= -f2 | tr ',' ' ')"
  for d in $deps; do add "$d"; done
  order+=("$m")
}
for m in virtio_pci virtio_mmio virtio_net 9pnet_virtio 9p button evdev; do add "$m"; done

root="$work/root"
mkdir -p "$root"/{bin,etc,lib/modules,proc,sys,dev,tmp,run,workspace}
cp "$busybox" "$root/bin/busybox"
cp "$here/init" "$root/init"
chmod 755 "$root/init"
for m in "${order[@]}"; do cp "$work/$m.ko" "$root/lib/modules/$m.ko"; done
printf '%s\n' "${order[@]}" > "$root/etc/modules"

mkdir -p "$image"
cp "$work/k/boot/vmlinuz-$kver" "$image/vmlinuz.part"
(cd "$root" && find . | LC_ALL=C sort | "$busybox" cpio -o -H newc 2>/dev/null) | gzip -1 > "$image/initrd.img.part"
mv "$image/vmlinuz.part" "$image/vmlinuz"
mv "$image/initrd.img.part" "$image/initrd.img"
echo "$stamp" > "$image/stamp"
echo "build-image: built $image ($kver; modules: ${order[*]})"
