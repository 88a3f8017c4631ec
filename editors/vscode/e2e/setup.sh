#!/usr/bin/env bash
# Installs everything the VS Code end-to-end test needs, idempotently:
#   - Debian packages: chromium (driven by Playwright), ripgrep, and the toolchain
#     and headers code-server's native modules build against;
#   - the extension's npm dependencies (npm ci) and its .vsix (npm run package);
#   - code-server + playwright-core in editors/vscode/e2e/node_modules.
# Needs only the Debian mirrors and the npm registry (no GitHub downloads):
# @vscode/ripgrep's postinstall would fetch rg from GitHub, so the Debian `rg`
# is put where it looks first (its bin/ folder) before its install script runs.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
EXT_DIR="$(cd "$HERE/.." && pwd)"
log() { printf '[setup %(%H:%M:%S)T] %s\n' -1 "$*"; }
START=$SECONDS

# ---------------------------------------------------------------- apt
APT_PKGS=(chromium ripgrep build-essential python3 pkg-config libkrb5-dev libxkbfile-dev libsecret-1-dev fonts-dejavu-core)
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  log "apt-get install ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
CHROMIUM="$(command -v chromium || true)"
[ -n "$CHROMIUM" ] || { echo "chromium not found after apt-get install" >&2; exit 1; }
RG="$(command -v rg || true)"
[ -n "$RG" ] || { echo "rg not found after apt-get install" >&2; exit 1; }
log "apt done ($((SECONDS - START))s)"

# ---------------------------------------------------------------- extension + .vsix
cd "$EXT_DIR"
if [ -n "${GRANITE_E2E_SKIP_VSIX:-}" ]; then
  log "skipping the extension build (GRANITE_E2E_SKIP_VSIX)"
elif [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  log "npm ci (extension)"
  npm ci --no-audit --no-fund --loglevel=error
fi
if [ -z "${GRANITE_E2E_SKIP_VSIX:-}" ]; then
  log "npm run package (extension)"
  npm run --silent package > "${TMPDIR:-/tmp}/granite-vsce-package.log" 2>&1 || { cat "${TMPDIR:-/tmp}/granite-vsce-package.log"; exit 1; }
  grep -E 'DONE|ERROR' "${TMPDIR:-/tmp}/granite-vsce-package.log" || true
fi
log "extension done ($((SECONDS - START))s)"

# ---------------------------------------------------------------- code-server
cd "$HERE"
CS="$HERE/node_modules/code-server"
STAMP="$HERE/node_modules/.granite-e2e-installed"
if [ -f "$STAMP" ] && [ "$STAMP" -nt package-lock.json ] && [ -x "$CS/out/node/entry.js" ]; then
  log "code-server already installed"
else
  rm -f "$STAMP"
  export npm_config_unsafe_perm=true npm_config_yes=true
  log "npm ci --ignore-scripts (code-server, playwright-core)"
  npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
  # argon2 (code-server's password hashing) would fetch a prebuilt binary from GitHub.
  log "npm rebuild argon2 --build-from-source"
  npm_config_build_from_source=true npm rebuild argon2 --no-audit --no-fund --loglevel=error

  # code-server's postinstall.sh runs `npm install --omit=dev` in lib/vscode and
  # lib/vscode/extensions, then makes a few symlinks. We do the lib/vscode
  # install ourselves first without scripts, drop Debian's rg into
  # @vscode/ripgrep/bin (its postinstall then skips the GitHub download), and
  # build the native modules with `npm rebuild`.
  cd "$CS/lib/vscode"
  log "npm install --omit=dev --ignore-scripts (code-server/lib/vscode)"
  npm install --omit=dev --ignore-scripts --no-audit --no-fund --loglevel=error
  for d in $(find node_modules -type d -path '*/@vscode/ripgrep' -prune); do
    mkdir -p "$d/bin"
    ln -sf "$RG" "$d/bin/rg"
  done
  log "npm rebuild (native modules of code-server/lib/vscode; a few minutes)"
  npm rebuild --no-audit --no-fund --loglevel=error
  cd "$CS"
  log "code-server postinstall.sh"
  npm_config_user_agent="npm/$(npm --version) node/$(node --version) linux x64" sh ./postinstall.sh
  cd "$HERE"
  "$CS/out/node/entry.js" --version >/dev/null
  touch "$STAMP"
fi
"$CS/out/node/entry.js" --version
log "setup done in $((SECONDS - START))s"
