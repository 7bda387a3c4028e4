#!/usr/bin/env bash
# Smoke test of the container image (deploy/image.sh) without a container daemon: the
# gateway runs from the image's own filesystem, the layer of the docker archive unpacked
# and entered with chroot.
#   1. the archive: one layer, and the image config that docker would run (user 10001,
#      entrypoint and command, ports, volumes, a docker-format HEALTHCHECK);
#   2. the image as shipped: in a network namespace of its own (loopback only, so its
#      0.0.0.0:8080 and :9090 collide with nothing), /usr/bin/tollgate with the default
#      /etc/tollgate/tollgate.lua as uid 10001; /healthz, /readyz, a DiscoverResources
#      offer from the example tenant, the admin listener with the image's token, the
#      image's own HEALTHCHECK command passing while it runs and failing once it stopped,
#      a clean exit on SIGTERM;
#   3. e2e smoke specs (spec/e2e) with TOLLGATE_BIN set to a wrapper that runs the
#      image's binary in the chroot (as root, /tmp bind-mounted: the specs write there).
# Usage: spec/image/smoke.sh ARCHIVE WORKDIR    (as root; needs unshare, chroot, node,
# curl, busted with luajit). Not named run-suite.sh on purpose: CMake registers those as
# ctest suites, and this one runs once, from the image step of deploy/dev.sh test.
# Prints one line "N passed, N failed, N skipped"; exits non-zero on any failure.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
specs=(readiness_spec.lua discover_tenants_spec.lua admin_spec.lua bad_connect_spec.lua)
uid=10001

# --- inside the private network and mount namespace (stage 2) -----------------------
if [ "${1:-}" = --inside ]; then
  r="$2" health_file="$3" log="$4"
  ok() { echo "ok $1"; }
  no() { echo "not ok $1${2:+: $2}"; }
  ip link set lo up || { no "loopback up in the namespace"; exit 0; }
  mount --bind /dev "$r/dev" && mount -t proc proc "$r/proc" || { no "mounts in the chroot"; exit 0; }
  mapfile -d '' health <"$health_file"
  # The entrypoint and command of the image config, as its user.
  chroot --userspec="$uid:$uid" "$r" /usr/bin/tollgate run -c /etc/tollgate/tollgate.lua >"$log" 2>&1 </dev/null &
  pid=$!
  up=0
  for _ in $(seq 1 200); do
    if curl -sf -o /dev/null http://127.0.0.1:8080/healthz; then up=1; break; fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.05
  done
  if [ "$up" = 1 ]; then ok "default config: /healthz 200 as uid $uid"; else no "default config: /healthz" "$(tail -n 20 "$log")"; fi
  ready=0
  for _ in $(seq 1 200); do
    if curl -sf -o /dev/null http://127.0.0.1:8080/readyz; then ready=1; break; fi
    sleep 0.05
  done
  if [ "$ready" = 1 ]; then ok "default config: /readyz 200 (example catalog loaded)"; else no "default config: /readyz" "$(curl -s http://127.0.0.1:8080/readyz)"; fi
  body="$(curl -s -H 'Content-Type: application/json' \
    -d '{"aiSystem":{"usagePurposes":["USAGE_PURPOSE_AI_INPUT"]},"resources":[{"uri":"https://news.example/articles/x"}]}' \
    http://127.0.0.1:8080/ramp.v1.ExchangeService/DiscoverResources)"
  case "$body" in
    *'"offers":[{"id":'*'"amount":"15000"'*) ok "default config: DiscoverResources offers the example price" ;;
    *) no "default config: DiscoverResources" "$body" ;;
  esac
  token="$(tr -d '[:space:]' <"$r/etc/tollgate/admin.token")"
  with="$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $token" http://127.0.0.1:9090/metrics)"
  without="$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:9090/metrics)"
  if [ "$with" = 200 ] && [ "$without" = 401 ]; then ok "default config: admin /metrics behind the image's token"
  else no "default config: admin /metrics" "with token $with, without $without"; fi
  if chroot --userspec="$uid:$uid" "$r" "${health[@]}" </dev/null >/dev/null 2>&1; then
    ok "HEALTHCHECK command passes while the gateway serves"
  else no "HEALTHCHECK command (${health[*]}) failed against a serving gateway"; fi
  kill -TERM "$pid" 2>/dev/null
  wait "$pid"
  rc=$?
  if [ "$rc" = 0 ]; then ok "default config: exit 0 on SIGTERM"; else no "default config: exit status $rc on SIGTERM" "$(tail -n 20 "$log")"; fi
  if chroot --userspec="$uid:$uid" "$r" "${health[@]}" </dev/null >/dev/null 2>&1; then
    no "HEALTHCHECK command passes with no gateway"
  else ok "HEALTHCHECK command fails with no gateway"; fi
  exit 0
fi

# --- the suite -----------------------------------------------------------------------
archive="${1:-}" work="${2:-}"
passed=0 failed=0
pass() { passed=$((passed + 1)); echo "  ok: $*" >&2; }
fail() { failed=$((failed + 1)); echo "  FAILED: $*" >&2; }
finish() {
  echo "image smoke: $passed passed, $failed failed" >&2
  echo "$passed passed, $failed failed, 0 skipped"
  [ "$failed" -eq 0 ]
  exit
}
setup_fail() { fail "$*"; finish; }

[ -n "$archive" ] && [ -n "$work" ] || setup_fail "usage: spec/image/smoke.sh ARCHIVE WORKDIR"
[ "$(id -u)" -eq 0 ] || setup_fail "must run as root (chroot, unshare, mount)"
[ -s "$archive" ] || setup_fail "no image archive at $archive (deploy/image.sh writes it)"
for t in unshare chroot node curl busted luajit tar; do
  command -v "$t" >/dev/null || setup_fail "$t is not installed (deploy/packages/test.txt)"
done
mkdir -p "$work"
work="$(cd "$work" && pwd)"
root="$work/smoke-root"
rm -rf "$root" "$work/smoke-meta"
mkdir -p "$root" "$work/smoke-meta"

# 1. The archive, as docker load reads it: manifest.json -> config and layers.
tar -xf "$archive" -C "$work/smoke-meta" manifest.json || setup_fail "$archive has no manifest.json"
# node prints: the config file, then each layer, one a line.
mapfile -t parts < <(node -e '
  const m = JSON.parse(require("fs").readFileSync(process.argv[1]))[0];
  console.log(m.Config); for (const l of m.Layers) console.log(l);' "$work/smoke-meta/manifest.json")
[ "${#parts[@]}" -ge 2 ] || setup_fail "manifest.json names no config or no layer"
tar -xf "$archive" -C "$work/smoke-meta" "${parts[0]}" || setup_fail "no config ${parts[0]} in $archive"
for layer in "${parts[@]:1}"; do
  tar -xOf "$archive" "$layer" | tar -x --numeric-owner -C "$root" ||
    setup_fail "cannot unpack layer $layer"
done
pass "archive: manifest.json, the image config and $((${#parts[@]} - 1)) layer(s) unpack"
check_config() {
  # One line per problem; none when the config is what image.sh means to ship.
  node -e '
    const c = JSON.parse(require("fs").readFileSync(process.argv[1])).config || {};
    const eq = (a, b) => JSON.stringify(a) === JSON.stringify(b);
    const bad = [];
    if (c.User !== "10001:10001") bad.push("User " + c.User);
    if (!eq(c.Entrypoint, ["/usr/bin/tollgate"])) bad.push("Entrypoint " + JSON.stringify(c.Entrypoint));
    if (!eq(c.Cmd, ["run", "-c", "/etc/tollgate/tollgate.lua"])) bad.push("Cmd " + JSON.stringify(c.Cmd));
    if (!eq(Object.keys(c.ExposedPorts || {}).sort(), ["8080/tcp", "9090/tcp"])) bad.push("ExposedPorts");
    if (!eq(Object.keys(c.Volumes || {}).sort(), ["/etc/tollgate", "/var/lib/tollgate"])) bad.push("Volumes");
    const h = c.Healthcheck;
    if (!h || !Array.isArray(h.Test) || h.Test[0] !== "CMD" || h.Test.length < 2) bad.push("Healthcheck " + JSON.stringify(h));
    else require("fs").writeFileSync(process.argv[2], h.Test.slice(1).join("\0") + "\0");
    for (const b of bad) console.log(b);' "$work/smoke-meta/${parts[0]}" "$work/smoke-meta/health"
}
problems="$(check_config 2>&1)"
if [ -z "$problems" ]; then pass "image config: user, entrypoint, cmd, ports, volumes, healthcheck"
else fail "image config: $problems"; fi
if [ -x "$root/usr/bin/tollgate" ] && [ ! -e "$root/usr/bin/curl" ] &&
   [ -f "$root/usr/share/tollgate/policies/news_publisher.lua" ] && [ -f "$root/etc/ssl/certs/ca-certificates.crt" ]; then
  pass "rootfs: binary, example policies, CA bundle"
else
  fail "rootfs: /usr/bin/tollgate, /usr/share/tollgate/policies or the CA bundle missing"
fi
# The goal of issue 12: an image under 120 MB, unpacked.
size_mb=$(($(du -sk "$root" | cut -f1) / 1024))
if [ "$size_mb" -lt 120 ]; then pass "size: the unpacked image is $size_mb MB (< 120 MB)"
else fail "size: the unpacked image is $size_mb MB, over the 120 MB goal (deploy/packages/runtime.txt, path-exclude in deploy/image.sh)"; fi
if chroot "$root" /usr/bin/tollgate version >/dev/null 2>&1 &&
   chroot --userspec="$uid:$uid" "$root" /usr/bin/tollgate check -c /etc/tollgate/tollgate.lua >/dev/null 2>&1; then
  pass "chroot: tollgate version, tollgate check of the default config (embedded Lua) as uid $uid"
else
  fail "chroot: tollgate version / check: $(chroot --userspec="$uid:$uid" "$root" /usr/bin/tollgate check -c /etc/tollgate/tollgate.lua 2>&1 | tail -n 3)"
fi

# 2. The image as shipped.
if [ -s "$work/smoke-meta/health" ]; then
  while IFS= read -r line; do
    case "$line" in
      "ok "*) pass "${line#ok }" ;;
      "not ok "*) fail "${line#not ok }" ;;
    esac
  done < <(unshare --net --mount bash "${BASH_SOURCE[0]}" --inside "$root" "$work/smoke-meta/health" "$work/smoke-default.log" 2>&1)
else
  fail "no HEALTHCHECK to run: the default-config checks did not run"
fi

# 3. The e2e smoke specs against the image's binary.
wrapper="$work/tollgate-in-image"
cat >"$wrapper" <<EOF
#!/bin/sh
# spec/image/smoke.sh: the image's tollgate, run from its unpacked filesystem. A mount
# namespace of its own (gone with the process) binds /tmp, /dev and /proc into it; each
# exec keeps the pid, so the specs signal and watch the gateway itself.
exec unshare --mount /bin/sh -c 'r="\$0"; mount --bind /tmp "\$r/tmp" && mount --bind /dev "\$r/dev" &&
  mount -t proc proc "\$r/proc" && exec chroot "\$r" /usr/bin/tollgate "\$@"' '$root' "\$@"
EOF
chmod 755 "$wrapper"
log="$work/smoke-e2e.log"
(cd "$here/../e2e" && TMPDIR=/tmp TOLLGATE_BIN="$wrapper" busted --lua=luajit --output=plainTerminal --verbose \
  --no-auto-insulate --pattern=_spec --lpath='./?.lua' "${specs[@]}") >"$log" 2>&1
status=$?
cat "$log" >&2
# shellcheck source=../busted-summary.sh
. "$here/../busted-summary.sh"
read -r p _ f _ k _ < <(busted_summary "image e2e (${specs[*]})" "$log" "$status" | tr -d ,)
passed=$((passed + p)); failed=$((failed + f))
if [ "$k" -gt 0 ]; then fail "$k e2e specs pending"; fi
finish
