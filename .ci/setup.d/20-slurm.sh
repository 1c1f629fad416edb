#!/usr/bin/env bash
# A real single-node SLURM on localhost for tests/test_cluster_slurm.py, tests/test_workflows.py and
# tests/test_resume.py: Debian's slurm-wlm and munge, a slurm.conf for this host (cores and memory from
# `slurmd -C`), munged + slurmctld + slurmd started and their PIDs recorded in .ci/pids/ for
# .ci/teardown.d/20-slurm.sh. Idempotent: daemons that already answer are left running.
# The config goes to /etc/slurm/slurm.conf, where the SLURM commands look without SLURM_CONF.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$(pwd)
state_dir=${WSI_GRUNET_SLURM_DIR:-/var/lib/wsi-grunet-slurm}
pids="$repo/.ci/pids"
mkdir -p "$pids" && echo '*' >"$pids/.gitignore"

if ! dpkg -s slurm-wlm munge >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends slurm-wlm munge
fi

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# munge: the key comes with the package; the daemon runs as the munge user
mkdir -p /run/munge && chown munge:munge /run/munge && chmod 0755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
fi
pgrep -u munge -x munged | head -n1 >"$pids/munged.pid"

mkdir -p "$state_dir"/{state,spool,log} /etc/slurm
host=$(hostname -s)
node=$(slurmd -C | head -n1)
cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$node")
memory=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
memory=$((memory * 9 / 10))  # leave room for the driver and the system
grep -q "[[:space:]]$host\b" /etc/hosts || echo "127.0.0.1 $host" >>/etc/hosts
conf=/etc/slurm/slurm.conf
sed -e "s|@HOST@|$host|g" -e "s|@DIR@|$state_dir|g" -e "s|@CPUS@|$cpus|g" -e "s|@MEMORY@|$memory|g" \
    "$repo/.ci/slurm/slurm.conf.in" >"$conf.new"
if ! cmp -s "$conf.new" "$conf"; then
    mv "$conf.new" "$conf"
    changed=1
else
    rm "$conf.new"
    changed=0
fi

if [ "$changed" = 1 ] && alive "$state_dir/slurmctld.pid"; then
    scontrol reconfigure || true
fi
alive "$state_dir/slurmctld.pid" || slurmctld -f "$conf"
alive "$state_dir/slurmd.pid" || slurmd -f "$conf"
for _ in $(seq 30); do alive "$state_dir/slurmctld.pid" && alive "$state_dir/slurmd.pid" && break; sleep 0.5; done
cp "$state_dir/slurmctld.pid" "$pids/slurmctld.pid"
cp "$state_dir/slurmd.pid" "$pids/slurmd.pid"

# a node left down by an earlier run comes back
for _ in $(seq 60); do
    s=$(sinfo -h -N -o '%t' 2>/dev/null | head -n1 || true)
    case "$s" in
        idle|mix|alloc) break ;;
        down*|drain*) scontrol update nodename="$host" state=resume || true ;;
    esac
    sleep 0.5
done
sinfo
s=$(sinfo -h -N -o '%t' | head -n1)
case "$s" in idle|mix|alloc) echo "SLURM up: node $host ($cpus CPUs, $memory MB) $s" ;;
    *) echo "SLURM node $host is $s, not idle; see $state_dir/log/" >&2; exit 1 ;; esac
