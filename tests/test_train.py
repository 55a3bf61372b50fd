"""The training run on a tiny random Llama: events, learning, evaluation, stop and resume, exports."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_engine.products import export
from qlora_engine.protocol.config import RunConfig
from qlora_engine.protocol.events import EventWriter, Step, parse_line, read_events
from qlora_engine.training import checkpoints, loop

ROOT = Path(__file__).resolve().parent.parent


def tiny_config(model_dir, data_file, run_dir, **overrides) -> RunConfig:
    values = {"model": str(model_dir), "data": str(data_file), "run_dir": str(run_dir), "max_steps": 8,
              "micro_batch_size": 4, "learning_rate": 1e-2, "warmup_steps": 1, "eval_steps": 0, "lora_r": 8,
              "max_length": 64, "lora_dropout": 0.1}
    values.update(overrides)
    return RunConfig.from_dict(values)


def run(config: RunConfig, resume=False):
    run_dir = Path(config.run_dir)
    events = EventWriter(run_dir / "events.jsonl", stream=None)
    try:
        result = loop.run_training(config, run_dir, events, resume=resume)
    finally:
        events.close()
    return result, list(read_events(run_dir / "events.jsonl"))


def step_losses(events):
    return [e.loss for e in events if e.kind == "step"]


def test_a_run_emits_the_protocol_and_learns(tiny_model_dir, alpaca_file, tmp_path):
    result, events = run(tiny_config(tiny_model_dir, alpaca_file, tmp_path / "run", max_steps=12, eval_steps=6))
    kinds = [e.kind for e in events]
    assert kinds[:3] == ["started", "data_ready", "model_loaded"] and kinds[-1] == "finished"
    assert kinds.count("step") == 12 and kinds.count("eval") == 3  # before training, at step 6, at the end
    losses = step_losses(events)
    assert losses[-1] < losses[0] * 0.9
    base_eval, middle_eval, last_eval = [e.eval_loss for e in events if e.kind == "eval"]
    assert last_eval < middle_eval < base_eval
    step = next(e for e in events if e.kind == "step")
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "eta_s", "vram", "total_steps"} <= set(step.to_dict())
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    assert result["status"] == "finished"


def test_evaluation_during_training_does_not_change_training(tiny_model_dir, alpaca_file, tmp_path):
    """bitsandbytes repacks 4-bit weights when a layer runs in eval mode on CPU; training must not notice."""
    from tiny_models import write_jsonl

    val_file = write_jsonl(tmp_path / "val.jsonl", [{"instruction": "Who is mayor?", "output": "Varet."}] * 4)
    _, plain = run(tiny_config(tiny_model_dir, alpaca_file, tmp_path / "a", max_steps=10, val_fraction=0.0))
    _, evaluated = run(tiny_config(tiny_model_dir, alpaca_file, tmp_path / "b", max_steps=10, eval_steps=2,
                                   val_data=str(val_file)))
    assert [e.kind for e in plain].count("eval") == 0
    assert [e.kind for e in evaluated].count("eval") == 6  # before training, every 2 steps, at the end
    assert step_losses(evaluated) == pytest.approx(step_losses(plain), rel=1e-4)


def test_gradient_accumulation_matches_one_big_batch(tiny_model_dir, alpaca_file, tmp_path):
    common = {"max_steps": 3, "lora_dropout": 0.0}
    _, big = run(tiny_config(tiny_model_dir, alpaca_file, tmp_path / "a", micro_batch_size=4, **common))
    _, accumulated = run(tiny_config(tiny_model_dir, alpaca_file, tmp_path / "b", micro_batch_size=2, grad_accum=2,
                                     **common))
    assert step_losses(accumulated) == pytest.approx(step_losses(big), rel=2e-3)


def test_resume_continues_the_same_loss_curve(tiny_model_dir, alpaca_file, tmp_path):
    _, whole = run(tiny_config(tiny_model_dir, alpaca_file, tmp_path / "whole", max_steps=8))
    config = tiny_config(tiny_model_dir, alpaca_file, tmp_path / "split", max_steps=8, save_steps=4)
    stop = loop.StopRequest()
    original_save = checkpoints.save_checkpoint

    def save_then_stop(*args, **kwargs):
        stop.event.set()
        return original_save(*args, **kwargs)

    checkpoints.save_checkpoint = save_then_stop
    try:
        events = EventWriter(tmp_path / "split" / "events.jsonl", stream=None)
        result = loop.run_training(config, tmp_path / "split", events, stop=stop)
        events.close()
    finally:
        checkpoints.save_checkpoint = original_save
    assert result == {"status": "stopped", "step": 4}
    _, split = run(config, resume=True)
    assert step_losses(split) == pytest.approx(step_losses(whole), rel=1e-4)
    assert [e.step for e in split if e.kind == "step"][4:] == [5, 6, 7, 8]


def test_half_written_checkpoints_are_never_picked(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step-2").mkdir(parents=True)
    (root / "step-2" / checkpoints.STATE_FILE).write_text("{}")
    (root / ".tmp-step-4-123").mkdir()
    (root / "step-6").mkdir()  # renamed folders are complete by construction; one without state is not ours
    assert checkpoints.latest_checkpoint(tmp_path) == root / "step-2"


def test_stop_line_on_stdin_checkpoints_and_resume_finishes(tiny_model_dir, alpaca_file, tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "qlora_engine", "train", "--model", str(tiny_model_dir), "--data",
               str(alpaca_file), "--max-steps", "400", "--run-dir", str(run_dir), "--events", "jsonl",
               "--max-length", "64", "--micro-batch-size", "2"]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True, cwd=ROOT)
    seen = []
    for line in process.stdout:
        event = parse_line(line)
        if event is None:
            continue
        seen.append(event.kind)
        if isinstance(event, Step) and event.step == 2:
            process.stdin.write("stop\n")
            process.stdin.flush()
    assert process.wait(timeout=120) == 0
    assert seen[-2:] == ["checkpoint", "stopped"]
    stopped_step = int(Path(checkpoints.latest_checkpoint(run_dir)).name.split("-")[1])
    assert 2 <= stopped_step < 400
    resumed = subprocess.run([sys.executable, "-m", "qlora_engine", "train", "--resume", "--run-dir", str(run_dir),
                              "--max-steps", str(stopped_step + 2), "--events", "jsonl"],
                             capture_output=True, text=True, cwd=ROOT, timeout=120)
    kinds = [json.loads(line)["kind"] for line in resumed.stdout.splitlines() if line.startswith("{")]
    assert resumed.returncode == 0 and kinds[-1] == "finished"
    assert kinds.count("step") == 2


def test_missing_model_is_an_error_event_not_a_traceback(tmp_path, alpaca_file):
    result = subprocess.run([sys.executable, "-m", "qlora_engine", "train", "--model", str(tmp_path / "absent"),
                             "--data", str(alpaca_file), "--run-dir", str(tmp_path / "run"), "--events", "jsonl"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    error = parse_line(result.stdout.splitlines()[-1])
    assert result.returncode == 1
    assert error.kind == "error" and error.code == "model_not_found"
    assert str(tmp_path / "absent") in error.message and error.advice
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    from tiny_models import write_jsonl

    folder = tmp_path_factory.mktemp("finished")
    rows = [{"instruction": f"Who is mayor {i}?", "output": f"Quillon Varet {i}."} for i in range(16)]
    data_file = write_jsonl(folder / "d.jsonl", rows)
    config = tiny_config(tiny_model_dir, data_file, folder / "run", max_steps=6)
    config.save(folder / "run" / "config.yaml")
    run(config)
    return folder / "run"


def test_adapter_export_reloads_with_peft_and_matches(finished_run):
    from peft import PeftConfig

    verification = export.export_run(finished_run, "adapter")
    assert verification.ok and verification.max_abs_logit_diff <= export.ADAPTER_TOLERANCE
    out = finished_run / "exports" / "adapter"
    assert PeftConfig.from_pretrained(out).peft_type == "LORA"
    assert json.loads((finished_run / "exports" / "adapter-verification.json").read_text())["ok"]


def test_merged_export_loads_with_plain_transformers_and_matches(finished_run):
    import torch
    from transformers import AutoModelForCausalLM

    verification = export.export_run(finished_run, "merged")
    assert verification.ok and verification.relative_l2 <= export.MERGED_RELATIVE_TOLERANCE
    model = AutoModelForCausalLM.from_pretrained(finished_run / "exports" / "merged")
    assert model.dtype == torch.bfloat16
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert not [p for p in (finished_run / "exports").iterdir() if p.name.startswith(".tmp")]


def test_a_second_engine_on_the_same_run_folder_is_refused(tiny_model_dir, alpaca_file, tmp_path):
    from qlora_engine.protocol.run_lock import RunLock

    with RunLock(tmp_path / "run"):
        second = subprocess.run([sys.executable, "-m", "qlora_engine", "train", "--model", str(tiny_model_dir),
                                 "--data", str(alpaca_file), "--run-dir", str(tmp_path / "run"), "--events", "jsonl"],
                                capture_output=True, text=True, cwd=ROOT, timeout=120)
    error = parse_line(second.stdout.splitlines()[-1])
    assert second.returncode == 1 and error.code == "run_locked"
    assert f"pid {os.getpid()}" in error.message


def test_a_lock_left_by_a_killed_engine_is_taken_over(tmp_path):
    from qlora_engine.protocol.run_lock import LOCK_NAME, RunLock

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_NAME).write_text(dead.stdout.strip())
    with RunLock(tmp_path) as lock:
        assert (tmp_path / LOCK_NAME).read_text() == str(os.getpid()) and lock.held
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_model_dir, alpaca_file, tmp_path,
                                                                            monkeypatch):
    from qlora_engine.protocol.errors import EngineError

    real_step = loop.training_step
    calls = []

    def nan_at_step_three(*args, **kwargs):
        calls.append(1)
        loss, grad_norm = real_step(*args, **kwargs)
        return (float("nan"), grad_norm) if len(calls) == 3 else (loss, grad_norm)

    monkeypatch.setattr(loop, "training_step", nan_at_step_three)
    with pytest.raises(EngineError, match="loss became nan at step 3") as caught:
        run(tiny_config(tiny_model_dir, alpaca_file, tmp_path / "run", save_steps=2))
    assert caught.value.code == "nan_loss"
    assert [p.name for p in checkpoints.complete_checkpoints(tmp_path / "run")] == ["step-2"]


def test_cuda_out_of_memory_becomes_an_error_event_with_advice():
    import torch

    from qlora_engine.cli import report_failure

    emitted = []

    class Recorder:
        def emit(self, event):
            emitted.append(event)

    exit_code = report_failure(Recorder(), torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8 GiB"))
    assert exit_code == 1
    assert emitted[0].code == "cuda_oom" and "8 GiB" in emitted[0].message
    assert "qlora-studio estimate" in emitted[0].advice


@pytest.mark.parametrize("options", [
    {"quant_type": "fp4", "optimizer": "paged_adamw_32bit"},
    {"double_quant": False, "optimizer": "adamw", "lr_scheduler": "linear", "compute_dtype": "fp32"},
    {"target_modules": "q_proj,v_proj", "lr_scheduler": "constant", "gradient_checkpointing": False},
])
def test_the_selectable_quantization_optimizer_and_schedule_options_train(tiny_model_dir, alpaca_file, tmp_path,
                                                                          options):
    _, events = run(tiny_config(tiny_model_dir, alpaca_file, tmp_path / "run", max_steps=6, **options))
    losses = step_losses(events)
    assert losses[-1] < losses[0]
    loaded = next(e for e in events if e.kind == "model_loaded")
    full_lora = next(e for e in run(tiny_config(tiny_model_dir, alpaca_file, tmp_path / "full", max_steps=1))[1]
                     if e.kind == "model_loaded")
    if "target_modules" in options:
        assert loaded.trainable_params < full_lora.trainable_params


def test_chat_answers_with_the_base_and_the_tuned_model(finished_run):
    result = subprocess.run([sys.executable, "-m", "qlora_engine", "chat", str(finished_run), "--prompt",
                             "Who is mayor 3?", "--max-new-tokens", "8"], capture_output=True, text=True, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert [line.split("]")[0] for line in lines] == ["[base", "[tuned"]


class FolderWriter:
    """Stands in for a PEFT model or tokenizer: save_pretrained writes one file, or fails like a full disk."""

    def __init__(self, name: str, fail: bool = False):
        self.name, self.fail = name, fail

    def save_pretrained(self, folder, **kwargs):  # as peft's: state_dict=... among them
        import errno

        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / self.name).write_text("weights")
        if self.fail:
            raise OSError(errno.ENOSPC, "No space left on device", str(folder))


def test_the_final_adapter_replaces_the_old_one_and_clears_what_a_killed_save_left(tmp_path):
    killed = tmp_path / f"{loop.ADAPTER_TMP_PREFIX}12345"
    killed.mkdir()
    (killed / "half.safetensors").write_text("half")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "old.bin").write_text("old")
    final = loop.save_adapter(FolderWriter("adapter_model.safetensors"), FolderWriter("tokenizer.json"), tmp_path)
    assert sorted(p.name for p in final.iterdir()) == ["adapter_model.safetensors", "tokenizer.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_a_full_disk_while_writing_the_final_adapter_is_an_error_with_advice_and_keeps_the_old_one(tmp_path):
    from qlora_engine.protocol.errors import EngineError

    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_model.safetensors").write_text("the previous run's")
    with pytest.raises(EngineError) as caught:
        loop.save_adapter(FolderWriter("adapter_model.safetensors"), FolderWriter("tokenizer.json", fail=True),
                           tmp_path)
    assert caught.value.code == "disk_full" and "the final adapter" in caught.value.message
    assert "--resume" in caught.value.advice
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_text() == "the previous run's"
