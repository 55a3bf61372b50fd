"""Ollama's Modelfile for an exported GGUF: FROM the file, the chat template as Ollama's TEMPLATE (Go text/template)
for the families we know, PARAMETER stop for the end-of-turn tokens, SYSTEM when training used one system prompt.

A family's TEMPLATE is chosen by the chat template's markers; tests render it for conversations and compare with
the tokenizer's own rendering. An unknown family gets no TEMPLATE: Ollama then reads the GGUF's chat template.
"""
from __future__ import annotations

import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_engine.training.end_of_turn import turn_end_text

# `$last`: the last message; after a last user (or system) message the assistant's turn is opened, as
# add_generation_prompt does.
GO_TEMPLATES = {
    "chatml": ('{{- range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}'
               '<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
               '{{ if and $last (ne .Role "assistant") }}<|im_start|>assistant\n{{ end }}{{ end }}'),
    "llama3": ('{{- range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}'
               '<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>'
               '{{ if and $last (ne .Role "assistant") }}<|start_header_id|>assistant<|end_header_id|>\n\n'
               '{{ end }}{{ end }}'),
}
MARKERS = {"chatml": "<|im_start|>", "llama3": "<|start_header_id|>"}
SYSTEM_BLOCK = {"chatml": r"<\|im_start\|>system\n(.*?)<\|im_end\|>",
                "llama3": r"<\|start_header_id\|>system<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>"}
PROBE = "Probe question 7?"
# What each TEMPLATE above renders, turn by turn (tests/test_modelfile_go.py holds the two to each other): a model's
# chat template gets its family's TEMPLATE only when it renders this conversation exactly so. Phi-4's uses
# <|im_start|> with <|im_sep|> instead of a newline: chatml's TEMPLATE would be wrong for it.
FAMILY_TURNS = {"chatml": "<|im_start|>{role}\n{content}<|im_end|>\n",
                "llama3": "<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>"}
CHECK_CONVERSATION = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi there"},
                      {"role": "assistant", "content": "Hello! How can I help?"},
                      {"role": "user", "content": PROBE}]


@dataclass
class Modelfile:
    """What the Modelfile says, and its text."""

    family: str  # chatml, llama3, or "" (Ollama reads the GGUF's template)
    template: str
    system: str
    stops: list[str]
    text: str


def template_family(chat_template: str) -> str:
    for family, marker in MARKERS.items():
        if marker in (chat_template or ""):
            return family
    return ""


def family_rendering(family: str, messages: list[dict[str, str]]) -> str:
    """The text `family`'s TEMPLATE gives these messages, the assistant's turn opened after a last user turn."""
    turn = FAMILY_TURNS[family]
    text = "".join(turn.format(role=m["role"], content=m["content"]) for m in messages)
    opened = turn.split("{content}")[0].format(role="assistant")
    return text + (opened if messages[-1]["role"] != "assistant" else "")


def renders_as_family(tokenizer: Any, family: str) -> bool:
    """Whether the tokenizer's chat template gives exactly what `family`'s TEMPLATE gives (a leading BOS aside:
    llama.cpp adds it itself)."""
    try:
        rendered = tokenizer.apply_chat_template(CHECK_CONVERSATION, tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that raises (a system turn it refuses): not ours to write
        return False
    expected = family_rendering(family, CHECK_CONVERSATION)
    # SmolLM2's bos_token is <|im_start|> itself: only a BOS written before the whole rendering is set aside
    return rendered in (expected, (tokenizer.bos_token or "") + expected)


def default_system_prompt(tokenizer: Any, family: str) -> str:
    """The system prompt the chat template adds when a conversation has none (SmolLM2's, Qwen2.5's), else ''."""
    if not family:
        return ""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": PROBE}], tokenize=False,
                                             add_generation_prompt=True)
    match = re.search(SYSTEM_BLOCK[family], rendered.split(PROBE)[0], flags=re.S)
    return match.group(1) if match else ""


def training_system_prompt(examples: list[Any]) -> str:
    """The system prompt most training rows began with, when at least half of them had one."""
    systems = [e.messages[0]["content"] for e in examples
               if e.messages and e.messages[0].get("role") == "system" and e.messages[0].get("content")]
    if not systems:
        return ""
    text, count = Counter(systems).most_common(1)[0]
    return text if count * 2 >= len(examples) else ""


def build_modelfile(gguf_name: str, tokenizer: Any, system: str = "") -> Modelfile:
    """The Modelfile for `gguf_name` (a file beside it) with this tokenizer's template and stop tokens."""
    markers = template_family(tokenizer.chat_template or "")
    family = markers if markers and renders_as_family(tokenizer, markers) else ""
    system = system or default_system_prompt(tokenizer, family)
    stops = [s for s in dict.fromkeys([turn_end_text(tokenizer).strip(), tokenizer.eos_token or ""]) if s]
    if markers == "chatml":
        stops = list(dict.fromkeys([*stops, "<|im_start|>"]))
    lines = ["# QLoRA Studio export. Use it: ollama create NAME -f THIS_FILE", f"FROM ./{gguf_name}"]
    template = GO_TEMPLATES.get(family, "")
    if template:
        lines.append(f'TEMPLATE """{template}"""')
    elif markers:
        lines.append(f"# chat template: {markers}'s markers but not its layout (checked on a conversation): Ollama "
                     "takes it from the GGUF")
    else:
        lines.append("# chat template: not one of ours (chatml, llama3): Ollama takes it from the GGUF")
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    return Modelfile(family=family, template=template, system=system, stops=stops, text="\n".join(lines) + "\n")


def ollama_command(name: str, modelfile: Path) -> str:
    return f"ollama create {name} -f {modelfile}"


def ollama_name(run_name: str) -> str:
    """A model name Ollama accepts: lower case, letters, digits, '-', '_' and '.'."""
    return re.sub(r"[^a-z0-9._-]+", "-", run_name.lower()).strip("-._") or "qlora-studio-model"


def ollama_available() -> bool:
    return shutil.which("ollama") is not None


def ollama_create(name: str, modelfile: Path) -> str:
    """Run `ollama create NAME -f Modelfile` (Ollama copies the GGUF into its store); returns its output."""
    import subprocess

    from qlora_engine.protocol.errors import EngineError

    if not ollama_available():
        raise EngineError("ollama_missing", "ollama is not on PATH",
                          f"Install Ollama, then run: {ollama_command(name, modelfile)}")
    result = subprocess.run(["ollama", "create", name, "-f", str(modelfile)], capture_output=True, text=True,
                            cwd=modelfile.parent)
    if result.returncode != 0:
        raise EngineError("ollama_failed", f"ollama create {name} failed: {result.stderr.strip()[-600:]}",
                          "Is the Ollama server running (ollama serve)? Then run the command again.")
    return result.stdout
