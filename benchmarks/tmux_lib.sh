# Helpers shared by the tmux drivers (tmux_drive.sh, tmux_newcomer.sh); source it after setting
# SESSION (the tmux session), OUT (where captures go) and optionally CAPTURE_PREFIX.

capture() {  # capture NAME: the visible screen as text, in $OUT/$CAPTURE_PREFIX$NAME.txt
  tmux capture-pane -p -t "$SESSION" > "$OUT/${CAPTURE_PREFIX:-}$1.txt"
  echo "captured $1"
}

keys() { for k in "$@"; do tmux send-keys -t "$SESSION" "$k"; sleep 0.4; done; }

wait_for() {  # wait_for REGEX SECONDS: until the screen matches the extended regex, or capture "timeout" and exit
  local deadline=$((SECONDS + $2))
  until tmux capture-pane -p -t "$SESSION" | grep -E -q -- "$1"; do
    if (( SECONDS > deadline )); then echo "timed out waiting for: $1"; capture "timeout"; exit 1; fi
    sleep 1
  done
}
