#!/usr/bin/env bash
# Issue 12's GPU item: chat with a finished QLoRA run (fine-tune, then base), then a merged export of it,
# each through the real CLI and timed; then the run's export.json, which holds every check's verdict.
#   TUI_FINETUNE_HOME=DIR bash benchmarks/chat_export_gpu.sh [RUN] [PROMPT]
# DIR is the folder whose runs/ holds the finished run; RUN defaults to "last". Everything printed also
# goes to $LOG (default docs/verification/chat-export-gpu.txt). Exits non-zero if any step failed.
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-$REPO/.venv/bin/python}"
RUN="${1:-last}"
PROMPT="${2:-Give me three tips for a first 10 km run, one line each.}"
LOG="${LOG:-$REPO/docs/verification/chat-export-gpu.txt}"
: "${TUI_FINETUNE_HOME:?set TUI_FINETUNE_HOME to the folder whose runs/ holds a finished QLoRA run}"
export TUI_FINETUNE_HOME
mkdir -p "$(dirname "$LOG")"
exec > >(tee "$LOG") 2>&1

CLI=("$PY" -m tui_finetune.cli)
failed=0
timed() {  # timed LABEL CMD...: runs CMD, then prints its exit status and wall seconds
    local label="$1" start end status
    shift
    echo; echo "### $label: $*"
    start=$(date +%s.%N)
    "$@"
    status=$?
    end=$(date +%s.%N)
    echo "### $label: exit $status, $(awk "BEGIN {printf \"%.1f\", $end - $start}") s"
    [ "$status" -eq 0 ] || failed=1
}

echo "# chat and merged export on $(date -u +%Y-%m-%dT%H:%MZ), TUI_FINETUNE_HOME=$TUI_FINETUNE_HOME"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# the run's folder, once, so every step works on the same run even if another one starts meanwhile
RUN_DIR="$("$PY" -c 'import sys; from tui_finetune.core.run_folder.listing import find_run; print(find_run(sys.argv[1]))' "$RUN")" \
    || exit 1
"$PY" - "$RUN_DIR" <<'PYTHON' || exit 1
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from tui_finetune.core.run_folder.info import read_run_info, read_run_recipe
def installed(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return "missing"
run = Path(sys.argv[1])
recipe, info = read_run_recipe(run), read_run_info(run)
print(f"run {run} ({info.state}): {recipe.model}, {recipe.method}")
print(", ".join(f"{p} {installed(p)}" for p in ("torch", "transformers", "peft", "bitsandbytes", "gguf")))
if recipe.method != "qlora":
    print(f"note: this run is {recipe.method}, not QLoRA")
PYTHON

timed "chat (fine-tune)" "${CLI[@]}" chat "$RUN_DIR" --prompt "$PROMPT"
timed "chat (base)" "${CLI[@]}" chat "$RUN_DIR" --base --prompt "$PROMPT"
timed "export merged" "${CLI[@]}" export "$RUN_DIR" --to merged

echo; echo "### $RUN_DIR/export.json"
"$PY" -m json.tool "$RUN_DIR/export.json" || failed=1
exit "$failed"
