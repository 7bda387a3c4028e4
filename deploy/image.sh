#!/usr/bin/env bash
# deploy/image.sh: the tollgate container image, built without a container daemon.
#
#   1. a Release build of the binary (stripped; the Lua runtime of lua/ is embedded in it);
#   2. a Debian bookworm rootfs from mmdebstrap (variant apt) with only the packages of
#      deploy/packages/runtime.txt, without docs, man pages and locales (dpkg path-exclude);
#   3. into it: /usr/bin/tollgate, the default configuration /etc/tollgate/tollgate.lua
#      (deploy/image/tollgate.lua, its example catalog, a random admin.token), the example
#      policies in /usr/share/tollgate/policies/, the user tollgate (uid and gid 10001) and
#      /var/lib/tollgate;
#   4. buildah (vfs storage in the work folder, chroot isolation, no RUN step) turns that
#      rootfs into an image in docker format (HEALTHCHECK exists only there), with the user,
#      the entrypoint, the ports, the volumes and the health check, and writes a
#      `docker load`-able archive.
#
# Usage: deploy/image.sh          (as root: mmdebstrap and chroot need it)
# Environment:
#   TG_IMAGE_DIR        work folder: rootfs/, the apt cache, buildah's storage (default build/image)
#   TG_IMAGE_BUILD_DIR  the Release build (default build-release)
#   TG_IMAGE_BIN        use this binary instead of building one (it is stripped on the way in)
#   TG_IMAGE_OUT        the archive (default build/tollgate-image.tar)
#   TG_IMAGE_TAG        its name (default tollgate:latest)
#   TG_IMAGE_MIRROR     a Debian mirror for mmdebstrap (default: the host's apt sources)
# The rootfs stays in TG_IMAGE_DIR/rootfs for spec/image/smoke.sh; the .deb files stay in
# TG_IMAGE_DIR/apt-cache, so the next build downloads only what changed.
# Operators mount their own /etc/tollgate over the image's (deploy/image/tollgate.lua says how).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

work="${TG_IMAGE_DIR:-build/image}"
bdir="${TG_IMAGE_BUILD_DIR:-build-release}"
out="${TG_IMAGE_OUT:-build/tollgate-image.tar}"
tag="${TG_IMAGE_TAG:-tollgate:latest}"
uid=10001
jobs="$(nproc 2>/dev/null || echo 2)"

say() { printf '==> image: %s\n' "$*" >&2; }
die() {
  printf 'image.sh: %s\n' "$1" >&2
  [ -n "${2:-}" ] && printf '  check: %s\n' "$2" >&2
  exit 1
}

# The packages of a list file: comments and blank lines dropped.
list() { sed -e 's/#.*//' -e 's/[[:space:]]//g' -e '/^$/d' "$1"; }

[ "$(id -u)" -eq 0 ] || die "must run as root (mmdebstrap --mode=root, chroot, buildah's storage)" "sudo deploy/image.sh"
for t in mmdebstrap buildah tar strip; do
  command -v "$t" >/dev/null ||
    die "$t is not installed" "apt-get install mmdebstrap buildah binutils (deploy/packages/test.txt; deploy/dev.sh test installs them)"
done

mkdir -p "$work" "$(dirname "$out")"
work="$(cd "$work" && pwd)"
out="$(cd "$(dirname "$out")" && pwd)/$(basename "$out")"
rootfs="$work/rootfs"
t_start=$(date +%s)

# 1. The binary.
if [ -n "${TG_IMAGE_BIN:-}" ]; then
  bin="$TG_IMAGE_BIN"
  [ -x "$bin" ] || die "TG_IMAGE_BIN=$bin is not an executable"
else
  say "Release build of tollgate into $bdir"
  cmake -S "$root" -B "$bdir" -DCMAKE_BUILD_TYPE=Release >"$work/cmake.log" 2>&1 ||
    { tail -n 30 "$work/cmake.log" >&2; die "cmake failed" "$work/cmake.log"; }
  cmake --build "$bdir" -j "$jobs" --target tollgate >"$work/build.log" 2>&1 ||
    { tail -n 30 "$work/build.log" >&2; die "the Release build failed" "$work/build.log"; }
  bin="$bdir/tollgate"
fi
strip --strip-all -o "$work/tollgate" "$bin"
# The policy sandbox and tools are lua/**/*.lua compiled into the binary (lua/embed.cmake):
# the image has no lua/ folder, so each file must be in the binary, by name.
while IFS= read -r f; do
  grep -qaF "${f#lua/}" "$work/tollgate" || die "lua file ${f#lua/} is not embedded in $bin" "lua/embed.cmake"
done < <(find lua -name '*.lua' | sort)
t_bin=$(date +%s)

# 2. The rootfs. The packages come through the host's apt sources (or TG_IMAGE_MIRROR); the
# .deb files are kept in apt-cache/ between builds (sync-in before, sync-out after).
packages="$(list deploy/packages/runtime.txt | paste -sd, -)"
say "rootfs (bookworm, variant apt): $packages"
rm -rf "$rootfs"
mkdir -p "$work/apt-cache"
mirror=()
[ -n "${TG_IMAGE_MIRROR:-}" ] && mirror=("$TG_IMAGE_MIRROR")
# merged-usr hook: /bin -> usr/bin as Debian's own images; without it apt installs usrmerge,
# which pulls in perl (45 MB). force-unsafe-io: no fsync per file in a throwaway tree.
if ! mmdebstrap --variant=apt --mode=root --format=directory \
     --aptopt='APT::Install-Recommends "false"' \
     --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
     --dpkgopt=force-unsafe-io \
     --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
     --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
     --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/lintian/*' \
     --dpkgopt='path-exclude=/usr/share/bash-completion/*' \
     --include="$packages" \
     --skip=essential/unlink \
     --setup-hook='mkdir -p "$1"/var/cache/apt/archives/' \
     --setup-hook="sync-in $work/apt-cache /var/cache/apt/archives/" \
     --customize-hook="sync-out /var/cache/apt/archives $work/apt-cache" \
     bookworm "$rootfs" "${mirror[@]}" >"$work/mmdebstrap.log" 2>&1; then
  tail -n 30 "$work/mmdebstrap.log" >&2
  die "mmdebstrap failed (log: $work/mmdebstrap.log)" \
    "the apt sources or TG_IMAGE_MIRROR, the network or its proxy, that this runs as root"
fi
# Left behind by the build, of no use at run time.
rm -rf "$rootfs"/var/cache/apt/* "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/* \
  "$rootfs"/var/cache/ldconfig/aux-cache
t_rootfs=$(date +%s)

# 3. tollgate into the rootfs.
install -D -m 0755 "$work/tollgate" "$rootfs/usr/bin/tollgate"
install -d -m 0755 "$rootfs/usr/share/tollgate/policies"
install -m 0644 policies/*.lua policies/README.md "$rootfs/usr/share/tollgate/policies/"
echo "tollgate:x:$uid:$uid:tollgate:/var/lib/tollgate:/usr/sbin/nologin" >>"$rootfs/etc/passwd"
echo "tollgate:x:$uid:" >>"$rootfs/etc/group"
echo "tollgate:!:19000::::::" >>"$rootfs/etc/shadow"
install -d -m 0750 -o "$uid" -g "$uid" "$rootfs/etc/tollgate" "$rootfs/etc/tollgate/rsl" "$rootfs/var/lib/tollgate"
install -m 0644 -o "$uid" -g "$uid" deploy/image/tollgate.lua "$rootfs/etc/tollgate/tollgate.lua"
install -m 0644 -o "$uid" -g "$uid" deploy/image/example.xml "$rootfs/etc/tollgate/rsl/example.xml"
(umask 077 && head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$rootfs/etc/tollgate/admin.token")
chown "$uid:$uid" "$rootfs/etc/tollgate/admin.token"
# The configuration as the image will run it: every path, the policy in the embedded sandbox.
chroot --userspec="$uid:$uid" "$rootfs" /usr/bin/tollgate check -c /etc/tollgate/tollgate.lua >&2 ||
  die "the image's default configuration does not pass tollgate check" "deploy/image/tollgate.lua"
rootfs_kb=$(du -sk "$rootfs" | cut -f1)

# 4. The image: buildah with its own storage in the work folder (vfs: no overlay mount
# needed), chroot isolation, nothing run inside the container.
export BUILDAH_ISOLATION=chroot BUILDAH_FORMAT=docker
store="$work/storage"
bh() { buildah --root "$store" --runroot "$work/run" --storage-driver vfs "$@"; }
rm -rf "$store" "$work/run"
say "buildah: $tag"
ctr="$(bh from --quiet --format docker scratch)" || die "buildah from scratch failed" "buildah --version; that /etc/containers/ exists (package containers-common)"
mnt="$(bh mount "$ctr")"
# cp -a keeps owners, modes and the /bin -> usr/bin links.
cp -a "$rootfs/." "$mnt/"
bh umount "$ctr" >/dev/null
# Health: the image has bash (Essential) but no curl: bash's /dev/tcp asks /healthz on the
# default port, and only a "200" status line passes. A deployment on another port sets
# its own (docker run --health-cmd, or the probes of deploy/k8s).
health='exec 3<>/dev/tcp/127.0.0.1/8080 && printf "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n" >&3 && read -r -t 2 v s r <&3 && [ "$s" = 200 ]'
bh config \
  --user "$uid:$uid" \
  --workingdir /var/lib/tollgate \
  --entrypoint '["/usr/bin/tollgate"]' \
  --cmd '["run", "-c", "/etc/tollgate/tollgate.lua"]' \
  --port 8080/tcp --port 9090/tcp \
  --volume /etc/tollgate --volume /var/lib/tollgate \
  --stop-signal SIGTERM \
  --healthcheck "CMD /bin/bash -c '$health'" \
  --healthcheck-interval 10s --healthcheck-timeout 3s --healthcheck-start-period 10s \
  --healthcheck-retries 3 \
  --label org.opencontainers.image.title=tollgate \
  --label org.opencontainers.image.description="tollgate payment gateway (deploy/image.sh)" \
  --label org.opencontainers.image.version="$(sed -n 's/^project(tollgate VERSION \([0-9.]*\).*/\1/p' CMakeLists.txt)" \
  "$ctr"
bh commit --quiet --format docker --rm "$ctr" "$tag" >/dev/null
rm -f "$out"
bh push --quiet --format docker "$tag" "docker-archive:$out:$tag"
bh rmi "$tag" >/dev/null 2>&1 || true
rm -rf "$store" "$work/run"
t_end=$(date +%s)

archive_kb=$(du -sk "$out" | cut -f1)
say "wrote $out ($((archive_kb / 1024)) MB; unpacked rootfs $((rootfs_kb / 1024)) MB)"
say "times: binary $((t_bin - t_start)) s, rootfs $((t_rootfs - t_bin)) s, image $((t_end - t_rootfs)) s"
say "load it with: docker load -i $out && docker run -p 8080:8080 -p 9090:9090 $tag"
