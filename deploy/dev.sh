#!/usr/bin/env bash
# The two set-up commands of the README, for a Debian bookworm machine:
#   deploy/dev.sh run    install what is missing, build, start the demo gateway
#   deploy/dev.sh test   install what is missing, build, run every suite
# Works as root, or as a user with sudo (only apt-get, the service switches and the image
# step run under sudo).
# Environment: TG_BUILD_DIR (default build), TG_BUILD_TYPE (default RelWithDebInfo),
# TG_CTEST_JOBS (default 1), TG_FUZZ_SECONDS (default 20; 0 skips the fuzzers, counted as
# skipped), TG_SKIP_ASAN=1 (the sanitized pass, counted as skipped), TG_DEMO_PORT and
# TG_DEMO_ADMIN_PORT (run: the demo's public and admin ports, default 8080 and 9090),
# TG_SKIP_IMAGE=1 (the container image step, counted as skipped), TG_IMAGE_DIR (default
# $TG_BUILD_DIR/image), TG_IMAGE_BUILD_DIR, TG_IMAGE_BIN, TG_IMAGE_MIRROR (deploy/image.sh).
# `test` always ends with one line "N passed, N failed, N skipped", also when a step before
# the tests fails (apt, npm, a missing tool, the build): that step is then 1 failed, after a
# line naming it and what to check.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

build_dir="${TG_BUILD_DIR:-build}"
build_type="${TG_BUILD_TYPE:-RelWithDebInfo}"
fuzz_dir="${TG_FUZZ_BUILD_DIR:-build-fuzz}"
fuzz_seconds="${TG_FUZZ_SECONDS:-20}"
jobs="$(nproc 2>/dev/null || echo 2)"

# The Debian packages, from one place: deploy/packages/{build,runtime,test}.txt (one package
# a line, '#' comments). deploy/image.sh puts runtime.txt in the image and deploy/Dockerfile
# installs build.txt and runtime.txt through `dev.sh install`.
pkg_list() { sed -e 's/#.*//' -e 's/[[:space:]]//g' -e '/^$/d' "$root/deploy/packages/$1.txt"; }
package_lists=(build runtime test)
packages=()
for list in "${package_lists[@]}"; do
  [ -f "deploy/packages/$list.txt" ] || { echo "dev.sh: missing deploy/packages/$list.txt" >&2; exit 1; }
  mapfile -t -O "${#packages[@]}" packages < <(pkg_list "$list")
done
want_node=1 # run and test also need node and npm (install: only the lists named)

# Packages that bring a service with them, and its unit. dev.sh installs them for their
# programs (promtool, redis-server, nginx: the tests and benchmarks start their own on free
# ports), never for a daemon: a Prometheus that apt starts listens on :9090, the demo's admin
# port. So nothing starts while dev.sh installs, and a unit that the install enabled is
# disabled again (one that was enabled before is left alone).
declare -A service_of=([prometheus]=prometheus [redis-server]=redis-server [nginx-light]=nginx)

# Programs the suites run, and the package of each. After the install every one must be
# there: a test never skips or passes for want of a tool, the install step fails instead.
declare -A tool_pkg=(
  [cmake]=cmake [cc]=build-essential [clang]=clang [protoc]=protobuf-compiler
  [protoc-c]=protobuf-c-compiler [luajit]=luajit2 [busted]=lua-busted
  [redis-server]=redis-server [wrk]=wrk [nginx]=nginx-light [promtool]=prometheus
  [openssl]=openssl [curl]=curl [ss]=iproute2 [node]=nodejs [npm]=npm
)

step=""     # the step running now, named when it fails
mode=""     # run, test or fuzz
closed=0    # 1 once the closing count line is out

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'dev.sh: %s\n' "$*" >&2; exit 1; }

usage() {
  cat >&2 <<'EOF'
usage: deploy/dev.sh run    install, build, start the gateway on deploy/demo/tollgate.lua
                            (TG_DEMO_PORT=8180 TG_DEMO_ADMIN_PORT=9190 for other ports)
       deploy/dev.sh test   install, build, run every test suite
       deploy/dev.sh fuzz [SECONDS]   only the fuzzers, SECONDS each (default 300)
       deploy/dev.sh install LIST...  only the Debian packages of deploy/packages/LIST.txt
                            (build, runtime, test; deploy/Dockerfile uses it)
EOF
  exit 2
}

# What to look at when a step fails.
hint() {
  case "$1" in
    apt*)
      echo "  check: the network or its proxy (http_proxy; Acquire::http::Proxy in /etc/apt/apt.conf.d/),"
      echo "  the mirrors in /etc/apt/sources.list(.d)/, the clock (a Release file \"not valid yet\"),"
      echo "  that no other apt-get or dpkg holds the lock, and without root that sudo works (sudo -v)."
      ;;
    npm*)
      echo "  check: the registry npm uses ($(npm config get registry 2>/dev/null || echo '?'); npm config get registry),"
      echo "  the network or its proxy (HTTPS_PROXY; npm config get https-proxy), and a proxy's CA"
      echo "  certificate (NODE_EXTRA_CA_CERTS=/path/ca.pem, or npm config set cafile /path/ca.pem)."
      ;;
    node*)
      echo "  check: node --version against \"engines\" in spec/interop/package.json."
      ;;
    "the tool check")
      echo "  check: dpkg -s PACKAGE for each package named above, and that its program is on PATH."
      ;;
    build*)
      echo "  check: the first compiler or cmake error above; for a clean build, rm -rf $build_dir."
      ;;
    image*)
      echo "  check: the message of deploy/image.sh or spec/image/smoke.sh above; that mmdebstrap and"
      echo "  buildah are installed (deploy/packages/test.txt) and run as root (or sudo works); the"
      echo "  apt sources mmdebstrap reads (the host's, or TG_IMAGE_MIRROR); the logs in"
      echo "  ${TG_IMAGE_DIR:-$build_dir/image}/ (mmdebstrap.log, smoke-*.log). TG_SKIP_IMAGE=1 counts it as skipped."
      ;;
    *) ;;
  esac
}

# Every way out of test and fuzz ends with the count line CI reads: a step that failed
# before the tests ran is one failed test. Also undoes the no-service-starts policy.
on_exit() {
  local rc=$?
  release_services
  if [ "$rc" -eq 0 ] || [ "$closed" -eq 1 ] || [ -z "$mode" ]; then
    return "$rc"
  fi
  printf '\ndev.sh %s: %s failed (exit %d)\n' "$mode" "${step:-set-up}" "$rc" >&2
  hint "$step" >&2
  if [ "$mode" != run ]; then
    echo
    echo "0 passed, 1 failed, 0 skipped"
  fi
  return "$rc"
}
trap on_exit EXIT

as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null; then
    # Without a terminal sudo cannot ask for a password: fail instead of hanging.
    if [ -t 0 ]; then sudo "$@"; else sudo -n "$@"; fi
  else
    die "not root and no sudo: cannot run $*"
  fi
}

installed() {
  dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

# The node version the interop clients declare ("engines" in spec/interop/package.json).
node_wanted() {
  sed -n 's/.*"node": *">= *\([0-9][0-9.]*\)".*/\1/p' spec/interop/package.json | head -n 1
}

node_ok() {
  command -v node >/dev/null &&
    node -e '
      const w = process.argv[1].split(".").map(Number);
      const h = process.versions.node.split(".").map(Number);
      for (let i = 0; i < 3; i++)
        if ((h[i] || 0) !== (w[i] || 0)) process.exit((h[i] || 0) > (w[i] || 0) ? 0 : 1);' \
      "$(node_wanted)" 2>/dev/null
}

# policy-rc.d is how Debian lets an installer say "start no service" (invoke-rc.d and
# deb-systemd-invoke ask it). dev.sh writes one only where there is none, and marks it so
# that a run killed half-way has its leftover removed by the next run.
policy_rcd=/usr/sbin/policy-rc.d
policy_mark="written by tollgate deploy/dev.sh"
own_policy_rcd=0
hold_services() {
  if [ -e "$policy_rcd" ] && ! grep -q "$policy_mark" "$policy_rcd" 2>/dev/null; then
    return 0 # the administrator's own policy
  fi
  as_root sh -c "printf '#!/bin/sh\n# %s: no service starts while it installs packages\nexit 101\n' \
    '$policy_mark' >'$policy_rcd' && chmod 755 '$policy_rcd'"
  own_policy_rcd=1
}
release_services() {
  if [ "$own_policy_rcd" -eq 1 ]; then
    own_policy_rcd=0
    as_root rm -f "$policy_rcd" || true
  fi
}

unit_enabled() {
  command -v systemctl >/dev/null && systemctl is-enabled --quiet "$1.service" 2>/dev/null
}

install_debian() {
  step="apt-get install"
  local want=("${packages[@]}") missing=() enabled_before=() p unit
  if [ "$want_node" -eq 0 ]; then
    : # dev.sh install: the named lists alone
  elif ! command -v node >/dev/null; then
    want+=(nodejs npm)
  elif ! command -v npm >/dev/null; then
    installed nodejs || die "node $(node --version) is installed but npm is not; install npm for it"
    want+=(npm)
  fi
  for p in "${want[@]}"; do
    installed "$p" || missing+=("$p")
  done
  if [ "${#missing[@]}" -eq 0 ]; then
    say "Debian packages: all ${#want[@]} present"
  else
    say "Debian packages missing: ${missing[*]}"
    for p in "${missing[@]}"; do
      unit="${service_of[$p]:-}"
      if [ -n "$unit" ] && unit_enabled "$unit"; then enabled_before+=("$unit"); fi
    done
    step="apt-get update"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
    step="apt-get install"
    hold_services
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
    release_services
    for p in "${missing[@]}"; do
      unit="${service_of[$p]:-}"
      [ -n "$unit" ] || continue
      [[ " ${enabled_before[*]} " == *" $unit "* ]] && continue
      if command -v systemctl >/dev/null; then
        # --now also stops it where a policy-rc.d of the administrator let it start.
        if [ -d /run/systemd/system ]; then
          as_root systemctl disable --now "$unit.service" >/dev/null 2>&1 || true
        else
          as_root systemctl disable "$unit.service" >/dev/null 2>&1 || true
        fi
      elif command -v update-rc.d >/dev/null; then
        as_root update-rc.d "$unit" disable >/dev/null 2>&1 || true
      fi
      say "$p: installed for its programs; its service is off (systemctl enable --now $unit to run it)"
    done
  fi
  [ "$want_node" -eq 1 ] || return 0
  step="node"
  node_ok || die "node $(node --version 2>/dev/null || echo '(none)') is older than the interop clients need (>= $(node_wanted), spec/interop/package.json)"
}

# Every program the suites run is there, or the install failed.
check_tools() {
  step="the tool check"
  local t missing=()
  for t in "${!tool_pkg[@]}"; do
    PATH="$PATH:/usr/sbin:/sbin" command -v "$t" >/dev/null || missing+=("$t (package ${tool_pkg[$t]})")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    die "installed, but not on PATH: ${missing[*]}"
  fi
  luajit -e 'require("socket")' 2>/dev/null || die "LuaSocket is missing for LuaJIT (package lua-socket)"
}

install_npm() {
  local dir major
  # The interop clients (@aws-sdk/cloudfront-signer above all) need Node 20 or later.
  step="node version"
  major="$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)"
  if [ "${major:-0}" -lt 20 ]; then
    die "node $(node --version 2>/dev/null) is older than 20, which the interop clients need; install Node 20 (e.g. from NodeSource: https://github.com/nodesource/distributions) and run this again"
  fi
  for dir in spec/*/; do
    [ -f "$dir/package.json" ] || continue
    step="npm ci in $dir"
    # npm ci only when node_modules is absent or older than the lock file. --engine-strict:
    # a package that does not support this node fails here, not later with a warning.
    if [ -f "$dir/package-lock.json" ]; then
      if [ ! -f "$dir/node_modules/.package-lock.json" ] ||
         [ "$dir/package-lock.json" -nt "$dir/node_modules/.package-lock.json" ]; then
        say "npm ci in $dir"
        (cd "$dir" && npm ci --engine-strict --no-audit --no-fund --loglevel=error)
      fi
    elif [ ! -d "$dir/node_modules" ]; then
      say "npm install in $dir (no package-lock.json)"
      (cd "$dir" && npm install --engine-strict --no-audit --no-fund --loglevel=error)
    fi
  done
}

build() {
  step="build"
  say "cmake ($build_type) into $build_dir"
  cmake -S "$root" -B "$build_dir" -DCMAKE_BUILD_TYPE="$build_type" >/dev/null
  cmake --build "$build_dir" -j "$jobs"
}

prepare() {
  install_debian
  install_npm
  build
}

# Listeners on PORT that a bind to 127.0.0.1:PORT collides with (127.0.0.1, the IPv4
# wildcard, and the dual-stack wildcard that ss shows as *), one ss line each.
port_holders() {
  command -v ss >/dev/null || return 0
  ss -ltnpH "sport = :$1" 2>/dev/null |
    awk '{ a = $4; sub(/:[0-9]+$/, "", a)
           if (a == "127.0.0.1" || a == "0.0.0.0" || a == "*" || a == "[::ffff:127.0.0.1]") print }'
}

# The first port above PORT that nothing listens on.
free_port_after() {
  local p=$(($1 + 1))
  while [ "$p" -lt 65535 ] && [ -n "$(port_holders "$p")" ]; do p=$((p + 1)); done
  echo "$p"
}

# check_port PORT WHAT VAR: 0 when PORT is free; else says who holds it and how to choose another.
check_port() {
  local port="$1" what="$2" var="$3" holders
  holders="$(port_holders "$port")"
  [ -n "$holders" ] || return 0
  {
    echo "dev.sh run: port $port, the demo's $what listener, is taken:"
    printf '    %s\n' "$holders"
    if [[ "$holders" != *users:* ]]; then
      echo "  (ss shows the process to root only: sudo ss -ltnp 'sport = :$port')"
    fi
    if [[ "$holders" == *'"prometheus"'* ]]; then
      echo "  That is a Prometheus service; stop it with: sudo systemctl disable --now prometheus"
    fi
    echo "  Stop that process, or run the demo on another port:"
    echo "    $var=$(free_port_after "$port") deploy/dev.sh run"
  } >&2
  return 1
}

# The demo configuration with other ports: a copy in .cache/demo/, two levels below the
# root like deploy/demo/, so its relative paths hold (files beside it are links).
demo_config_on() {
  local port="$1" admin_port="$2" src=deploy/demo/tollgate.lua dir=.cache/demo f
  mkdir -p "$dir"
  sed -e "/^ *listen = /s/port = [0-9]*/port = $port/" \
      -e "/^ *admin = /s/port = [0-9]*/port = $admin_port/" "$src" >"$dir/tollgate.lua"
  for f in admin.token keys rsl; do
    ln -sfn "../../deploy/demo/$f" "$dir/$f"
  done
  if ! grep -q "^ *listen = .*port = $port\b" "$dir/tollgate.lua" ||
     ! grep -q "^ *admin = .*port = $admin_port\b" "$dir/tollgate.lua"; then
    die "could not set the ports in a copy of $src (its listen and admin lines changed?)"
  fi
  echo "$dir/tollgate.lua"
}

cmd_run() {
  step="the demo's start"
  local config=deploy/demo/tollgate.lua token_file=deploy/demo/admin.token token
  local port admin_port base_port base_admin busy=0
  [ -f "$config" ] || die "missing $config"
  base_port="$(sed -n 's/^ *listen = .*port = \([0-9]*\).*/\1/p' "$config" | head -n 1)"
  base_admin="$(sed -n 's/^ *admin = .*port = \([0-9]*\).*/\1/p' "$config" | head -n 1)"
  port="${TG_DEMO_PORT:-${base_port:-8080}}"
  admin_port="${TG_DEMO_ADMIN_PORT:-${base_admin:-9090}}"
  for p in "$port" "$admin_port"; do
    if ! [[ "$p" =~ ^[0-9]+$ ]] || [ "$p" -lt 1 ] || [ "$p" -gt 65535 ]; then die "not a port: $p"; fi
  done
  [ "$port" != "$admin_port" ] || die "TG_DEMO_PORT and TG_DEMO_ADMIN_PORT are the same port ($port)"
  if [ ! -s "$token_file" ]; then
    # A checkout without the demo token gets a fresh one rather than no admin access.
    say "creating $token_file"
    (umask 077 && openssl rand -hex 24 > "$token_file")
  fi
  # git checks files out 0644: the demo's secrets become the owner's alone, as the gateway
  # wants of any secret file (else it warns at every start).
  chmod 600 "$token_file" deploy/demo/keys/* 2>/dev/null ||
    say "warning: could not chmod 600 $token_file and deploy/demo/keys/*"
  check_port "$port" public TG_DEMO_PORT || busy=1
  check_port "$admin_port" admin TG_DEMO_ADMIN_PORT || busy=1
  [ "$busy" -eq 0 ] || exit 1
  if [ "$port" != "$base_port" ] || [ "$admin_port" != "$base_admin" ]; then
    config="$(demo_config_on "$port" "$admin_port")"
  fi
  token="$(tr -d '[:space:]' < "$token_file")"
  cat <<EOF

tollgate demo: public http://127.0.0.1:$port, admin http://127.0.0.1:$admin_port ($config)

  # Discover what is on offer for a URI (Connect, JSON)
  curl -s -H 'Content-Type: application/json' -d '{"resources":[{"uri":"https://news.example/a"}]}' http://127.0.0.1:$port/ramp.v1.ExchangeService/DiscoverResources

  # Buy an offer's id with the demo's prepaid account (README: the whole purchase), see the balance
  #   POST /ramp.v1.ExchangeService/ExecuteTransaction
  #   {"aiSystem":{"billingReference":"acct-demo"},"idempotencyKey":"k1","items":[{"offerId":"<id>"}]}
  curl -s -H 'Authorization: Bearer $token' 'http://127.0.0.1:$admin_port/ledger/balance?account=acct-demo'

  # Liveness and readiness
  curl -s http://127.0.0.1:$port/healthz
  curl -s http://127.0.0.1:$port/readyz

  # Prometheus metrics on the admin listener (bearer token from $token_file)
  curl -s -H 'Authorization: Bearer $token' http://127.0.0.1:$admin_port/metrics

Logs are JSON lines on stdout. Ctrl-C stops the gateway.

EOF
  exec "$build_dir/tollgate" run -c "$config"
}

# Reads a ctest -V log and prints one line per test:
#   <name> <status> <passed> <failed> <skipped>
# where the counts come from the test's last "N passed, N failed[, N skipped]" line; a
# test that printed none counts as 1 passed or 1 failed by ctest's verdict. A test ctest
# skipped (SKIP_RETURN_CODE, DISABLED) is 1 skipped; one it could not run at all (a
# missing executable: ctest says "Not Run" too) is a failure, as ctest itself counts it.
summarize_ctest() {
  awk '
    /^[0-9]+: / {
      n = $1; sub(/:$/, "", n)
      line = $0; sub(/^[0-9]+: /, "", line)
      sub(/^[ \t]+/, "", line); sub(/[ \t\r]+$/, "", line)
      # The count line stands alone; one "word:" may precede it, ", N skipped" follow it.
      if (line ~ /^([A-Za-z0-9_.-]+: )?[0-9]+ passed, [0-9]+ failed(, [0-9]+ skipped)?$/) {
        s = line; sub(/^[^ ]+: /, "", s)
        k = split(s, num, /[^0-9]+/)
        passed[n] = num[1]; failed[n] = num[2]; skipped[n] = (k >= 3 && num[3] != "") ? num[3] : 0
        seen[n] = 1
      }
      next
    }
    /Test +#[0-9]+: / {
      s = $0; sub(/.*Test +#/, "", s)
      n = s; sub(/:.*/, "", n)
      rest = s; sub(/^[0-9]+: +/, "", rest)
      name = rest; sub(/ .*/, "", name)
      verdict = (rest ~ /\.\.\.+ +Passed/) ? "Passed" : "Failed"
      if (rest ~ /Timeout/) verdict = "Timeout"
      if (rest ~ /Not Run/) verdict = "NotRun"
      if (rest ~ /\*\*\*Skipped/ || rest ~ /Not Run \(Disabled\)/) verdict = "Skipped"
      names[n] = name; verdicts[n] = verdict; order[++count] = n
    }
    END {
      for (i = 1; i <= count; i++) {
        n = order[i]
        p = 0; f = 0; k = 0
        if (verdicts[n] == "Skipped") { print names[n], verdicts[n], 0, 0, 1; continue }
        if (seen[n]) { p = passed[n]; f = failed[n]; k = skipped[n] }
        else if (verdicts[n] == "Passed") p = 1
        if (verdicts[n] != "Passed" && f == 0) f = 1
        print names[n], verdicts[n], p, f, k
      }
    }' "$1"
}

# Echoes "passed failed skipped" on the last line of stdout.
run_fuzzers() {
  local srcs=() targets=() src name bin log passed=0 failed=0
  shopt -s nullglob
  srcs=(spec/fuzz/*_fuzz.c)
  shopt -u nullglob
  if [ "${#srcs[@]}" -eq 0 ]; then
    say "fuzz: no targets"
    echo "0 0 0"
    return
  fi
  if [ "$fuzz_seconds" = 0 ]; then
    say "fuzz: ${#srcs[@]} targets skipped (TG_FUZZ_SECONDS=0)"
    echo "0 0 ${#srcs[@]}"
    return
  fi
  for src in "${srcs[@]}"; do
    targets+=("$(basename "$src" .c)")
  done
  say "fuzz: building ${targets[*]} with clang into $fuzz_dir"
  mkdir -p "$fuzz_dir"
  if ! cmake -S "$root" -B "$fuzz_dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_C_COMPILER=clang \
         -DTG_FUZZ=ON -DTG_SANITIZE=ON >"$fuzz_dir/configure.log" 2>&1 ||
     ! cmake --build "$fuzz_dir" -j "$jobs" --target "${targets[@]}" >"$fuzz_dir/build.log" 2>&1; then
    tail -n 40 "$fuzz_dir/configure.log" "$fuzz_dir/build.log" >&2 2>/dev/null || true
    say "fuzz: build failed"
    echo "0 ${#targets[@]} 0"
    return
  fi
  mkdir -p "$fuzz_dir/artifacts"
  for name in "${targets[@]}"; do
    bin="$fuzz_dir/$name"
    log="$fuzz_dir/$name.log"
    local corpus="$fuzz_dir/corpus/$name" seeds=()
    mkdir -p "$corpus"
    # New inputs go to the scratch corpus; the repository's seeds are only read.
    [ -d "spec/fuzz/corpus/$name" ] && seeds=("spec/fuzz/corpus/$name")
    local dict=()
    [ -f "spec/fuzz/$name.dict" ] && dict=(-dict="spec/fuzz/$name.dict")
    if "$bin" "${dict[@]}" -max_total_time="$fuzz_seconds" -timeout=10 -rss_limit_mb=2048 \
         -artifact_prefix="$fuzz_dir/artifacts/$name-" -print_final_stats=1 \
         "$corpus" "${seeds[@]}" >"$log" 2>&1; then
      printf '  fuzz.%s: 1 passed, 0 failed, 0 skipped (%s runs, %s)\n' "$name" \
        "$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -Eo '[0-9]+$')" \
        "$(grep -Eo 'DONE +cov: [0-9]+ ft: [0-9]+' "$log" | tail -n 1 | sed 's/DONE *//')" >&2
      passed=$((passed + 1))
    else
      printf '  fuzz.%s: 0 passed, 1 failed, 0 skipped; log %s:\n' "$name" "$log" >&2
      tail -n 40 "$log" >&2
      failed=$((failed + 1))
    fi
  done
  echo "$passed $failed 0"
}

# run_ctest DIR LABEL: runs every test registered in DIR, prints the results by suite
# (names prefixed with LABEL) and echoes "passed failed skipped" on the last line of stdout.
run_ctest() {
  local dir="$1" label="$2" log="$1/ctest.log" status=0 tp=0 tf=0 ts=0 name verdict p f k
  say "ctest in $dir"
  # Each test's output streams as it runs (ctest -V prefixes it with the test's number).
  set +e
  ctest --test-dir "$dir" -V -j "${TG_CTEST_JOBS:-1}" --no-tests=error >"$log" 2>&1
  status=$?
  set -e
  cat "$log" >&2
  {
    echo
    echo "Results by suite${label:+ ($label)}:"
    while read -r name verdict p f k; do
      printf '  %-32s %5s passed, %s failed, %s skipped  (%s)\n' "$label$name" "$p" "$f" "$k" "$verdict"
      tp=$((tp + p)); tf=$((tf + f)); ts=$((ts + k))
    done < <(summarize_ctest "$log")
    if [ "$status" -ne 0 ] && [ "$tf" -eq 0 ]; then
      # ctest itself failed (no tests, or a test it could not start).
      echo "  ctest exited $status"
      tf=$((tf + 1))
    fi
  } >&2
  echo "$tp $tf $ts"
}

# The same tests again on a clang build with AddressSanitizer and UBSan: the
# suites that drive the binary then drive a sanitized one, which must also exit
# 0 on SIGTERM (a leak or a memory error fails them). TG_SKIP_ASAN=1 skips it,
# counted as one skipped.
asan_dir="${TG_ASAN_BUILD_DIR:-$root/build-asan}"
run_asan() {
  if [ "${TG_SKIP_ASAN:-0}" = 1 ]; then
    say "asan: skipped (TG_SKIP_ASAN=1)"
    echo "0 0 1"
    return
  fi
  say "asan: building with clang into $asan_dir"
  mkdir -p "$asan_dir"
  if ! cmake -S "$root" -B "$asan_dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_C_COMPILER=clang \
         -DTG_SANITIZE=ON >"$asan_dir/configure.log" 2>&1 ||
     ! cmake --build "$asan_dir" -j "$jobs" >"$asan_dir/build.log" 2>&1; then
    tail -n 40 "$asan_dir/configure.log" "$asan_dir/build.log" >&2 2>/dev/null || true
    say "asan: build failed"
    echo "0 1 0"
    return
  fi
  TG_SANITIZED=1 ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0}" \
    run_ctest "$asan_dir" "asan."
}

# The container image (deploy/image.sh: mmdebstrap + buildah, no daemon), then its smoke
# test (spec/image/smoke.sh: the gateway run from the image's unpacked filesystem with
# chroot, e2e smoke specs against it). image.sh makes its own Release build of the binary
# (TG_IMAGE_BUILD_DIR, default build-release: about a minute); TG_IMAGE_BIN=PATH takes that
# binary instead. It needs root (or sudo) and never skips for want of a tool: it fails with
# a hint; TG_SKIP_IMAGE=1 counts it as one skipped.
run_image() {
  local work="${TG_IMAGE_DIR:-$build_dir/image}" archive="$build_dir/tollgate-image.tar"
  local t0 counts p f k env=()
  if [ "${TG_SKIP_IMAGE:-0}" = 1 ]; then
    say "image: skipped (TG_SKIP_IMAGE=1)"
    echo "0 0 1"
    return
  fi
  t0=$(date +%s)
  say "image: deploy/image.sh into $archive (work folder $work)"
  mkdir -p "$work"
  env=(TG_IMAGE_DIR="$work" TG_IMAGE_OUT="$archive")
  [ -z "${TG_IMAGE_BUILD_DIR:-}" ] || env+=(TG_IMAGE_BUILD_DIR="$TG_IMAGE_BUILD_DIR")
  [ -z "${TG_IMAGE_BIN:-}" ] || env+=(TG_IMAGE_BIN="$TG_IMAGE_BIN")
  [ -z "${TG_IMAGE_MIRROR:-}" ] || env+=(TG_IMAGE_MIRROR="$TG_IMAGE_MIRROR")
  if ! as_root env "${env[@]}" bash deploy/image.sh >&2; then
    say "image: deploy/image.sh failed"
    hint image >&2
    echo "0 1 0"
    return
  fi
  counts="$(as_root bash spec/image/smoke.sh "$archive" "$work" | tail -n 1)"
  read -r p _ f _ k _ <<<"${counts//,/}"
  if ! [[ "${p:-}" =~ ^[0-9]+$ && "${f:-}" =~ ^[0-9]+$ && "${k:-}" =~ ^[0-9]+$ ]]; then
    p=0 f=1 k=0
  fi
  printf '  image: %s passed, %s failed, %s skipped (%s s)\n' "$p" "$f" "$k" "$(($(date +%s) - t0))" >&2
  [ "$f" -eq 0 ] || hint image >&2
  echo "$p $f $k"
}

# add_counts "p f s": adds one part's counts to the totals.
total_p=0 total_f=0 total_s=0
add_counts() {
  local p f s
  read -r p f s <<<"$1"
  total_p=$((total_p + ${p:-0})); total_f=$((total_f + ${f:-1})); total_s=$((total_s + ${s:-0}))
}

close_counts() {
  closed=1
  echo
  echo "$total_p passed, $total_f failed, $total_s skipped"
  [ "$total_f" -eq 0 ]
}

cmd_test() {
  step="ctest"
  mkdir -p "$build_dir"
  add_counts "$(run_ctest "$build_dir" "" | tail -n 1)"
  step="asan"
  add_counts "$(run_asan | tail -n 1)"
  step="fuzz"
  add_counts "$(run_fuzzers | tail -n 1)"
  step="image"
  add_counts "$(run_image | tail -n 1)"
  close_counts
}

[ $# -ge 1 ] || usage
case "$1" in
  run) mode="run"; prepare; cmd_run ;;
  test)
    mode="test"
    install_debian
    check_tools
    install_npm
    build
    cmd_test ;;
  fuzz)
    # Long fuzz runs, apart from the tests: deploy/dev.sh fuzz 600
    mode="fuzz"
    install_debian
    fuzz_seconds="${2:-300}"
    step="fuzz"
    add_counts "$(run_fuzzers | tail -n 1)"
    close_counts ;;
  install)
    # Only the named lists, e.g. deploy/dev.sh install runtime (deploy/Dockerfile).
    [ $# -ge 2 ] || usage
    shift
    packages=() want_node=0
    for list in "$@"; do
      [ -f "deploy/packages/$list.txt" ] || die "no package list deploy/packages/$list.txt"
      mapfile -t -O "${#packages[@]}" packages < <(pkg_list "$list")
    done
    install_debian ;;
  -h|--help|help) usage ;;
  *) usage ;;
esac
