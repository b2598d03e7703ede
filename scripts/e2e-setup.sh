#!/usr/bin/env bash
# End-to-end rig for vhost-device-iommu: a patched QEMU, a stock Debian guest kernel and an
# initramfs with our guest test program. Everything lands in a cache outside the repository:
#
#   ${VHOST_IOMMU_CACHE:-$HOME/.cache/vhost-device-iommu}/
#     qemu-<version>-<patch hash>/qemu-system-x86_64   QEMU with vhost-user-device(-pci) user-creatable
#     kernel-<kernel release>/vmlinux, modules/*.ko     the guest kernel (PVH entry) and its modules
#     guest-<input hash>/initramfs.cpio.gz              busybox + init + e2e-guest + modules
#     rig.env                                           paths of the above, read by tests/e2e/rig.rs
#
# Usage: scripts/e2e-setup.sh [all|qemu|guest]   (default: all)
#
# Idempotent and non-interactive: a warm run (everything cached, all packages present) only
# checks stamps and takes seconds. A cold run installs Debian packages (adds bookworm-backports
# with deb-src), downloads Debian's QEMU source and guest kernel, and builds.
#
# Knobs (environment):
#   VHOST_IOMMU_CACHE         cache directory (default ~/.cache/vhost-device-iommu)
#   VHOST_IOMMU_QEMU_VERSION  upstream QEMU version expected from Debian's source (default 10.0.2)
#   VHOST_IOMMU_KERNEL        guest kernel release, e.g. 6.12.57+deb12-amd64 (default: the one
#                             already cached, else the newest 6.12 in bookworm-backports)
#   VHOST_IOMMU_JOBS          ninja parallelism for the QEMU build (default 2)
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
export LC_ALL=C
exec </dev/null

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${VHOST_IOMMU_CACHE:-$HOME/.cache/vhost-device-iommu}
qemu_version=${VHOST_IOMMU_QEMU_VERSION:-10.0.2}
jobs=${VHOST_IOMMU_JOBS:-2}
t_start=$(date +%s)

log() { printf '[e2e-setup %4ss] %s\n' "$(($(date +%s) - t_start))" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

mkdir -p "$cache"
# One setup at a time per cache (parallel test binaries may all ask for the rig).
exec 9>"$cache/.lock"
flock 9

# ---------------------------------------------------------------------------------------------
# Debian packages
# ---------------------------------------------------------------------------------------------

# Build and runtime packages from bookworm (main).
base_pkgs=(
    ninja-build libglib2.0-dev libpixman-1-dev flex bison pkg-config libfdt-dev zlib1g-dev
    python3 python3-venv gcc libc6-dev linux-libc-dev
    busybox-static cpio xz-utils zstd gzip seabios
)
# From bookworm-backports: QEMU 10's firmware/option ROMs (pvh.bin, linuxboot_dma.bin, ...).
bpo_pkgs=(qemu-system-data)

backports_file=/etc/apt/sources.list.d/vhost-iommu-e2e-backports.sources
apt_updated=0

# The Debian mirror already configured for bookworm (deb822 or one-line format).
debian_mirror() {
    local uri
    uri=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | awk '{print $2}' | grep -E '/debian/?$' | head -n1 || true)
    if [ -z "$uri" ]; then
        uri=$(grep -hsE '^deb[[:space:]]' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
            2>/dev/null | awk '{print $2}' | grep -E '/debian/?$' | head -n1 || true)
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}

ensure_backports() {
    if [ -f "$backports_file" ]; then
        return
    fi
    local mirror
    mirror=$(debian_mirror)
    log "adding bookworm-backports (deb + deb-src) from $mirror"
    cat >"$backports_file" <<EOF
Types: deb deb-src
URIs: $mirror
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    apt_updated=0
}

apt_update_once() {
    if [ "$apt_updated" = 0 ]; then
        log "apt-get update"
        apt-get update -qq >/dev/null
        apt_updated=1
    fi
}

pkg_installed() {
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]
}

ensure_packages() {
    local missing=() missing_bpo=() p
    for p in "${base_pkgs[@]}"; do pkg_installed "$p" || missing+=("$p"); done
    for p in "${bpo_pkgs[@]}"; do pkg_installed "$p" || missing_bpo+=("$p"); done
    # qemu-system-data from bookworm itself is 7.2: QEMU 10 wants its own option ROMs.
    if pkg_installed qemu-system-data \
        && ! dpkg-query -W -f='${Version}' qemu-system-data | grep -q '^1:10\.'; then
        missing_bpo+=(qemu-system-data)
    fi
    if [ ${#missing[@]} -eq 0 ] && [ ${#missing_bpo[@]} -eq 0 ]; then
        return
    fi
    ensure_backports
    apt_update_once
    if [ ${#missing[@]} -gt 0 ]; then
        log "apt-get install ${missing[*]}"
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    if [ ${#missing_bpo[@]} -gt 0 ]; then
        log "apt-get install -t bookworm-backports ${missing_bpo[*]}"
        apt-get install -y -qq --no-install-recommends -t bookworm-backports \
            "${missing_bpo[@]}" >/dev/null
    fi
}

# ---------------------------------------------------------------------------------------------
# QEMU
# ---------------------------------------------------------------------------------------------

# Files the patch touches, and the configure line; both feed the cache key.
qemu_patch_files=(hw/virtio/vhost-user-device.c hw/virtio/vhost-user-device-pci.c)
qemu_configure_flags=(
    --target-list=x86_64-softmmu --disable-docs --disable-user --disable-tools
    --disable-guest-agent --disable-werror --enable-kvm --enable-tcg --disable-sdl --disable-gtk
    --disable-vnc --disable-opengl --disable-spice --disable-curses --disable-slirp
    --disable-libusb --disable-usb-redir --disable-xen --disable-vhost-vdpa --disable-rust
    --disable-install-blobs
)
# Bump when the patch logic below changes.
qemu_patch_rev=1
qemu_key=$( { echo "rev=$qemu_patch_rev"; printf '%s\n' "${qemu_patch_files[@]}" \
    "${qemu_configure_flags[@]}"; } | sha256sum | cut -c1-12)
qemu_dir=$cache/qemu-$qemu_version-$qemu_key
qemu_bin=$qemu_dir/qemu-system-x86_64

patch_qemu_source() {
    local src=$1 f
    for f in "${qemu_patch_files[@]}"; do
        grep -q 'user_creatable = false' "$src/$f" \
            || die "$f: no 'user_creatable = false' line to patch (QEMU source changed?)"
        sed -i 's/user_creatable = false/user_creatable = true/' "$src/$f"
    done
    # The +ds tarball strips the edk2 .bz2 blobs that meson would unpack.
    grep -Eq '^[[:space:]]*unpack_edk2_blobs = bzip2.found\(\)' "$src/meson.build" \
        || die "meson.build: no 'unpack_edk2_blobs = bzip2.found()' line"
    sed -Ei 's/^([[:space:]]*)unpack_edk2_blobs = bzip2.found\(\)/\1unpack_edk2_blobs = false/' \
        "$src/meson.build"
}

build_qemu() {
    if [ -x "$qemu_bin" ] && [ -f "$qemu_dir/stamp" ]; then
        log "QEMU $qemu_version ($qemu_key) cached: $qemu_bin"
        return
    fi
    local t0 srcdir work tarball venv
    t0=$(date +%s)
    log "building QEMU $qemu_version ($qemu_key)"

    srcdir=$cache/src
    mkdir -p "$srcdir"
    tarball=$srcdir/qemu_$qemu_version+ds.orig.tar.xz
    if [ ! -s "$tarball" ]; then
        ensure_backports
        apt_update_once
        log "apt-get source --download-only qemu (bookworm-backports)"
        # The .dsc and .debian.tar.xz may 404 on the mirror; the orig tarball is all we need.
        (cd "$srcdir" && apt-get source -qq -o APT::Sandbox::User=root -t bookworm-backports \
            --download-only qemu >/dev/null 2>&1) \
            || log "apt-get source reported an error (a missing .dsc is expected); checking for the orig tarball"
        if [ ! -s "$tarball" ]; then
            ls "$srcdir" >&2 || true
            die "no $tarball (Debian offers another QEMU version? set VHOST_IOMMU_QEMU_VERSION)"
        fi
    fi

    # meson and pycotap from PyPI, in a venv of our own that QEMU's configure reuses.
    venv=$cache/venv
    if [ ! -x "$venv/bin/meson" ]; then
        log "python venv with meson + pycotap"
        rm -rf "$venv"
        python3 -m venv "$venv"
        "$venv/bin/pip" install -q --disable-pip-version-check 'meson>=1.5,<1.9' pycotap==1.3.1
    fi

    work=$cache/build-qemu
    rm -rf "$work"
    mkdir -p "$work"
    log "unpacking $(basename "$tarball")"
    # roms/ (firmware sources, 200 MB of the 330) is not needed for an x86 build without blobs.
    tar --no-same-owner -xJf "$tarball" -C "$work" --exclude='qemu-*/roms/?*'
    local src
    src=$(find "$work" -mindepth 1 -maxdepth 1 -type d | head -n1)
    [ -f "$src/configure" ] || die "unpacked QEMU source has no configure"
    patch_qemu_source "$src"

    log "configure"
    mkdir -p "$src/build"
    (cd "$src/build" && PATH="$venv/bin:$PATH" ../configure --python="$venv/bin/python3" \
        "${qemu_configure_flags[@]}" >"$work/configure.log" 2>&1) \
        || { tail -n 40 "$work/configure.log" >&2; die "QEMU configure failed"; }
    log "ninja -j$jobs qemu-system-x86_64"
    (cd "$src/build" && PATH="$venv/bin:$PATH" ninja -j"$jobs" qemu-system-x86_64 \
        >"$work/build.log" 2>&1) \
        || { tail -n 40 "$work/build.log" >&2; die "QEMU build failed"; }

    "$src/build/qemu-system-x86_64" -device help 2>/dev/null | grep -q '"vhost-user-device-pci"' \
        || die "patched QEMU does not list vhost-user-device-pci"
    mkdir -p "$qemu_dir"
    install -m 0755 "$src/build/qemu-system-x86_64" "$qemu_bin.tmp"
    mv "$qemu_bin.tmp" "$qemu_bin"
    "$qemu_bin" --version | head -n1 >"$qemu_dir/stamp"
    rm -rf "$work"
    log "QEMU built in $(($(date +%s) - t0))s: $qemu_bin"
}

# ---------------------------------------------------------------------------------------------
# Guest kernel
# ---------------------------------------------------------------------------------------------

# Modules the guest needs (kernel names); their dependencies are added.
guest_modules=(virtio_iommu irqbypass vfio vfio_iommu_type1 vfio_pci_core vfio_pci)

cached_kernel() {
    local d
    for d in "$cache"/kernel-*/stamp; do
        [ -f "$d" ] || continue
        basename "$(dirname "$d")" | sed 's/^kernel-//'
    done | sort -V | tail -n1
}

fetch_kernel() {
    local krel=${VHOST_IOMMU_KERNEL:-$(cached_kernel)}
    if [ -n "$krel" ] && [ -f "$cache/kernel-$krel/stamp" ]; then
        log "guest kernel $krel cached"
        kernel_dir=$cache/kernel-$krel
        return
    fi
    local t0 pkg work
    t0=$(date +%s)
    ensure_backports
    apt_update_once
    if [ -z "$krel" ]; then
        pkg=$(apt-cache search --names-only '^linux-image-6\.12\.[0-9]+\+[a-z0-9.~+]+-amd64$' \
            | awk '{print $1}' | sort -V | tail -n1)
        [ -n "$pkg" ] || die "no linux-image-6.12.*-amd64 in bookworm-backports"
        krel=${pkg#linux-image-}
    fi
    pkg=linux-image-$krel
    log "fetching guest kernel $pkg"
    work=$cache/build-kernel
    rm -rf "$work"
    mkdir -p "$work/root"
    (cd "$work" && apt-get download -qq -o APT::Sandbox::User=root "$pkg" >/dev/null) || die "apt-get download $pkg failed"
    dpkg-deb -x "$work"/"$pkg"_*.deb "$work/root"

    local vmlinuz=$work/root/boot/vmlinuz-$krel moddir=$work/root/lib/modules/$krel
    [ -f "$vmlinuz" ] || vmlinuz=$work/root/boot/vmlinuz-$krel
    [ -f "$vmlinuz" ] || die "no vmlinuz in $pkg"
    [ -d "$moddir" ] || moddir=$work/root/usr/lib/modules/$krel
    [ -d "$moddir" ] || die "no modules directory in $pkg"

    local out=$cache/kernel-$krel
    rm -rf "$out"
    mkdir -p "$out/modules"

    # vmlinuz is a bzImage whose payload is a zstd frame: find its magic and decompress from
    # there to get the ELF vmlinux, which QEMU boots through its PVH entry point.
    local off
    off=$(python3 -c 'import sys; print(open(sys.argv[1], "rb").read().find(b"\x28\xb5\x2f\xfd"))' \
        "$vmlinuz")
    [ "$off" -ge 0 ] || die "no zstd frame in $vmlinuz"
    # zstd stops with an error at the bytes that follow the frame; the frame itself is complete.
    tail -c +$((off + 1)) "$vmlinuz" | zstd -dcq 2>/dev/null >"$out/vmlinux" || true
    python3 - "$out/vmlinux" <<'EOF' || die "extracted vmlinux is not an x86-64 ELF with a PVH note"
import sys
d = open(sys.argv[1], "rb").read()
assert d[:4] == b"\x7fELF" and d[4] == 2, "not ELF64"
assert len(d) > 8 << 20, "too small"
# An ELF note of type XEN_ELFNOTE_PHYS32_ENTRY (18), name "Xen": the PVH entry point.
assert b"\x12\x00\x00\x00Xen\x00" in d, "no PVH entry note"
EOF
    cp "$work/root/boot/config-$krel" "$out/config" 2>/dev/null || true
    # Resolve the load order: each module after its dependencies. The package ships no
    # modules.dep (depmod writes it at install time): read each module's own "depends=" tag.
    python3 - "$moddir" "$out/modules" "${guest_modules[@]}" <<'EOF' >"$out/modules.order"
import lzma, os, re, sys
moddir, outdir, wanted = sys.argv[1], sys.argv[2], sys.argv[3:]
path_of = {}
for root, _, files in os.walk(os.path.join(moddir, "kernel")):
    for f in files:
        if ".ko" in f:
            path_of[f.split(".ko")[0].replace("-", "_")] = os.path.join(root, f)
builtin = open(os.path.join(moddir, "modules.builtin")).read().replace("-", "_")
order, data = [], {}
def visit(name):
    if name in order:
        return
    if name not in path_of:
        if "/" + name + ".ko" in builtin:
            return
        sys.exit(f"module {name} not found")
    raw = open(path_of[name], "rb").read()
    if path_of[name].endswith(".xz"):
        raw = lzma.decompress(raw)
    data[name] = raw
    m = re.search(rb"(?:^|\x00)depends=([^\x00]*)", raw)
    for dep in (m.group(1).decode().split(",") if m else []):
        if dep:
            visit(dep.replace("-", "_"))
    order.append(name)
for w in wanted:
    visit(w)
for name in order:
    open(os.path.join(outdir, name + ".ko"), "wb").write(data[name])
    print(name)
EOF
    echo "$krel" >"$out/stamp"
    rm -rf "$work"
    kernel_dir=$out
    log "guest kernel $krel ready in $(($(date +%s) - t0))s (modules: $(tr '\n' ' ' <"$out/modules.order"))"
}

# ---------------------------------------------------------------------------------------------
# Guest program + initramfs
# ---------------------------------------------------------------------------------------------

guest_src=$repo/tests/e2e/guest

build_initramfs() {
    local key dir t0
    key=$( { cat "$guest_src"/*.c "$guest_src"/init "${BASH_SOURCE[0]}"; cat "$kernel_dir/stamp" \
        "$kernel_dir/modules.order"; gcc --version | head -n1; dpkg-query -W busybox-static; } \
        | sha256sum | cut -c1-12)
    dir=$cache/guest-$key
    if [ -f "$dir/initramfs.cpio.gz" ]; then
        log "initramfs cached: $dir/initramfs.cpio.gz"
        guest_dir=$dir
        return
    fi
    t0=$(date +%s)
    log "building guest program and initramfs ($key)"
    local root=$cache/build-initramfs
    rm -rf "$root"
    mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,etc,lib/modules}
    gcc -static -O2 -Wall -Wextra -Werror -o "$root/bin/e2e-guest" "$guest_src"/e2e-guest.c
    cp /bin/busybox "$root/bin/busybox"
    local applet
    for applet in $("$root/bin/busybox" --list); do
        [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
    done
    install -m 0755 "$guest_src/init" "$root/init"
    cp "$kernel_dir"/modules/*.ko "$root/lib/modules/"
    cp "$kernel_dir/modules.order" "$root/lib/modules/order"
    cat "$kernel_dir/stamp" >"$root/etc/kernel-release"

    mkdir -p "$dir"
    (cd "$root" && find . -print0 | sort -z | cpio --null -o -H newc --quiet -R 0:0) \
        | gzip -9 >"$dir/initramfs.cpio.gz.tmp"
    mv "$dir/initramfs.cpio.gz.tmp" "$dir/initramfs.cpio.gz"
    rm -rf "$root"
    # Initramfs builds of older guest sources pile up: drop those unused for a week.
    find "$cache" -maxdepth 1 -type d -name 'guest-*' ! -name "guest-$key" -mtime +7 \
        -exec rm -rf {} + 2>/dev/null || true
    guest_dir=$dir
    log "initramfs ready in $(($(date +%s) - t0))s: $dir/initramfs.cpio.gz" \
        "($(du -h "$dir/initramfs.cpio.gz" | cut -f1))"
}

write_rig_env() {
    local tmp=$cache/rig.env.tmp
    {
        echo "# Written by scripts/e2e-setup.sh; read by tests/e2e/rig.rs"
        echo "QEMU=$qemu_bin"
        echo "QEMU_VERSION=$qemu_version"
        echo "KERNEL=$kernel_dir/vmlinux"
        echo "KERNEL_RELEASE=$(cat "$kernel_dir/stamp")"
        echo "INITRD=$guest_dir/initramfs.cpio.gz"
        echo "FIRMWARE=/usr/share/seabios:/usr/share/qemu"
    } >"$tmp"
    mv "$tmp" "$cache/rig.env"
}

what=${1:-all}
case "$what" in
    all)
        ensure_packages
        build_qemu
        fetch_kernel
        build_initramfs
        write_rig_env
        ;;
    qemu)
        ensure_packages
        build_qemu
        ;;
    guest)
        ensure_packages
        fetch_kernel
        build_initramfs
        if [ -x "$qemu_bin" ]; then write_rig_env; fi
        ;;
    *) die "usage: $0 [all|qemu|guest]" ;;
esac
log "done ($what) in $(($(date +%s) - t_start))s; cache: $cache"
