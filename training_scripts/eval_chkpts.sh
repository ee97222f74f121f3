#!/usr/bin/env bash
# Evaluate every checkpoint of a run (step-* in step order, then final) with lm-eval.
#
#   sbatch training_scripts/eval_chkpts.sh <run dir> [tasks]      # on a SLURM cluster
#   bash   training_scripts/eval_chkpts.sh <run dir> [tasks]      # anywhere
#
# tasks: comma-separated lm-eval tasks/tags (default: the local demo tasks). Results go to
# <checkpoint>/eval/<tasks with , -> +>[_<k>shot][_limit<n>].json; a checkpoint whose results file
# exists is skipped, so re-running (or re-queueing a preempted job) only does what is missing.
# Settings (environment variables):
#   PYTHON=.venv/bin/python (else python)  NUM_FEWSHOT=  LIMIT=  BATCH_SIZE=8  DEVICE=auto  DTYPE=auto
#   EVAL_DATA_DIR=data/demo/eval_tasks  EXTRA_ARGS=   (passed verbatim to `litgpt-ext evaluate`)
# SBATCH defaults below: one GPU, 8 CPUs, 4 h; override on the command line (sbatch --time=...).
# CPU partition: DEVICE=cpu sbatch --partition=cpu --gpus-per-task=0 --cpus-per-task=2 --mem=8G …
#SBATCH --job-name=eval_chkpts
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
set -uo pipefail

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
  sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
  exit $(( $# < 1 ? 2 : 0 ))
fi
RUN_DIR=${1%/}
TASKS=${2:-demo_math_mc,demo_code_completion,demo_prose_cloze}
BATCH_SIZE=${BATCH_SIZE:-8}
DEVICE=${DEVICE:-auto}
DTYPE=${DTYPE:-auto}
EVAL_DATA_DIR=${EVAL_DATA_DIR:-data/demo/eval_tasks}

# Under sbatch the script runs from a spool copy: the submit dir is the repo root.
REPO_ROOT=${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
# Logs, not terminals: no tqdm carriage-return bars (litgpt-ext sets the same; see docs/evaluation.md).
[[ -t 2 ]] || export TQDM_DISABLE=${TQDM_DISABLE:-1} TQDM_MININTERVAL=${TQDM_MININTERVAL:-60}
# the repo's venv (as `make install` creates it) unless PYTHON says otherwise, as small_model_pretrain.sh
PYTHON=${PYTHON:-$( [ -x "$REPO_ROOT/.venv/bin/python" ] && echo "$REPO_ROOT/.venv/bin/python" || echo python )}

if [[ ! -d "$RUN_DIR" ]]; then
  echo "eval_chkpts: run dir '$RUN_DIR' does not exist" >&2; exit 2
fi

# Must match litgpt_ext.eval.evaluate.results_name.
NAME=$(printf '%s' "$TASKS" | tr -d ' ' | tr ',' '+' | sed 's/[^A-Za-z0-9_.+-]/_/g')
ARGS=(--tasks "$TASKS" --batch_size "$BATCH_SIZE" --device "$DEVICE" --dtype "$DTYPE" --eval_data_dir "$EVAL_DATA_DIR")
if [[ -n "${NUM_FEWSHOT:-}" ]]; then NAME+="_${NUM_FEWSHOT}shot"; ARGS+=(--num_fewshot "$NUM_FEWSHOT"); fi
if [[ -n "${LIMIT:-}" ]]; then NAME+="_limit${LIMIT}"; ARGS+=(--limit "$LIMIT"); fi
NAME+=".json"

mapfile -t CKPTS < <(find "$RUN_DIR" -mindepth 1 -maxdepth 1 -type d -name 'step-*' -printf '%f\n' | sort -V)
[[ -d "$RUN_DIR/final" ]] && CKPTS+=(final)
if [[ ${#CKPTS[@]} -eq 0 ]]; then
  echo "eval_chkpts: no step-* or final checkpoints in '$RUN_DIR'" >&2; exit 2
fi

done_n=0; skip_n=0; failed=()
for c in "${CKPTS[@]}"; do
  ckpt="$RUN_DIR/$c"
  out="$ckpt/eval/$NAME"
  if [[ ! -f "$ckpt/lit_model.pth" ]]; then
    echo "[$c] no lit_model.pth, skipping"; continue
  fi
  if [[ -f "$out" ]]; then
    echo "[$c] skip: $out exists"; skip_n=$((skip_n + 1)); continue
  fi
  echo "[$c] evaluating on $TASKS ($(date '+%F %T'))"
  start=$SECONDS
  # shellcheck disable=SC2086  # EXTRA_ARGS is meant to split into words
  if "$PYTHON" -m litgpt_ext evaluate "$ckpt" "${ARGS[@]}" ${EXTRA_ARGS:-}; then
    done_n=$((done_n + 1)); echo "[$c] done in $((SECONDS - start)) s -> $out"
  else
    failed+=("$c"); echo "[$c] FAILED after $((SECONDS - start)) s" >&2
  fi
done
echo "eval_chkpts: $done_n evaluated, $skip_n skipped, ${#failed[@]} failed ${failed[*]:-}"
[[ ${#failed[@]} -eq 0 ]]
