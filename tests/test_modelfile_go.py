"""The Modelfile's TEMPLATE rendered by Go's real text/template (the package Ollama renders it with), for the chat
template families we write, against the tokenizer's own rendering, and against tests/go_template.py (so the small
Python renderer the other tests use is checked against the real thing). Skipped where `go` is not installed
(Debian / Ubuntu: apt-get install golang-go)."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from go_template import render
from test_modelfile import CONVERSATIONS, LLAMA3_TEMPLATE, SMOLLM2_TEMPLATE
from tiny_models import CHATML_TEMPLATE, build_tokenizer

from qlora_engine.products import modelfile

GO_RENDERER = """package main

import (
	"encoding/json"
	"os"
	"text/template"
)

// Each case: a template and its data; prints the renderings as one JSON list, in order.
func main() {
	var cases []struct {
		Template string
		Data     map[string]interface{}
	}
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	out := []string{}
	for _, c := range cases {
		t := template.Must(template.New("modelfile").Parse(c.Template))
		var b []byte
		w := &buffer{&b}
		if err := t.Execute(w, c.Data); err != nil {
			panic(err)
		}
		out = append(out, string(b))
	}
	json.NewEncoder(os.Stdout).Encode(out)
}

type buffer struct{ b *[]byte }

func (w *buffer) Write(p []byte) (int, error) { *w.b = append(*w.b, p...); return len(p), nil }
"""


@pytest.fixture(scope="module")
def go_render(tmp_path_factory):
    if shutil.which("go") is None:
        pytest.skip("Go is not installed (apt-get install golang-go)")
    folder = tmp_path_factory.mktemp("go-render")
    (folder / "render.go").write_text(GO_RENDERER)
    built = subprocess.run(["go", "build", "-o", str(folder / "render"), str(folder / "render.go")],
                           capture_output=True, text=True, timeout=300, cwd=folder)
    assert built.returncode == 0, built.stderr

    def run(cases: list[dict]) -> list[str]:
        result = subprocess.run([str(folder / "render")], input=json.dumps(cases), capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    return run


def ollama_messages(built: modelfile.Modelfile, conversation: list[dict[str, str]]) -> list[dict[str, str]]:
    """What Ollama hands the template: the Modelfile's SYSTEM first unless the conversation has a system message."""
    messages = [{"Role": m["role"], "Content": m["content"]} for m in conversation]
    if built.system and messages[0]["Role"] != "system":
        messages.insert(0, {"Role": "system", "Content": built.system})
    return messages


@pytest.mark.parametrize("template", [CHATML_TEMPLATE, SMOLLM2_TEMPLATE, LLAMA3_TEMPLATE],
                         ids=["chatml", "smollm2", "llama3"])
def test_go_text_template_renders_our_template_as_the_chat_template(go_render, template):
    tokenizer = build_tokenizer(template)
    tokenizer.bos_token = "<|endoftext|>"  # Llama 3's template starts with it; llama.cpp adds BOS itself
    built = modelfile.build_modelfile("model-q4_k_m.gguf", tokenizer)
    cases = [{"Template": built.template, "Data": {"Messages": ollama_messages(built, c)}} for c in CONVERSATIONS]
    rendered = go_render(cases)
    for conversation, case, by_go in zip(CONVERSATIONS, cases, rendered, strict=True):
        expected = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        expected = expected.removeprefix(tokenizer.bos_token) if template is LLAMA3_TEMPLATE else expected
        assert by_go == expected
        assert render(case["Template"], case["Data"]) == by_go  # our Python renderer agrees with Go

