#!/usr/bin/env bash
# The two set-up commands of the README, for a Debian bookworm machine:
#   deploy/dev.sh run    install what is missing, build, start the demo gateway
#   deploy/dev.sh test   install what is missing, build, run every suite
# Works as root, or as a user with sudo (only apt-get runs under sudo).
# Environment: TG_BUILD_DIR (default build), TG_BUILD_TYPE (default RelWithDebInfo),
# TG_CTEST_JOBS (default 1), TG_FUZZ_SECONDS (default 20; 0 skips the fuzzers).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

build_dir="${TG_BUILD_DIR:-build}"
build_type="${TG_BUILD_TYPE:-RelWithDebInfo}"
fuzz_dir="${TG_FUZZ_BUILD_DIR:-build-fuzz}"
fuzz_seconds="${TG_FUZZ_SECONDS:-20}"
jobs="$(nproc 2>/dev/null || echo 2)"

packages=(
  build-essential cmake pkg-config clang libclang-rt-14-dev
  libluajit2-5.1-dev luajit2 libuv1-dev node-llhttp libmbedtls-dev
  libprotobuf-c-dev protobuf-c-compiler protobuf-compiler
  libhiredis-dev libjansson-dev libexpat1-dev zlib1g-dev libsecp256k1-dev
  lua-busted lua-socket redis-server wrk nginx-light libnginx-mod-http-lua prometheus
  openssl curl ca-certificates
)

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'dev.sh: %s\n' "$*" >&2; exit 1; }

usage() {
  cat >&2 <<'EOF'
usage: deploy/dev.sh run    install, build, start the gateway on deploy/demo/tollgate.lua
       deploy/dev.sh test   install, build, run every test suite
       deploy/dev.sh fuzz [SECONDS]   only the fuzzers, SECONDS each (default 300)
EOF
  exit 2
}

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

node_ok() {
  command -v node >/dev/null &&
    node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 18 ? 0 : 1)' 2>/dev/null
}

install_debian() {
  local want=("${packages[@]}") missing=() p
  # A node >= 18 that is already there (e.g. from another repository) is kept.
  if ! node_ok; then
    want+=(nodejs npm)
  elif ! command -v npm >/dev/null; then
    die "node $(node --version) is installed but npm is not; install npm for it"
  elif ! node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)'; then
    say "warning: node $(node --version): the interop clients (connect-node 2.1) declare node >= 20"
  fi
  for p in "${want[@]}"; do
    installed "$p" || missing+=("$p")
  done
  if [ "${#missing[@]}" -eq 0 ]; then
    say "Debian packages: all ${#want[@]} present"
    return
  fi
  say "Debian packages missing: ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
}

install_npm() {
  local dir
  for dir in spec/*/; do
    [ -f "$dir/package.json" ] || continue
    # npm ci only when node_modules is absent or older than the lock file.
    if [ -f "$dir/package-lock.json" ]; then
      if [ ! -f "$dir/node_modules/.package-lock.json" ] ||
         [ "$dir/package-lock.json" -nt "$dir/node_modules/.package-lock.json" ]; then
        say "npm ci in $dir"
        (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
      fi
    elif [ ! -d "$dir/node_modules" ]; then
      say "npm install in $dir (no package-lock.json)"
      (cd "$dir" && npm install --no-audit --no-fund --loglevel=error)
    fi
  done
}

build() {
  say "cmake ($build_type) into $build_dir"
  cmake -S "$root" -B "$build_dir" -DCMAKE_BUILD_TYPE="$build_type" >/dev/null || return 1
  cmake --build "$build_dir" -j "$jobs" || return 1
}

prepare() {
  install_debian
  install_npm
  build
}

cmd_run() {
  local config=deploy/demo/tollgate.lua token_file=deploy/demo/admin.token token
  [ -f "$config" ] || die "missing $config"
  if [ ! -s "$token_file" ]; then
    # A checkout without the demo token gets a fresh one rather than no admin access.
    say "creating $token_file"
    (umask 077 && openssl rand -hex 24 > "$token_file")
  fi
  token="$(tr -d '[:space:]' < "$token_file")"
  cat <<EOF

tollgate demo: public http://127.0.0.1:8080, admin http://127.0.0.1:9090

  # Discover what is on offer for a URI (Connect, JSON)
  curl -s -H 'Content-Type: application/json' -d '{"resources":[{"uri":"https://news.example/a"}]}' http://127.0.0.1:8080/ramp.v1.ExchangeService/DiscoverResources

  # Liveness and readiness
  curl -s http://127.0.0.1:8080/healthz
  curl -s http://127.0.0.1:8080/readyz

  # Prometheus metrics on the admin listener (bearer token from $token_file)
  curl -s -H 'Authorization: Bearer $token' http://127.0.0.1:9090/metrics

Logs are JSON lines on stdout. Ctrl-C stops the gateway.

EOF
  exec "$build_dir/tollgate" run -c "$config"
}

# Reads a ctest -V log and prints one line per test:
#   <name> <status> <passed> <failed>
# where passed/failed come from the test's last "N passed, N failed" line; a test
# that printed none counts as 1 passed or 1 failed by ctest's verdict.
summarize_ctest() {
  awk '
    /^[0-9]+: / {
      n = $1; sub(/:$/, "", n)
      line = $0; sub(/^[0-9]+: /, "", line)
      sub(/^[ \t]+/, "", line); sub(/[ \t\r]+$/, "", line)
      # The count line stands alone; one "word:" may precede it, ", N skipped" follow it.
      if (line ~ /^([A-Za-z0-9_.-]+: )?[0-9]+ passed, [0-9]+ failed(, [0-9]+ skipped)?$/) {
        s = line; sub(/^[^ ]+: /, "", s)
        split(s, num, /[^0-9]+/)
        passed[n] = num[1]; failed[n] = num[2]; seen[n] = 1
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
      names[n] = name; verdicts[n] = verdict; order[++count] = n
    }
    END {
      for (i = 1; i <= count; i++) {
        n = order[i]
        p = 0; f = 0
        if (seen[n]) { p = passed[n]; f = failed[n] }
        else if (verdicts[n] == "Passed") p = 1
        if (verdicts[n] != "Passed" && f == 0) f = 1
        print names[n], verdicts[n], p, f
      }
    }' "$1"
}

run_fuzzers() {
  local srcs=() targets=() src name bin log passed=0 failed=0
  shopt -s nullglob
  srcs=(spec/fuzz/*_fuzz.c)
  shopt -u nullglob
  if [ "${#srcs[@]}" -eq 0 ] || [ "$fuzz_seconds" = 0 ]; then
    say "fuzz: no targets to run"
    echo "0 0"
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
    echo "0 ${#targets[@]}"
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
      printf '  fuzz.%s: 1 passed, 0 failed (%s runs, %s)\n' "$name" \
        "$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -Eo '[0-9]+$')" \
        "$(grep -Eo 'DONE +cov: [0-9]+ ft: [0-9]+' "$log" | tail -n 1 | sed 's/DONE *//')" >&2
      passed=$((passed + 1))
    else
      printf '  fuzz.%s: 0 passed, 1 failed; log %s:\n' "$name" "$log" >&2
      tail -n 40 "$log" >&2
      failed=$((failed + 1))
    fi
  done
  echo "$passed $failed"
}

# run_ctest DIR LABEL: runs every test registered in DIR, prints the results by suite
# (names prefixed with LABEL) and echoes "passed failed" on the last line of stdout.
run_ctest() {
  local dir="$1" label="$2" log="$1/ctest.log" status=0 tp=0 tf=0 name verdict p f
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
    while read -r name verdict p f; do
      printf '  %-32s %5s passed, %s failed  (%s)\n' "$label$name" "$p" "$f" "$verdict"
      tp=$((tp + p)); tf=$((tf + f))
    done < <(summarize_ctest "$log")
    if [ "$status" -ne 0 ] && [ "$tf" -eq 0 ]; then
      # ctest itself failed (no tests, or a test it could not start).
      echo "  ctest exited $status"
      tf=$((tf + 1))
    fi
  } >&2
  echo "$tp $tf"
}

# The same tests again on a clang build with AddressSanitizer and UBSan: the
# suites that drive the binary then drive a sanitized one, which must also exit
# 0 on SIGTERM (a leak or a memory error fails them). TG_SKIP_ASAN=1 skips it.
asan_dir="${TG_ASAN_BUILD_DIR:-$root/build-asan}"
run_asan() {
  if [ "${TG_SKIP_ASAN:-0}" = 1 ]; then
    say "asan: skipped (TG_SKIP_ASAN=1)"
    echo "0 0"
    return
  fi
  say "asan: building with clang into $asan_dir"
  mkdir -p "$asan_dir"
  if ! cmake -S "$root" -B "$asan_dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_C_COMPILER=clang \
         -DTG_SANITIZE=ON >"$asan_dir/configure.log" 2>&1 ||
     ! cmake --build "$asan_dir" -j "$jobs" >"$asan_dir/build.log" 2>&1; then
    tail -n 40 "$asan_dir/configure.log" "$asan_dir/build.log" >&2 2>/dev/null || true
    say "asan: build failed"
    echo "0 1"
    return
  fi
  TG_SANITIZED=1 ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0}" \
    run_ctest "$asan_dir" "asan."
}

cmd_test() {
  local total_p=0 total_f=0 r fz
  mkdir -p "$build_dir"
  r="$(run_ctest "$build_dir" "" | tail -n 1)"
  total_p=$((total_p + ${r% *})); total_f=$((total_f + ${r#* }))

  r="$(run_asan | tail -n 1)"
  total_p=$((total_p + ${r% *})); total_f=$((total_f + ${r#* }))

  fz="$(run_fuzzers)"
  total_p=$((total_p + ${fz% *})); total_f=$((total_f + ${fz#* }))

  echo
  echo "$total_p passed, $total_f failed"
  [ "$total_f" -eq 0 ]
}

[ $# -ge 1 ] || usage
case "$1" in
  run) prepare; cmd_run ;;
  test)
    install_debian
    install_npm
    # A build that breaks is one failed test, so CI's closing line still counts it.
    build || { echo; echo "build failed"; echo "0 passed, 1 failed"; exit 1; }
    cmd_test ;;
  fuzz)
    # Long fuzz runs, apart from the tests: deploy/dev.sh fuzz 600
    install_debian
    fuzz_seconds="${2:-300}"
    fz="$(run_fuzzers)"
    echo
    echo "${fz% *} passed, ${fz#* } failed"
    [ "${fz#* }" -eq 0 ] ;;
  -h|--help|help) usage ;;
  *) usage ;;
esac
