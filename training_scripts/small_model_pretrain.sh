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
# Further arguments are passed to `litgpt-ext pretrain` (or `sft`, see below) and override YAML keys; the config file is
# never edited (the paper's script rewrote max_additional_steps with sed, which races in arrays).
#
# Preemption: SLURM sends SIGUSR1 120 s before the time limit (--signal below; it reaches job
# *steps* only, so the trainer always runs under `srun`, even for one task). The training loop
# saves a checkpoint at the next step boundary and exits with PREEMPT_EXIT_CODE (99); SIGTERM (the
# time limit itself, `scontrol requeue`, a preempting job) and `scancel --signal=USR1 <job>` do the
# same. This script then requeues the job, and the requeued job resumes from the latest checkpoint
# in out_dir (`--resume auto` is added unless the config names a checkpoint itself or
# AUTO_RESUME=0). With several tasks, `srun --kill-on-bad-exit=1` may report 143 for a rank killed
# after the others exited 99: the trainer's marker file (logs/.preempted-<job>) tells this script
# the checkpoint is complete, so it requeues anyway. Requeue by hand: `scontrol requeue <job>`.
# Midtraining runs that start from another run's checkpoint should say so with `fork_from:`, which
# is requeue-safe (the fork happens once; later starts resume the fork's own checkpoints).
#
# The #SBATCH defaults: one node, one GPU and one task per GPU, 8 CPUs per task for the data
# workers, 24 h. SLURM's task count must equal the run's world size (devices x num_nodes; the
# default `devices: auto` takes it from SLURM): raise --gpus-per-node and --ntasks-per-node
# together. On a CPU partition override the GPU, CPU and memory requests (the job pends forever
# if it asks for more than a node has), e.g.
#   sbatch --partition=cpu --gpus-per-node=0 --cpus-per-task=2 --mem=8G training_scripts/small_model_pretrain.sh cfg.yaml
# Settings (environment): PYTHON (default .venv/bin/python, else python), PREEMPT_EXIT_CODE=99,
# AUTO_RESUME=1, REPO_DIR (default: the submit dir), SRUN_ARGS (extra srun options).
# `logs/` must exist when sbatch is called (--output below): it is in the repository.
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
elif [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
  echo "config '$1' does not exist (cwd: $PWD)" >&2; exit 2
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
[ -f "$config" ] || { echo "config '$config' does not exist (cwd: $PWD)" >&2; exit 2; }

# Which command: $LITGPT_EXT_COMMAND (pretrain | sft | soup, or a sweep's prep and synth commands), else sft for
# an SFT config (its data module is litgpt_ext.sft.data.SFTData), else pretrain. `litgpt-ext sweep` writes
# CONFIG_LISTs of every kind and names the command of each array.
command=${LITGPT_EXT_COMMAND:-$("$PYTHON" - "$config" <<'PY'
import sys, yaml
cfg = yaml.safe_load(open(sys.argv[1])) or {}
print("sft" if str((cfg.get("data") or {}).get("class_path") or "").endswith("SFTData") else "pretrain")
PY
)}
case "$command" in
  pretrain|sft|soup) ;;  # soup: the seed-averaging step of a `litgpt-ext sweep` plan (no training, no resume)
  synth-replay|merge-lora|build-demo|build-sft-tasks|prepare|clean|train-tokenizer|extend-vocab) ;;  # a sweep's synth, merge and prep jobs
  *) echo "LITGPT_EXT_COMMAND='$command' is not a command this script runs; expected pretrain, sft, soup," \
          "or a sweep's synth-replay, merge-lora or prep command (build-demo, build-sft-tasks, prepare, clean, train-tokenizer," \
          "extend-vocab)" >&2; exit 2 ;;
esac

extra=()
if [ "$AUTO_RESUME" = 1 ] && { [ "$command" = pretrain ] || [ "$command" = sft ]; } && "$PYTHON" - "$config" "$@" <<'PY'
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
if [ -n "${SLURM_JOB_ID:-}" ] && [ -z "${SLURM_STEP_ID:-}" ]; then
  # a job step: --signal=USR1@N without B: reaches steps only, never this batch shell's children
  # shellcheck disable=SC2206  # SRUN_ARGS is meant to split into words
  launcher=(srun --kill-on-bad-exit=1 ${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK} ${SRUN_ARGS:-})
fi
marker="logs/.preempted-${SLURM_JOB_ID:-local-$$}"
rm -f "$marker"
export LITGPT_EXT_PREEMPT_MARKER="$PWD/$marker"

# This shell must outlive the trainer to requeue: SLURM's SIGTERM (and USR1 with B: or
# scancel --full) would kill it. A trap runs only after the foreground command returns.
trap 'echo "[$(date "+%F %T")] batch shell got SIGTERM; waiting for the trainer to save"' TERM
trap 'echo "[$(date "+%F %T")] batch shell got SIGUSR1; waiting for the trainer to save"' USR1

echo "[$(date '+%F %T')] $command config=$config job=${SLURM_JOB_ID:-local} array_task=${SLURM_ARRAY_TASK_ID:-none} restart=${SLURM_RESTART_COUNT:-0} extra=${extra[*]:-} $*"
set +e
"${launcher[@]}" "$PYTHON" -m litgpt_ext "$command" --config "$config" "${extra[@]}" "$@"
status=$?
set -e

if [ "$status" -ne "$PREEMPT_EXIT_CODE" ] && [ -f "$marker" ]; then
  echo "[$(date '+%F %T')] exit status $status, but the trainer saved a preemption checkpoint ($(cat "$marker")):" \
       "a rank was killed after the others exited $PREEMPT_EXIT_CODE (srun --kill-on-bad-exit)"
  status=$PREEMPT_EXIT_CODE
fi
rm -f "$marker"
if [ "$status" -eq "$PREEMPT_EXIT_CODE" ]; then
  if [ -n "${SLURM_JOB_ID:-}" ]; then
    job=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}
    job=${job:-$SLURM_JOB_ID}
    echo "[$(date '+%F %T')] preempted: checkpoint saved; requeueing $job"
    if scontrol requeue "$job"; then exit 0; fi
    echo "[$(date '+%F %T')] 'scontrol requeue $job' failed; resubmit this job by hand: it resumes from the checkpoint" >&2
    exit "$status"
  fi
  echo "[$(date '+%F %T')] stopped by a signal after saving a checkpoint; run this command again to resume"
fi
exit "$status"
