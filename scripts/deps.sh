#!/usr/bin/env bash
# Installs the real components the tests and benchmarks run against, on Debian 12.
# Idempotent and fast when everything is present already. Needs root (or sudo) for apt.
#
#   scripts/deps.sh run     # what `scripts/run.sh` needs: QEMU (demo VM), noVNC (npm)
#   scripts/deps.sh test    # what `scripts/test.sh` needs: also Chromium, playwright-core, PostgreSQL, `cs`
#   scripts/deps.sh bench   # also TigerVNC Xvnc and websockify (PyPI) for the relay benchmark
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
mode=${1:-test}

sudo_cmd=()
if [ "$(id -u)" != 0 ]; then sudo_cmd=(sudo); fi

case "$mode" in
  run | test | bench) ;;
  *) echo "usage: scripts/deps.sh run|test|bench" >&2; exit 2 ;;
esac

# busybox-static and cpio: the demo VM's guest (`systemvm-image demo`).
apt_pkgs=(qemu-system-x86 busybox-static cpio)
if [ "$mode" != run ]; then
  apt_pkgs+=(chromium fonts-dejavu-core genisoimage bzip2 xz-utils zstd zip)
  # certutil: a test CA in a throwaway NSS database, so Chromium trusts an uploaded certificate.
  apt_pkgs+=(libnss3-tools)
  # The NFS server the store's end-to-end tests run against (started with scripts/fake_rpcbind.py).
  apt_pkgs+=(nfs-ganesha nfs-ganesha-vfs)
  # The core's API tests: PostgreSQL (a throwaway cluster per test run) and a venv for the `cs` CLI.
  apt_pkgs+=(postgresql python3-venv)
  # The libvirt driver's tests: libvirtd (started by the tests, no systemd) and a guest initramfs.
  apt_pkgs+=(libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients busybox-static cpio)
  # Swift as an object store (started by the tests: proxy with tempauth, one-replica rings), its
  # CLI to read objects back, and memcached for its tokens.
  apt_pkgs+=(swift swift-proxy swift-account swift-container swift-object python3-swiftclient memcached)
  # The system VM image's builder (`systemvm-image build`): a FAT ESP and a squashfs root made as
  # files (no mount, no loop device), SYSLINUX for BIOS, OVMF to boot it under UEFI in the tests,
  # musl-gcc for the C parts (ring) of its static agents, faketime to freeze the clock of the
  # tools that stamp the current time (reproducible images).
  apt_pkgs+=(mtools dosfstools syslinux syslinux-common fdisk ovmf kmod musl-tools faketime squashfs-tools)
fi
# Ansible with its bundled ngine_io.cloudstack collection (PyPI `ansible` 9.13.0, pinned) and the
# `cs` library its modules call: the Ansible end-to-end test drives core with them.
if [ "$mode" != run ]; then
  ansible_venv="$here/target/ansible-venv"
  if ! { [ -x "$ansible_venv/bin/ansible-playbook" ] \
         && "$ansible_venv/bin/python" -c 'import importlib.metadata as m; assert m.version("ansible") == "9.13.0" and m.version("cs") == "5.2.0"' 2>/dev/null; }; then
    echo "deps: ansible into $ansible_venv" >&2
    python3 -m venv "$ansible_venv"
    "$ansible_venv/bin/pip" install -q ansible==9.13.0 cs==5.2.0
  fi
fi

if [ "$mode" = bench ]; then
  apt_pkgs+=(tigervnc-standalone-server tigervnc-tools x11-xserver-utils python3-venv)
fi

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  "${sudo_cmd[@]}" apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "$@" >/dev/null
}

missing=()
for p in "${apt_pkgs[@]}"; do installed "$p" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "deps: installing ${missing[*]}" >&2
  # This machine kind ships qemu-utils 10 from bookworm-backports, which breaks bookworm's
  # qemu-system-x86 7.2: take qemu-system-x86 from backports too in that case.
  if [[ " ${missing[*]} " == *" qemu-system-x86 "* ]] \
     && dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null | grep -q bpo; then
    list=/etc/apt/sources.list.d/bookworm-backports.list
    if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
      echo 'deb http://deb.debian.org/debian bookworm-backports main' | "${sudo_cmd[@]}" tee "$list" >/dev/null
    fi
    "${sudo_cmd[@]}" apt-get -o DPkg::Lock::Timeout=600 update -qq
    apt_install -t bookworm-backports qemu-system-x86
    missing=("${missing[@]/qemu-system-x86}")
  else
    "${sudo_cmd[@]}" apt-get -o DPkg::Lock::Timeout=600 update -qq
  fi
  rest=()
  for p in "${missing[@]}"; do [ -n "$p" ] && rest+=("$p"); done
  if [ ${#rest[@]} -gt 0 ]; then apt_install "${rest[@]}"; fi
fi

# Web assets: stock noVNC and playwright-core from the npm registry, pinned in package.json / package-lock.json.
web="$here/console-proxy/web"
if [ ! -f "$web/node_modules/@novnc/novnc/core/rfb.js" ] || [ ! -d "$web/node_modules/playwright-core" ] \
   || [ "$web/package-lock.json" -nt "$web/node_modules/.package-lock.json" ]; then
  echo "deps: npm ci in console-proxy/web" >&2
  (cd "$web" && npm ci --no-audit --no-fund --loglevel=error)
fi

# Core's upload page: tus-js-client from the npm registry, pinned in core/web/package-lock.json.
core_web="$here/core/web"
if [ ! -f "$core_web/node_modules/tus-js-client/dist/tus.min.js" ] \
   || [ "$core_web/package-lock.json" -nt "$core_web/node_modules/.package-lock.json" ]; then
  echo "deps: npm ci in core/web" >&2
  (cd "$core_web" && npm ci --no-audit --no-fund --loglevel=error)
fi

# A guest kernel for the libvirt driver's tests: Debian's, taken out of its package (no modules needed).
if [ "$mode" != run ] && [ ! -s "$here/target/guest-kernel/vmlinuz" ]; then
  kdir="$here/target/guest-kernel"
  kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
  echo "deps: guest kernel from $kpkg" >&2
  rm -rf "$kdir" && mkdir -p "$kdir"
  (cd "$kdir" && apt-get download -qq "$kpkg" 2>/dev/null)
  dpkg-deb --fsys-tarfile "$kdir/${kpkg}"_*.deb | tar -x -C "$kdir" --wildcards './boot/vmlinuz-*'
  mv "$kdir"/boot/vmlinuz-* "$kdir/vmlinuz"
  rm -rf "$kdir/boot" "$kdir"/*.deb
fi

# The system VM image's agents are static musl binaries.
if [ "$mode" != run ] && ! rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl; then
  echo "deps: rustup target x86_64-unknown-linux-musl" >&2
  rustup target add x86_64-unknown-linux-musl
fi

# The real CloudStack CLI the core's API tests drive (PyPI `cs`, pinned).
if [ "$mode" != run ]; then
  cs_venv="$here/target/cs-venv"
  if ! { [ -x "$cs_venv/bin/cs" ] \
         && "$cs_venv/bin/python" -c 'import importlib.metadata as m; assert m.version("cs") == "5.2.0"' 2>/dev/null; }; then
    echo "deps: cs into $cs_venv" >&2
    python3 -m venv "$cs_venv"
    "$cs_venv/bin/pip" install -q cs==5.2.0
  fi
fi

# Object stores for the replication tests: s3s-fs (checks signatures and checksums; crates.io,
# pinned: later versions need a newer rustc) and moto (multipart bookkeeping) with boto3 as the
# independent client that reads replicas back (PyPI, pinned).
if [ "$mode" != run ]; then
  if ! s3s-fs --version 2>/dev/null | grep -q '0\.14\.1'; then
    echo "deps: s3s-fs 0.14.1 (cargo install)" >&2
    cargo install -q s3s-fs@0.14.1 --locked --features binary
  fi
  s3_venv="$here/target/s3-venv"
  if ! { [ -x "$s3_venv/bin/moto_server" ] \
         && "$s3_venv/bin/python" -c 'import importlib.metadata as m; assert m.version("moto") == "5.2.5" and m.version("boto3") == "1.44.5"' 2>/dev/null; }; then
    echo "deps: moto and boto3 into $s3_venv" >&2
    python3 -m venv "$s3_venv"
    "$s3_venv/bin/pip" install -q 'moto[server]==5.2.5' boto3==1.44.5
  fi
fi

if [ "$mode" = bench ]; then
  venv="$here/target/bench-venv"
  if [ ! -x "$venv/bin/websockify" ]; then
    echo "deps: websockify into $venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q websockify==0.13.0
  fi
fi
