#!/usr/bin/env bash
# CPU time per heartbeat written, by PostgreSQL and by warden, during one
# `warden bench ingest` run (group commit only). Throughput on a shared
# 2-core machine moves 10-20 % between runs with the machine's speed; the
# CPU a heartbeat costs moves far less, so compare builds or schema
# changes by it, runs alternated (A B B A).
#
#   scripts/ingest-cpu.sh --batch 100
#   WARDEN=/tmp/warden-old scripts/ingest-cpu.sh --batch 100 --metrics 2
#
# Arguments go to `warden bench ingest`. Uses (drops and creates) the
# database warden_bench on the PostgreSQL at 127.0.0.1:5432 (user
# postgres); WARDEN is the binary (default: a release build of this
# checkout). Counts every process named postgres* or warden* on the
# machine, sampled every 0.2 s, so run it on an otherwise idle one.
set -euo pipefail
cd "$(dirname "$0")/.."

DB=warden_bench
PSQL=(psql -h 127.0.0.1 -U postgres -qAt)
if [ -z "${WARDEN:-}" ]; then
    cargo build --release --quiet
    WARDEN=target/release/warden
fi
export PGOPTIONS="-c client_min_messages=warning"
"${PSQL[@]}" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB"
export WARDEN__DATABASE__URL="postgres://postgres@127.0.0.1:5432/$DB"
"$WARDEN" migrate >/dev/null

samples=$(mktemp)
output=$(mktemp)
trap 'rm -f "$samples" "$output"' EXIT

# One line per process per sample: pid, postgres|warden, user+system ticks.
sample() {
    for stat in /proc/[0-9]*/stat; do
        read -r line <"$stat" 2>/dev/null || continue
        comm=${line#*(}
        comm=${comm%%)*}
        case $comm in
            postgres*) group=postgres ;;
            warden*) group=warden ;;
            *) continue ;;
        esac
        rest=${line##*) }
        # Fields after the command: state is the 1st, utime the 12th, stime the 13th.
        set -- $rest
        echo "${stat//[^0-9]/} $group $((${12} + ${13}))"
    done
}

sample | sed 's/^/base /' >"$samples"
"$WARDEN" bench ingest --skip-naive "$@" >"$output" 2>&1 &
bench=$!
while kill -0 "$bench" 2>/dev/null; do
    sample | sed 's/^/run /' >>"$samples"
    sleep 0.2
done
wait "$bench"
grep -v '^\s*$' "$output" | grep -v WARN

rows=$("${PSQL[@]}" -d "$DB" -c "SELECT count(*) FROM warden.agent_heartbeats")
awk -v rows="$rows" -v hz="$(getconf CLK_TCK)" '
    $1 == "base" { base[$2] = $4 }
    $1 == "run" { group[$2] = $3; last[$2] = $4 }
    END {
        for (pid in last) used[group[pid]] += last[pid] - base[pid]
        printf "heartbeat rows written: %d\n", rows
        for (g in used) printf "%-8s CPU per heartbeat row: %.2f us\n", g, used[g] / hz / rows * 1e6
    }' "$samples"
