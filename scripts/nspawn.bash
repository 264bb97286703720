# Shared by scripts/systemd-e2e and scripts/test-deb (sourced, not run): boot a Debian root
# under systemd-nspawn without a host systemd, run commands in it, record checks, and the checks
# both make of an installed edge-llm service. The caller sets machine_root, machine, work (a
# scratch directory) and edge_llm (the command inside), defines say and die, and calls
# `trap finish EXIT` before boot.
# shellcheck shell=bash disable=SC2154  # machine_root, machine, work, edge_llm: the caller's
nspawn_pid='' init_pid='' results=() failed=0 clients=()

host_tools() {
  local missing=()
  command -v systemd-nspawn >/dev/null || missing+=(systemd-container)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  command -v unshare >/dev/null || die "unshare (util-linux) is needed"
  command -v nsenter >/dev/null || die "nsenter (util-linux) is needed"
  ((${#missing[@]})) || return 0
  say "installing ${missing[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
}

# Run a command inside the booted container, as root, with a clean environment.
inside() {
  nsenter -t "$init_pid" -a env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/root LANG=C.UTF-8 "$@"
}

boot() {
  say "booting the container (console: $work/nspawn.log)"
  mkdir -p /run/systemd/nspawn
  # Without a host systemd: --register=no --keep-unit. nspawn also needs a writable
  # /run/systemd/nspawn/propagate: a private tmpfs in a mount namespace of its own.
  # shellcheck disable=SC2016  # $1 and $2 are for sh
  unshare -m --propagation private sh -c 'mount -t tmpfs tmpfs /run/systemd/nspawn &&
    exec systemd-nspawn -D "$1" -M "$2" -b --register=no --keep-unit --console=passive' \
    sh "$machine_root" "$machine" >"$work/nspawn.log" 2>&1 &
  nspawn_pid=$!
  local i
  for ((i = 0; i < 60; i++)); do
    init_pid=$(pgrep -P "$nspawn_pid" -x systemd | head -1 || true)
    [[ -n $init_pid ]] && break
    kill -0 "$nspawn_pid" 2>/dev/null || { cat "$work/nspawn.log" >&2; die "systemd-nspawn failed"; }
    sleep 0.5
  done
  [[ -n $init_pid ]] || die "no systemd in the container after 30 s; see $work/nspawn.log"
  # Poll (systemctl cannot connect until systemd inside listens). An enabled edge-llm from an
  # earlier run is part of the boot: it ends once the model is loaded.
  for ((i = 0; i < 600; i++)); do
    state=$(inside systemctl is-system-running 2>/dev/null || true)
    [[ $state == @(running|degraded|stopping) ]] && break
    sleep 0.5
  done
  say "container booted: $state"
  [[ $state == @(running|degraded) ]] || die "the container did not boot ($state); see $work/nspawn.log"
  [[ $state == running ]] || inside systemctl --failed --no-legend >&2 || true
}

power_off() {
  local c i
  for c in "${clients[@]}"; do kill "$c" 2>/dev/null || true; done
  [[ -n $nspawn_pid ]] && kill -0 "$nspawn_pid" 2>/dev/null || return 0
  say "powering the container off"
  [[ -n $init_pid ]] && inside systemctl poweroff >/dev/null 2>&1 || kill "$nspawn_pid" 2>/dev/null || true
  for ((i = 0; i < 120; i++)); do
    kill -0 "$nspawn_pid" 2>/dev/null || return 0
    sleep 0.5
  done
  say "the container did not power off in 60 s: killing systemd-nspawn ($nspawn_pid)"
  kill -KILL "$nspawn_pid" 2>/dev/null || true
}

finish() {
  local code=$?
  trap - EXIT INT TERM
  power_off
  if ((${#results[@]})); then
    printf '\n== summary ==\n'
    printf '%s\n' "${results[@]}"
  fi
  ((failed == 0 && code == 0)) || { say "kept for a look: $work"; exit $((code ? code : 1)); }
  rm -rf "$work"
}

# Run check function $2 (description $1); record and print PASS or FAIL with what it printed.
# Not in a subshell: a check may set variables for later ones (marks, client pids).
check() {
  local what=$1 detail
  shift
  say "check: $what"
  if "$@" >"$work/detail" 2>&1; then results+=("PASS  $what")
  else results+=("FAIL  $what"); failed=$((failed + 1))
  fi
  detail=$(<"$work/detail")
  [[ -z $detail ]] || results[-1]+=$'\n      '"${detail//$'\n'/$'\n      '}"
  printf '%s\n' "${results[-1]}"
}

prop() { inside systemctl show -p "$1" --value edge-llm; }

# Seconds between two of the unit's *TimestampMonotonic properties.
between() {
  local a b
  a=$(prop "$1TimestampMonotonic") b=$(prop "$2TimestampMonotonic")
  awk -v a="$a" -v b="$b" 'BEGIN { printf "%.1f", (b - a) / 1e6 }'
}

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# Journal of the unit since epoch second $1 (the container's clock is the host's).
journal() { inside journalctl -u edge-llm --no-pager --since "@$1" "${@:2}"; }

check_active() {
  local active status
  active=$(inside systemctl is-active edge-llm || true)
  status=$(prop StatusText)
  echo "is-active: $active; exec to READY=1 $(between ExecMainStart ActiveEnter) s"
  echo "status: $status"
  [[ $active == active && $status == *serving* ]]
}

# The CPU variant was self-tested in child processes under the unit's sandbox, and the verdicts
# were kept in CacheDirectory= (a restart then runs no test).
check_cpu_selftest() {
  local lines
  lines=$(inside journalctl -u edge-llm --no-pager -o cat | grep -E 'cpu backend|self-test' || true)
  printf '%s\n' "$lines" | tail -n 4 | cut -c1-160
  inside test -s /var/cache/edge-llm/cpu-variants.json ||
    { echo "no verdicts in /var/cache/edge-llm/cpu-variants.json"; return 1; }
  grep -q 'passed a self-test' <<<"$lines"
}

check_generate() {
  local out rc=0
  # shellcheck disable=SC2034  # systemd-e2e's journal check starts here
  mark_generate=$(inside date +%s)
  out=$(inside timeout 120 "$edge_llm" generate "Say hi" --max-tokens 16 </dev/null) || rc=$?
  echo "exit $rc, answer: $(printf '%s' "$out" | tr '\n' ' ' | cut -c1-80)"
  [[ $rc == 0 && -n ${out//[[:space:]]/} ]]
}

# Sessions live in StateDirectory= (/var/lib/edge-llm): a turn is there after a restart.
check_session_restart() {
  local err id shown
  err=$(printf 'Hi\n' | inside timeout 120 "$edge_llm" chat --max-tokens 8 --temperature 0 \
    2>&1 >/dev/null) || { echo "chat failed: $err"; return 1; }
  id=$(grep -oE 'session [0-9a-f]{32}' <<<"$err" | head -1 | cut -d' ' -f2)
  [[ -n $id ]] || { echo "no session id in: $err"; return 1; }
  inside systemctl restart edge-llm
  shown=$(inside "$edge_llm" sessions show "$id") || { echo "not found after restart"; return 1; }
  echo "session $id after a restart: $(tr '\n' ' ' <<<"$shown" | cut -c1-80)"
  echo "state directory: $(inside ls /var/lib/edge-llm | tr '\n' ' ')"
  grep -q '^\[user\] Hi' <<<"$shown" && grep -q '^\[assistant\] ' <<<"$shown"
}

check_security() {
  local out level
  out=$(inside systemd-analyze security --no-pager edge-llm 2>&1 || true)
  level=$(grep -oE 'Overall exposure level for edge-llm.service: [0-9.]+' <<<"$out" | grep -oE '[0-9.]+$' || true)
  [[ -n $level ]] || { echo "no overall exposure level in: $(tail -1 <<<"$out")"; return 1; }
  echo "overall exposure $level"
  awk -v l="$level" 'BEGIN { exit !(l <= 2.0) }'
}

