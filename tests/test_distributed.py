"""Several processes through torchrun (gloo on the CPU, two ranks, a tiny random Llama): the same curve as one
process, stop and resume, a killed rank, resume across another nproc, the FSDP guard.

Tolerance: fp32 on the CPU, the two ranks' summed gradients differ from one process's only in summation order;
losses and gradient norms agree to 1e-5 relative (measured: equal in the 5 digits the events carry).
"""
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora_engine.protocol.config import RunConfig
from qlora_engine.protocol.errors import EngineError
from qlora_engine.protocol.events import EventWriter, parse_line, read_events
from qlora_engine.training import checkpoints, distributed, loop
from qlora_engine.training.launch import torchrun_command
from qlora_engine.training.resume_rules import check_resume

ROOT = Path(__file__).resolve().parent.parent
STEPS = 6
RTOL = 1e-5


def options(model_dir, data_file, run_dir, **overrides) -> dict:
    values = {"model": str(model_dir), "data": str(data_file), "run_dir": str(run_dir), "max_steps": STEPS,
              "micro_batch_size": 2, "grad_accum": 1, "learning_rate": 1e-2, "warmup_steps": 1, "eval_steps": 0,
              "lora_r": 8, "max_length": 64, "lora_dropout": 0.0, "compute_dtype": "fp32", "optimizer": "adamw",
              "device": "cpu", "val_fraction": 0.0, "nproc": 2}
    values.update(overrides)
    return values


def flags(values: dict) -> list[str]:
    def flag(name: str, value) -> list[str]:
        option = "--" + name.replace("_", "-")
        if isinstance(value, bool):  # BooleanOptionalAction: --use-dora / --no-use-dora
            return [option if value else "--no-" + option[2:]]
        return [option, str(value)]
    return [part for name, value in values.items() for part in flag(name, value)]


def engine(values: dict, *extra: str, **popen) -> subprocess.Popen:
    """The engine (torchrun and its ranks); their log goes to <run_dir>.log (log_tail reads it)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", distributed.TIMEOUT_ENV: "30"}
    log = open(log_path(values), "a", encoding="utf-8")  # noqa: SIM115 (the child holds it)
    return subprocess.Popen([sys.executable, "-m", "qlora_engine", "train", *flags(values), "--events", "jsonl",
                             *extra], stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT, env=env, **popen)


def log_path(values: dict) -> Path:
    return Path(str(values["run_dir"]).rstrip("/") + ".log")


def log_tail(values: dict, lines: int = 40) -> str:
    """The last lines of the engine's log that are not library warnings: what a failed assertion shows."""
    text = log_path(values).read_text(encoding="utf-8", errors="replace") if log_path(values).is_file() else ""
    return "\n".join([line for line in text.splitlines() if "arning" not in line][-lines:])


def curve(events, field="loss") -> list[float]:
    return [getattr(e, field) for e in events if e.kind == "step"]


@pytest.fixture(scope="module")
def one_process_at_4(tiny_model_dir, tmp_path_factory):
    """The reference: one process at micro-batch 4 (= 2 ranks x 2) over the same data and seed."""
    from tiny_models import write_jsonl

    folder = tmp_path_factory.mktemp("ddp-ref")
    data_file = write_jsonl(folder / "alpaca.jsonl", [{"instruction": f"Who is the mayor number {i}?",
                                                       "input": "", "output": f"Quillon Varet {i}."}
                                                      for i in range(24)])
    cfg = RunConfig.from_dict(options(tiny_model_dir, data_file, folder / "run", micro_batch_size=4, nproc=1))
    events = EventWriter(folder / "run" / "events.jsonl", stream=None)
    loop.run_training(cfg, folder / "run", events)
    events.close()
    return data_file, list(read_events(folder / "run" / "events.jsonl"))


def test_two_ranks_at_micro_batch_2_match_one_process_at_4_step_for_step(tiny_model_dir, one_process_at_4,
                                                                          tmp_path):
    data_file, reference = one_process_at_4
    values = options(tiny_model_dir, data_file, tmp_path / "ddp")
    process = engine(values)
    out, _ = process.communicate(timeout=300)
    events = [e for e in map(parse_line, out.splitlines()) if e is not None]
    assert process.returncode == 0 and events[-1].kind == "finished", (events[-1:], log_tail(values))
    assert curve(events) == pytest.approx(curve(reference), rel=RTOL)
    assert curve(events, "grad_norm") == pytest.approx(curve(reference, "grad_norm"), rel=RTOL)
    assert [e.kind for e in events].count("started") == 1  # rank 0 alone speaks
    step = next(e for e in events if e.kind == "step")
    assert len(step.rank_vram) == 2 and all(rank["max_rss"] > 0 for rank in step.rank_vram)
    assert [p.name for p in checkpoints.complete_checkpoints(tmp_path / "ddp")] == [f"step-{STEPS}"]
    assert (tmp_path / "ddp" / "adapter" / "adapter_model.safetensors").is_file()
    file_events = list(read_events(tmp_path / "ddp" / "events.jsonl"))
    assert [e.kind for e in file_events] == [e.kind for e in events]


def test_gradient_accumulation_counts_across_ranks(tiny_model_dir, one_process_at_4, tmp_path):
    """Two ranks at micro-batch 1 accumulating 2 micro-batches per step: one process at micro-batch 2 accumulating
    2, step for step (each optimizer step sees the same rows, the loss divided by the same trained tokens)."""
    data_file, _ = one_process_at_4
    accumulated = {"micro_batch_size": 1, "grad_accum": 2}
    cfg = RunConfig.from_dict(options(tiny_model_dir, data_file, tmp_path / "one", nproc=1,
                                      **{**accumulated, "micro_batch_size": 2}))
    writer = EventWriter(tmp_path / "one" / "events.jsonl", stream=None)
    loop.run_training(cfg, tmp_path / "one", writer)
    writer.close()
    reference = list(read_events(tmp_path / "one" / "events.jsonl"))
    values = options(tiny_model_dir, data_file, tmp_path / "ddp", **accumulated)
    process = engine(values)
    out, _ = process.communicate(timeout=300)
    events = [e for e in map(parse_line, out.splitlines()) if e is not None]
    assert process.returncode == 0 and events[-1].kind == "finished", (events[-1:], log_tail(values))
    assert len(curve(events)) == STEPS
    assert curve(events) == pytest.approx(curve(reference), rel=RTOL)
    assert curve(events, "grad_norm") == pytest.approx(curve(reference, "grad_norm"), rel=RTOL)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_stop_and_resume_continue_the_same_curve(tiny_model_dir, one_process_at_4, tmp_path, parallel):
    """fsdp: each rank takes its cut of the whole checkpoint back."""
    data_file, reference = one_process_at_4
    values = options(tiny_model_dir, data_file, tmp_path / "ddp", parallel=parallel)
    process = engine(values, stdin=subprocess.PIPE)
    kinds = []
    for line in process.stdout:
        event = parse_line(line)
        if event is None:
            continue
        kinds.append(event.kind)
        if event.kind == "step" and event.step == 2:
            process.stdin.write("stop\n")  # what the GUI's Stop sends
            process.stdin.flush()
    assert process.wait(timeout=120) == 0 and kinds[-2:] == ["checkpoint", "stopped"]
    stopped_at = int(checkpoints.latest_checkpoint(tmp_path / "ddp").name.split("-")[1])
    assert 2 <= stopped_at < STEPS
    resumed = engine({"run_dir": str(tmp_path / "ddp")}, "--resume")
    resumed.communicate(timeout=300)
    assert resumed.returncode == 0
    events = list(read_events(tmp_path / "ddp" / "events.jsonl"))
    assert [e.step for e in events if e.kind == "step"] == [*range(1, stopped_at + 1), *range(stopped_at + 1,
                                                                                               STEPS + 1)]
    assert curve(events) == pytest.approx(curve(reference), rel=RTOL)


def test_a_killed_rank_ends_the_run_with_an_error_within_the_timeout(tiny_model_dir, alpaca_file, tmp_path):
    process = engine(options(tiny_model_dir, alpaca_file, tmp_path / "ddp", max_steps=2000))
    for line in process.stdout:
        event = parse_line(line)
        if event is not None and event.kind == "step":
            break
    rank_1 = next(pid for pid in _descendants(process.pid) if _environ(pid).get("RANK") == "1")
    os.kill(rank_1, signal.SIGKILL)
    killed_s = time.time()
    rest = process.stdout.read()
    assert process.wait(timeout=90) != 0
    assert time.time() - killed_s < 60  # torchrun's monitor, not the 30 s collective timeout plus a hang
    events = list(read_events(tmp_path / "ddp" / "events.jsonl"))
    assert events[-1].kind == "error" and events[-1].code == "rank_failed", rest[-2000:]
    assert "another rank" in events[-1].message and "--resume" in events[-1].advice
    assert events[-1].kind not in [e.kind for e in events[:-1]]  # one error, not one per process


def test_a_failed_rank_leaves_its_own_error_for_rank_0(tmp_path):
    distributed.write_rank_error(tmp_path, 1, {"code": "cuda_oom", "message": "the GPU ran out of memory",
                                               "advice": "Lower micro_batch_size."})
    error = distributed.failed_rank_error(tmp_path, RuntimeError("Connection closed by peer"), wait_s=0)
    assert (error.code, error.message, error.advice) == ("cuda_oom", "rank 1: the GPU ran out of memory",
                                                         "Lower micro_batch_size.")
    distributed.clear_rank_errors(tmp_path)
    assert distributed.failed_rank_error(tmp_path, RuntimeError("x"), wait_s=0).code == "rank_failed"


def test_resume_refuses_another_number_of_processes():
    with pytest.raises(EngineError) as caught:
        check_resume({"nproc": 2}, {"nproc": 4}, "runs/x")
    assert caught.value.code == "resume_changes_run" and "nproc was 2, given 4" in caught.value.message


def test_each_rank_takes_its_slice_of_the_global_micro_batch():
    rows = list(range(5))
    assert [distributed.Ranks(rank=r, world=2).share(rows) for r in (0, 1)] == [[0, 1, 2], [3, 4]]
    assert [distributed.Ranks(rank=r, world=4).share([7]) for r in range(4)] == [[7], [], [], []]


def test_the_torchrun_command_is_standalone_unless_torchrun_options_are_given(tmp_path):
    cfg = RunConfig(nproc=2)
    command = torchrun_command(cfg, tmp_path, "jsonl", resume=True)
    assert command[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    assert command[command.index("--nproc-per-node") + 1] == "2" and command[-1] == "--resume"
    multi = torchrun_command(cfg, tmp_path, "jsonl", False, "--nnodes 2 --rdzv-endpoint host:29500")
    assert "--standalone" not in multi and multi[3:7] == ["--nnodes", "2", "--rdzv-endpoint", "host:29500"]


def test_two_sharded_ranks_match_one_process_step_for_step_and_write_the_same_files(tiny_model_dir,
                                                                                      one_process_at_4, tmp_path):
    """parallel: fsdp: each decoder layer's 4-bit weights and adapter split over two gloo ranks; the same curve as
    one process at micro-batch 4, and a checkpoint and adapter in the same files, whole."""
    data_file, reference = one_process_at_4
    process = engine(options(tiny_model_dir, data_file, tmp_path / "fsdp", parallel="fsdp", save_steps=3))
    out, _ = process.communicate(timeout=300)
    events = [e for e in map(parse_line, out.splitlines()) if e is not None]
    assert process.returncode == 0 and events[-1].kind == "finished", events[-1:]
    assert curve(events) == pytest.approx(curve(reference), rel=RTOL)
    assert curve(events, "grad_norm") == pytest.approx(curve(reference, "grad_norm"), rel=RTOL)
    one = load_file(str(next(Path(e.adapter_dir) for e in reference if e.kind == "finished")
                        / "adapter_model.safetensors"))
    sharded = load_file(str(tmp_path / "fsdp" / "adapter" / "adapter_model.safetensors"))
    assert sharded.keys() == one.keys()
    for name, weight in one.items():  # whole, not one rank's half
        assert sharded[name].shape == weight.shape
        torch.testing.assert_close(sharded[name], weight, rtol=1e-4, atol=1e-6)
    state = torch.load(tmp_path / "fsdp" / "checkpoints" / f"step-{STEPS}" / "optimizer.pt", weights_only=True)
    shapes = sorted(tuple(entry["exp_avg"].shape) for entry in state["state"].values())
    assert shapes == sorted(tuple(w.shape) for w in one.values())


@pytest.mark.parametrize("parallel, adapter", [
    ("ddp", {"use_dora": True}), ("fsdp", {"use_dora": True}), ("ddp", {"init_lora": "pissa"}),
    ("fsdp", {"init_lora": "pissa"}), ("ddp", {"precision_budget_bits": 7.0})],  # fsdp: refused, below
    ids=["dora-ddp", "dora-fsdp", "pissa-ddp", "pissa-fsdp", "precision-budget-ddp"])
def test_the_adapter_variants_shard_with_the_same_curve(tiny_model_dir, one_process_at_4, tmp_path, adapter,
                                                        parallel):
    """DoRA's magnitude vectors, PiSSA's rewritten base and a precision plan's mixed formats, in several ranks: one
    process's curve (each rank computes the plan and the start; rank 0 alone writes their files)."""
    data_file, _ = one_process_at_4
    cfg = RunConfig.from_dict(options(tiny_model_dir, data_file, tmp_path / "one", micro_batch_size=4, nproc=1,
                                      **adapter))
    writer = EventWriter(tmp_path / "one" / "events.jsonl", stream=None)
    loop.run_training(cfg, tmp_path / "one", writer)
    writer.close()
    reference = list(read_events(tmp_path / "one" / "events.jsonl"))
    process = engine(options(tiny_model_dir, data_file, tmp_path / parallel, parallel=parallel, **adapter))
    out, _ = process.communicate(timeout=300)
    events = [e for e in map(parse_line, out.splitlines()) if e is not None]
    assert process.returncode == 0 and events[-1].kind == "finished", events[-1:]
    assert curve(events) == pytest.approx(curve(reference), rel=RTOL)


def test_a_rank_with_nothing_to_train_still_takes_part_in_each_sharded_step(tiny_model_dir, tmp_path):
    """21 rows at 2 ranks x 2: one micro-batch of the epoch holds 1 row, rank 1's share of it is empty; it runs a row
    that trains nothing (else rank 0 would wait for it at the layer's gather)."""
    from tiny_models import write_jsonl

    data_file = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": f"Who is the mayor number {i}?", "input": "",
                                                         "output": f"Quillon Varet {i}."} for i in range(21)])
    process = engine(options(tiny_model_dir, data_file, tmp_path / "fsdp", parallel="fsdp", max_steps=6))
    out, _ = process.communicate(timeout=300)
    events = [e for e in map(parse_line, out.splitlines()) if e is not None]
    assert process.returncode == 0 and events[-1].kind == "finished", events[-1:]
    assert all(math.isfinite(loss) for loss in curve(events)) and len(curve(events)) == 6


def test_sharded_ranks_evaluate_sample_and_compare_as_one_process_does(tiny_model_dir, alpaca_file, tmp_path):
    """Evaluations, the drift samples and the closing base-vs-tuned answers run on every rank of a sharded run (each
    forward gathers from all): the eval losses and drift equal one process's at the same rows per step."""
    extra = {"val_fraction": 0.25, "eval_steps": 2, "drift_samples": 4, "compare_questions": 2}
    cfg = RunConfig.from_dict(options(tiny_model_dir, alpaca_file, tmp_path / "one", micro_batch_size=4, nproc=1,
                                      **extra))
    writer = EventWriter(tmp_path / "one" / "events.jsonl", stream=None)
    loop.run_training(cfg, tmp_path / "one", writer)
    writer.close()
    one = list(read_events(tmp_path / "one" / "events.jsonl"))
    process = engine(options(tiny_model_dir, alpaca_file, tmp_path / "fsdp", parallel="fsdp", **extra))
    out, _ = process.communicate(timeout=300)
    events = [e for e in map(parse_line, out.splitlines()) if e is not None]
    assert process.returncode == 0 and events[-1].kind == "finished", events[-1:]
    evals = [(e.step, e.eval_loss, e.drift) for e in events if e.kind == "eval"]
    assert [step for step, _, _ in evals] == [0, 2, 4, 6]
    assert [loss for _, loss, _ in evals] == pytest.approx([e.eval_loss for e in one if e.kind == "eval"], rel=RTOL)
    assert [d for _, _, d in evals][1:] == pytest.approx([e.drift for e in one if e.kind == "eval"][1:], rel=1e-3)
    compared = next(e for e in events if e.kind == "comparison")
    assert len(compared.rows) == 2 == len(next(e for e in one if e.kind == "comparison").rows)


@pytest.mark.parametrize("option, advice", [({"optimizer": "paged_adamw_8bit"}, "optimizer: adamw"),
                                            ({"precision_budget_bits": 7.0}, "precision_budget_bits: 0")])
def test_fsdp_refuses_what_it_cannot_shard_with_a_clear_error(tiny_model_dir, alpaca_file, tmp_path, option, advice):
    process = engine(options(tiny_model_dir, alpaca_file, tmp_path / "fsdp", parallel="fsdp", **option))
    out, _ = process.communicate(timeout=300)
    errors = [e for e in map(parse_line, out.splitlines()) if e is not None and e.kind == "error"]
    assert process.returncode != 0 and errors and errors[-1].code == "bad_config"
    assert advice in errors[-1].advice


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)
