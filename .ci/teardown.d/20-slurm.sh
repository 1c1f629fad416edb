#!/usr/bin/env bash
# Stop what .ci/setup.d/20-slurm.sh started, by the PIDs it recorded, whatever happened before.
cd "$(dirname "$0")/../.."
pids=.ci/pids
scancel --full --quiet -u "$(id -un)" 2>/dev/null || true  # jobs a failed test left
for name in slurmd slurmctld munged; do
    file="$pids/$name.pid"
    [ -s "$file" ] || continue
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    fi
    rm -f "$file"
done
exit 0
