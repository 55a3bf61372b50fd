#!/usr/bin/env bash
# QLoRA Studio launcher for Linux (start_macos.command runs this one too).
# First run: makes a private Python environment and installs PyTorch for this machine, the default model and the
# app (packaging/bootstrap.py does that); later runs start the app at once. Arguments are passed to the app.
# Settings (QLORA_STUDIO_HOME, QLORA_STUDIO_TORCH, ...) are described in packaging/README.md.
# Kept to bash 3.2, the version macOS ships.
set -u

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

python_is_new_enough() {
  "$1" -c 'import sys; sys.exit(sys.version_info < (3, 10))' >/dev/null 2>&1
}

# Prints the first Python 3.10+ found: QLORA_STUDIO_PYTHON, the usual names, then where macOS installers put it.
find_python() {
  if [ -n "${QLORA_STUDIO_PYTHON:-}" ]; then
    if python_is_new_enough "$QLORA_STUDIO_PYTHON"; then
      printf '%s\n' "$QLORA_STUDIO_PYTHON"
      return 0
    fi
    echo "QLORA_STUDIO_PYTHON=$QLORA_STUDIO_PYTHON is not a Python 3.10 or newer." >&2
    return 1
  fi
  local candidate
  for candidate in python3 python python3.13 python3.12 python3.11 python3.10 \
      /opt/homebrew/bin/python3 /usr/local/bin/python3 \
      /Library/Frameworks/Python.framework/Versions/Current/bin/python3; do
    if command -v "$candidate" >/dev/null 2>&1 && python_is_new_enough "$candidate"; then
      command -v "$candidate"
      return 0
    fi
  done
  return 1
}

if ! python="$(find_python)"; then
  echo "QLoRA Studio needs Python 3.10 or newer, and none was found." >&2
  case "$(uname -s)" in
    Darwin) echo "Install Python 3.12 from https://www.python.org/downloads/macos/ and open this launcher again." >&2 ;;
    *) echo "Install it with your package manager, e.g. 'sudo apt install python3 python3-venv' (Debian, Ubuntu)" >&2
       echo "or 'sudo dnf install python3' (Fedora), then start this launcher again." >&2 ;;
  esac
  exit 1
fi

exec "$python" "$here/bootstrap.py" "$@"
