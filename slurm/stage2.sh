#!/bin/bash
# Stage 2 on a Slurm GPU cluster:   sbatch slurm/stage2.sh [extra LightningCLI overrides]
# Change the allocation here only; the trainer's num_nodes/devices are read from it. The global
# batch stays the config's (see optim.ddp_rule in slurm/common.sh); the released recipe:
#   CONFIG=configs/reference/stage2.yaml sbatch slurm/stage2.sh
#SBATCH --job-name=patchalign-stage2
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=SIGUSR1@90
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
source "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}/slurm/common.sh"
launch "${CONFIG:-configs/stage2.yaml}" "$@"
