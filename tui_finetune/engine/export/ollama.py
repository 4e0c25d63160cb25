"""``--to ollama``: the GGUF plus a Modelfile whose TEMPLATE is the run's chat template translated to
Ollama's Go template, the training system prompt, and a ``PARAMETER stop`` line for every end token.

The translation renders the run's Jinja template with marker strings and cuts the result into the
pieces around the system prompt, the user's message and the reply; those pieces become a Go template
that uses only ``{{ if .System }}``, ``{{ else }}``, ``{{ .System }}``, ``{{ .Prompt }}`` and
``{{ .Response }}``, which :func:`render_go_template` evaluates for the check. A lost stop token is the
commonest complaint after an export, so the check generates with only the Modelfile's stops.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Callable

from tui_finetune.core.export_spec import CheckResult, ExportError, ExportSpec
from tui_finetune.engine.export import checks
from tui_finetune.engine.run_model import RunFinetune

SYSTEM, USER, REPLY = "\x00SYSTEM\x00", "\x00USER\x00", "\x00REPLY\x00"
MODELFILE = "Modelfile"


def _render(run: RunFinetune, messages: list[dict[str, str]], generation: bool) -> str:
    return run.tokenizer.apply_chat_template(messages, chat_template=run.template.jinja, tokenize=False,
                                             add_generation_prompt=generation)


def go_template(run: RunFinetune) -> str:
    """The run's chat template as an Ollama TEMPLATE (one turn; Ollama repeats it for a history)."""
    bos = run.tokenizer.bos_token or ""
    turn = _render(run, [{"role": "user", "content": USER}, {"role": "assistant", "content": REPLY}], False)
    user_pre, rest = turn.split(USER, 1)
    between, reply_post = rest.split(REPLY, 1)
    user_pre = user_pre[len(bos):] if bos and user_pre.startswith(bos) else user_pre  # llama.cpp adds BOS itself
    head = f"{user_pre}"
    try:
        with_system = _render(run, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}], True)
        sys_pre, sys_rest = with_system.split(SYSTEM, 1)
        sys_mid = sys_rest.split(USER, 1)[0]
        sys_pre = sys_pre[len(bos):] if bos and sys_pre.startswith(bos) else sys_pre
        head = f"{{{{ if .System }}}}{sys_pre}{{{{ .System }}}}{sys_mid}{{{{ else }}}}{user_pre}{{{{ end }}}}"
    except Exception:  # the template has no system role (it raises, or drops it): no SYSTEM support
        pass
    return f"{head}{{{{ .Prompt }}}}{between}{{{{ .Response }}}}{reply_post}"


def render_go_template(template: str, system: str, prompt: str, response: str) -> str:
    """Evaluate the subset of Go template that :func:`go_template` writes."""
    def pick(match: re.Match[str]) -> str:
        return match.group(1) if system else match.group(2)

    text = re.sub(r"\{\{ if \.System \}\}(.*?)\{\{ else \}\}(.*?)\{\{ end \}\}", pick, template, flags=re.S)
    return text.replace("{{ .System }}", system).replace("{{ .Prompt }}", prompt).replace("{{ .Response }}", response)


def end_tokens(run: RunFinetune, stop_ids: list[int]) -> list[str]:
    """Every end token the template can emit after a reply, plus the stop tokens the vocabulary has."""
    names = {run.tokenizer.convert_ids_to_tokens(i) for i in stop_ids}
    turn = _render(run, [{"role": "user", "content": USER}, {"role": "assistant", "content": REPLY}], False)
    after_reply = turn.split(REPLY, 1)[1]
    names |= {t for t in run.tokenizer.all_special_tokens if t and t in after_reply}
    return sorted(n for n in names if n)


def system_prompt(run: RunFinetune) -> str:
    first = checks.training_conversation(run)
    return first[0]["content"] if first and first[0]["role"] == "system" else ""


def write_modelfile(run: RunFinetune, dest: Path, gguf_file: Path,
                    say: Callable[[str], None]) -> tuple[Path, list[str]]:
    from tui_finetune.engine.samples import stop_token_ids

    stops = end_tokens(run, stop_token_ids(run.tokenizer, _NoModel()))
    lines = [f"FROM ./{gguf_file.name}", f'TEMPLATE """{go_template(run)}"""']
    system = system_prompt(run)
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{token}"' for token in stops]
    modelfile = dest / MODELFILE
    tmp = dest / f".{MODELFILE}.partial"
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(modelfile)
    name = re.sub(r"[^a-z0-9._-]+", "-", run.run_dir.name.lower())
    command = f"ollama create {name} -f {modelfile}"
    steps = [command, f"ollama run {name}"]
    if shutil.which("ollama"):
        say(f"running: {command}")
        done = subprocess.run(["ollama", "create", name, "-f", str(modelfile)], capture_output=True, text=True)
        steps.insert(0, f"(ran 'ollama create': exit {done.returncode} {done.stderr.strip()[-200:]})")
    return modelfile, steps


class _NoModel:
    """stop_token_ids reads the generation config from a model; the Modelfile needs only the tokenizer's."""

    generation_config = None


def read_modelfile(path: Path) -> tuple[str, list[str]]:
    text = path.read_text(encoding="utf-8")
    match = re.search(r'TEMPLATE """(.*?)"""', text, flags=re.S)
    if not match:
        raise ExportError(f"{path}: no TEMPLATE")
    return match.group(1), re.findall(r'^PARAMETER stop "(.*)"$', text, flags=re.M)


def check_modelfile(run: RunFinetune, modelfile: Path, gguf_file: Path, prompts: list[list[int]],
                    spec: ExportSpec) -> list[CheckResult]:
    """The Modelfile's template renders a training turn to the same tokens; its stops alone end every reply."""
    from tui_finetune.engine.export.gguf_rope import apply_file_rope
    from tui_finetune.engine.export.gguf_target import load_with_reader

    template, stops = read_modelfile(modelfile)
    conversation = checks.training_conversation(run)
    system = conversation[0]["content"] if conversation[0]["role"] == "system" else ""
    turn = [m for m in conversation if m["role"] != "system"][:2]
    results = []
    if len(turn) == 2 and turn[0]["role"] == "user":
        want_text = _render(run, ([{"role": "system", "content": system}] if system else []) + turn, False)
        bos = run.tokenizer.bos_token or ""
        want_text = want_text[len(bos):] if bos and want_text.startswith(bos) else want_text
        got_text = render_go_template(template, system, turn[0]["content"], turn[1]["content"])
        want = run.tokenizer(want_text, add_special_tokens=False)["input_ids"]
        got = run.tokenizer(got_text, add_special_tokens=False)["input_ids"]
        results.append(CheckResult("Modelfile template round-trip", want == got,
                                   f"one training turn gives the same {len(want)} tokens" if want == got else
                                   f"{len(want)} tokens from the run's template, {len(got)} from the Modelfile's"))
    vocab = run.tokenizer.get_vocab()
    stop_ids = sorted(vocab[s] for s in stops if s in vocab)
    model, meta = load_with_reader(run, gguf_file)
    apply_file_rope(model, meta["rope"])
    got_behaviour = checks.measure(model, prompts, stop_ids, run.tokenizer.pad_token_id, spec.max_new_tokens)
    result = checks.check_stops(got_behaviour, spec.max_new_tokens, stops)
    result.name = "Modelfile stops: " + result.name
    return results + [result]
