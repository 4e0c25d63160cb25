#!/usr/bin/env bash
# Drive the real app in tmux as a new user would: the CPU demo through the wizard, watch it train,
# quit (training continues), start the app again and reattach, then stop and save.
# Every screen is captured as text under docs/verification/tui/ (or $OUT).
#   bash benchmarks/tmux_drive.sh        # about 3 minutes on 2 cores; needs tmux and the demo extra
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$REPO/docs/verification/tui}"
HOME_DIR="$(mktemp -d)"
SESSION="tui-finetune-drive"
PY="${PYTHON:-$REPO/.venv/bin/python}"
APP="cd '$REPO' && TUI_FINETUNE_HOME='$HOME_DIR' '$PY' -m tui_finetune.cli"
mkdir -p "$OUT"
command -v tmux >/dev/null || { echo "tmux is missing: apt-get install -y tmux"; exit 1; }

CAPTURE_PREFIX=""
# shellcheck source=benchmarks/tmux_lib.sh
source "$REPO/benchmarks/tmux_lib.sh"

tmux kill-session -t "$SESSION" 2>/dev/null || true
tmux new-session -d -s "$SESSION" -x 100 -y 30 "bash --norc"
tmux send-keys -t "$SESSION" "$APP" Enter
wait_for "Plan for another card" 20;          capture 01-hardware
keys C-n; wait_for "CPU demo" 10;             capture 02-model
keys Enter; wait_for "Presets" 10; sleep 1;   capture 03-recipe
keys C-n; wait_for "Pick a data file" 10
tmux send-keys -t "$SESSION" -l "recipes/demo-cpu.jsonl"; keys Enter  # the path field has focus
wait_for "Ready to launch" 60;                capture 04-dataset
keys C-n; wait_for "Start training" 10;       capture 05-launch
keys Enter; wait_for "Stop & save" 20;        capture 06-monitor-starting
wait_for "loss [0-9]" 240; sleep 2;           capture 07-monitor-training
keys q; sleep 2;                              capture 08-quit-training-continues
tmux send-keys -t "$SESSION" "$APP" Enter
wait_for "Reattach" 20;                       capture 09-startup-offer
keys y; wait_for "loss [0-9]" 30; sleep 2;    capture 10-reattached
keys s; sleep 1;                              capture 11-stop-requested
wait_for "interrupted|completed" 120; sleep 1; capture 12-stopped
keys d; sleep 1;                              capture 13-runs
keys C-q; sleep 1
tmux kill-session -t "$SESSION"
rm -rf "$HOME_DIR"
echo "screens in $OUT"
