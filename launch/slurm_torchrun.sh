#!/bin/bash
# Shared body of launch/train_*.slurm: start one torchrun per node with srun; requeue on SLURM's warning signal.
#   launch/slurm_torchrun.sh STAGE [run.py arguments...]
set -euo pipefail
stage=${1:?usage: slurm_torchrun.sh prior|dvae [args...]}
shift
: "${SLURM_JOB_ID:?run this under sbatch (launch/train_prior.slurm / train_dvae.slurm)}"

if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
gpus=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-$(( gpus > 0 ? gpus : 1 ))}}
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${MASTER_PORT:-29500}

# NCCL on GPU clusters (uncomment and adapt to the fabric):
# export NCCL_SOCKET_IFNAME=^lo,docker   # interfaces for bootstrap traffic
# export NCCL_IB_HCA=mlx5                # InfiniBand adapters for the inter-node all-reduce
# export NCCL_DEBUG=WARN                 # INFO to debug hangs and topology detection
# export TORCH_NCCL_ASYNC_ERROR_HANDLING=1   # a failed collective aborts the job instead of hanging
# export TORCH_NCCL_BLOCKING_WAIT=0
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# SLURM sends USR1 (--signal=B:USR1@180) before the time limit or preemption: requeue the job; the next
# allocation resumes from the latest complete checkpoint.
trap 'echo "[slurm] USR1: requeueing job $SLURM_JOB_ID"; scontrol requeue "$SLURM_JOB_ID"' USR1

echo "[slurm] job $SLURM_JOB_ID: $SLURM_JOB_NUM_NODES node(s) × $NPROC_PER_NODE process(es), rendezvous $HEAD:$PORT"
srun --kill-on-bad-exit=1 --ntasks-per-node=1 "$PYTHON" -m torch.distributed.run \
  --nnodes "$SLURM_JOB_NUM_NODES" --nproc-per-node "$NPROC_PER_NODE" \
  --rdzv-id "$SLURM_JOB_ID" --rdzv-backend c10d --rdzv-endpoint "$HEAD:$PORT" \
  launch/run.py --stage "$stage" "$@" &
wait $!
