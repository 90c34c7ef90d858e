# Shared by the sbatch templates: derive the launch environment from a SLURM allocation.
# Inputs (SLURM): SLURM_JOB_NODELIST, SLURM_JOB_NUM_NODES, SLURM_JOB_ID; optional GPUS_PER_NODE (default 8).
# Outputs: HOSTFILE (DeepSpeed hostfile "<host> slots=<gpus>"), MASTER_ADDR, MASTER_PORT, NNODES, GPUS_PER_NODE.
set -euo pipefail
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${SLURM_JOB_NUM_NODES:?run inside a SLURM allocation (sbatch/salloc)}
mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
if [ "${#HOSTS[@]}" -ne "$NNODES" ]; then
  echo "error: SLURM_JOB_NODELIST expands to ${#HOSTS[@]} hosts but SLURM_JOB_NUM_NODES=$NNODES" >&2
  exit 2
fi
RUN_DIR=${RUN_DIR:-runs/slurm-${SLURM_JOB_ID:-local}}
mkdir -p "$RUN_DIR"
HOSTFILE="$RUN_DIR/hostfile"
: > "$HOSTFILE"
for host in "${HOSTS[@]}"; do
  echo "$host slots=$GPUS_PER_NODE" >> "$HOSTFILE"
done
export MASTER_ADDR="${HOSTS[0]}"
export MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
# NCCL on A100 InfiniBand clusters; adjust the interface names to the cluster.
export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^lo,docker0}
export NCCL_ASYNC_ERROR_HANDLING=1
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
# Preemption and time limits: the templates ask SLURM for USR1 two minutes before the end
# (#SBATCH --signal=B:USR1@120, to this batch shell) and to requeue the job (#SBATCH --requeue). The trap
# turns the signal into "$RUN_DIR/STOP"; every training rank sees it after its current optimizer step,
# the run writes a checkpoint and exits with status 99 after writing "$RUN_DIR/preempted.json"; the job is
# then requeued and its next run resumes (--resume auto) from that checkpoint.
run_with_requeue() {
  echo "$*"
  if [ "${DRY_RUN:-0}" = 1 ]; then exit 0; fi
  rm -f "$RUN_DIR/STOP" "$RUN_DIR/preempted.json"
  trap 'touch "$RUN_DIR/STOP"' USR1 TERM
  "$@" &
  local child=$! status=0
  while true; do  # wait returns early when a trapped signal arrives: wait again until the run exits
    wait "$child" && status=0 || status=$?
    kill -0 "$child" 2>/dev/null || break
  done
  if [ -f "$RUN_DIR/preempted.json" ] && [ -n "${SLURM_JOB_ID:-}" ]; then
    echo "preempted ($(cat "$RUN_DIR/preempted.json")): requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID" || echo "warning: scontrol requeue $SLURM_JOB_ID failed (already requeued or cancelled?); resubmit to resume" >&2
    exit 0
  fi
  exit "$status"
}
