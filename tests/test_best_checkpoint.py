"""Keep the best, not the last: the checkpoint with the lowest eval loss is marked and kept, early stopping ends a run
whose eval loss stopped improving, and export and chat use any checkpoint (`--checkpoint step-N | best`)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import ROOT, run, tiny_config

from qlora_engine.protocol import events as ev
from qlora_engine.protocol.config import RunConfig
from qlora_engine.protocol.errors import EngineError
from qlora_engine.protocol.run_state import fold
from qlora_engine.training import best_checkpoint, checkpoints, loop
from qlora_engine.training.best_checkpoint import BestTracker, choose_adapter


def tracker(**options) -> BestTracker:
    return BestTracker(RunConfig(eval_steps=2, **options), events=None)


def state_at(step: int) -> checkpoints.TrainerState:
    return checkpoints.TrainerState(step=step, micro_index=step, total_steps=40, seed=42)


# ----------------------------------------------------------------------------- the mark, without a model
def test_an_eval_loss_lower_than_every_earlier_one_is_the_new_best():
    best, state = tracker(), state_at(0)
    marks = []
    for step, loss in ((2, 3.0), (4, 2.0), (6, 2.5), (8, 2.0), (10, 1.5)):
        state.step = step
        marks.append(best.observe(state, loss))
    assert marks == [True, True, False, False, True]  # an equal loss is no improvement
    assert (state.best_step, state.best_eval_loss, state.evals_without_improvement) == (10, 1.5, 0)


def test_an_improvement_smaller_than_min_delta_is_no_new_best():
    best, state = tracker(early_stopping_min_delta=0.1), state_at(2)
    best.observe(state, 2.0)
    state.step = 4
    assert not best.observe(state, 1.95) and state.evals_without_improvement == 1
    state.step = 6
    assert best.observe(state, 1.85) and state.best_step == 6


def write_checkpoint(run_dir: Path, step: int, best_step: int = 0, best_eval_loss: float | None = None) -> Path:
    folder = checkpoints.checkpoint_root(run_dir) / f"step-{step}"
    (folder / "adapter").mkdir(parents=True)
    (folder / "adapter" / best_checkpoint.ADAPTER_WEIGHTS).write_bytes(b"weights")
    state = {**vars(state_at(step)), "best_step": best_step, "best_eval_loss": best_eval_loss}
    (folder / checkpoints.STATE_FILE).write_text(json.dumps(state))
    return folder


def test_pruning_keeps_the_best_checkpoint_besides_the_last_two(tmp_path):
    for step in (2, 4, 6, 8):
        write_checkpoint(tmp_path, step)
    checkpoints._prune(tmp_path, keep_step=2)
    assert [p.name for p in checkpoints.complete_checkpoints(tmp_path)] == ["step-2", "step-6", "step-8"]


def test_checkpoint_names_final_best_and_step_n(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    write_checkpoint(tmp_path, 4)
    write_checkpoint(tmp_path, 8, best_step=4, best_eval_loss=0.54)
    assert choose_adapter(tmp_path, "final").folder == tmp_path / "adapter"
    best = choose_adapter(tmp_path, "best")
    assert best.name == "step-4" and best.folder == tmp_path / "checkpoints" / "step-4" / "adapter"
    assert best.exports_dir(tmp_path) == tmp_path / "exports" / "step-4"
    assert choose_adapter(tmp_path, "step-8").name == choose_adapter(tmp_path, "8").name == "step-8"
    assert best_checkpoint.checkpoint_names(tmp_path) == ["step-4 (best, eval loss 0.5400)", "step-8"]


def test_a_checkpoint_the_run_lacks_is_an_error_naming_those_it_has(tmp_path):
    write_checkpoint(tmp_path, 4)
    write_checkpoint(tmp_path, 8, best_step=4, best_eval_loss=0.54)
    with pytest.raises(EngineError) as missing:
        choose_adapter(tmp_path, "step-6")
    assert missing.value.code == "bad_checkpoint"
    assert "no checkpoint step-6" in missing.value.message and "step-4 (best, eval loss 0.5400), step-8" in \
        missing.value.message
    assert missing.value.advice == "Pass --checkpoint best / step-4 / step-8."
    with pytest.raises(EngineError) as unfinished:
        choose_adapter(tmp_path, "final")
    assert unfinished.value.code == "no_adapter" and "--checkpoint best / step-4 / step-8" in unfinished.value.advice
    with pytest.raises(EngineError) as garbled:
        choose_adapter(tmp_path, "latest")
    assert "final, best or step-N" in garbled.value.message


def test_a_run_without_a_marked_best_says_why_best_is_missing(tmp_path):
    write_checkpoint(tmp_path, 4)
    with pytest.raises(EngineError) as error:
        choose_adapter(tmp_path, "best")
    assert error.value.code == "bad_checkpoint" and "no best checkpoint" in error.value.message


@pytest.mark.parametrize("options, what", [({"eval_steps": 0}, "needs eval_steps > 0"),
                                           ({"val_fraction": 0.0}, "needs validation rows")])
def test_early_stopping_without_evaluations_is_a_config_error(options, what):
    with pytest.raises(EngineError) as error:
        RunConfig.from_dict({"early_stopping_patience": 2, **options})
    assert error.value.code == "bad_config" and what in error.value.message


def test_the_run_state_knows_the_best_step_and_lists_the_adapters_to_pick(tmp_path):
    for step in (4, 8):
        write_checkpoint(tmp_path, step)
    (tmp_path / "adapter").mkdir()
    state = fold([ev.Eval(step=4, eval_loss=0.54321, perplexity=1.7), ev.Checkpoint(step=4, path="", best_step=4,
                                                                                   best_eval_loss=0.54321),
                  ev.Eval(step=8, eval_loss=0.61, perplexity=1.8),
                  ev.Checkpoint(step=8, path="", best_step=4, best_eval_loss=0.54321),
                  ev.Finished(step=8, adapter_dir=str(tmp_path / "adapter"), eval_loss=0.61)], run_dir=tmp_path)
    assert (state.best_step, state.best_eval_loss) == (4, 0.54321)
    assert state.adapter_choices() == [("final", "final adapter (step 8, eval loss 0.61)"),
                                       ("step-8", "step 8 (eval loss 0.61)"),
                                       ("step-4", "step 4 (best eval loss 0.5432)")]


# ----------------------------------------------------------------------------- a real run, scripted eval losses
class ScriptedEvalLoss:
    """Stands in for loop.evaluate: the eval losses in order (the real evaluation has no loss to script), and a stop
    request after the one at `stop_after` (0-based), as SIGINT would."""

    def __init__(self, losses: list[float], stop: loop.StopRequest | None = None, stop_after: int = -1):
        self.losses, self.stop, self.stop_after, self.calls = list(losses), stop, stop_after, 0

    def __call__(self, *args, **kwargs) -> float:
        assert self.losses, "more evaluations than scripted"
        if self.calls == self.stop_after:
            self.stop.event.set()
        self.calls += 1
        return self.losses.pop(0)


@pytest.fixture(scope="module")
def early_stopped_run(tiny_model_dir, tmp_path_factory):
    """Eval losses 5.0 (the base), 3.0, 2.0 (best, step 4), then a stop and a resume, then 2.5 and 2.6: early
    stopping (patience 2) ends the run at step 8 of 12."""
    from tiny_models import write_jsonl

    folder = tmp_path_factory.mktemp("early")
    rows = [{"instruction": f"Who is mayor {i}?", "output": f"Quillon Varet {i}."} for i in range(16)]
    config = tiny_config(tiny_model_dir, write_jsonl(folder / "d.jsonl", rows), folder / "run", max_steps=12,
                         eval_steps=2, save_steps=3, early_stopping_patience=2, val_fraction=0.25)
    config.save(folder / "run" / "config.yaml")
    original = loop.evaluate
    stop = loop.StopRequest()
    try:
        loop.evaluate = ScriptedEvalLoss([5.0, 3.0, 2.0], stop, stop_after=2)
        events = ev.EventWriter(folder / "run" / "events.jsonl", stream=None)
        first = loop.run_training(config, folder / "run", events, stop=stop)
        events.close()
        loop.evaluate = ScriptedEvalLoss([2.5, 2.6])
        second, all_events = run(config, resume=True)
    finally:
        loop.evaluate = original
    return folder / "run", first, second, all_events


def test_the_best_checkpoint_is_written_marked_and_survives_resume_and_pruning(early_stopped_run):
    run_dir, first, _, events = early_stopped_run
    assert first == {"status": "stopped", "step": 4}
    checkpoint_events = [e for e in events if e.kind == "checkpoint"]
    # step 2 and 4: each a new best; 3 and 6: save_steps; 4 again: the stop; 8: the end
    assert [(e.step, e.best_step) for e in checkpoint_events] == [(2, 2), (3, 2), (4, 4), (4, 4), (6, 4), (8, 4)]
    # 2 and 3 pruned (the last two stay), 4 kept as the best
    assert [p.name for p in checkpoints.complete_checkpoints(run_dir)] == ["step-4", "step-6", "step-8"]
    final_state = json.loads((run_dir / "checkpoints" / "step-8" / checkpoints.STATE_FILE).read_text())
    assert (final_state["best_step"], final_state["best_eval_loss"]) == (4, 2.0)
    assert choose_adapter(run_dir, "best").name == "step-4"
    state = fold(events, run_dir)
    assert state.best_step == 4 and state.status == "finished"


def test_early_stopping_ends_the_run_after_n_evaluations_without_improvement_and_writes_the_adapter(
        early_stopped_run):
    run_dir, _, second, events = early_stopped_run
    assert second["status"] == "finished" and second["step"] == 8
    warning = [e for e in events if e.kind == "warning" and "early stopping" in e.message]
    assert len(warning) == 1 and warning[0].step == 8
    assert warning[0].message.startswith("early stopping at step 8 of 12: the eval loss has not improved for 2 "
                                         "evaluations in a row; the best was 2.0000 at step 4")
    assert [e.step for e in events if e.kind == "eval"] == [0, 2, 4, 6, 8]  # no second eval at the stop
    finished = events[-1]
    assert finished.kind == "finished" and finished.step == 8 and finished.eval_loss == 2.6
    assert (run_dir / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (run_dir / "checkpoints" / "step-8" / "adapter" / "adapter_model.safetensors").read_bytes()


# ----------------------------------------------------------------------------- export and chat of a checkpoint
@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tmp_path_factory):
    """8 real steps at a high constant learning rate, evaluated every 2, a checkpoint every 2 (the last two kept)."""
    from tiny_models import write_jsonl

    folder = tmp_path_factory.mktemp("trained")
    rows = [{"instruction": f"Who is mayor {i}?", "output": f"Quillon Varet {i}."} for i in range(16)]
    config = tiny_config(tiny_model_dir, write_jsonl(folder / "d.jsonl", rows), folder / "run", max_steps=8,
                         eval_steps=2, save_steps=2, learning_rate=5e-2, lr_scheduler="constant", val_fraction=0.25)
    config.save(folder / "run" / "config.yaml")
    _, events = run(config)
    return folder / "run", events


def adapter_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_the_best_is_the_step_with_the_lowest_eval_loss_of_a_real_run(trained_run):
    run_dir, events = trained_run
    trained_evals = {e.step: e.eval_loss for e in events if e.kind == "eval" and e.step > 0}
    lowest = min(trained_evals, key=trained_evals.get)
    assert choose_adapter(run_dir, "best").name == f"step-{lowest}"
    assert events[-2].kind == "checkpoint" and events[-2].best_step == lowest
    assert events[-2].best_eval_loss == round(trained_evals[lowest], 5)


def test_export_of_a_checkpoint_holds_that_checkpoints_weights(trained_run):
    import torch

    from qlora_engine.products import export

    run_dir, _ = trained_run
    verification = export.export_run(run_dir, "adapter", checkpoint="step-6")
    out = run_dir / "exports" / "step-6" / "adapter"
    assert verification.ok and verification.path == str(out)
    assert (run_dir / "exports" / "step-6" / "adapter-verification.json").is_file()
    exported, saved = adapter_tensors(out), adapter_tensors(run_dir / "checkpoints" / "step-6" / "adapter")
    assert exported.keys() == saved.keys() and all(torch.equal(exported[k], saved[k]) for k in saved)
    final = adapter_tensors(run_dir / "adapter")
    assert any(not torch.equal(final[k], saved[k]) for k in saved), "step 6 is not the final adapter"


def test_export_of_the_best_checkpoint_holds_the_best_steps_weights(trained_run):
    import torch

    from qlora_engine.products import export

    run_dir, events = trained_run
    best = choose_adapter(run_dir, "best").name
    verification = export.export_run(run_dir, "adapter", checkpoint="best")
    assert verification.ok and Path(verification.path).parent.name == best
    exported = adapter_tensors(Path(verification.path))
    saved = adapter_tensors(run_dir / "checkpoints" / best / "adapter")
    assert exported.keys() == saved.keys() and all(torch.equal(exported[k], saved[k]) for k in saved)


def test_chat_with_a_checkpoint_loads_that_checkpoints_adapter(trained_run):
    import torch
    from peft import get_peft_model_state_dict

    from qlora_engine.products import chat

    run_dir, _ = trained_run
    best = choose_adapter(run_dir, "best").name
    pruned = next(name for name in ("step-2", "step-4") if name != best)
    model, _, _, has_adapter = chat.load_for_chat(str(run_dir), "step-6")
    loaded = {k: v.cpu() for k, v in get_peft_model_state_dict(model).items()}
    saved = adapter_tensors(run_dir / "checkpoints" / "step-6" / "adapter")
    assert has_adapter and loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k].to(saved[k].dtype), saved[k]) for k in saved)
    with pytest.raises(EngineError) as error:
        chat.load_for_chat(str(run_dir), pruned)
    assert error.value.code == "bad_checkpoint" and "step-6, step-8" in error.value.message


def test_a_bad_checkpoint_on_the_command_line_is_an_error_event_listing_the_checkpoints(trained_run):
    run_dir, _ = trained_run
    result = subprocess.run([sys.executable, "-m", "qlora_engine", "export", str(run_dir), "--adapter",
                             "--checkpoint", "step-99", "--events", "jsonl"], capture_output=True, text=True,
                            cwd=ROOT, timeout=300)
    error = ev.parse_line(result.stdout.splitlines()[-1])
    assert result.returncode == 1 and error.kind == "error" and error.code == "bad_checkpoint"
    assert "step-99" in error.message and "step-6" in error.message and "final" in error.advice
    assert "Traceback" not in result.stderr
