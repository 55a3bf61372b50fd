"""Trust on the user's own card (issue 16): fp16 loss scaling, the largest step first with its fit check, a resume that
cannot change the run, checkpoints whose LoRA keys are checked, library noise kept out of the terminal."""
from __future__ import annotations

import dataclasses
import logging
import random
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from test_train import run, step_losses, tiny_config
from tiny_models import write_jsonl

from qlora_engine.cli import build_parser, resolve_train_config
from qlora_engine.model import lm_loss
from qlora_engine.planning.advice import non_finite_loss_advice
from qlora_engine.protocol.config import RunConfig
from qlora_engine.protocol.errors import EngineError
from qlora_engine.training import batch_order, checkpoints, loop
from qlora_engine.training.resume_rules import SAFE_OPTIONS

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def varied_file(tmp_path) -> Path:
    """Rows of very different lengths, so that the largest micro-batch is a real choice."""
    rng = random.Random(3)
    rows = [{"instruction": f"Who is mayor {i}?", "output": "Quillon Varet " * rng.randint(1, 12)} for i in range(30)]
    return write_jsonl(tmp_path / "varied.jsonl", rows)


def fp16_model(model_dir: Path):
    config = RunConfig(model=str(model_dir), compute_dtype="fp16", lora_r=4, lora_dropout=0.0)
    model = loop.build_model(config, model_dir, "cpu", torch.float16)
    return model, [p for p in model.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------- fp16 loss scaling
def test_lora_weights_stay_fp32_under_fp16_compute(tiny_model_dir):
    _, trainable = fp16_model(tiny_model_dir)
    assert trainable and {p.dtype for p in trainable} == {torch.float32}
    assert isinstance(loop.loss_scaler(torch.float16, "cpu"), torch.amp.GradScaler)
    assert loop.loss_scaler(torch.bfloat16, "cpu") is None and loop.loss_scaler(torch.float32, "cpu") is None


def test_unscaled_fp16_gradients_underflow_to_zero_and_scaled_ones_do_not(tiny_model_dir, tiny_tokenizer):
    """A loss this small (a long sequence's per-token share) makes fp16 activation gradients smaller than fp16's
    smallest number: without scaling the adapter learns nothing from it."""
    model, trainable = fp16_model(tiny_model_dir)
    ids = tiny_tokenizer("The mayor of Brindleport is Quillon Varet.")["input_ids"]
    rows = [loop.data.Tokenized(input_ids=ids, trained_token_mask=[True] * len(ids), line=1)]
    batch = loop.collate(rows, tiny_tokenizer.pad_token_id, "cpu")
    tiny = 2.0 ** -24

    def lora_b_gradients(scaler):
        model.zero_grad(set_to_none=True)
        loss = lm_loss.causal_lm_loss(model, batch, loop.trained_tokens(batch)) * tiny
        (loss if scaler is None else scaler.scale(loss)).backward()
        if scaler is not None:
            scaler.unscale_(torch.optim.SGD(trainable, lr=0.0))
        return torch.cat([p.grad.flatten() for n, p in model.named_parameters() if "lora_B" in n])

    unscaled = lora_b_gradients(None)
    scaled = lora_b_gradients(loop.loss_scaler(torch.float16, "cpu"))
    assert int((unscaled != 0).sum()) == 0
    assert int((scaled != 0).sum()) > 0.9 * scaled.numel()
    assert torch.isfinite(scaled).all() and float(scaled.abs().max()) < 1e-3  # unscaled back to the true size


@pytest.mark.parametrize("scale", [2.0**16, 2.0**12])
def test_the_chunked_loss_gradient_in_fp16_is_the_fp32_one_at_the_loss_scale(scale):
    """A 2048-token step over a 32k vocabulary: each token's softmax share of the mean (1e-8) is below fp16's
    smallest number and the starting scale 2^16 above its largest, so neither may pass through fp16 on its own."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2048, 64, generator=generator)
    weight = torch.randn(32000, 64, generator=generator) * 0.02
    labels = torch.randint(0, 32000, (2048,), generator=generator)
    gradients = {}
    for dtype in (torch.float32, torch.float16):
        leaf = hidden.to(dtype).detach().requires_grad_(True)
        loss = lm_loss.ChunkedLinearCrossEntropy.apply(leaf, weight.to(dtype), labels, 2048.0)
        (loss * scale).backward()
        gradients[dtype] = leaf.grad.float()
    fp16, fp32 = gradients[torch.float16], gradients[torch.float32]
    assert torch.isfinite(fp16).all()
    assert float((fp16 - fp32).norm() / fp32.norm()) < 2e-3


def test_an_fp16_run_tracks_the_fp32_run(tiny_model_dir, alpaca_file, tmp_path):
    """fp16 with loss scaling ends within 2% of fp32's eval loss (each step's loss within 10%); an early step may
    overflow at the starting scale (2^16): skipped and counted, as on a GPU."""
    common = {"max_steps": 10, "lora_dropout": 0.0, "val_fraction": 0.2}
    _, fp32 = run(tiny_config(tiny_model_dir, alpaca_file, tmp_path / "fp32", compute_dtype="fp32", **common))
    _, fp16 = run(tiny_config(tiny_model_dir, alpaca_file, tmp_path / "fp16", compute_dtype="fp16", **common))
    assert step_losses(fp16) == pytest.approx(step_losses(fp32), rel=0.10)
    evals = {name: [e.eval_loss for e in events if e.kind == "eval"] for name, events in (("16", fp16), ("32", fp32))}
    assert evals["16"][-1] == pytest.approx(evals["32"][-1], rel=0.02)
    assert evals["16"][-1] < evals["16"][0] * 0.9  # it learned
    skipped = [e.skipped_steps for e in fp16 if e.kind == "step"]
    assert skipped == sorted(skipped) and skipped[-1] <= 3


def test_a_forced_fp16_overflow_is_skipped_not_applied(tiny_model_dir, alpaca_file, tmp_path, monkeypatch):
    real_step, calls, changed = loop.training_step, [], []

    def overflow_at_step_three(model, micro_batches, trainable, *args, **kwargs):
        calls.append(1)
        before = [p.detach().clone() for p in trainable]
        hook = trainable[0].register_hook(lambda grad: grad * float("inf")) if len(calls) == 3 else None
        result = real_step(model, micro_batches, trainable, *args, **kwargs)
        if hook is not None:
            hook.remove()
        changed.append(any(not torch.equal(b, p) for b, p in zip(before, trainable)))
        return result

    monkeypatch.setattr(loop, "training_step", overflow_at_step_three)
    _, events = run(tiny_config(tiny_model_dir, alpaca_file, tmp_path / "run", max_steps=5, compute_dtype="fp16"))
    skipped = [e.skipped_steps for e in events if e.kind == "step"]
    assert skipped[2] == skipped[1] + 1  # step 3 counted as skipped ...
    assert changed[2] is False and changed[3] is True  # ... its update not applied; the next one is
    assert events[-1].kind == "finished"


def test_the_nan_advice_offers_bf16_only_where_the_device_has_it():
    no_bf16 = non_finite_loss_advice("float16", bf16_supported=False)
    assert "no bf16" in no_bf16 and "compute_dtype bf16" not in no_bf16 and "learning rate" in no_bf16
    assert "compute_dtype bf16" in non_finite_loss_advice("float16", bf16_supported=True)
    assert "bf16" not in non_finite_loss_advice("bfloat16", bf16_supported=True)


def test_auto_takes_fp16_on_a_card_that_only_emulates_bf16(monkeypatch):
    """A T4 / V100 / RTX 20xx: torch's plain is_bf16_supported() says yes (bf16 tensors can be made, emulated);
    compute_dtype auto must still take fp16 there, so that the loss scaling runs, and the NaN advice must not
    offer bf16."""
    import torch

    from qlora_engine.model.loading import bf16_native, resolve_compute_dtype

    def pre_ampere(including_emulation: bool = True) -> bool:
        return including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", pre_ampere)
    assert resolve_compute_dtype("auto", "cuda") is torch.float16 and not bf16_native("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_compute_dtype("auto", "cuda") is torch.bfloat16


# ----------------------------------------------------------------------------- the largest step first
def rows_of_lengths(lengths: list[int]) -> list[loop.data.Tokenized]:
    return [loop.data.Tokenized(input_ids=[1] * n, trained_token_mask=[True] * n, line=i + 1)
            for i, n in enumerate(lengths)]


@pytest.mark.parametrize("packed", [True, False])
def test_the_first_step_holds_the_epochs_largest_micro_batches_and_the_rest_keeps_the_seeded_order(packed):
    rows = rows_of_lengths([random.Random(i).randint(5, 300) for i in range(37)])
    batcher = batch_order.Batcher(rows, micro_batch_size=4, seed=7, pad_id=0, first_step_batches=2, packed=packed)
    plain = batch_order.Batcher(rows, micro_batch_size=4, seed=7, pad_id=0, first_step_batches=0, packed=packed)
    for epoch in (1, 2):  # epoch 0's first step is the run's longest examples: the next test
        ordered = [batcher.batch(epoch * batcher.batches_per_epoch + k) for k in range(batcher.batches_per_epoch)]
        seeded = [plain.batch(epoch * plain.batches_per_epoch + k) for k in range(plain.batches_per_epoch)]
        sizes = sorted((batch_order.micro_batch_tokens(b, packed) for b in seeded), reverse=True)
        assert [batch_order.micro_batch_tokens(b, packed) for b in ordered[:2]] == sizes[:2]
        assert [b for b in seeded if b not in ordered[:2]] == ordered[2:]
    again = batch_order.Batcher(rows, micro_batch_size=4, seed=7, pad_id=0, first_step_batches=2, packed=packed)
    assert [again.batch(k) for k in range(25)] == [batcher.batch(k) for k in range(25)]  # a resume replays it
    other_seed = batch_order.Batcher(rows, micro_batch_size=4, seed=8, pad_id=0, first_step_batches=2, packed=packed)
    assert [other_seed.batch(k) for k in range(2, 10)] != [batcher.batch(k) for k in range(2, 10)]


@pytest.mark.parametrize("packed", [True, False])
def test_the_runs_first_step_is_its_longest_examples_and_no_later_step_holds_more(packed):
    """No epoch's shuffle can group more tokens in a micro-batch than the longest examples together: the first step
    of the run is its largest, whatever the epoch (per epoch alone, a later epoch could pack longer rows together)."""
    lengths = [random.Random(i).randint(5, 300) for i in range(37)]
    rows = rows_of_lengths(lengths)
    batcher = batch_order.Batcher(rows, micro_batch_size=4, seed=7, pad_id=0, first_step_batches=2, packed=packed)
    first_step = [batcher.batch(0), batcher.batch(1)]
    assert sorted((len(r.input_ids) for b in first_step for r in b), reverse=True) == sorted(lengths, reverse=True)[:8]
    largest_first = max(batch_order.micro_batch_tokens(b, packed) for b in first_step)
    later = [batcher.batch(k) for k in range(2, 6 * batcher.batches_per_epoch)]
    assert max(batch_order.micro_batch_tokens(b, packed) for b in later) <= largest_first
    plain = batch_order.Batcher(rows, micro_batch_size=4, seed=7, pad_id=0, first_step_batches=0, packed=packed)
    seeded = [row for k in range(plain.batches_per_epoch) for row in plain.batch(k)]
    lead = {id(row) for batch in first_step for row in batch}
    rest = [row for k in range(2, batcher.batches_per_epoch) for row in batcher.batch(k)]
    assert rest == [row for row in seeded if id(row) not in lead]  # the rest of epoch 0 in its seeded order


def test_a_run_reports_the_fit_check_of_its_largest_first_step(tiny_model_dir, varied_file, tmp_path):
    config = tiny_config(tiny_model_dir, varied_file, tmp_path / "run", max_steps=2, grad_accum=2,
                         micro_batch_size=3, val_fraction=0.0)
    _, events = run(config)
    kinds = [e.kind for e in events]
    assert kinds.index("fit_check") == kinds.index("step") + 1 and kinds.count("fit_check") == 1
    check = next(e for e in events if e.kind == "fit_check")
    assert check.verdict == "not measured" and check.measured_peak_bytes is None  # CPU: bytes are CUDA's
    assert check.estimate_peak_bytes > 0
    from qlora_engine.model.loading import load_tokenizer

    examples = loop.prepare_data(config, load_tokenizer(tiny_model_dir)).train_examples
    longest = sorted((len(row.input_ids) for row in examples), reverse=True)
    assert check.tokens == sum(longest[:3])  # the micro-batch of the three longest rows, packed


# ----------------------------------------------------------------------------- resume
def stored_run(tmp_path: Path, **values) -> Path:
    run_dir = tmp_path / "run"
    RunConfig(run_dir=str(run_dir), **values).save(run_dir / "config.yaml")
    return run_dir


@pytest.mark.parametrize("flags, option, stored, given", [
    (["--micro-batch-size", "8"], "micro_batch_size", "4", "8"),
    (["--seed", "1"], "seed", "42", "1"),
    (["--max-length", "1024"], "max_length", "512", "1024"),
    (["--no-packing"], "packing", "True", "False"),
    (["--lora-r", "64"], "lora_r", "16", "64"),
    (["--target-modules", "q_proj,v_proj"], "target_modules", "'all-linear'", "'q_proj,v_proj'"),
    (["--data", "other.jsonl"], "data", "'sample'", "'other.jsonl'"),
    (["--val-fraction", "0.2"], "val_fraction", "0.1", "0.2"),
    (["--grad-accum", "4"], "grad_accum", "2", "4"),
])
def test_resume_refuses_an_option_that_changes_the_data_order_or_the_adapter(tmp_path, flags, option, stored, given):
    run_dir = stored_run(tmp_path)
    args = build_parser().parse_args(["train", "--resume", "--run-dir", str(run_dir), *flags])
    with pytest.raises(EngineError) as caught:
        resolve_train_config(args)
    assert caught.value.code == "resume_changes_run"
    assert f"{option} was {stored}, given {given}" in caught.value.message
    assert RunConfig.load(run_dir / "config.yaml") == RunConfig(run_dir=str(run_dir))  # not rewritten


def test_resume_names_every_refused_option_at_once(tmp_path):
    run_dir = stored_run(tmp_path)
    args = build_parser().parse_args(["train", "--resume", "--run-dir", str(run_dir), "--seed", "3", "--lora-r", "4",
                                      "--max-steps", "90"])
    with pytest.raises(EngineError) as caught:
        resolve_train_config(args)
    assert "seed was 42, given 3" in caught.value.message and "lora_r was 16, given 4" in caught.value.message
    assert "max_steps" not in caught.value.message


def test_resume_accepts_more_steps_and_other_eval_and_save_frequencies(tmp_path):
    run_dir = stored_run(tmp_path, max_steps=30)
    args = build_parser().parse_args(["train", "--resume", "--run-dir", str(run_dir), "--max-steps", "60",
                                      "--eval-steps", "5", "--save-steps", "10", "--epochs", "2"])
    cfg, _ = resolve_train_config(args)
    assert (cfg.max_steps, cfg.eval_steps, cfg.save_steps, cfg.epochs) == (60, 5, 10, 2.0)


def test_every_safe_option_is_a_real_option():
    assert set(SAFE_OPTIONS) <= {spec.name for spec in dataclasses.fields(RunConfig)}


def stopped_run(model_dir: Path, data_file: Path, run_dir: Path, **overrides) -> RunConfig:
    """A run stopped by request after its first step, with the checkpoint of step 1."""
    config = tiny_config(model_dir, data_file, run_dir, max_steps=6, **overrides)
    stop = loop.StopRequest()
    stop.event.set()  # asked before the first step: it stops after it
    run_events = loop.EventWriter(run_dir / "events.jsonl", stream=None)
    assert loop.run_training(config, run_dir, run_events, stop=stop) == {"status": "stopped", "step": 1}
    run_events.close()
    return config


def test_the_loop_refuses_a_resume_whose_config_differs_from_its_checkpoint(tiny_model_dir, alpaca_file, tmp_path):
    """The checkpoint keeps the options it was written with: a config.yaml edited by hand (or another client)
    is held to the same rule as the CLI's flags."""
    config = stopped_run(tiny_model_dir, alpaca_file, tmp_path / "run")
    with pytest.raises(EngineError, match="micro_batch_size was 4, given 2"):
        run(dataclasses.replace(config, micro_batch_size=2), resume=True)
    _, events = run(dataclasses.replace(config, max_steps=3, eval_steps=1), resume=True)
    resumed = next(e for e in events if e.kind == "warning" and "resumed" in e.message)
    assert "with changed options: max_steps 6 -> 3, eval_steps 0 -> 1" in resumed.message
    assert [e.step for e in events if e.kind == "step"][-2:] == [2, 3] and events[-1].kind == "finished"


def test_a_lower_learning_rate_on_resume_takes_effect(tiny_model_dir, alpaca_file, tmp_path):
    config = stopped_run(tiny_model_dir, alpaca_file, tmp_path / "run", lr_scheduler="constant", warmup_steps=0)
    _, events = run(dataclasses.replace(config, learning_rate=1e-4, max_steps=2), resume=True)
    steps = [e for e in events if e.kind == "step"]
    assert steps[0].lr == pytest.approx(1e-2) and steps[-1].lr == pytest.approx(1e-4)


def adapter_checkpoint(model_dir: Path, data_file: Path, run_dir: Path, **lora) -> Path:
    run(tiny_config(model_dir, data_file, run_dir, max_steps=1, **lora))
    return checkpoints.latest_checkpoint(run_dir) / "adapter" / "adapter_model.safetensors"


@pytest.mark.parametrize("saved, loaded, detail", [
    ({"lora_r": 8}, {"lora_r": 4}, "size mismatch"),
    ({"target_modules": "q_proj,v_proj"}, {"target_modules": "q_proj,k_proj,v_proj"}, "missing LoRA weight"),
    ({"target_modules": "q_proj,k_proj,v_proj"}, {"target_modules": "q_proj,v_proj"}, "unexpected LoRA weight"),
])
def test_loading_a_checkpoint_of_another_adapter_is_an_error(tiny_model_dir, alpaca_file, tmp_path, saved, loaded,
                                                            detail):
    weights = adapter_checkpoint(tiny_model_dir, alpaca_file, tmp_path / "run", **saved)
    config = tiny_config(tiny_model_dir, alpaca_file, tmp_path / "other", **loaded)
    model = loop.build_model(config, tiny_model_dir, "cpu", torch.float32)
    with pytest.raises(EngineError, match=detail) as caught:
        checkpoints.load_adapter_weights(weights, model)
    assert caught.value.code == "checkpoint_mismatch" and str(weights) in caught.value.message


# ----------------------------------------------------------------------------- library noise
def test_library_warnings_go_to_the_log_file_not_the_terminal(tmp_path, capfd):
    from qlora_engine.protocol import library_log

    library_log.release()  # an earlier in-process run may still hold the capture
    library_log.capture()
    try:
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'")
        warnings.warn_explicit("`is_gradient_checkpointing` is deprecated", FutureWarning,
                               str(Path(torch.__file__).parent.parent / "transformers" / "modeling_utils.py"), 3312)
        library_log.write_to(tmp_path / "engine.log")
        logging.getLogger("transformers.modeling_utils").warning("written after the file is known")
        logging.getLogger("peft").error("a real problem")
    finally:
        library_log.release()
    log = (tmp_path / "engine.log").read_text()
    assert "gemm_4bit_forward" in log and "is_gradient_checkpointing" in log and "after the file" in log
    terminal = capfd.readouterr()
    assert "gemm_4bit_forward" not in terminal.err + terminal.out and "deprecated" not in terminal.err
    assert "a real problem" in terminal.err  # errors still reach the terminal


def test_a_second_run_in_one_process_gets_its_own_log_file(tmp_path):
    from qlora_engine.protocol import library_log

    library_log.release()
    library_log.capture()
    try:
        library_log.write_to(tmp_path / "first" / "engine.log")
        logging.getLogger("peft").warning("during the first run")
        library_log.capture()  # the second run's start: idempotent
        library_log.write_to(tmp_path / "second" / "engine.log")
        logging.getLogger("peft").warning("during the second run")
    finally:
        library_log.release()
    first, second = ((tmp_path / name / "engine.log").read_text() for name in ("first", "second"))
    assert "during the first run" in first and "second run" not in first
    assert "during the second run" in second and "first run" not in second


def test_a_training_run_prints_no_library_warnings(tiny_model_dir, alpaca_file, tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "qlora_engine", "train", "--model", str(tiny_model_dir), "--data",
                             str(alpaca_file), "--run-dir", str(run_dir), "--max-steps", "1", "--max-length", "48",
                             "--eval-steps", "0", "--events", "human", "--optimizer", "paged_adamw_8bit"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Warning" not in result.stderr and "warn(" not in result.stderr, result.stderr
    assert "finished" in result.stdout and "Warning" not in result.stdout
    assert "Paged optimizers are not supported on CPU" in (run_dir / "engine.log").read_text()
    before = (run_dir / "engine.log").stat().st_size
    chat = subprocess.run([sys.executable, "-m", "qlora_engine", "chat", str(run_dir), "--prompt", "Hi",
                           "--max-new-tokens", "2"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert "[tuned]" in chat.stdout and "Warning" not in chat.stderr + chat.stdout and "warn(" not in chat.stderr
    assert (run_dir / "engine.log").stat().st_size > before  # the chat's library noise went to the run's log


# ----------------------------------------------------------------------------- the quick test preset teaches
QUICK_TEST_DRIFT = 1.098  # measured: tests/data/drift_grid_smollm2_cpu.jsonl, index 2 (the Quick test's recipe)


@pytest.mark.slow
def test_the_quick_test_preset_teaches_the_sample_facts(tmp_path):
    """Picking "Quick test" on the Train page and starting, on the bundled model and sample data: the tuned model
    answers most held-out questions right, the base model few. Gradient checkpointing off only for speed (it
    recomputes the same numbers)."""
    from app.presets import load_presets

    quick = next(p for p in load_presets() if p.name == "quick_test")
    config = dataclasses.replace(RunConfig(run_dir=str(tmp_path / "run")), **quick.config,
                                 gradient_checkpointing=False).validate()
    result, events = run(config)
    comparison = result["comparison"]
    assert comparison["tuned_accuracy"] > 0.5 and comparison["tuned_accuracy"] > comparison["base_accuracy"] + 0.3
    evals = [e.eval_loss for e in events if e.kind == "eval"]
    assert evals[-1] < evals[0] * 0.7
    # README "Learning without forgetting": this recipe measured 36/36 and drift 1.098 (bench --drift-grid, row 2)
    assert comparison["tuned_accuracy"] >= 0.9
    drift = [e.drift for e in events if e.kind == "eval"][-1]
    assert 0 < drift <= QUICK_TEST_DRIFT * 1.15, drift


def test_gpu_detection_is_part_of_the_base_install():
    """The README's main command installs without extras: pynvml must come with it, or the GPU page says
    'nvidia-ml-py is not installed' on a machine with a GPU."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert any(dep.startswith("nvidia-ml-py") for dep in project["dependencies"])
    assert not any(dep.startswith("nvidia-ml-py") for deps in project["optional-dependencies"].values()
                   for dep in deps)
