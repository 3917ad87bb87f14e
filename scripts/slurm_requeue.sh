#!/usr/bin/env bash
# Run fdfast-train (plain or under torchrun) in a SLURM batch job and requeue the job when it was preempted.
#
#   #SBATCH --signal=B:USR1@120        # SIGUSR1 to this batch shell 120 s before the time limit
#   #SBATCH --requeue
#   #SBATCH --open-mode=append         # the requeued job appends to the same log
#   scripts/slurm_requeue.sh runs/fd \
#       torchrun --nproc_per_node 8 --shutdown-timeout 110 -m fdfast.cli.train -c clip_vit_base_300ep \
#       --set train.output_dir=runs/fd
#
# Usage: slurm_requeue.sh OUTPUT_DIR COMMAND [ARGS...]
# SIGUSR1 or SIGTERM reaching this script is passed to COMMAND as SIGTERM (torchrun passes SIGTERM on to its
# workers and kills them --shutdown-timeout seconds later: leave time for a checkpoint). fdfast-train then
# writes a checkpoint and "status": "preempted" in OUTPUT_DIR/summary.json and exits 4; torchrun exits 1
# either way. When COMMAND failed and summary.json, written during this attempt, says preempted, the job is
# requeued with `scontrol requeue $SLURM_JOB_ID` and the script exits 0 (the requeued job resumes from the
# checkpoint); otherwise it exits with COMMAND's status.
set -u
if [ $# -lt 2 ]; then
    echo "usage: $0 OUTPUT_DIR COMMAND [ARGS...]" >&2
    exit 2
fi
out=$1
shift
stamp=$(mktemp)  # this attempt's start: a preempted record older than this is a previous attempt's
trap 'rm -f "$stamp"' EXIT
"$@" &
child=$!
trap 'kill -TERM "$child" 2>/dev/null' USR1 TERM
wait "$child"
rc=$?
while [ "$rc" -gt 128 ] && kill -0 "$child" 2>/dev/null; do  # a trapped signal ends `wait` early
    wait "$child"
    rc=$?
done
summary="$out/summary.json"
if [ "$rc" -ne 0 ] && [ -n "$(find "$summary" -newer "$stamp" 2>/dev/null)" ] \
        && grep -q '"status": "preempted"' "$summary"; then
    echo "$0: $1 exited $rc and $summary says preempted: requeueing SLURM job ${SLURM_JOB_ID:?not in a SLURM job}" >&2
    scontrol requeue "$SLURM_JOB_ID"
    exit $?
fi
exit "$rc"
