#!/usr/bin/env bash
# Sends N requests to URL and prints how many each pod answered, with bars.
# Usage: scripts/distribution.sh URL [N]
# Works against anything that answers like the backend: the local demo, or
# the load balancer on kind (make distribution URL=http://localhost:8080/).
set -euo pipefail

url=${1:?usage: scripts/distribution.sh URL [N]}
n=${2:-100}
command -v curl >/dev/null || { echo "distribution: curl is needed; install it (apt-get install curl)" >&2; exit 1; }
[[ $n =~ ^[1-9][0-9]*$ ]] || { echo "distribution: N must be a positive number, not '$n'" >&2; exit 1; }

echo "Sending $n requests to $url"
for ((i = 0; i < n; i++)); do
  # One connection per request: each one is balanced on its own.
  curl -s --max-time 5 "$url" | grep -o '"podName":"[^"]*"' | cut -d'"' -f4 || echo "(failed)"
done | sort | uniq -c | awk -v n="$n" '
  { count[$2] = $1; order[++pods] = $2 }
  END {
    printf "\n  %-32s %8s %7s\n", "pod", "requests", "share"
    for (i = 1; i <= pods; i++) {
      pod = order[i]; bar = ""
      for (j = 0; j < int(count[pod] * 40 / n + 0.5); j++) bar = bar "#"
      printf "  %-32s %8d %6.1f%%  %s\n", pod, count[pod], 100 * count[pod] / n, bar
    }
    printf "\n"
  }'
