#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# End-to-end rig for vhost-device-iommu: an unpatched QEMU, a stock Debian guest kernel and an
# initramfs with our guest test program. Everything lands in a cache outside the repository:
#
#   ${VHOST_IOMMU_CACHE:-$HOME/.cache/vhost-device-iommu}/
#     qemu-<version>-<key>/qemu-system-x86_64          stock QEMU (Debian's source, no patch)
#     qemu-<version>-patched-<key>/qemu-system-x86_64  the same with scripts/qemu-patches/*.patch,
#                                                      built only when that directory has patches
#     kernel-<kernel release>/vmlinux, modules/*.ko     the guest kernel (PVH entry) and its modules
#     guest-<input hash>/initramfs.cpio.gz              busybox + init + e2e-guest + modules
#     rig.env                                           paths of the above, read by tests/e2e/rig.rs
#
# Usage: scripts/e2e-setup.sh [all|qemu|guest]   (default: all)
#
# Idempotent and non-interactive: a warm run (everything cached, all packages present) only
# checks stamps and takes seconds. A cold run installs Debian packages (adds bookworm-backports
# for the guest kernel and QEMU's option ROMs, and a deb-src line for sid, whose QEMU source it
# downloads), downloads the guest kernel, and builds.
#
# QEMU patches: every scripts/qemu-patches/NNNN-name.patch is applied, in name order, to a
# separate build (QEMU_PATCHED in rig.env) that only the tests needing it use; the stock build
# (QEMU in rig.env) never gets them. Each patch starts with a header that says what it changes
# (a "Subject:" line) and why stock QEMU cannot do it (a "Why-not-stock:" line); see
# tests/e2e/README.md.
#
# Knobs (environment):
#   VHOST_IOMMU_CACHE         cache directory (default ~/.cache/vhost-device-iommu)
#   VHOST_IOMMU_QEMU_DEBIAN   Debian source version of QEMU (default 1:10.2.2+ds-1, from sid)
#   VHOST_IOMMU_QEMU_PATCHES  directory of QEMU patches (default scripts/qemu-patches)
#   VHOST_IOMMU_KERNEL        guest kernel release, e.g. 6.12.57+deb12-amd64 (default: the one
#                             already cached, else the newest 6.12 in bookworm-backports)
#   VHOST_IOMMU_JOBS          ninja parallelism for the QEMU build (default 2)
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
export LC_ALL=C
exec </dev/null

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${VHOST_IOMMU_CACHE:-$HOME/.cache/vhost-device-iommu}
qemu_debian=${VHOST_IOMMU_QEMU_DEBIAN:-1:10.2.2+ds-1}
patch_dir=${VHOST_IOMMU_QEMU_PATCHES:-$repo/scripts/qemu-patches}
jobs=${VHOST_IOMMU_JOBS:-2}
t_start=$(date +%s)

log() { printf '[e2e-setup %4ss] %s\n' "$(($(date +%s) - t_start))" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# 1:10.2.2+ds-1 -> 10.2.2 (the upstream version, also the orig tarball's name).
qemu_version=${qemu_debian#*:}
qemu_version=${qemu_version%%+*}
qemu_version=${qemu_version%%-*}
[[ $qemu_version =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] \
    || die "VHOST_IOMMU_QEMU_DEBIAN=$qemu_debian: expected e.g. 1:10.2.2+ds-1"

mkdir -p "$cache"
# One setup at a time per cache (parallel test binaries may all ask for the rig).
exec 9>"$cache/.lock"
flock 9

# ---------------------------------------------------------------------------------------------
# Debian packages
# ---------------------------------------------------------------------------------------------

# Build and runtime packages from bookworm (main). device-tree-compiler: QEMU 10.2 builds its
# device trees from source (the +ds tarball has no prebuilt .dtb).
base_pkgs=(
    ninja-build libglib2.0-dev libpixman-1-dev flex bison pkg-config libfdt-dev zlib1g-dev
    device-tree-compiler python3 python3-venv gcc libc6-dev linux-libc-dev patch
    busybox-static cpio xz-utils zstd gzip seabios
)
# From bookworm-backports: QEMU 10's firmware/option ROMs (pvh.bin, linuxboot_dma.bin, ...).
bpo_pkgs=(qemu-system-data)

backports_file=/etc/apt/sources.list.d/vhost-iommu-e2e-backports.sources
sid_src_file=/etc/apt/sources.list.d/vhost-iommu-e2e-sid-src.sources
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
    log "adding bookworm-backports from $mirror"
    cat >"$backports_file" <<EOS
Types: deb
URIs: $mirror
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOS
    apt_updated=0
}

# Source packages only: nothing is ever installed from sid.
ensure_sid_sources() {
    if [ -f "$sid_src_file" ]; then
        return
    fi
    local mirror
    mirror=$(debian_mirror)
    log "adding deb-src for sid from $mirror (QEMU's source)"
    cat >"$sid_src_file" <<EOS
Types: deb-src
URIs: $mirror
Suites: sid
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOS
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

qemu_configure_flags=(
    --target-list=x86_64-softmmu --disable-docs --disable-user --disable-tools
    --disable-guest-agent --disable-werror --enable-kvm --enable-tcg --disable-sdl --disable-gtk
    --disable-vnc --disable-opengl --disable-spice --disable-curses --disable-slirp
    --disable-libusb --disable-usb-redir --disable-xen --disable-vhost-vdpa --disable-rust
    --disable-install-blobs
)
# Bump when build_fix_qemu_source or the build steps change.
qemu_build_rev=2
qemu_key=$( { echo "rev=$qemu_build_rev debian=$qemu_debian"; \
    printf '%s\n' "${qemu_configure_flags[@]}"; } | sha256sum | cut -c1-12)
qemu_dir=$cache/qemu-$qemu_version-$qemu_key
qemu_bin=$qemu_dir/qemu-system-x86_64

# The functional patches, in order; the patched build's key adds their contents.
qemu_patches=()
if [ -d "$patch_dir" ]; then
    while IFS= read -r -d '' f; do qemu_patches+=("$f"); done \
        < <(find "$patch_dir" -maxdepth 1 -type f -name '*.patch' -print0 | sort -z)
fi
qemu_patched_bin=
if [ ${#qemu_patches[@]} -gt 0 ]; then
    qemu_patched_key=$( { echo "$qemu_key"; cat "${qemu_patches[@]}"; } | sha256sum | cut -c1-12)
    qemu_patched_dir=$cache/qemu-$qemu_version-patched-$qemu_patched_key
    qemu_patched_bin=$qemu_patched_dir/qemu-system-x86_64
fi

# Every patch says what it changes and why stock QEMU cannot do it, before its first hunk.
check_patch_headers() {
    local p header
    for p in "${qemu_patches[@]}"; do
        header=$(sed -n '1,/^\(diff \|--- \)/p' "$p")
        grep -q '^Subject: ..' <<<"$header" || die "$p: no 'Subject:' line in its header"
        grep -q '^Why-not-stock: ..' <<<"$header" \
            || die "$p: no 'Why-not-stock:' line in its header (why stock QEMU cannot do it)"
    done
}

# A build fix, not a functional change: Debian's +ds tarball strips the edk2 .bz2 firmware
# images that meson would otherwise unpack.
build_fix_qemu_source() {
    local src=$1
    grep -Eq '^[[:space:]]*unpack_edk2_blobs = bzip2.found\(\)' "$src/meson.build" \
        || die "meson.build: no 'unpack_edk2_blobs = bzip2.found()' line (QEMU source changed?)"
    sed -Ei 's/^([[:space:]]*)unpack_edk2_blobs = bzip2.found\(\)/\1unpack_edk2_blobs = false/' \
        "$src/meson.build"
}

# Debian's orig tarball of QEMU $qemu_version, downloaded once into $cache/src; sets $tarball.
fetch_qemu_source() {
    local srcdir=$cache/src
    tarball=$srcdir/qemu_$qemu_version+ds.orig.tar.xz
    mkdir -p "$srcdir"
    if [ ! -s "$tarball" ]; then
        ensure_sid_sources
        apt_update_once
        log "apt-get source --download-only qemu=$qemu_debian"
        (cd "$srcdir" && apt-get source -qq -o APT::Sandbox::User=root --download-only \
            "qemu=$qemu_debian" >"$srcdir/apt-source.log" 2>&1) \
            || log "apt-get source reported an error (see below); checking for the orig tarball"
        if [ ! -s "$tarball" ]; then
            tail -n 20 "$srcdir/apt-source.log" >&2 || true
            die "no $tarball: Debian no longer serves qemu $qemu_debian? Set" \
                "VHOST_IOMMU_QEMU_DEBIAN to a version 'apt-cache showsrc qemu' lists"
        fi
    fi
}

qemu_cached() {
    [ -x "$1/qemu-system-x86_64" ] && [ -f "$1/stamp" ]
}

# The stock build's tree, kept (with a .kept mark) when the patched build follows in the same
# run: the patches then touch a few files of a configured, built tree, and ninja rebuilds only
# those (a minute instead of a whole build).
stock_tree=$cache/build-qemu-stock

# build_qemu LABEL DIR [PATCH...]: QEMU into DIR/qemu-system-x86_64, with PATCHes applied.
# With keep_tree=1 the build tree stays (for the patched build to reuse).
keep_tree=0
build_qemu() {
    local label=$1 dir=$2
    shift 2
    local bin=$dir/qemu-system-x86_64
    if qemu_cached "$dir"; then
        log "QEMU $qemu_version $label cached: $bin"
        return
    fi
    local t0 work venv src p
    t0=$(date +%s)
    log "building QEMU $qemu_version $label ($(basename "$dir"))"
    fetch_qemu_source

    # meson and pycotap from PyPI, in a venv of our own that QEMU's configure reuses.
    venv=$cache/venv
    if [ ! -x "$venv/bin/meson" ]; then
        log "python venv with meson + pycotap"
        rm -rf "$venv"
        python3 -m venv "$venv"
        "$venv/bin/pip" install -q --disable-pip-version-check 'meson>=1.5,<1.9' pycotap==1.3.1
    fi

    work=$cache/build-qemu-$label
    if [ $# -gt 0 ] && [ -f "$stock_tree/.kept" ]; then
        # On top of the stock build of this run: same source, same configuration, in place
        # (a meson build tree names its paths absolutely).
        log "patching the stock build's tree"
        rm -f "$stock_tree/.kept"
        work=$stock_tree
        src=$(find "$work" -mindepth 1 -maxdepth 1 -type d | head -n1)
    else
        rm -rf "$work"
        mkdir -p "$work"
        log "unpacking $(basename "$tarball")"
        # roms/ (firmware sources, 200 MB of the 330) is not needed for an x86 build without
        # blobs.
        tar --no-same-owner -xJf "$tarball" -C "$work" --exclude='qemu-*/roms/?*'
        src=$(find "$work" -mindepth 1 -maxdepth 1 -type d | head -n1)
        [ -f "$src/configure" ] || die "unpacked QEMU source has no configure"
        build_fix_qemu_source "$src"
    fi
    for p in "$@"; do
        log "applying $(basename "$p")"
        patch -d "$src" -p1 --batch --forward --fuzz=0 <"$p" >"$work/patch.log" 2>&1 \
            || { cat "$work/patch.log" >&2; die "$p does not apply to QEMU $qemu_version"; }
    done

    if [ ! -f "$src/build/build.ninja" ]; then
        log "configure"
        mkdir -p "$src/build"
        (cd "$src/build" && PATH="$venv/bin:$PATH" ../configure --python="$venv/bin/python3" \
            "${qemu_configure_flags[@]}" >"$work/configure.log" 2>&1) \
            || { tail -n 40 "$work/configure.log" >&2; die "QEMU configure failed"; }
    fi
    log "ninja -j$jobs qemu-system-x86_64"
    (cd "$src/build" && PATH="$venv/bin:$PATH" ninja -j"$jobs" qemu-system-x86_64 \
        >"$work/build.log" 2>&1) \
        || { tail -n 40 "$work/build.log" >&2; die "QEMU build failed"; }

    # Both devices the suite plugs: QEMU's own virtio-iommu and the generic vhost-user device
    # (renamed vhost-user-test-device-pci and made user-creatable in QEMU 10.2).
    local devices
    devices=$("$src/build/qemu-system-x86_64" -device help 2>/dev/null)
    for p in virtio-iommu-pci vhost-user-test-device-pci; do
        grep -q "\"$p\"" <<<"$devices" || die "the built QEMU has no $p device"
    done
    mkdir -p "$dir"
    install -m 0755 "$src/build/qemu-system-x86_64" "$bin.tmp"
    mv "$bin.tmp" "$bin"
    {
        "$bin" --version | head -n1
        echo "debian source: qemu $qemu_debian"
        for p in "$@"; do echo "patch: $(basename "$p") $(sha256sum <"$p" | cut -c1-12)"; done
    } >"$dir/stamp"
    if [ "$keep_tree" = 1 ]; then
        touch "$work/.kept"
    else
        rm -rf "$work"
    fi
    log "QEMU $label built in $(($(date +%s) - t0))s: $bin"
}

build_qemus() {
    check_patch_headers
    # A tree kept by a run that stopped before its patched build: stale.
    rm -rf "$stock_tree"
    if [ -n "$qemu_patched_bin" ] && ! qemu_cached "$qemu_dir" \
        && ! qemu_cached "$qemu_patched_dir"; then
        keep_tree=1
    fi
    build_qemu stock "$qemu_dir"
    keep_tree=0
    if [ -n "$qemu_patched_bin" ]; then
        build_qemu patched "$qemu_patched_dir" "${qemu_patches[@]}"
    fi
    rm -rf "$stock_tree"
}

# ---------------------------------------------------------------------------------------------
# Guest kernel
# ---------------------------------------------------------------------------------------------

# Modules the guest needs (kernel names); their dependencies are added. virtio_blk: the block
# device behind the virtio-iommu (tests/e2e_blk.rs); loaded last, after the IOMMU.
guest_modules=(virtio_iommu irqbypass vfio vfio_iommu_type1 vfio_pci_core vfio_pci virtio_blk)
# A cached kernel counts only if it was extracted with these modules.
kernel_stamp() { echo "$1 modules=${guest_modules[*]}"; }

cached_kernel() {
    local d
    for d in "$cache"/kernel-*/stamp; do
        [ -f "$d" ] || continue
        basename "$(dirname "$d")" | sed 's/^kernel-//'
    done | sort -V | tail -n1
}

fetch_kernel() {
    local krel=${VHOST_IOMMU_KERNEL:-$(cached_kernel)}
    if [ -n "$krel" ] && [ "$(cat "$cache/kernel-$krel/stamp" 2>/dev/null)" = "$(kernel_stamp "$krel")" ]; then
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
    kernel_stamp "$krel" >"$out/stamp"
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
    cut -d" " -f1 "$kernel_dir/stamp" >"$root/etc/kernel-release"

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
        if [ -n "$qemu_patched_bin" ]; then
            echo "QEMU_PATCHED=$qemu_patched_bin"
            printf 'QEMU_PATCHES=%s\n' "$(for p in "${qemu_patches[@]}"; do basename "$p"; done \
                | paste -sd, -)"
        fi
        echo "KERNEL=$kernel_dir/vmlinux"
        echo "KERNEL_RELEASE=$(cut -d" " -f1 "$kernel_dir/stamp")"
        echo "INITRD=$guest_dir/initramfs.cpio.gz"
        echo "FIRMWARE=/usr/share/seabios:/usr/share/qemu"
    } >"$tmp"
    mv "$tmp" "$cache/rig.env"
}

what=${1:-all}
case "$what" in
    all)
        ensure_packages
        build_qemus
        fetch_kernel
        build_initramfs
        write_rig_env
        ;;
    qemu)
        ensure_packages
        build_qemus
        ;;
    guest)
        ensure_packages
        fetch_kernel
        build_initramfs
        if [ -x "$qemu_bin" ] && { [ -z "$qemu_patched_bin" ] || [ -x "$qemu_patched_bin" ]; }; then
            write_rig_env
        fi
        ;;
    *) die "usage: $0 [all|qemu|guest]" ;;
esac
log "done ($what) in $(($(date +%s) - t_start))s; cache: $cache"
