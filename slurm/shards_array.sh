#!/bin/bash
# Build training shards on a Slurm cluster: the per-object stages as an array job (one chunk of the
# object list per task), then one dependent job for the global stages (text bank + shard writing).
#
# Usage (from the repository root):
#   MESHES=/data/objaverse_glbs WORK=/scratch/$USER/shards_work OUT=/data/shards/objaverse \
#   NUM_CHUNKS=64 bash slurm/shards_array.sh submit
#
#   FIND3D=/data/find3d/labeled ... bash slurm/shards_array.sh submit   # Find3D data-engine output
#
# Environment:
#   MESHES | FIND3D   object source (a mesh directory, or a Find3D data root)
#   WORK              work directory with the per-object caches (shared filesystem)
#   OUT               output directory of the shard sets (OUT/<split>/, OUT/text_bank.safetensors)
#   NUM_CHUNKS        array size (default 64); each task takes a contiguous 1/NUM_CHUNKS of the objects
#   EXTRA_ARGS        more engine flags, e.g. "--n-views 10 --image-size 512 --teacher dinov2:/models/dinov2-base"
#                     (python -m patchalign shards build --help lists them)
#   PYTHON            interpreter (default: .venv/bin/python if present, else python)
#
# Every stage is resumable (finished objects are skipped; files are written atomically), so a
# preempted/requeued or resubmitted task just continues. Objects that fail (unreadable mesh, ...)
# are logged to WORK/failures.jsonl and skipped; they do not fail the task. A teacher or text encoder
# that cannot be loaded fails the task at once, before any object is processed.
#
#SBATCH --job-name=pa-shards
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=48G
#SBATCH --time=08:00:00
#SBATCH --requeue
#SBATCH --output=slurm-%x-%A_%a.out

set -euo pipefail

MODE="${1:-${SHARDS_MODE:-array}}"
: "${WORK:?set WORK to the work directory}"
: "${OUT:?set OUT to the output directory}"
NUM_CHUNKS="${NUM_CHUNKS:-64}"
EXTRA_ARGS="${EXTRA_ARGS:-}"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
ENGINE=("$PYTHON" -m patchalign shards)
THREADS="${SLURM_CPUS_PER_TASK:-8}"

case "$MODE" in
submit)
    # 1. The object list, once (tasks read it instead of each listing the source).
    if [[ -n "${MESHES:-}" ]]; then
        "${ENGINE[@]}" index --meshes "$MESHES" --work "$WORK"
    elif [[ -n "${FIND3D:-}" ]]; then
        "${ENGINE[@]}" index --find3d "$FIND3D" --work "$WORK"
    else
        echo "set MESHES or FIND3D" >&2
        exit 2
    fi
    # 2. Per-object stages, one chunk per array task.
    array_id=$(sbatch --parsable --array="0-$((NUM_CHUNKS - 1))" \
        --export=ALL,SHARDS_MODE=array,NUM_CHUNKS="$NUM_CHUNKS" "$0")
    # 3. Text bank + shards once every chunk is done (afterok: a crashed task blocks it; resubmit).
    final_id=$(sbatch --parsable --dependency="afterok:${array_id}" --job-name=pa-shards-final \
        --export=ALL,SHARDS_MODE=finalize "$0")
    echo "submitted array ${array_id} (${NUM_CHUNKS} tasks) and finalize ${final_id}"
    ;;
array)
    : "${SLURM_ARRAY_TASK_ID:?array mode runs inside a Slurm array task}"
    # shellcheck disable=SC2086
    "${ENGINE[@]}" build --work "$WORK" --out "$OUT" --stages sample,views,labels \
        --num-chunks "$NUM_CHUNKS" --chunk-id "$SLURM_ARRAY_TASK_ID" --threads "$THREADS" --no-progress $EXTRA_ARGS
    ;;
finalize)
    # shellcheck disable=SC2086
    "${ENGINE[@]}" build --work "$WORK" --out "$OUT" --stages textbank,write --threads "$THREADS" $EXTRA_ARGS
    ;;
*)
    echo "unknown mode '$MODE' (submit | array | finalize)" >&2
    exit 2
    ;;
esac
