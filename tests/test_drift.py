"""The drift measure: the tuned model's KL divergence from the base on text the base wrote (training.drift)."""
from __future__ import annotations

import json

import pytest
import torch

from qlora_engine import cli
from qlora_engine.protocol.config import RunConfig
from qlora_engine.protocol.events import Comparison, Finished, describe
from qlora_engine.protocol.run_state import fold
from qlora_engine.training import drift, loop
from tests.test_train import run, step_losses, tiny_config


@pytest.fixture(scope="module")
def tuned(tiny_model_dir, tmp_path_factory):
    """A tiny model with a LoRA adapter, its tokenizer and the base's continuations."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("drift")
    cfg = tiny_config(tiny_model_dir, folder / "none.jsonl", folder / "run", drift_samples=12)
    loop.seed_everything(cfg.seed)  # the LoRA init, whatever ran before in this process
    model = loop.build_model(cfg, tiny_model_dir, "cpu", torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    samples = drift.sample_continuations(model, tokenizer, cfg.drift_samples, cfg.seed, "cpu")
    return model, tokenizer, samples


def lora_b(model):
    return [p for name, p in model.named_parameters() if "lora_B" in name]


def test_the_base_has_no_drift_and_a_moved_adapter_has_more_the_further_it_moved(tuned):
    model, tokenizer, samples = tuned
    assert len(samples) == 12 and all(s.new_ids and s.prompt_ids for s in samples)
    assert drift.drift_from_start(model, samples, tokenizer.pad_token_id, "cpu") == 0.0  # B = 0: the base itself
    originals = [p.detach().clone() for p in lora_b(model)]
    measured = []
    try:
        # small moves: past ~0.2 the perturbation dominates the tiny model's residual stream and its final norm
        # makes the output distribution saturate (measured with the seeded init: 0.0082, 0.0268, 0.0264 at 0.02, 0.2, 2)
        for size in (0.002, 0.01, 0.05):
            generator = torch.Generator().manual_seed(0)
            for p, original in zip(lora_b(model), originals):
                p.data = original + size * torch.randn(p.shape, generator=generator)
            measured.append(drift.drift_from_start(model, samples, tokenizer.pad_token_id, "cpu"))
    finally:
        for p, original in zip(lora_b(model), originals):
            p.data = original
    assert 0 < measured[0] < measured[1] < measured[2], measured


def test_sampling_leaves_the_random_state_and_the_model_as_it_found_them(tuned):
    model, tokenizer, _ = tuned
    model.train()
    modes = [module.training for module in model.modules()]
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    again = drift.sample_continuations(model, tokenizer, 4, 42, "cpu")
    assert torch.equal(torch.rand(3), expected)
    first = drift.sample_continuations(model, tokenizer, 4, 42, "cpu")
    assert [s.new_ids for s in first] == [s.new_ids for s in again]  # the run's seed decides the text
    assert [module.training for module in model.modules()] == modes and tokenizer.padding_side == "right"


def test_a_run_reports_drift_at_each_evaluation_without_changing_what_it_trains(tiny_model_dir, alpaca_file,
                                                                                 tmp_path, capsys):
    common = {"max_steps": 8, "eval_steps": 4, "learning_rate": 5e-2}
    _, measured = run(tiny_config(tiny_model_dir, alpaca_file, tmp_path / "on", drift_samples=8, **common))
    _, unmeasured = run(tiny_config(tiny_model_dir, alpaca_file, tmp_path / "off", drift_samples=0, **common))
    assert step_losses(measured) == step_losses(unmeasured)  # same training, bit for bit
    evals = [e for e in measured if e.kind == "eval"]
    assert [e.step for e in evals] == [0, 4, 8]
    assert evals[0].drift == 0.0 and 0 < evals[1].drift and 0 < evals[2].drift
    assert all(e.drift is None for e in unmeasured if e.kind == "eval")
    _, gentler = run(tiny_config(tiny_model_dir, alpaca_file, tmp_path / "gentle", drift_samples=8,
                                 **{**common, "learning_rate": 1e-3}))
    assert 0 < [e.drift for e in gentler if e.kind == "eval"][-1] < evals[-1].drift / 2, "over-training drifts more"
    state = fold(measured)
    assert state.drift == evals[-1].drift and list(state.series["drift"].x) == [0, 4, 8]
    assert state.to_summary()["drift"] == evals[-1].drift
    stored = json.loads((tmp_path / "on" / drift.SAMPLES_FILE).read_text())
    assert len(stored["samples"]) == 8 and stored["seed"] == 42
    for name, cfg in (("on", measured), ("off", unmeasured)):
        RunConfig.from_dict(cfg[0].config).save(tmp_path / name / "config.yaml")  # as `train` writes it
    assert cli.main(["runs", "--runs-dir", str(tmp_path)]) == 0
    listed = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert f"drift {evals[-1].drift:.3f}" in listed["on"] and "drift" not in listed["off"]
    assert "Everything else: drift from the base" in describe(Comparison(rows=[], drift=0.25))
    assert "1.28x as surprising" in describe(Finished(step=8, adapter_dir="a", drift=0.25))


def test_a_resumed_run_measures_on_the_same_text(tiny_model_dir, alpaca_file, tmp_path):
    cfg = tiny_config(tiny_model_dir, alpaca_file, tmp_path / "run", drift_samples=6, max_steps=6, eval_steps=3,
                      save_steps=3)
    run(cfg)
    path = tmp_path / "run" / drift.SAMPLES_FILE
    before = path.read_text()
    path.write_text(json.dumps({**json.loads(before), "marker": 1}))  # rewritten only if sampled again
    _, events = run(tiny_config(tiny_model_dir, alpaca_file, tmp_path / "run", drift_samples=6, max_steps=9,
                                eval_steps=3, save_steps=3), resume=True)
    assert json.loads(path.read_text()).get("marker") == 1
    assert [e.step for e in events if e.kind == "eval" and e.drift is not None][-2:] == [6, 9]


def test_a_pissa_start_is_the_base_drift_measures_from(tiny_model_dir, alpaca_file, tmp_path):
    """PiSSA moves the base weights into the adapter: drift is measured from the model as it started."""
    _, events = run(tiny_config(tiny_model_dir, alpaca_file, tmp_path / "run", drift_samples=6, max_steps=4,
                                eval_steps=4, init_lora="pissa"))
    evals = [e for e in events if e.kind == "eval"]
    assert evals[0].drift == 0.0 and evals[-1].drift > 0


def test_the_drift_grid_runs_each_configuration_in_its_own_engine_and_tables_it(tiny_model_dir, tmp_path,
                                                                                  monkeypatch):
    from qlora_engine.bench import drift_grid

    assert drift_grid.flags({"learning_rate": 5e-4, "gradient_checkpointing": False}) == [
        "--learning-rate", "0.0005", "--no-gradient-checkpointing"]
    monkeypatch.setattr(drift_grid, "GRID", [{"model": str(tiny_model_dir), "learning_rate": 1e-3, "lora_r": 8,
                                              "max_steps": 2}])
    monkeypatch.setitem(drift_grid.BASE_OPTIONS, "compare_questions", 3)
    monkeypatch.setitem(drift_grid.BASE_OPTIONS, "drift_samples", 4)
    out = tmp_path / "grid.jsonl"
    assert drift_grid.run_grid(out) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["drift"] >= 0 and 0 <= row["heldout_accuracy"] <= 1 and row["eval_loss_final"] > 0
    assert "| 0.001 | 8 | 2 | 0.05 | all-linear |" in drift_grid.markdown_table([row])
