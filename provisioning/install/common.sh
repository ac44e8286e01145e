# Shared steps of install-device and install-registry (sourced, not run).
#
# Every step checks before it changes anything, so a second run changes nothing;
# with --dry-run a step says what it would do and does nothing; with --root DIR files
# go under DIR and the steps that act on the running system (apt, pip, users,
# systemctl) are listed as skipped.

ROOT=/
DRY_RUN=0
SKIP_PACKAGES=0
CHANGED=0
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TEMPLATES="$HERE/../templates"
# The checkout these scripts are in: what pip installs unless --package names
# something else (a wheel, or a package index's flowfleet).
CHECKOUT="$(cd "$HERE/../.." && pwd)"

say() { printf '%-9s %s\n' "$1" "$2"; }

system_root() { [ -d "$ROOT" ] && [ "$(cd "$ROOT" && pwd -P)" = "/" ]; }

# path under the root: p /etc/flowfleet -> $ROOT/etc/flowfleet
p() { if system_root; then printf '%s' "$1"; else printf '%s%s' "${ROOT%/}" "$1"; fi; }

changed() { CHANGED=$((CHANGED + 1)); }

# ensure_dir PATH MODE [OWNER:GROUP]: the owner is applied on the system root only
ensure_dir() {
    local path owner=""; path="$(p "$1")"
    if [ -n "${3:-}" ] && system_root; then owner="$3"; fi
    if [ -d "$path" ] && [ "$(stat -c %a "$path")" = "$2" ] \
        && { [ -z "$owner" ] || [ "$(stat -c %U:%G "$path")" = "$owner" ]; }; then
        say unchanged "folder $1"
    elif [ "$DRY_RUN" = 1 ]; then
        say would "folder $1 (mode $2${owner:+, $owner})"; changed
    else
        mkdir -p "$path" && chmod "$2" "$path"
        if [ -n "$owner" ]; then chown "$owner" "$path"; fi
        say done "folder $1 (mode $2${owner:+, $owner})"; changed
    fi
}

# ensure_file SOURCE DEST MODE: DEST gets SOURCE's content
ensure_file() {
    local dest; dest="$(p "$2")"
    if [ -f "$dest" ] && cmp -s "$1" "$dest" && [ "$(stat -c %a "$dest")" = "$3" ]; then
        say unchanged "file $2"
    elif [ "$DRY_RUN" = 1 ]; then
        say would "file $2 (mode $3)"; changed
    else
        mkdir -p "$(dirname "$dest")"
        install -m "$3" "$1" "$dest"; say done "file $2 (mode $3)"; changed
    fi
}

# ensure_link TARGET LINK
ensure_link() {
    local link; link="$(p "$2")"
    if [ -L "$link" ] && [ "$(readlink "$link")" = "$1" ]; then
        say unchanged "link $2 -> $1"
    elif [ "$DRY_RUN" = 1 ]; then
        say would "link $2 -> $1"; changed
    else
        mkdir -p "$(dirname "$link")"; ln -sfn "$1" "$link"; say done "link $2 -> $1"; changed
    fi
}

# ensure_user NAME [GROUPS]
ensure_user() {
    if ! system_root; then say skipped "system user $1 (--root $ROOT)"; return; fi
    if id -u "$1" >/dev/null 2>&1; then
        say unchanged "system user $1"
    elif [ "$DRY_RUN" = 1 ]; then
        say would "system user $1"; changed
    else
        useradd --system --no-create-home --shell /usr/sbin/nologin ${2:+--groups "$2"} "$1"
        say done "system user $1"; changed
    fi
}

# ensure_apt PACKAGE...
ensure_apt() {
    if [ "$SKIP_PACKAGES" = 1 ] || ! system_root; then say skipped "apt: $*"; return; fi
    local missing=()
    for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
    if [ ${#missing[@]} = 0 ]; then
        say unchanged "apt: $*"
    elif [ "$DRY_RUN" = 1 ]; then
        say would "apt-get install ${missing[*]}"; changed
    else
        apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
        say done "apt-get install ${missing[*]}"; changed
    fi
}

# ensure_venv PATH SPEC MODULES: a virtual environment with SPEC installed (pip);
# it counts as installed when MODULES (comma-separated) import, so an extra missing
# from an earlier install (a device's venv on the registry host) is still added.
ensure_venv() {
    if [ "$SKIP_PACKAGES" = 1 ] || ! system_root; then say skipped "venv $1: $2"; return; fi
    # -I: not the current folder's modules (a checkout has a flowfleet/ of its own)
    if [ -x "$1/bin/python" ] && "$1/bin/python" -I -c "import $3" >/dev/null 2>&1; then
        say unchanged "venv $1 ($3 import)"
    elif [ "$DRY_RUN" = 1 ]; then
        say would "venv $1, pip install $2"; changed
    else
        [ -x "$1/bin/python" ] || python3 -m venv "$1"
        "$1/bin/python" -m pip install -q "$2"; say done "venv $1, pip install $2"; changed
    fi
}

# ensure_enabled UNIT
ensure_enabled() {
    if ! system_root || ! command -v systemctl >/dev/null 2>&1; then
        say skipped "systemctl enable --now $1"; return
    fi
    if systemctl is-enabled -q "$1" 2>/dev/null; then
        say unchanged "unit $1 enabled"
    elif [ "$DRY_RUN" = 1 ]; then
        say would "systemctl enable --now $1"; changed
    else
        systemctl daemon-reload && systemctl enable --now "$1"; say done "enabled $1"; changed
    fi
}

common_option() {  # returns 0 when it consumed "$1" (and maybe "$2": sets SHIFT)
    SHIFT=1
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --root) ROOT="$2"; SHIFT=2 ;;
        --skip-packages) SKIP_PACKAGES=1 ;;
        *) return 1 ;;
    esac
}

finish() {
    if [ "$CHANGED" = 0 ]; then echo "nothing changed"
    elif [ "$DRY_RUN" = 1 ]; then echo "dry run: $CHANGED change(s) listed, none made"
    else echo "$CHANGED change(s) made"; fi
}
