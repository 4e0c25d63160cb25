#!/usr/bin/env bash
# The newcomer's first hour (issue 13), driven in tmux: the CPU demo through the wizard at 100x30, kill -9
# of its worker mid-run, then at 80x24 the start-up offer (Enter = "Not now", remembered), the Runs list,
# a resume that names its checkpoint step, the run to completion, and `tui-finetune runs`.
# The demo trains once (minutes on 2 cores); every screen is captured as text under docs/verification/tui/
# (or $OUT) with the prefix newcomer-, and ram.txt compares the launch screen's RAM estimate with the
# worker's measured peak RSS.
#   bash benchmarks/tmux_newcomer.sh       # needs tmux and the demo extra (pip install "tui-finetune[demo]")
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$REPO/docs/verification/tui}"
HOME_DIR="$(mktemp -d)"
SESSION="tui-finetune-newcomer"
PY="${PYTHON:-$REPO/.venv/bin/python}"
ENVS="PYTHONPATH='$REPO' TUI_FINETUNE_HOME='$HOME_DIR'"
APP="cd '$REPO' && $ENVS '$PY' -m tui_finetune.cli"
mkdir -p "$OUT"
command -v tmux >/dev/null || { echo "tmux is missing: apt-get install -y tmux"; exit 1; }

CAPTURE_PREFIX="newcomer-"
# shellcheck source=benchmarks/tmux_lib.sh
source "$REPO/benchmarks/tmux_lib.sh"
run_dir() { ls -d "$HOME_DIR"/runs/*/ | head -1; }
py_json() { "$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))$2)" "$1"; }

tmux kill-session -t "$SESSION" 2>/dev/null || true
tmux new-session -d -s "$SESSION" -x 100 -y 30 "bash --norc"

# 1. install: the package is installed in $PY's environment (README: pip install "tui-finetune[demo]").
tmux send-keys -t "$SESSION" "cd '$REPO' && $ENVS '$PY' -m tui_finetune.cli doctor" Enter
sleep 15;                                         capture 00-installed-doctor-100x30
tmux send-keys -t "$SESSION" "clear" Enter

# 2. the demo through the wizard, by keyboard only, at 100x30
tmux send-keys -t "$SESSION" "$APP" Enter
wait_for "Plan for another card" 20;              capture 01-hardware-100x30
keys C-n; wait_for "CPU demo" 10;                 capture 02-model-100x30
keys Enter; wait_for "Presets" 10; sleep 1;       capture 03-recipe-100x30
keys C-n; wait_for "Pick a data file" 10
tmux send-keys -t "$SESSION" -l "recipes/demo-cpu.jsonl"; keys Enter  # the path field has focus
wait_for "Ready to launch" 60;                    capture 04-dataset-100x30
keys C-n; wait_for "Start training" 10;           capture 05-launch-100x30
keys Enter; wait_for "Stop & save" 20;            capture 06-monitor-starting-100x30

# 3. kill -9 the worker once it has sealed a checkpoint past step 4
wait_for "checkpoint: step ([89]|[1-9][0-9])" 400; sleep 1; capture 07-monitor-training-100x30
RUN="$(run_dir)"
kill -9 "$(py_json "$RUN/run.json" "['pid']")"
wait_for "worker gone" 30; sleep 1;               capture 08-monitor-worker-killed-100x30
keys C-q; sleep 1

# 4. at 80x24: the start-up offer names the checkpoint; Enter is "Not now" and is remembered
tmux resize-window -t "$SESSION" -x 80 -y 24 2>/dev/null || tmux resize-pane -t "$SESSION" -x 80 -y 24
tmux send-keys -t "$SESSION" "clear; $APP" Enter
wait_for "Resume it now" 20;                      capture 09-startup-offer-80x24
keys Enter; sleep 1;                              capture 10-not-now-80x24
keys C-q; sleep 1
tmux send-keys -t "$SESSION" "clear; $APP" Enter
wait_for "Plan for another card" 20; sleep 1;     capture 11-no-offer-again-80x24
keys F2; wait_for "Runs" 10; sleep 1;             capture 12-runs-80x24

# 5. resume from the Runs list: the toast names the checkpoint step; the chart continues one line
keys r; wait_for "Resuming" 10;                   capture 13-resume-toast-80x24
wait_for "loss [0-9]" 120; sleep 2;               capture 14-monitor-resumed-80x24
wait_for "completed" 600; sleep 3;                capture 15-monitor-completed-80x24
keys C-q; sleep 1

# 6. the CLI at 80 columns: every id whole
tmux send-keys -t "$SESSION" "clear; cd '$REPO' && $ENVS '$PY' -m tui_finetune.cli runs" Enter
sleep 4;                                          capture 16-cli-runs-80x24

# 7. TODO(merge newcomer-cli): a Q/A CSV trained through --columns (the other branch's feature):
#    tui-finetune train demo-cpu --data qa.csv --columns prompt=question,reply=answer

# RAM: the launch screen's estimate against the worker's measured peak RSS (issue 13 item 4: within 25%)
"$PY" - "$RUN" "$OUT/newcomer-05-launch-100x30.txt" > "$OUT/newcomer-ram.txt" <<'EOF'
import json, re, sys
from pathlib import Path
peaks = [json.loads(l).get("rss_peak_mb") for l in Path(sys.argv[1], "events.jsonl").read_text().splitlines() if l.strip()]
measured = max(p for p in peaks if p) / 1024
estimate = float(re.search(r"peak RAM\s+≈ ([0-9.]+) GiB", Path(sys.argv[2]).read_text()).group(1))
print(f"estimate {estimate:.2f} GiB, measured peak RSS {measured:.2f} GiB, off by {abs(estimate / measured - 1):.0%}")
EOF
cat "$OUT/newcomer-ram.txt"
tmux kill-session -t "$SESSION"
rm -rf "$HOME_DIR"
echo "screens in $OUT"
