# Sourced by the stage scripts. The allocation (#SBATCH lines in each script) is the ONE place where
# node / GPU / CPU counts live: everything below derives from Slurm's environment.
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "${BASH_SOURCE[0]}")/..}"
# shellcheck disable=SC1091
[ -f .venv/bin/activate ] && source .venv/bin/activate
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}      # compute nodes rarely see the internet
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
export NCCL_ASYNC_ERROR_HANDLING=1
NNODES=${SLURM_NNODES:?run with sbatch}
GPUS_PER_NODE=${SLURM_NTASKS_PER_NODE:?set --ntasks-per-node (one task per GPU)}
WORKERS=$(( ${SLURM_CPUS_PER_TASK:-4} > 2 ? ${SLURM_CPUS_PER_TASK:-4} - 2 : 1 ))
# Global batch and learning rate under DDP are set by the config, never by the allocation: with
# optim.ddp_rule: keep_global_batch (both stage configs and configs/reference/) the configured
# data.batch_size (or optim.global_batch_size) is the GLOBAL batch and is split over the
# NNODES x GPUS_PER_NODE ranks at the same lr and the same number of steps (32 on 8 GPUs = 4 per GPU).
# optim.ddp_rule: scale_lr keeps the per-GPU batch and scales the lr linearly instead. The rule, the
# resulting global batch and the learning rates are printed when fit starts.
# Lightning's SLURMEnvironment catches SIGUSR1 (sent 90 s before the time limit by --signal), saves
# <default_root_dir>/hpc_ckpt_N.ckpt and requeues the job; the requeued job resumes from it.
launch() {  # launch <config> [extra CLI args...]
  local config=$1; shift
  srun --kill-on-bad-exit=1 python -m patchalign fit --config "$config" \
    --trainer.num_nodes "$NNODES" --trainer.devices "$GPUS_PER_NODE" --trainer.strategy ddp \
    --data.init_args.num_workers "$WORKERS" "$@"
}
