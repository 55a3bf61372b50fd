#!/usr/bin/env bash
# Adds QLoRA Studio to the Linux application menu: installs qlora-studio.desktop, pointing at this folder's
# start_linux.sh, and the app icon (resources/icon.svg). `--uninstall` removes both.
# Where: $XDG_DATA_HOME (default ~/.local/share)/applications and .../icons/hicolor/scalable/apps.
set -eu

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
launcher="$here/start_linux.sh"
icon="$(cd "$here/.." && pwd)/resources/icon.svg"
data_home="${XDG_DATA_HOME:-$HOME/.local/share}"
entry="$data_home/applications/qlora-studio.desktop"
icon_target="$data_home/icons/hicolor/scalable/apps/qlora-studio.svg"

refresh_menus() {
  if command -v update-desktop-database >/dev/null 2>&1; then
    update-desktop-database "$data_home/applications" >/dev/null 2>&1 || true
  fi
  if command -v gtk-update-icon-cache >/dev/null 2>&1; then
    gtk-update-icon-cache -q -t "$data_home/icons/hicolor" >/dev/null 2>&1 || true
  fi
}

if [ "${1:-}" = "--uninstall" ]; then
  rm -f "$entry" "$icon_target"
  refresh_menus
  echo "Removed $entry and $icon_target"
  exit 0
fi

# The desktop entry spec: an Exec argument with spaces is double-quoted, and inside the quotes \ " ` $ are
# backslash-escaped; then the whole value is escaped once more as a string (\ becomes \\). A literal % is %%.
exec_arg="$launcher"
case "$exec_arg" in
  *[[:space:]\"\`\$\\]*)
    exec_arg="$(printf '%s' "$exec_arg" | sed -e 's/[\\"`$]/\\&/g')"
    exec_arg="\"$exec_arg\"" ;;
esac
exec_arg="$(printf '%s' "$exec_arg" | sed -e 's/\\/\\\\/g' -e 's/%/%%/g')"
# The value as a plain string (TryExec): only \ is escaped.
try_exec="$(printf '%s' "$launcher" | sed -e 's/\\/\\\\/g')"

chmod +x "$launcher"
mkdir -p "$(dirname "$entry")" "$(dirname "$icon_target")"
if [ -f "$icon" ]; then
  cp "$icon" "$icon_target"
else
  echo "warning: $icon not found; the menu entry will have a generic icon." >&2
fi
# sed replacement text: escape \ & and the | delimiter.
sed_escape() { printf '%s' "$1" | sed -e 's/[\\&|]/\\&/g'; }
sed -e "s|@LAUNCHER@|$(sed_escape "$exec_arg")|" -e "s|@LAUNCHER_PATH@|$(sed_escape "$try_exec")|" \
  -e '/^# install_desktop_entry.sh/d' "$here/qlora-studio.desktop" > "$entry"
chmod +x "$entry"
if command -v desktop-file-validate >/dev/null 2>&1; then
  desktop-file-validate "$entry" || echo "warning: desktop-file-validate found problems in $entry (above)." >&2
fi
refresh_menus
echo "Installed $entry"
echo "QLoRA Studio is now in the application menu. The first start installs PyTorch and the app (a few minutes);"
echo "a notification says so. To remove the entry: $0 --uninstall"
