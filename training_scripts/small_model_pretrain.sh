#!/usr/bin/env bash
# Pretrain or midtrain with litgpt_ext, under sbatch or as plain bash on a workstation.
#
#   sbatch training_scripts/small_model_pretrain.sh midtrain_configs/demo/pretrain.yaml [--train.max_iters 100 …]
#   model_config_file=cfg.yaml sbatch training_scripts/small_model_pretrain.sh
#   CONFIG_LIST=midtrain_configs/ablations/sweep.txt sbatch --array=1-4 training_scripts/small_model_pretrain.sh
#   bash training_scripts/small_model_pretrain.sh cfg.yaml        # no SLURM: runs here
#
# Which config: the first argument if it is a file, else $model_config_file / $MODEL_CONFIG_FILE,
# else line $SLURM_ARRAY_TASK_ID of $CONFIG_LIST (1-based; blank lines and # comments skipped).
# Further arguments are passed to `litgpt-ext pretrain` and override YAML keys; the config file is
# never edited (the paper's script rewrote max_additional_steps with sed, which races in arrays).
#
# Preemption: SLURM sends SIGUSR1 120 s before the time limit (--signal below). The training loop
# saves a checkpoint at the next step boundary and exits with PREEMPT_EXIT_CODE (99); this script
# then requeues the job, and the requeued job resumes from the latest checkpoint in out_dir
# (`--resume auto` is added unless the config names a checkpoint itself or AUTO_RESUME=0).
# Midtraining runs that start from another run's checkpoint should say so with `fork_from:`, which
# is requeue-safe (the fork happens once; later starts resume the fork's own checkpoints).
#
# The #SBATCH defaults: one node, one GPU and one task per GPU (Fabric reads the SLURM
# environment; raise --gpus-per-node and --ntasks-per-node together), 8 CPUs per task for the
# data workers, 24 h. Override any of them on the sbatch command line.
#SBATCH --job-name=litgpt-ext
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%A_%a.out

set -euo pipefail

REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
cd "$REPO_DIR"
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
PREEMPT_EXIT_CODE=${PREEMPT_EXIT_CODE:-99}
AUTO_RESUME=${AUTO_RESUME:-1}
mkdir -p logs

config=""
if [ $# -gt 0 ] && [ -f "$1" ]; then
  config=$1; shift
elif [ -n "${model_config_file:-${MODEL_CONFIG_FILE:-}}" ]; then
  config=${model_config_file:-$MODEL_CONFIG_FILE}
elif [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
  list=${CONFIG_LIST:?SLURM_ARRAY_TASK_ID is set but CONFIG_LIST (a file with one config path per line) is not}
  [ -f "$list" ] || { echo "CONFIG_LIST '$list' does not exist" >&2; exit 2; }
  config=$(grep -v -e '^[[:space:]]*#' -e '^[[:space:]]*$' "$list" | sed -n "${SLURM_ARRAY_TASK_ID}p")
  [ -n "$config" ] || { echo "CONFIG_LIST '$list' has no entry $SLURM_ARRAY_TASK_ID (it lists $(grep -cv -e '^[[:space:]]*#' -e '^[[:space:]]*$' "$list"))" >&2; exit 2; }
fi
if [ -z "$config" ]; then
  echo "no config: pass one as the first argument, set model_config_file, or use an array job with CONFIG_LIST" >&2
  exit 2
fi
[ -f "$config" ] || { echo "config '$config' does not exist" >&2; exit 2; }

extra=()
if [ "$AUTO_RESUME" = 1 ] && "$PYTHON" - "$config" "$@" <<'PY'
import sys, yaml
cfg = yaml.safe_load(open(sys.argv[1])) or {}
args = sys.argv[2:]
named = any(a.startswith(("--resume", "--initial_checkpoint_dir")) for a in args)
own = cfg.get("resume") not in (None, False, True, "auto") or cfg.get("initial_checkpoint_dir")
sys.exit(1 if named or own else 0)
PY
then
  extra+=(--resume auto)
fi

launcher=()
if [ -n "${SLURM_JOB_ID:-}" ] && [ "${SLURM_NTASKS:-1}" -gt 1 ]; then
  launcher=(srun --kill-on-bad-exit=1)
fi

echo "[$(date '+%F %T')] config=$config job=${SLURM_JOB_ID:-local} array_task=${SLURM_ARRAY_TASK_ID:-none} extra=${extra[*]:-} $*"
set +e
"${launcher[@]}" "$PYTHON" -m litgpt_ext pretrain --config "$config" "${extra[@]}" "$@"
status=$?
set -e

if [ "$status" -eq "$PREEMPT_EXIT_CODE" ]; then
  if [ -n "${SLURM_JOB_ID:-}" ]; then
    job=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}
    job=${job:-$SLURM_JOB_ID}
    echo "[$(date '+%F %T')] preempted: checkpoint saved; requeueing $job"
    scontrol requeue "$job"
    exit 0
  fi
  echo "[$(date '+%F %T')] stopped by a signal after saving a checkpoint; run this command again to resume"
fi
exit "$status"
