#!/bin/bash
# The Slurm recipe, tested for real: bring up a single-node Slurm from Debian's
# packages (slurm-wlm 22.05, munge) on this machine, submit the shipped
# deploy/slurm/dbnps.sbatch unmodified, check that it completes, that its
# output has the job's summary and that `psctl list` / `psctl status` find
# the run where psctl looks by default; then tear Slurm down.
#
#   sudo bench/slurm_check.sh                  # as root (the issue's case)
#   sudo bench/slurm_check.sh --user dbnpsck   # also as that (created) user
#   sudo bench/slurm_check.sh --keep           # leave Slurm running afterwards
#
# Everything Slurm and munge write lives in $DBNPS_SLURM_DIR (default
# /tmp/dbnps-slurm-check): a private slurm.conf (passed by $SLURM_CONF, so
# /etc/slurm is not touched), a private munge socket, state, spool and logs.
# There is no systemd in these containers, so the daemons are started here by
# hand and stopped by their pid files.  Run it again: it stops what a previous
# run left and starts from a clean state.  Exit status 0 only if every check
# passed; the output is what bench/results/slurm-single-node.txt records.
#
# Environment: DBNPS_CHECK_CONFIG (configs/small.toml with 60 fine-tuning epochs), DBNPS_CHECK_NTASKS (3:
# one server + 2 workers, more tasks than the 2 CPUs here, so the script's
# --overcommit is exercised), DBNPS_CHECK_TIMEOUT_S (600), DBNPS_CHECK_VENV (the
# venv the job runs from: this checkout's .venv), DBNPS_CHECK_SBATCH (the batch
# script: deploy/slurm/dbnps.sbatch; another one shows that the checks can fail).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
W=${DBNPS_SLURM_DIR:-/tmp/dbnps-slurm-check}
if [[ -n ${DBNPS_CHECK_CONFIG:-} ]]; then
  CONFIG=$DBNPS_CHECK_CONFIG
else
  # configs/small.toml with 60 fine-tuning epochs instead of 8: on a quiet machine
  # the shipped one trains for ~2 s, and the job ended between the two status
  # checks below (seen: --run answered, --address was refused a moment later).
  CONFIG=/tmp/dbnps-slurm-check-config.toml
  sed 's/^epochs = 8.0$/epochs = 60.0/' "$REPO/configs/small.toml" >"$CONFIG"
  grep -q '^epochs = 60.0$' "$CONFIG" || { echo "small.toml changed shape" >&2; exit 2; }
  chmod 644 "$CONFIG"
fi
NTASKS=${DBNPS_CHECK_NTASKS:-3}
TIMEOUT_S=${DBNPS_CHECK_TIMEOUT_S:-600}
VENV=${DBNPS_CHECK_VENV:-$REPO/.venv}
PSCTL=$VENV/bin/psctl
SBATCH=$(realpath "${DBNPS_CHECK_SBATCH:-$REPO/deploy/slurm/dbnps.sbatch}")
KEEP=0
USERS=(root)
while (($#)); do
  case $1 in
    --keep) KEEP=1 ;;
    --user)
      [[ $# -ge 2 ]] || { echo "error: --user needs a name" >&2; exit 2; }
      USERS+=("$2")
      shift
      ;;
    *) echo "error: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
  shift
done
[[ $(id -u) == 0 ]] || { echo "error: run as root (it installs packages and starts daemons)" >&2; exit 2; }
[[ -x $PSCTL ]] || { echo "error: no $PSCTL; run \`make install\` first" >&2; exit 2; }
CONFIG=$(realpath "$CONFIG")

say() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*"; }
fail() { say "FAIL: $*"; exit 1; }

# -- packages -------------------------------------------------------------------
PKGS=(slurmctld slurmd slurm-client munge)
installed=$(dpkg-query -W -f='${Status}\n' "${PKGS[@]}" 2>/dev/null | grep -c "^install ok installed$" || true)
if ((installed != ${#PKGS[@]})); then
  say "installing ${PKGS[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${PKGS[@]}" >/dev/null
fi
say "$(slurmctld -V), $(munged -V 2>&1 | head -n 1)"

# -- daemons ----------------------------------------------------------------------
# Each daemon writes its pid file; stop_daemons() ends exactly those processes.
stop_daemons() {
  local name pid
  for name in slurmd slurmctld munge/munged; do
    [[ -f $W/$name.pid ]] || continue
    pid=$(cat "$W/$name.pid")
    if kill "$pid" 2>/dev/null; then
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$W/$name.pid"
  done
}
stop_daemons # what a previous run left
rm -rf "$W"
mkdir -p "$W"/{state,spool,munge,log}
chmod 0755 "$W"
chown munge:munge "$W/munge"
chmod 0755 "$W/munge" # munged wants the socket directory searchable by all
HOST=$(hostname -s)
CPUS=$(nproc)
export SLURM_CONF=$W/slurm.conf
# proctrack/linuxproc and task/none: no cgroup delegation in a container.
# SlurmUser root: slurmctld needs no account of its own for a check.
cat >"$SLURM_CONF" <<EOF
ClusterName=dbnps-check
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$W/munge/munge.socket
SlurmctldPort=${DBNPS_SLURMCTLD_PORT:-6817}
SlurmdPort=${DBNPS_SLURMD_PORT:-6818}
StateSaveLocation=$W/state
SlurmdSpoolDir=$W/spool
SlurmctldPidFile=$W/slurmctld.pid
SlurmdPidFile=$W/slurmd.pid
SlurmctldLogFile=$W/log/slurmctld.log
SlurmdLogFile=$W/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
MinJobAge=3600
NodeName=$HOST CPUs=$CPUS State=UNKNOWN
PartitionName=check Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
trap 'rc=$?; ((KEEP)) || { stop_daemons; say "Slurm stopped"; }; exit $rc' EXIT

runuser -u munge -- munged --socket="$W/munge/munge.socket" --pid-file="$W/munge/munged.pid" \
  --log-file="$W/munge/munged.log" --seed-file="$W/munge/munged.seed" --key-file=/etc/munge/munge.key
munge -S "$W/munge/munge.socket" -n | unmunge -S "$W/munge/munge.socket" >/dev/null ||
  fail "munge does not round-trip a credential"
slurmctld
slurmd
for _ in $(seq 100); do
  state=$(sinfo -h -n "$HOST" -o %t 2>/dev/null || true)
  [[ $state == idle ]] && break
  sleep 0.2
done
[[ $state == idle ]] || { tail -n 20 "$W"/log/*.log; fail "node $HOST is '$state', not idle"; }
say "Slurm up: $(sinfo -h -o '%P %D node(s) %t %c CPUs %N')"

# -- one submission -----------------------------------------------------------------
# check_as USER: sbatch the shipped script from a directory USER owns, psctl's
# state in that user's default place (XDG_STATE_HOME under the work dir, so no
# real home is touched), and check what Slurm, the job's output and psctl say.
check_as() {
  local user=$1 home
  if [[ $user == root ]]; then
    home=$W/home-root
    mkdir -p "$home"
  else
    id "$user" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$user"
    home=$W/home-$user
    install -d -o "$user" -g "$user" "$home"
    # The job runs the venv's interpreter as this user: a venv made from a Python
    # under a private home (pyenv in /root, mode 700) cannot start for anyone else.
    runuser -u "$user" -- "$VENV/bin/python" -c pass 2>/dev/null ||
      fail "[$user] cannot run $VENV/bin/python (a parent directory is private?); give a venv $user can execute with DBNPS_CHECK_VENV"
  fi
  local -a as=(env)
  [[ $user == root ]] || as=(runuser -u "$user" -- env)
  as+=(-u DBNPS_STATE_DIR HOME="$home" XDG_STATE_HOME="$home/state" SLURM_CONF="$SLURM_CONF")
  # The submit directory is the user's; the venv and configs are the repository's
  # (on a cluster: a filesystem every node sees).
  local out jobid
  out=$(cd "$home" && "${as[@]}" DBNPS_VENV="$VENV" DBNPS_CONFIG="$CONFIG" \
    sbatch --parsable --ntasks="$NTASKS" "$SBATCH")
  jobid=${out%%;*}
  say "[$user] submitted: DBNPS_VENV=$VENV DBNPS_CONFIG=$CONFIG sbatch --ntasks=$NTASKS ${SBATCH#"$REPO"/} -> job $jobid"
  local psctl=("${as[@]}" "$PSCTL")
  local job=slurm-$jobid state="" seen_running=0
  local deadline=$((SECONDS + TIMEOUT_S))
  while ((SECONDS < deadline)); do
    state=$(squeue -h -j "$jobid" -o %T 2>/dev/null || true)
    [[ -z $state ]] && state=$(scontrol show job "$jobid" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | cut -d= -f2)
    case $state in COMPLETED | FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY) break ;; esac
    # While it runs: psctl finds the run by its id, and reaches the control plane
    # by the node's name as the script's header says (bound to all interfaces).
    # Kept: the first answer that shows training (1: only "starting" so far).
    if ((seen_running < 2)) && [[ $state == RUNNING ]] &&
      "${psctl[@]}" status --run "$job" >"$W/status.tmp" 2>&1; then
      mv "$W/status.tmp" "$W/status-$jobid.txt"
      seen_running=1
      if ! grep -q "^job $job  starting" "$W/status-$jobid.txt" &&
        "${psctl[@]}" status --address "$HOST:50051" >"$W/status-address-$jobid.txt" 2>&1; then
        seen_running=2
      fi
    fi
    sleep 0.5
  done
  if ((seen_running)); then
    say "[$user] while RUNNING, psctl status --run $job:"
    sed 's/^/    /' "$W/status-$jobid.txt"
  fi
  if ((seen_running == 2)); then
    say "[$user] while RUNNING, psctl status --address $HOST:50051 (first line): $(head -n 1 "$W/status-address-$jobid.txt")"
  fi
  local log=$home/dbnps-$jobid.log
  say "[$user] job $jobid: $(scontrol show job "$jobid" | grep -o 'JobState=[A-Z_]* Reason=[^ ]*\|ExitCode=[0-9:]*\|RunTime=[^ ]*\|NumCPUs=[0-9]*\|NumTasks=[0-9]*\|OverSubscribe=[A-Z]*' | tr '\n' ' ')"
  say "[$user] its output, $log:"
  sed 's/^/    /' "$log"
  [[ $state == COMPLETED ]] || fail "[$user] job $jobid ended $state"
  scontrol show job "$jobid" | grep -q 'ExitCode=0:0' || fail "[$user] job $jobid exit code is not 0:0"
  grep -q "final test accuracy" "$log" || fail "[$user] no final test accuracy in $log"
  grep -Eq "prterun has detected|Traceback" "$log" && fail "[$user] launcher error or traceback in $log"
  ((seen_running == 2)) || fail "[$user] psctl status (--run, --address) never saw the job training"
  [[ $(stat -c %U "$log") == "$user" ]] || fail "[$user] $log is not owned by $user"

  say "[$user] psctl list (state dir: the user's default, \$XDG_STATE_HOME/dbnps):"
  "${psctl[@]}" list | sed 's/^/    /'
  "${psctl[@]}" list --json >"$W/list-$jobid.json"
  "$VENV/bin/python" - "$W/list-$jobid.json" "$job" <<'EOF' || fail "[$user] psctl list does not show $job as exited 0"
import json, sys
rows = {r["job_id"]: r for r in json.load(open(sys.argv[1]))}
row = rows.get(sys.argv[2])
sys.exit(0 if row and row["state"] == "exited 0" and row["latest"] else 1)
EOF
  local st rc=0
  st=$("${psctl[@]}" status 2>&1) || rc=$?
  say "[$user] psctl status after the end (rc $rc): $st"
  [[ $rc != 0 && $st == "error: job $job is not running: exited with status 0"* ]] ||
    fail "[$user] psctl status after the end does not report $job exited 0"
  # The summary and model are in the run directory psctl reports.
  local run_dir
  run_dir=$("$VENV/bin/python" -c 'import json,sys; print([r["run_dir"] for r in json.load(open(sys.argv[1])) if r["job_id"]==sys.argv[2]][0])' "$W/list-$jobid.json" "$job")
  [[ -s $run_dir/summary.json && -s $run_dir/model.npz ]] || fail "[$user] no summary.json/model.npz in $run_dir"
  [[ $(stat -c %U "$run_dir/token") == "$user" ]] || fail "[$user] $run_dir/token is not $user's"
  say "[$user] PASS: job $jobid COMPLETED exit 0, run $run_dir"
}

for u in "${USERS[@]}"; do
  check_as "$u"
done
say "all checks passed (${USERS[*]})"
