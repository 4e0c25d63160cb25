"""The events.jsonl schema: every event type round-trips, and a reader survives torn or newer files."""

from __future__ import annotations

import json

import pytest

from tui_finetune.core.events import (
    EVENT_TYPES, CheckpointEvent, EndEvent, ErrorEvent, EvalEvent, EventDecodeError, EventLog,
    PhaseEvent, ProgressEvent, SampleEvent, StepEvent, UnknownEvent, WarningEvent, decode_event,
    encode_event, read_events)

EXAMPLES = [
    PhaseEvent(phase="train", message="training"),
    ProgressEvent(phase="download", done=10.0, total=100.0, unit="B"),
    StepEvent(step=3, total_steps=40, epoch=0.5, loss=1.25, lr=2e-4, grad_norm=0.7, tokens_per_s=812.5,
              eta_s=30.0, vram_reserved_mb=1024.0, vram_peak_mb=2048.0, nvml_used_mb=3000.0, nvml_total_mb=8192.0),
    EvalEvent(step=10, eval_loss=0.9, metrics={"eval_runtime": 1.5}),
    CheckpointEvent(step=10, path="checkpoints/step-000010"),
    SampleEvent(label="after", prompt="Q?", text="A."),
    WarningEvent(message="slow", advice="use a GPU"),
    ErrorEvent(message="out of memory", advice="shorter sequences", kind="oom"),
    EndEvent(state="completed"),
]


def test_every_event_type_has_an_example():
    assert {type(e) for e in EXAMPLES} == set(EVENT_TYPES.values())


@pytest.mark.parametrize("event", EXAMPLES, ids=lambda e: e.type)
def test_event_round_trips_through_one_json_line(event):
    line = encode_event(event)
    assert "\n" not in line
    assert json.loads(line)["type"] == event.type
    assert decode_event(line) == event


def test_decode_ignores_unknown_keys_and_keeps_unknown_types():
    step = decode_event(json.dumps({"type": "step", "time": 1.0, "step": 1, "total_steps": 2, "epoch": 0.1,
                                    "loss": 2.0, "added_in_a_later_version": 5}))
    assert isinstance(step, StepEvent) and step.loss == 2.0
    other = decode_event('{"type": "telemetry", "time": 2.0, "x": 1}')
    assert isinstance(other, UnknownEvent) and other.raw["x"] == 1


@pytest.mark.parametrize("line", ["not json", "[1, 2]", '{"no_type": 1}', '{"type": "step", "time": 1}'])
def test_decode_rejects_malformed_lines(line):
    with pytest.raises(EventDecodeError):
        decode_event(line)


def test_reader_leaves_a_torn_last_line_for_later_and_resumes_from_offset(tmp_path):
    path = tmp_path / "events.jsonl"
    with EventLog(path) as log:
        log.emit(PhaseEvent(phase="load"))
        log.emit(StepEvent(step=1, total_steps=2, epoch=0.5, loss=3.0))
    with path.open("a") as handle:
        handle.write('{"type": "step", "time": 1, "ste')  # the worker is mid-write
    events, offset = read_events(path)
    assert [e.type for e in events] == ["phase", "step"]
    with path.open("a") as handle:
        handle.write('p": 2, "total_steps": 2, "epoch": 1.0, "loss": 1.0}\nbroken line\n')
    more, offset2 = read_events(path, offset)
    assert [(e.type, e.step) for e in more] == [("step", 2)]
    assert offset2 == path.stat().st_size
