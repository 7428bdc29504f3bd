#!/usr/bin/env bash
# Runs two simulator binaries on the standard scenarios and says, per scenario, whether
# their JSON reports are byte-identical. For refactors that must not change behaviour:
#
#   cargo build --release -p sim && cp target/release/sim /tmp/sim-before
#   # ... change the code ...
#   cargo build --release -p sim && sim/scripts/compare.sh /tmp/sim-before target/release/sim
#
# IGNORE=field,field leaves out top-level numeric fields that one side adds (a new
# report field). Exit status 1 if any scenario differs.
set -euo pipefail
a=$1
b=$2
strip() {
  local out
  out=$(cat)
  IFS=',' read -ra fields <<<"${IGNORE:-}"
  for f in "${fields[@]}"; do
    out=$(sed -E "s/,\"$f\":[0-9.eE+-]+//" <<<"$out")
  done
  printf '%s' "$out"
}
status=0
while read -r args; do
  # shellcheck disable=SC2086
  x=$("$a" $args --json | strip | sha256sum)
  # shellcheck disable=SC2086
  y=$("$b" $args --json | strip | sha256sum)
  if [[ "$x" == "$y" ]]; then echo "same       $args"; else echo "DIFFERENT  $args"; status=1; fi
done <<'SCENARIOS'
--seed 1 --duration-ms 3000
--seed 2 --duration-ms 3000 --mode optimistic
--seed 3 --duration-ms 3000 --loss 0.05 --duplicate 0.05 --reorder 0.1
--seed 4 --duration-ms 4000 --partition 1000..2500
--seed 5 --duration-ms 4000 --crash 2@1000 --restart 2@2000
--seed 6 --duration-ms 3000 --clock-skew-ms 200 --clock-step 1@1500:3000
--seed 7 --duration-ms 3000 --nodes 20 --clients 50
--seed 8 --duration-ms 3000 --strategy log --window-ms 2000
--seed 9 --duration-ms 3000 --strategy token
--seed 10 --duration-ms 3000 --strategy fixed --burst-clients 20 --burst-fresh --limit 10 --window-ms 60000
--seed 11 --duration-ms 2000 --nodes 10 --clients 1000 --limit 100 --rate 1.0
SCENARIOS
exit $status
