"""The VRAM estimate from config.json alone: per-family sizes, what each option costs, the advice, the CLI."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from qlora_engine.planning import estimate_command, hardware, memory
from qlora_engine.planning.advice import advise, fit_to_gpu, fit_verdict
from qlora_engine.planning.memory import Estimate, estimate_peak
from qlora_engine.planning.model_shape import (
    SMOLLM2_135M_CONFIG,
    load_model_config,
    model_shape,
    resolve_model_config,
    targeted_linears,
)
from qlora_engine.protocol.config import RunConfig
from qlora_engine.protocol.errors import EngineError
from qlora_engine.resources import resources_dir

GIB = 2**30
CONFIGS = resources_dir() / "model_configs"
TERM_NAMES = ["nf4_weights", "quant_constants", "layers_16bit", "lora_weights", "lora_gradients",
              "optimizer_states", "activations", "logits_and_loss", "cuda_context", "allocator_slack"]
WEIGHT_TERMS = ("nf4_weights", "quant_constants", "layers_16bit")


def config(name: str) -> dict:
    return load_model_config(CONFIGS / f"{name}.json")


def run(**changes) -> RunConfig:
    """A run config without gradient accumulation unless asked: the memory cases below are written for it."""
    # The memory model of peft's layer-by-layer path with padded batches and full logits unless a test says
    # otherwise; the engine's default speed switches are tested on their own below.
    # (and uncompiled: the compiled layers have constants of their own, tested below), with the paged 8-bit
    # optimizer (the default when these cases were written; the others are tested by name)
    return RunConfig(**{"grad_accum": 1, "packing": False, "chunked_loss": False, "fused_lora": False,
                        "compile_layers": False, "optimizer": "paged_adamw_8bit", **changes}).validate()


def gib_of(estimate: Estimate, *names: str) -> float:
    return sum(estimate.bytes_of(name) for name in names) / GIB


# ----------------------------------------------------------------------------- families
@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.json")), ids=lambda path: path.stem)
def test_every_supported_family_gets_an_exact_estimate_of_named_terms(path):
    estimate = estimate_peak(load_model_config(path), run())
    assert not estimate.approximate and estimate.reasons == []
    assert [term.name for term in estimate.terms] == TERM_NAMES
    assert all(term.note for term in estimate.terms)
    # One micro-batch per step: the gradients count only where they are alive at the peak (often they aren't).
    assert all(term.bytes > 0 for term in estimate.terms if term.name != "lora_gradients")
    assert estimate.peak_bytes == sum(term.bytes for term in estimate.terms)
    accumulating = estimate_peak(load_model_config(path), run(grad_accum=2))
    assert all(term.bytes > 0 for term in accumulating.terms)


@pytest.mark.parametrize("name, billions", [("llama-3.1-8b", 8.03), ("mistral-7b-v0.1", 7.24),
                                            ("qwen2.5-7b", 7.62), ("qwen3-8b", 8.19), ("phi-3-mini-4k", 3.82),
                                            ("gemma-7b", 8.54), ("gemma-2-2b", 2.61), ("qwen2.5-0.5b", 0.49),
                                            ("smollm2-135m", 0.13)])
def test_parameter_counts_match_the_published_model_sizes(name, billions):
    assert estimate_peak(config(name), run()).total_params / 1e9 == pytest.approx(billions, abs=0.01)


def test_an_8b_model_in_nf4_takes_about_5_gib_of_weights():
    estimate = estimate_peak(config("llama-3.1-8b"), run())
    assert 3.2 < gib_of(estimate, "nf4_weights", "quant_constants") < 3.5  # 7.0 B linear weights at ~4.1 bits
    assert gib_of(estimate, "layers_16bit") == pytest.approx(2 * 128256 * 4096 * 2 / GIB, rel=0.01)
    assert 5.0 < gib_of(estimate, *WEIGHT_TERMS) < 5.5  # HF's get_memory_footprint: ~5.6 GB


def test_a_7b_model_with_a_small_vocabulary_takes_under_4_gib_of_weights():
    assert 3.7 < gib_of(estimate_peak(config("mistral-7b-v0.1"), run()), *WEIGHT_TERMS) < 4.0


def test_tied_embeddings_halve_the_16bit_layers():
    tied = config("llama-3.2-1b")
    untied = {**tied, "tie_word_embeddings": False}
    tied_gib = gib_of(estimate_peak(tied, run()), "layers_16bit")
    assert gib_of(estimate_peak(untied, run()), "layers_16bit") == pytest.approx(2 * tied_gib, rel=0.01)


def test_gemma_ties_embeddings_when_its_config_does_not_say():
    assert "tie_word_embeddings" not in config("gemma-7b")
    assert model_shape(config("gemma-7b"))[0].tied_embeddings


def test_gqa_makes_the_k_and_v_adapters_smaller():
    gqa = config("llama-3.1-8b")  # 8 key/value heads for 32 query heads
    full = {**gqa, "num_key_value_heads": 32}
    kv_only = run(target_modules="k_proj,v_proj")
    ratio = estimate_peak(gqa, kv_only).bytes_of("lora_weights") / estimate_peak(full, kv_only).bytes_of("lora_weights")
    assert ratio == pytest.approx((4096 + 8 * 128) / (4096 + 32 * 128))


def test_gemma_head_dim_sets_the_attention_width():
    shape = model_shape(config("gemma-7b"))[0]
    assert shape.q_width == 16 * 256 != shape.hidden_size
    assert [(linear.name, linear.in_features) for linear in shape.decoder_linears()][3] == ("o_proj", 4096)


def test_phi3_fused_projections_are_the_lora_targets():
    names = [linear.name for linear in model_shape(config("phi-3-mini-4k"))[0].decoder_linears()]
    assert names == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    with pytest.raises(EngineError, match="names no linear layer") as error:
        estimate_peak(config("phi-3-mini-4k"), run(target_modules="q_proj,v_proj"))
    assert "qkv_proj" in error.value.advice


def test_qwen2_attention_biases_stay_in_16_bit():
    qwen = config("qwen2.5-7b")
    without_bias = {**qwen, "attention_bias": False}
    extra_bytes = (estimate_peak(qwen, run()).bytes_of("layers_16bit")
                   - estimate_peak(without_bias, run()).bytes_of("layers_16bit"))
    assert extra_bytes == 28 * (3584 + 2 * 4 * 128) * 2


def test_gemma2_logit_softcapping_costs_logits_memory():
    gemma2 = config("gemma-2-2b")
    uncapped = {**gemma2, "final_logit_softcapping": None}
    assert (estimate_peak(gemma2, run()).bytes_of("logits_and_loss")
            > estimate_peak(uncapped, run()).bytes_of("logits_and_loss"))


# ----------------------------------------------------------------------------- what options cost
def test_gradient_checkpointing_cuts_activation_memory():
    model = config("llama-3.1-8b")
    with_checkpointing = estimate_peak(model, run(gradient_checkpointing=True)).bytes_of("activations")
    without = estimate_peak(model, run(gradient_checkpointing=False)).bytes_of("activations")
    assert with_checkpointing < without / 10


def test_8bit_optimizer_states_are_about_a_quarter_of_32bit():
    model = config("llama-3.1-8b")
    states_8bit = estimate_peak(model, run(optimizer="paged_adamw_8bit")).bytes_of("optimizer_states")
    states_32bit = estimate_peak(model, run(optimizer="paged_adamw_32bit")).bytes_of("optimizer_states")
    assert states_8bit / states_32bit == pytest.approx(0.25, abs=0.01)
    assert states_32bit == estimate_peak(model, run(optimizer="adamw")).bytes_of("optimizer_states")


def test_the_optimizer_note_says_what_paging_moves_off_the_gpu():
    notes = {term.name: term.note for term in estimate_peak(config("llama-3.1-8b"), run()).terms}
    assert "CPU RAM" in notes["optimizer_states"]


def test_double_quantization_saves_about_0_37_bits_per_weight():
    model = config("llama-3.1-8b")
    on = estimate_peak(model, run(double_quant=True))
    off = estimate_peak(model, run(double_quant=False))
    linear_params = 2 * on.bytes_of("nf4_weights")
    saved_bits = 8 * (off.bytes_of("quant_constants") - on.bytes_of("quant_constants")) / linear_params
    assert saved_bits == pytest.approx(0.373, abs=0.01)


def test_lora_rank_scales_lora_weights_gradients_and_states():
    model = config("mistral-7b-v0.3")
    r8, r16 = estimate_peak(model, run(lora_r=8, grad_accum=2)), estimate_peak(model, run(lora_r=16, grad_accum=2))
    for name in ("lora_weights", "lora_gradients", "optimizer_states"):
        assert r16.bytes_of(name) == pytest.approx(2 * r8.bytes_of(name), rel=0.01)


def test_fp32_compute_doubles_the_16bit_layers():
    model = config("qwen2.5-0.5b")
    assert (estimate_peak(model, run(compute_dtype="fp32")).bytes_of("layers_16bit")
            == 2 * estimate_peak(model, run(compute_dtype="bf16")).bytes_of("layers_16bit"))


def test_gradients_are_not_counted_at_the_loss_unless_accumulated():
    """loop.training_step sets gradients to None after each step; with accumulation they outlive a micro-batch."""
    model = config("llama-3.1-8b")
    single = estimate_peak(model, run(max_length=2048))
    accumulated = estimate_peak(model, run(max_length=2048, grad_accum=4))
    assert "peak is at the loss" in single.terms[TERM_NAMES.index("activations")].note
    assert single.bytes_of("lora_gradients") == 0
    assert accumulated.bytes_of("lora_gradients") == accumulated.bytes_of("lora_weights")  # fp32 each
    assert "kept across the 4 micro-batches" in accumulated.terms[TERM_NAMES.index("lora_gradients")].note


def test_a_high_rank_on_short_rows_peaks_at_the_end_of_the_backward_with_every_gradient():
    estimate = estimate_peak(config("llama-3.1-8b"), run(max_length=64, micro_batch_size=1, lora_r=256))
    assert "end of the backward" in estimate.terms[TERM_NAMES.index("activations")].note
    assert 0 < estimate.bytes_of("lora_gradients") <= estimate.bytes_of("lora_weights")


def test_a_small_vocabulary_with_checkpointing_peaks_in_the_layers_backward():
    """Mistral's 32k vocabulary: the recomputed layer and its gradients outweigh the logits."""
    estimate = estimate_peak(config("mistral-7b-v0.3"), run(max_length=4096, micro_batch_size=2))
    assert "start of the backward" in estimate.terms[TERM_NAMES.index("activations")].note


def test_a_single_row_has_no_padding_mask_and_keeps_gqa_unexpanded():
    """collate pads to the longest row: batch 1 is never padded, so SDPA runs causal with GQA's k and v as they are."""
    shape = model_shape(config("llama-3.1-8b"))[0]
    one_row, padded = run(max_length=4096, micro_batch_size=1), run(max_length=4096, micro_batch_size=2)
    expanded_k_v = 2 * (shape.q_width - shape.kv_width) * 2
    mask_row = 4096 * 2
    assert (memory._attention_bytes_per_token(shape, padded, 2) - memory._attention_bytes_per_token(shape, one_row, 2)
            == expanded_k_v + mask_row)
    assert memory._mask_bytes_per_element(shape, one_row, 2) == 0 < memory._mask_bytes_per_element(shape, padded, 2)


def test_only_large_optimizer_states_are_paged():
    """bitsandbytes pages the states of tensors of 100,000 parameters or more; smaller ones are GPU tensors."""
    assert memory._optimizer_state_bytes(99_999, "paged_adamw_8bit")[1] == 0
    torch_bytes, paged_bytes = memory._optimizer_state_bytes(100_000, "paged_adamw_8bit")
    assert paged_bytes == 2 * 100_000 and torch_bytes == 2 * 391 * 4  # the fp32 absmax per 256 stay on the GPU
    assert memory._optimizer_state_bytes(100_000, "adamw") == (8 * 100_000, 0)
    notes = {term.name: term.note for term in estimate_peak(config("llama-3.1-8b"), run(optimizer="adamw")).terms}
    assert "paged" not in notes["optimizer_states"]


def test_allocator_slack_scales_the_short_lived_tensors_more_with_checkpointing():
    model = config("llama-3.1-8b")
    for checkpointing, name in ((True, "allocator_slack_checkpointed_fraction"),
                                (False, "allocator_slack_full_fraction")):
        estimate = estimate_peak(model, run(max_length=1024, micro_batch_size=1, gradient_checkpointing=checkpointing))
        short_lived = gib_of(estimate, "lora_gradients", "activations", "logits_and_loss")
        assert gib_of(estimate, "allocator_slack") == pytest.approx(memory.CALIBRATION[name] * short_lived, rel=1e-6)
    checkpointed, full = (memory.CALIBRATION[f"allocator_slack_{kind}_fraction"] for kind in ("checkpointed", "full"))
    assert checkpointed > 2 * full


def test_the_shipped_calibration_is_the_h100_fit_and_is_package_data():
    fitted = json.loads(memory.CALIBRATION_PATH.read_text(encoding="utf-8"))
    assert "H100" in fitted["_source"] and "memory_measured_h100.jsonl" in fitted["_source"]
    assert memory.load_calibration() == memory.CALIBRATION
    assert all(memory.CALIBRATION[name] == value for name, value in fitted.items() if not name.startswith("_"))
    pyproject = (Path(__file__).parent.parent / "pyproject.toml").read_text(encoding="utf-8")
    package_data = re.search(r'\[tool\.setuptools\.package-data\]\s*"qlora_engine\.planning" = \[([^\]]*)\]', pyproject)
    assert package_data and '"calibration.json"' in package_data.group(1)


@pytest.mark.parametrize("checkpointing", [True, False])
def test_peak_grows_with_batch_and_with_sequence_length(checkpointing):
    model = config("llama-3.2-3b")
    by_batch = [estimate_peak(model, run(micro_batch_size=b, gradient_checkpointing=checkpointing)).peak_bytes
                for b in range(1, 17)]
    by_length = [estimate_peak(model, run(max_length=n, gradient_checkpointing=checkpointing)).peak_bytes
                 for n in range(128, 8193, 128)]
    assert by_batch == sorted(by_batch) and len(set(by_batch)) == len(by_batch)
    assert by_length == sorted(by_length) and len(set(by_length)) == len(by_length)


# ----------------------------------------------------------------------------- configs we can't fully model
def test_unknown_architecture_is_marked_approximate_with_the_reason():
    strange = {**config("llama-3.1-8b"), "model_type": "falcon_mamba_x"}
    estimate = estimate_peak(strange, run())
    assert estimate.approximate and "falcon_mamba_x" in estimate.reasons[0]
    assert estimate.peak_bytes > 0


def test_multimodal_config_counts_the_text_decoder_approximately():
    text = {key: value for key, value in config("llama-3.2-3b").items() if key != "model_type"}
    multimodal = {"model_type": "llava", "text_config": {**text, "model_type": "llama"}}
    estimate = estimate_peak(multimodal, run())
    assert estimate.approximate and "text decoder" in estimate.reasons[0]
    assert estimate.bytes_of("nf4_weights") == estimate_peak(config("llama-3.2-3b"), run()).bytes_of("nf4_weights")


def test_missing_field_is_named_in_the_error():
    broken = {key: value for key, value in config("qwen3-8b").items() if key != "hidden_size"}
    with pytest.raises(EngineError, match="'hidden_size'") as error:
        estimate_peak(broken, run())
    assert "gated" in error.value.advice


def test_a_field_with_a_wrong_value_is_named():
    with pytest.raises(EngineError, match="'num_hidden_layers' is 'thirty'"):
        estimate_peak({**config("llama-3.2-1b"), "num_hidden_layers": "thirty"}, run())


def test_config_loads_from_the_model_folder_or_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(config("qwen3-8b")))
    assert load_model_config(tmp_path) == load_model_config(tmp_path / "config.json") == config("qwen3-8b")


def test_a_config_that_is_not_json_says_so_with_the_path(tmp_path):
    (tmp_path / "config.json").write_text("<html>401 Unauthorized</html>")
    with pytest.raises(EngineError, match="not valid JSON") as error:
        load_model_config(tmp_path)
    assert str(tmp_path) in error.value.message


def test_default_model_is_the_bundled_smollm2():
    assert resolve_model_config("default") == SMOLLM2_135M_CONFIG
    assert {**SMOLLM2_135M_CONFIG, "transformers_version": "4.42.3"} == config("smollm2-135m")


def test_calibration_file_overrides_the_constants(tmp_path):
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"_source": "a note, ignored", "allocator_slack_checkpointed_fraction": 0.6}))
    calibration = memory.load_calibration(path)
    assert calibration["allocator_slack_checkpointed_fraction"] == 0.6
    assert calibration["cuda_context_bytes"] == memory.DEFAULT_CALIBRATION["cuda_context_bytes"]
    assert "_source" not in calibration
    slack = estimate_peak(config("llama-3.2-1b"), run(), calibration).bytes_of("allocator_slack")
    assert slack > estimate_peak(config("llama-3.2-1b"), run()).bytes_of("allocator_slack")


def test_calibration_file_with_an_unknown_constant_is_refused(tmp_path):
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"slack": 0.25}))
    with pytest.raises(EngineError, match="unknown calibration constant"):
        memory.load_calibration(path)


# ----------------------------------------------------------------------------- verdict and advice
def test_verdict_is_tight_within_ten_percent_of_free_memory():
    estimate = estimate_peak(config("llama-3.2-1b"), run())
    assert fit_verdict(estimate, int(estimate.peak_bytes * 1.5)) == "fits"
    assert fit_verdict(estimate, int(estimate.peak_bytes * 1.05)) == "tight"
    assert fit_verdict(estimate, int(estimate.peak_bytes * 0.95)) == "won't fit"


def test_a_run_that_fits_needs_no_fixes_only_speed_it_can_afford():
    """A run that fits gets no memory-saving fixes; on a GPU, the speed switches measured on the H200 that still fit
    (each a cost: a negative saving), both together first; on the CPU, none."""
    advice = advise(config("smollm2-135m"), run(device="cpu"), 24 * GIB)
    assert advice.verdict == "fits" and advice.fixes == []
    model = config("llama-3.1-8b")
    gpu_run = run(device="cuda", compile_layers=True, max_length=2048, micro_batch_size=1)
    advice = advise(model, gpu_run, 24 * GIB)
    assert advice.verdict == "fits"
    assert [fix.config_changes for fix in advice.fixes] == [
        {"optimizer": "adamw", "activation_memory_budget": 0.25}, {"optimizer": "adamw"},
        {"activation_memory_budget": 0.25}]
    for fix in advice.fixes:
        changed = dataclasses.replace(gpu_run, **fix.config_changes)
        assert fix.kind == "speed" and fix.fits_after and fit_verdict(estimate_peak(model, changed), 24 * GIB) == "fits"
        assert fix.saving_bytes == advice.peak_bytes - estimate_peak(model, changed).peak_bytes < 0
    assert advice.fixes_of("speed") == advice.fixes and advice.fixes_of("memory") == []
    tight = advise(model, gpu_run, int(12.5 * GIB))  # room for the optimizer's 0.23 GiB, not for the budget's 5 GiB
    assert [fix.config_changes for fix in tight.fixes] == [{"optimizer": "adamw"}]


def test_every_fix_marked_as_fitting_fits_when_re_estimated():
    model = config("llama-3.1-8b")
    failing = run(micro_batch_size=8, max_length=2048, gradient_checkpointing=False, optimizer="adamw")
    advice = advise(model, failing, 24 * GIB)
    assert advice.verdict == "won't fit"
    fitting = [fix for fix in advice.fixes if fix.fits_after]
    assert fitting, "no suggested fix makes the run fit"
    for fix in advice.fixes:
        changed = dataclasses.replace(failing, **fix.config_changes).validate()
        re_estimated = estimate_peak(model, changed)
        assert fix.kind == "memory" and fix.saving_bytes == advice.peak_bytes - re_estimated.peak_bytes > 0
        assert (fit_verdict(re_estimated, 24 * GIB) == "fits") == fix.fits_after


def test_checkpointing_is_suggested_when_it_is_off():
    advice = advise(config("llama-3.1-8b"), run(gradient_checkpointing=False), 12 * GIB)
    assert {"gradient_checkpointing": True} in [fix.config_changes for fix in advice.fixes]


def test_a_bf16_residual_is_offered_for_long_rows_and_saves_half_the_checkpoint():
    model, long_rows = config("llama-3.1-8b"), run(max_length=32768, micro_batch_size=1, fp32_residual=True)
    advice = advise(model, long_rows, 24 * GIB)
    fix = next(fix for fix in advice.fixes if fix.config_changes == {"fp32_residual": False})
    kept_values = 32768 * model["hidden_size"] * model["num_hidden_layers"]
    assert fix.saving_bytes >= 2 * kept_values  # 2 of the 4 bytes per kept hidden value, and its allocator slack


def test_smaller_batch_fix_keeps_the_effective_batch():
    failing = run(micro_batch_size=8, grad_accum=2, max_length=2048)
    advice = advise(config("llama-3.1-8b"), failing, 16 * GIB)
    batch_fix = next(fix for fix in advice.fixes if "grad_accum" in fix.config_changes and len(fix.config_changes) == 2)
    assert batch_fix.config_changes["micro_batch_size"] * batch_fix.config_changes["grad_accum"] == 16


def test_largest_length_and_batch_that_fit_are_the_limits():
    model, chosen, free_bytes = config("mistral-7b-v0.3"), run(max_length=4096, micro_batch_size=4), 16 * GIB
    advice = advise(model, chosen, free_bytes)
    longest, batch = advice.max_length_that_fits, advice.batch_that_fits
    assert fit_verdict(estimate_peak(model, dataclasses.replace(chosen, max_length=longest)), free_bytes) == "fits"
    assert fit_verdict(estimate_peak(model, dataclasses.replace(chosen, max_length=longest + 64)),
                       free_bytes) != "fits"
    assert fit_verdict(estimate_peak(model, dataclasses.replace(chosen, micro_batch_size=batch)), free_bytes) == "fits"
    assert fit_verdict(estimate_peak(model, dataclasses.replace(chosen, micro_batch_size=batch + 1)),
                       free_bytes) != "fits"


def test_fit_to_gpu_picks_a_run_that_fits_and_keeps_the_effective_batch():
    model, chosen = config("qwen2.5-7b"), run(micro_batch_size=8, max_length=2048, gradient_checkpointing=False)
    changes = fit_to_gpu(model, chosen, 16 * GIB)
    fitted = dataclasses.replace(chosen, **changes)
    assert fit_verdict(estimate_peak(model, fitted), 16 * GIB) == "fits"
    assert fitted.micro_batch_size * fitted.grad_accum == 8
    assert fitted.max_length <= 2048


def test_fit_to_gpu_changes_nothing_when_the_run_already_fits():
    assert fit_to_gpu(config("smollm2-135m"), run(), 24 * GIB) == {}


def test_fit_to_gpu_explains_when_nothing_fits():
    with pytest.raises(EngineError, match="won't fit"):
        fit_to_gpu(config("llama-2-13b"), run(), 2 * GIB)


# ----------------------------------------------------------------------------- qlora-studio estimate
def test_estimate_command_json_output_parses(capsys):
    code = estimate_command.estimate_main([str(CONFIGS / "llama-3.1-8b.json"), "--gpu-memory", "12GiB",
                                           "--max-length", "4096", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert [term["name"] for term in report["estimate"]["terms"]] == TERM_NAMES
    assert report["advice"]["free_bytes"] == 12 * GIB
    assert report["advice"]["verdict"] in ("fits", "tight", "won't fit")


def test_estimate_command_prints_a_table_with_the_verdict_and_fixes(capsys):
    estimate_command.estimate_main([str(CONFIGS / "llama-3.1-8b.json"), "--gpu-memory", "12GiB",
                                    "--no-gradient-checkpointing"])
    text = capsys.readouterr().out
    assert all(name in text for name in TERM_NAMES)
    assert "WON'T FIT" in text and "What would help" in text and "gradient checkpointing" in text


def test_every_run_option_is_a_flag_of_the_estimate_command():
    flags = {option for action in estimate_command._build_parser()._actions for option in action.option_strings}
    for spec in dataclasses.fields(RunConfig):
        assert "--" + spec.name.replace("_", "-") in flags


def test_estimate_command_names_a_missing_model(tmp_path, capsys):
    assert estimate_command.estimate_main([str(tmp_path / "nowhere"), "--gpu-memory", "8GiB"]) == 2
    assert "no such file" in capsys.readouterr().out


def test_estimate_command_reports_a_bad_option_as_a_config_error(capsys):
    assert estimate_command.estimate_main(["default", "--max-length", "4", "--json"]) == 2
    failure = json.loads(capsys.readouterr().out)
    assert failure["kind"] == "error" and failure["code"] == "bad_config" and failure["message"]


def test_estimate_command_without_a_gpu_says_so(monkeypatch, capsys):
    monkeypatch.setattr(hardware, "detect_gpus", lambda: hardware.GpuReport(problem=hardware.NO_GPU_MESSAGE))
    assert estimate_command.estimate_main(["default"]) == 0
    text = capsys.readouterr().out
    assert "no NVIDIA GPU found" in text and "--gpu-memory" in text


@pytest.mark.parametrize("text, n_bytes", [("12GiB", 12 * GIB), ("12GB", 12 * GIB), ("12", 12 * GIB),
                                           ("11500MiB", 11500 * 2**20), ("7.5g", int(7.5 * GIB))])
def test_gpu_memory_sizes_read_as_a_person_writes_them(text, n_bytes):
    assert estimate_command.parse_size_bytes(text) == n_bytes


# ----------------------------------------------------------------------------- against autograd itself
TINY_SIZES = {"vocab_size": 1000, "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 2,
              "num_attention_heads": 8, "num_key_value_heads": 2, "max_position_embeddings": 512,
              "tie_word_embeddings": False, "pad_token_id": 0}


@pytest.mark.slow
@pytest.mark.parametrize("model_type, extra", [("llama", {}), ("qwen2", {}), ("qwen3", {"head_dim": 32}),
                                               ("gemma", {"head_dim": 64}),
                                               ("gemma2", {"head_dim": 64, "attn_logit_softcapping": 50.0,
                                                           "final_logit_softcapping": None}),
                                               ("phi3", {}), ("phi3", {"num_key_value_heads": 8})])
def test_activation_model_matches_what_autograd_saves_on_cpu(model_type, extra):
    """The per-layer tensor list is the real modelling code's: count the bytes autograd saves in a tiny model.

    The one test here that needs torch (imported inside); it guards the memory model against changes in
    transformers and peft. Dropout is off because CPU dropout keeps an fp32 mask where CUDA keeps a boolean one.
    """
    torch = pytest.importorskip("torch")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = {**TINY_SIZES, **extra}
    attention = "eager" if model_type == "gemma2" else "sdpa"  # gemma2 has no SDPA path in transformers
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **sizes, attn_implementation=attention))
    model = model.to(torch.bfloat16).requires_grad_(False)
    model.config.use_cache = False  # as the engine does: a KV cache would copy k and v
    model.enable_input_require_grads()  # as gradient checkpointing does: the first norm keeps its input too
    model = get_peft_model(model, LoraConfig(r=16, lora_dropout=0.0, target_modules="all-linear")).train()
    batch, length = 2, 128
    ids = torch.randint(0, 1000, (batch, length))
    padding = torch.ones(batch, length, dtype=torch.long)
    padding[1, 100:] = 0
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved_bytes: dict[int, int] = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved_bytes[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        model(input_ids=ids, attention_mask=padding, labels=ids)
    shape = model_shape({**sizes, "model_type": model_type})[0]
    chosen = run(max_length=length, micro_batch_size=batch, lora_r=16, lora_dropout=0.0)
    layers_bytes = 2 * batch * length * memory._layer_activation_bytes_per_token(shape, chosen, 2)
    loss_bytes = 4 * batch * length * (1000 + 256)  # the saved fp32 log-softmax and the final norm's input
    assert layers_bytes + loss_bytes == pytest.approx(sum(saved_bytes.values()), rel=0.01)


def test_the_chunked_loss_replaces_the_full_logits_with_one_chunk():
    llama = config("llama-3.1-8b")
    full = estimate_peak(llama, run(max_length=4096))
    chunked = estimate_peak(llama, run(max_length=4096, chunked_loss=True))
    assert full.bytes_of("logits_and_loss") > 4 * 2**30  # 4096 x 128,256 fp32 logits and their gradients
    assert chunked.bytes_of("logits_and_loss") < 2**30
    assert chunked.peak_bytes < full.peak_bytes - 2 * 2**30
    gemma2 = config("gemma-2-2b")  # soft-capped logits: transformers' own loss, all logits
    assert (estimate_peak(gemma2, run(chunked_loss=True)).bytes_of("logits_and_loss")
            == estimate_peak(gemma2, run()).bytes_of("logits_and_loss"))


def test_the_fused_lora_layer_keeps_16bit_inputs_instead_of_fp32_copies():
    llama = config("llama-3.1-8b")
    peft_path = estimate_peak(llama, run(gradient_checkpointing=False, max_length=1024))
    fused = estimate_peak(llama, run(gradient_checkpointing=False, max_length=1024, fused_lora=True))
    assert fused.bytes_of("activations") < 0.95 * peft_path.bytes_of("activations")


def test_packed_rows_have_no_padding_mask():
    llama = config("llama-3.2-1b")
    padded = estimate_peak(llama, run(micro_batch_size=4, max_length=2048))
    packed = estimate_peak(llama, run(micro_batch_size=4, max_length=2048, packing=True))
    assert "no padding mask" in next(t.note for t in packed.terms if t.name == "activations")
    assert packed.peak_bytes < padded.peak_bytes


def test_the_compiled_layers_on_a_gpu_have_their_own_constants():
    """compile_layers with checkpointing on a GPU (the default there) is estimated with the compiled path's fitted
    constants; on the CPU, where nothing is compiled, with the eager path's."""
    model = config("llama-3.1-8b")
    compiled = memory.CALIBRATION["compiled_allocator_slack_fraction"]
    for device, fraction in (("cuda", compiled), ("cpu", memory.CALIBRATION["allocator_slack_checkpointed_fraction"])):
        estimate = estimate_peak(model, run(device=device, compile_layers=True, max_length=1024))
        short_lived = gib_of(estimate, "lora_gradients", "activations", "logits_and_loss")
        assert gib_of(estimate, "allocator_slack") == pytest.approx(fraction * short_lived, rel=1e-6)


def test_dora_is_estimated_on_peft_path_uncompiled_with_its_weight_norm():
    """DoRA layers run peft's path (not the fused layer) and, checkpointed, uncompiled (the loop turns compiling
    off for them); on top, the weight norm of the adapted matrix that holds the most: down_proj, whose identity of
    8192 inputs outweighs the larger gate/up matrices' 4 x in x out of 2048 inputs."""
    model = config("llama-3.2-1b")
    linears = {linear.name: linear for linear in targeted_linears(model_shape(model)[0], "all-linear")}
    dora = estimate_peak(model, run(use_dora=True, fused_lora=True, compile_layers=True, device="cuda"))
    peft_eager = estimate_peak(model, run(fused_lora=False, compile_layers=False, device="cuda"))
    down = linears["down_proj"]
    assert dora.bytes_of("dora") == int(4 * down.in_features ** 2 + memory.CALIBRATION["dora_bytes_per_weight"]
                                        * down.in_features * down.out_features)
    assert dora.bytes_of("dora") > memory.dora_bytes(linears["gate_proj"], memory.CALIBRATION)
    assert dora.peak_bytes == peft_eager.peak_bytes + dora.bytes_of("dora")
    assert not memory.compiled_path(RunConfig(use_dora=True, device="cuda"))


def test_the_per_card_estimate_of_several_processes_counts_each_layout():
    """ddp: the whole run on each card plus the all-reduce buffer; fsdp: the 4-bit weights, adapter, gradients and
    optimizer states split, two layers gathered; the base is loaded on the CPU and cut onto the cards, so no card
    holds it whole (the RAM that takes is a warning): a 32B fits two 24 GiB cards and a 70B four, none alone."""
    config = json.loads((CONFIGS / "llama-3.1-8b.json").read_text())
    one = estimate_peak(config, RunConfig(max_length=1024))
    terms = {t.name: t.bytes for t in one.terms}
    ddp = {t.name: t.bytes for t in estimate_peak(config, RunConfig(max_length=1024, nproc=2)).terms}
    assert ddp["ddp_gradient_buffer"] == terms["lora_weights"] and ddp["nf4_weights"] == terms["nf4_weights"]
    fsdp = estimate_peak(config, RunConfig(max_length=1024, nproc=4, parallel="fsdp"))
    split = {t.name: t.bytes for t in fsdp.terms}
    for name in memory.FSDP_SHARDED_TERMS:
        assert split[name] == -(-terms[name] // 4)
    assert split["fsdp_gathered_layers"] > 0 and split["layers_16bit"] == terms["layers_16bit"]
    assert fsdp.peak_bytes < one.peak_bytes and set(split) == set(terms) | {"fsdp_gathered_layers"}
    assert any("RAM" in warning and "4 processes" in warning for warning in fsdp.warnings)
    card = 24 * 2**30
    for name, cards in (("qwen2.5-32b", 2), ("llama-3.1-70b", 4)):
        big = json.loads((CONFIGS / f"{name}.json").read_text())
        row = RunConfig(max_length=2048, micro_batch_size=1)
        assert estimate_peak(big, row).peak_bytes > card, name
        assert estimate_peak(big, dataclasses.replace(row, nproc=cards - 1, parallel="fsdp")).peak_bytes > card, name
        assert estimate_peak(big, dataclasses.replace(row, nproc=cards, parallel="fsdp")).peak_bytes < card, name
