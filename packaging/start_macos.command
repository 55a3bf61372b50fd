#!/bin/bash
# QLoRA Studio launcher for macOS: double-click it in Finder (Terminal opens and shows the first-run install).
# The first time, macOS may refuse a downloaded script: right-click it, choose Open, then Open again.
# It runs start_linux.sh, which does the same on both systems; arguments are passed to the app.
here="$(cd "$(dirname "$0")" && pwd)"
exec /bin/bash "$here/start_linux.sh" "$@"
