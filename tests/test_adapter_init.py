"""Adapter starts (LoftQ, PiSSA, OLoRA) and variants (DoRA, rsLoRA): what peft computes, LoftQ's point (step 0 closer
to the 16-bit model), and each through training, stop, resume, both exports and chat."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import ROOT, run, tiny_config

from qlora_engine.model import adapter_init, lm_loss, weight_formats
from qlora_engine.products import export
from qlora_engine.protocol.config import RunConfig
from qlora_engine.protocol.errors import EngineError
from qlora_engine.protocol.events import EventWriter
from qlora_engine.training import checkpoints, loop

NAME = "model.layers.1.mlp.down_proj"


def built(model_dir, **options):
    cfg = RunConfig(model=str(model_dir), compute_dtype="fp32", device="cpu", lora_dropout=0.0, lora_r=8, **options)
    torch.manual_seed(0)
    return loop.build_model(cfg, model_dir, "cpu", torch.float32)


def layer_of(peft_model, name=NAME):
    return adapter_init.lora_layers(peft_model)[name]


def adapter_of(layer):
    return layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()


@pytest.fixture
def cuda_as_cpu(monkeypatch):
    """peft's LoftQ functions hard-code compute_device = "cuda"; this lets them run here, on the CPU, unchanged."""
    original = torch.Tensor.to

    def to(self, *args, **kwargs):
        args = tuple("cpu" if a == "cuda" or (isinstance(a, torch.device) and a.type == "cuda") else a for a in args)
        if kwargs.get("device") in ("cuda", torch.device("cuda")):
            kwargs["device"] = "cpu"
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)


def test_loftq_one_iteration_is_peft_replace_lora_weights_loftq(tiny_model_dir, cuda_as_cpu):
    from peft.utils.loftq_utils import _loftq_init_new

    ours = layer_of(built(tiny_model_dir, init_lora="loftq", lora_alpha=8))  # scaling 1: peft's own convention
    plain = layer_of(built(tiny_model_dir))
    original = adapter_init.original_weight(tiny_model_dir, NAME)
    lora_a, lora_b = _loftq_init_new(plain.get_base_layer().weight, original, num_bits=4, reduced_rank=8)
    got_a, got_b = adapter_of(ours)
    assert torch.allclose(got_a, lora_a, atol=1e-6) and torch.allclose(got_b, lora_b, atol=1e-6)


def test_loftq_iterations_are_peft_loftq_init_and_the_factors_carry_the_scaling(tiny_model_dir, cuda_as_cpu):
    from peft.utils.loftq_utils import loftq_init

    original = adapter_init.original_weight(tiny_model_dir, NAME).float()
    peft_base, peft_a, peft_b = loftq_init(original, num_bits=4, reduced_rank=8, num_iter=3)
    # peft's loftq_init quantizes without double quantization, in blocks of 64; alpha 32 over r 8 is scaling 4
    ours = layer_of(built(tiny_model_dir, init_lora="loftq", loftq_iters=3, double_quant=False, lora_alpha=32))
    got_a, got_b = adapter_of(ours)
    assert torch.allclose(4 * got_b @ got_a, peft_b @ peft_a, atol=1e-5)
    assert torch.allclose(weight_formats.dequantize_layer(ours.get_base_layer()), peft_base.float(), atol=1e-6)


def test_pissa_is_peft_pissa_on_the_16bit_weights_with_the_residual_quantized(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    ours = layer_of(built(tiny_model_dir, init_lora="pissa"))
    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    reference = get_peft_model(full, LoraConfig(r=8, lora_alpha=32, init_lora_weights="pissa",
                                                target_modules="all-linear"))
    ref_layer = layer_of(reference)
    for got, expected in zip(adapter_of(ours), adapter_of(ref_layer)):
        assert torch.allclose(got, expected, atol=1e-5)
    residual = ref_layer.get_base_layer().weight.detach()
    requantized = weight_formats.dequantize_layer(ours.get_base_layer())
    expected_base = weight_formats.dequantize(weight_formats.like(ours.get_base_layer(), residual))
    assert torch.allclose(requantized, expected_base, atol=1e-6)


def test_olora_is_peft_olora_on_the_4bit_layer(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    from qlora_engine.model import loading

    ours = layer_of(built(tiny_model_dir, init_lora="olora"))
    base = loading.load_quantized_model(tiny_model_dir, quant_type="nf4", double_quant=True,
                                        compute_dtype=torch.float32, device="cpu")
    reference = layer_of(get_peft_model(base, LoraConfig(r=8, lora_alpha=32, init_lora_weights="olora",
                                                         target_modules="all-linear")))
    for got, expected in zip(adapter_of(ours), adapter_of(reference)):
        assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(weight_formats.dequantize_layer(ours.get_base_layer()),
                          weight_formats.dequantize_layer(reference.get_base_layer()), atol=1e-6)


def test_dora_and_rslora_are_peft_options(tiny_model_dir):
    dora = built(tiny_model_dir, use_dora=True)
    assert layer_of(dora).use_dora["default"] and "lora_magnitude_vector" in str(list(dora.state_dict()))
    rslora = layer_of(built(tiny_model_dir, use_rslora=True, lora_alpha=32))
    assert rslora.scaling["default"] == pytest.approx(32 / 8 ** 0.5)


def step0_logits_and_loss(model, batch):
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = float(lm_loss.causal_lm_loss(model, batch, loop.trained_tokens(batch)))
    return logits, loss


def test_loftq_step0_is_closer_to_the_16bit_model_than_plain_qlora(tiny_model_dir):
    from test_packing import random_rows
    from transformers import AutoModelForCausalLM

    batch = loop.collate(random_rows([20, 33]), 0, "cpu")
    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    reference_logits, reference_loss = step0_logits_and_loss(full, batch)
    gaps = {}
    for name, options in {"plain": {}, "loftq": {"init_lora": "loftq"},
                          "loftq5": {"init_lora": "loftq", "loftq_iters": 5}}.items():
        model = built(tiny_model_dir, packing=False, **options).eval()
        logits, loss = step0_logits_and_loss(model, batch)
        gaps[name] = (float((logits - reference_logits).norm() / reference_logits.norm()), abs(loss - reference_loss))
    assert gaps["loftq"][0] < 0.8 * gaps["plain"][0] and gaps["loftq"][1] < gaps["plain"][1]
    assert gaps["loftq5"][0] < gaps["plain"][0] and gaps["loftq5"][1] < gaps["plain"][1]


def test_dora_with_a_start_that_rewrites_the_base_is_a_bad_config_naming_both():
    with pytest.raises(EngineError) as caught:
        RunConfig.from_dict({"use_dora": True, "init_lora": "pissa"})
    assert caught.value.code == "bad_config"
    assert "use_dora" in caught.value.message and "init_lora" in caught.value.message


def train_stop_resume(config: RunConfig, run_dir: Path) -> None:
    """Stop after the first checkpoint, resume to the end: the resumed curve is the uninterrupted one's."""
    stop = loop.StopRequest()
    original_save = checkpoints.save_checkpoint

    def save_then_stop(*args, **kwargs):
        stop.event.set()
        return original_save(*args, **kwargs)

    config.save(run_dir / "config.yaml")
    checkpoints.save_checkpoint = save_then_stop
    try:
        events = EventWriter(run_dir / "events.jsonl", stream=None)
        assert loop.run_training(config, run_dir, events, stop=stop)["status"] == "stopped"
        events.close()
    finally:
        checkpoints.save_checkpoint = original_save
    result, _ = run(config, resume=True)
    assert result["status"] == "finished"


def check_exports_and_chat(run_dir: Path) -> None:
    for kind in ("adapter", "merged"):
        verification = export.export_run(run_dir, kind)
        assert verification.ok, (kind, verification)
    result = subprocess.run([sys.executable, "-m", "qlora_engine", "chat", str(run_dir), "--prompt",
                             "Who is mayor 3?", "--max-new-tokens", "4"], capture_output=True, text=True, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("options", [{"init_lora": "loftq", "loftq_iters": 2}, {"init_lora": "pissa"},
                                     {"init_lora": "olora"}, {"use_dora": True}, {"use_rslora": True}],
                         ids=["loftq2", "pissa", "olora", "dora", "rslora"])
def test_each_start_trains_resumes_exports_and_chats(tiny_model_dir, alpaca_file, tmp_path, options):
    run_dir = tmp_path / "run"
    config = tiny_config(tiny_model_dir, alpaca_file, run_dir, max_steps=4, save_steps=2, **options)
    _, whole = run(tiny_config(tiny_model_dir, alpaca_file, tmp_path / "whole", max_steps=4, **options))
    train_stop_resume(config, run_dir)
    resumed = [e.loss for e in loop_events(run_dir) if e.kind == "step"]
    assert resumed[-2:] == pytest.approx([e.loss for e in whole if e.kind == "step"][-2:], rel=1e-4)
    check_exports_and_chat(run_dir)
    if options.get("init_lora") in ("pissa", "olora"):  # exported as peft's converted LoRA of rank 2r
        import json

        config_out = json.loads((run_dir / "exports" / "adapter" / "adapter_config.json").read_text())
        assert config_out["r"] == 16 and config_out["init_lora_weights"] is True


def loop_events(run_dir: Path):
    from qlora_engine.protocol.events import read_events

    return list(read_events(run_dir / "events.jsonl"))


def test_the_base_side_of_a_pissa_run_is_the_model_as_training_began(tiny_model_dir):
    from test_packing import random_rows
    from transformers import AutoModelForCausalLM

    batch = loop.collate(random_rows([20, 33]), 0, "cpu")
    reference, _ = step0_logits_and_loss(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                         batch)
    model = built(tiny_model_dir, init_lora="pissa", packing=False).eval()
    started, _ = step0_logits_and_loss(model, batch)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:  # as if trained
                param.add_(torch.randn_like(param) * 0.05)
    trained, _ = step0_logits_and_loss(model, batch)
    with adapter_init.as_started(model):
        base_side, _ = step0_logits_and_loss(model, batch)
    with model.disable_adapter():
        residual_only, _ = step0_logits_and_loss(model, batch)
    assert torch.allclose(base_side, started, atol=1e-5)
    assert (base_side - reference).norm() < 0.5 * (residual_only - reference).norm()
    assert torch.allclose(step0_logits_and_loss(model, batch)[0], trained)
