"""Training teaches the model to stop: the chat template's end-of-turn token is trained on in every assistant turn,
and padding (even when the pad token is that same token) never hides it."""
from __future__ import annotations

import pytest
from test_modelfile import LLAMA3_TEMPLATE, SMOLLM2_TEMPLATE
from tiny_models import CHATML_TEMPLATE, build_tokenizer

from qlora_engine.training import data, loop
from qlora_engine.training.end_of_turn import end_of_turn_token_id, stop_token_ids, turn_end_text

TWO_TURNS = [{"role": "user", "content": "Who is mayor?"}, {"role": "assistant", "content": "Varet."},
             {"role": "user", "content": "And the harbour?"}, {"role": "assistant", "content": "Brindle."}]
# A template that renders a turn differently once later turns follow it (as Qwen3's drops earlier reasoning): the
# trained spans are then found by the answer text, and must still reach the end-of-turn token.
REWRITING_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' and not loop.last %}{{ '<|im_start|>user\n'"
    " + m['content'] + ' (earlier)<|im_end|>\n' }}{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] +"
    " '<|im_end|>\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def tokenizer_for(template):
    tokenizer = build_tokenizer(template)
    tokenizer.add_tokens(["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], special_tokens=True)
    tokenizer.bos_token = "<|endoftext|>"
    return tokenizer


@pytest.mark.parametrize("template", [CHATML_TEMPLATE, SMOLLM2_TEMPLATE, LLAMA3_TEMPLATE, REWRITING_TEMPLATE],
                         ids=["chatml", "smollm2", "llama3", "rewriting"])
def test_the_end_of_turn_token_is_trained_in_every_assistant_turn(template):
    tokenizer = tokenizer_for(template)
    end = end_of_turn_token_id(tokenizer)
    example = data.tokenize(data.Example(line=1, messages=TWO_TURNS), tokenizer, max_length=256,
                            train_on_prompt=False)
    trained_ends = [i for i, (t, trained) in enumerate(zip(example.input_ids, example.trained_token_mask))
                    if t == end and trained]
    assert len(trained_ends) == 2, (turn_end_text(tokenizer), example.input_ids)


def test_the_end_of_turn_token_is_the_templates_closing_token():
    chatml = tokenizer_for(CHATML_TEMPLATE)
    assert end_of_turn_token_id(chatml) == chatml.convert_tokens_to_ids("<|im_end|>")
    assert stop_token_ids(chatml, [chatml.eos_token_id, 7]) == [chatml.convert_tokens_to_ids("<|im_end|>"), 7]
    assert turn_end_text(tokenizer_for(LLAMA3_TEMPLATE)) == "<|eot_id|>"


def test_padding_with_the_end_of_turn_token_does_not_hide_it():
    tokenizer = tokenizer_for(CHATML_TEMPLATE)
    end = end_of_turn_token_id(tokenizer)
    short = data.tokenize(data.Example(line=1, messages=TWO_TURNS[:2]), tokenizer, 256, False)
    long = data.tokenize(data.Example(line=2, messages=TWO_TURNS), tokenizer, 256, False)
    batch = loop.collate([short, long], pad_id=end, device="cpu")
    labels = batch["labels"][0].tolist()
    assert labels.count(end) == sum(1 for t, m in zip(short.input_ids, short.trained_token_mask) if t == end and m)
    assert labels.count(end) >= 1 and labels[len(short.input_ids):] == [-100] * (len(labels) - len(short.input_ids))
