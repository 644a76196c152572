#!/usr/bin/env bash
# A two-node SLURM cluster on this one machine, for tests and for trying slurm/train.sbatch:
# munged, slurmctld and two slurmd (`slurmd -N node1`, `slurmd -N node2`) on their own ports,
# all on 127.0.0.1, partition `debug` (default). Idempotent and non-interactive:
#
#   bash slurm/local_cluster.sh          # install (apt) if needed, configure, start, wait for idle nodes
#   bash slurm/local_cluster.sh stop     # stop the daemons this script started (by their pid files)
#
# When it cannot set a cluster up (not root, no apt-get, a foreign /etc/slurm/slurm.conf, a daemon that
# does not start) it says why and exits 0, so `tests/run.sh` goes on and the SLURM tests skip.
# A second call while the cluster runs returns at once. State, logs and pid files live in
# $DISTSFT_SLURM_STATE (default /var/spool/distsft-slurm); the config is /etc/slurm/slurm.conf
# (where every SLURM command looks), marked as ours so that a real cluster's config is never touched.
set -uo pipefail

STATE=${DISTSFT_SLURM_STATE:-/var/spool/distsft-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by distsft slurm/local_cluster.sh"
NODES=(node1 node2)

say() { echo "local_cluster: $*"; }
give_up() { say "$* (SLURM tests will skip)"; exit 0; }

alive() {  # the pid in file $1 (.../slurmd-node1.pid, munged.pid, ...) is that daemon, running
  local pid name
  [ -s "$1" ] || return 1
  pid=$(cat "$1")
  name=$(basename "$1" .pid)
  kill -0 "$pid" 2>/dev/null && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "${name%%-*}" ]
}

all_alive() {
  alive "$STATE/munged.pid" && alive "$STATE/slurmctld.pid" || return 1
  for n in "${NODES[@]}"; do alive "$STATE/slurmd-$n.pid" || return 1; done
}

nodes_up() {  # both nodes known to slurmctld and usable (idle, or busy with jobs)
  local states
  states=$(timeout 5 sinfo -h -N -o '%N %t' 2>/dev/null) || return 1
  for n in "${NODES[@]}"; do
    grep -Eq "^$n (idle|alloc|mix|comp)\$" <<<"$states" || return 1
  done
}

stop_daemons() {  # by the pid files this cluster's daemons wrote; waits until they are gone
  local f pid
  for f in "$@"; do
    alive "$f" || continue
    pid=$(cat "$f")
    kill "$pid" && say "stopped $(basename "$f" .pid) ($pid)"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  done
}

# The config: one host, two nodes on distinct slurmd ports, no cgroups (proctrack/linuxproc,
# task/none). cred_expire=10: a requeued job may start again after 11 s instead of 121 s.
# Every SLURM command reads /etc/slurm/slurm.conf, so the test suite needs no SLURM_CONF.
config() {
  local host cpus
  host=$(hostname -s)
  cpus=$(nproc)
  cat <<EOF
$MARK
# A one-host test cluster: slurmctld and two slurmd (node1, node2) on 127.0.0.1.
ClusterName=distsft
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=6817
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool-%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
# look at pending jobs (a requeued one waits for its begin time) every few seconds, not every minute
SchedulerParameters=sched_interval=3,bf_interval=3
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# the nodes share this machine's cores: take the configured CPUs as they are
SlurmdParameters=config_overrides
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
# keep finished jobs visible to scontrol/squeue for an hour (no accounting database here)
MinJobAge=3600
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
KillWait=30
NodeName=node1 NodeHostname=$host NodeAddr=127.0.0.1 Port=17001 CPUs=$cpus State=UNKNOWN
NodeName=node2 NodeHostname=$host NodeAddr=127.0.0.1 Port=17002 CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
}

if [ "${1:-}" = stop ]; then
  stop_daemons "$STATE"/slurmd-*.pid "$STATE/slurmctld.pid" "$STATE/munged.pid"
  exit 0
fi

# Fast path: everything already runs (a second call returns in milliseconds).
if [ "$(config)" = "$(cat "$CONF" 2>/dev/null)" ] && all_alive && nodes_up; then
  say "running (sinfo: $(sinfo -h -o '%P %D %t' | tr '\n' ' '))"
  exit 0
fi

[ "$(id -u)" = 0 ] || give_up "not root: cannot install or start SLURM daemons here"
if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
  give_up "$CONF exists and was not written by this script: leaving that cluster alone"
fi

# 1. Packages (Debian's slurm-wlm: slurmctld, slurmd, client commands; munge for authentication).
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
   || ! command -v munged >/dev/null; then
  command -v apt-get >/dev/null || give_up "slurm-wlm/munge missing and no apt-get to install them"
  say "installing slurm-wlm and munge (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurm-wlm munge; } \
    > "/tmp/distsft-slurm-apt.log" 2>&1 || give_up "apt-get install failed, see /tmp/distsft-slurm-apt.log"
fi

# 2. Config (rewritten only when it differs; running daemons then restart with it).
mkdir -p "$STATE/ctld" "$STATE/spool-node1" "$STATE/spool-node2" /etc/slurm
config > "$CONF.new"
changed=0
if ! cmp -s "$CONF.new" "$CONF"; then mv "$CONF.new" "$CONF"; changed=1; else rm -f "$CONF.new"; fi
[ "$changed" = 1 ] && stop_daemons "$STATE"/slurmd-*.pid "$STATE/slurmctld.pid"  # restart with the new config

# 3. Daemons. munged runs as its own user, as packaged.
if ! alive "$STATE/munged.pid"; then
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
  [ -s /etc/munge/munge.key ] || { mungekey --create 2>/dev/null || create-munge-key -f; } >/dev/null 2>&1
  chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
  rm -f /run/munge/munged.pid
  runuser -u munge -- munged || give_up "munged did not start"
  for _ in $(seq 50); do [ -s /run/munge/munged.pid ] && break; sleep 0.1; done
  cp /run/munge/munged.pid "$STATE/munged.pid" 2>/dev/null || give_up "munged wrote no pid file"
fi
munge -n | unmunge >/dev/null 2>&1 || give_up "munge does not work (munge -n | unmunge failed)"

if ! alive "$STATE/slurmctld.pid"; then
  slurmctld || give_up "slurmctld did not start, see $STATE/slurmctld.log"
fi
for _ in $(seq 100); do timeout 2 scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
for n in "${NODES[@]}"; do
  if ! alive "$STATE/slurmd-$n.pid"; then
    slurmd -N "$n" || give_up "slurmd -N $n did not start, see $STATE/slurmd-$n.log"
  fi
done

# 4. Wait until both nodes are idle (a node that was down when its slurmd died comes back here).
for i in $(seq 150); do
  nodes_up && break
  if [ "$i" = 25 ]; then scontrol update NodeName=node[1-2] State=RESUME >/dev/null 2>&1 || true; fi
  sleep 0.2
done
nodes_up || give_up "nodes did not become idle: $(sinfo -N 2>&1 | tr '\n' ';'), see $STATE/*.log"
say "started (sinfo: $(sinfo -h -o '%P %D %t' | tr '\n' ' '))"
