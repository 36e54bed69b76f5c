# Sourced by the demo scripts: start processes in the background, wait for
# them to be ready, and stop every one of them (by PID) when the script ends,
# also on Ctrl-C. Set `name` (for messages) before sourcing.

logs=$(mktemp -d)
pids=()
stop_all() {
  if ((${#pids[@]})); then
    kill -TERM "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
  fi
}
trap stop_all EXIT
trap 'echo; echo "$name: interrupted"; exit 130' INT TERM

# Waits (at most 10 s) until URL answers 200; shows the log if PID died.
wait_ready() {
  local url=$1 pid=$2 log=$3
  for _ in $(seq 100); do
    curl -sf -o /dev/null "$url" && return 0
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "$name: a process exited early; its output ($log):" >&2
      cat "$log" >&2
      exit 1
    fi
    sleep 0.1
  done
  echo "$name: $url did not become ready within 10 s; see $log" >&2
  exit 1
}
