#!/usr/bin/env bash
# Install, inspect or remove the AI dialogue backend as a systemd service. Run `./install.sh --help`.
#
# Every step compares before it writes, so running the script again changes nothing unless the
# project, the requested model or the options changed. The secrets file is created once and never
# overwritten.
set -euo pipefail

readonly SERVICE=ai-dialogue-backend
SOURCE_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
readonly SOURCE_DIR
readonly DEFAULT_DIR=/opt/ai-dialogue-backend
readonly DEFAULT_USER=ai-dialogue
readonly ETC_DIR=/etc/$SERVICE
readonly ENV_FILE=$ETC_DIR/env
readonly UNIT_FILE=/etc/systemd/system/$SERVICE.service
readonly WANTS_LINK=/etc/systemd/system/multi-user.target.wants/$SERVICE.service
readonly LOG_DIR=/var/log/$SERVICE
readonly STATE_DIR=/var/lib/$SERVICE
# Project entries copied into the install directory (model/ is handled apart: it holds the Vosk model).
readonly CODE_ITEMS=(config server stt_pool llm service docs requirements.txt install.sh pyproject.toml README.md)
# Official Vosk downloads. alphacephei.com publishes no SHA-256 for them, so none is built in: pass
# --sha256 with a hash you obtained from a source you trust.
declare -rA MODEL_URLS=(
    [cn]=https://alphacephei.com/vosk/models/vosk-model-cn-0.22.zip
    [small-en]=https://alphacephei.com/vosk/models/vosk-model-small-en-us-0.15.zip
)

action=install
service_user=$DEFAULT_USER
install_dir=$DEFAULT_DIR
root=""
model=""
sha256=""
skip_sha256=0
allow_http=0
start=1
purge=0
create_venv=1
[[ "${AI_DIALOGUE_NO_VENV:-}" == 1 ]] && create_venv=0
python=${PYTHON:-python3}
health_timeout=${HEALTH_TIMEOUT:-120}
changed=0

usage() {
    cat <<EOF
Usage: sudo ./install.sh [OPTIONS]

Install the AI dialogue backend as the systemd service $SERVICE (default action), or inspect or
remove an installation. Safe to run again: only what differs is rewritten.

Actions:
  (none)            install or update: user, code, virtualenv, secrets file, unit; enable and start
  --status          show the unit state, the health endpoint and the installed files
  --logs            show the service journal (follows it when run in a terminal)
  --uninstall       stop, disable and remove the unit, the code and the virtualenv; keep the
                    secrets file, the state and log directories and the Vosk model
  --purge           with --uninstall: also remove those, and the service user
  -h, --help        show this help

Options:
  --user USER       system user the service runs as (default: $DEFAULT_USER)
  --dir DIR         install directory (default: $DEFAULT_DIR)
  --model MODEL     install a Vosk model into DIR/model/vosk-model; MODEL is one of
                      cn         ${MODEL_URLS[cn]}
                      small-en   ${MODEL_URLS[small-en]}
                      URL        an https URL of a .zip or .tar.gz model archive
                      PATH       a local model directory or archive
  --sha256 HASH     expected SHA-256 of the model archive (required for an archive)
  --skip-sha256     install a model archive without checking it (explicit, not the default)
  --allow-http      accept a plain http model URL (and redirects to http); https only otherwise
  --no-start        install and enable, but do not (re)start the service
  --no-venv         do not create the virtualenv (packaging, tests); also AI_DIALOGUE_NO_VENV=1
  --root DIR        stage the installation under DIR as if it were /: nothing outside DIR is
                    touched; no user is created, no systemctl is called, nothing is started

Environment:
  PYTHON            interpreter for the virtualenv (default: python3, must be >= 3.11)
  HEALTH_TIMEOUT    seconds to wait for GET /conversation/health after a start (default: 120)

Files:
  $ENV_FILE   secrets and settings (mode 0600, root): OPENROUTER_API_KEY, PORT, ...
  $UNIT_FILE
  DIR/model/vosk-model  the Vosk model (the service runs with mock STT while it is missing)
  $LOG_DIR/server.log, journalctl -u $SERVICE
EOF
}

say() { printf '==> %s\n' "$*"; }
warn() { printf 'WARNING: %s\n' "$*" >&2; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# The path of an installation file as this run sees it (below --root when staging).
target() { printf '%s%s' "$root" "$1"; }

parse_args() {
    while (($#)); do
        case "$1" in
            -h | --help)
                usage
                exit 0
                ;;
            --uninstall) action=uninstall ;;
            --purge) purge=1 ;;
            --status) action=status ;;
            --logs) action=logs ;;
            --no-start) start=0 ;;
            --no-venv) create_venv=0 ;;
            --skip-sha256) skip_sha256=1 ;;
            --allow-http) allow_http=1 ;;
            --user | --dir | --root | --model | --sha256)
                if (($# < 2)) || [[ -z "$2" ]]; then
                    die "$1 needs a value"
                fi
                case "$1" in
                    --user) service_user=$2 ;;
                    --dir) install_dir=$2 ;;
                    --root) root=$2 ;;
                    --model) model=$2 ;;
                    --sha256) sha256=$2 ;;
                esac
                shift
                ;;
            --user=* | --dir=* | --root=* | --model=* | --sha256=*)
                set -- "${1%%=*}" "${1#*=}" "${@:2}"
                continue
                ;;
            *) die "unknown option: $1 (see --help)" ;;
        esac
        shift
    done

    [[ "$service_user" =~ ^[a-z_][a-z0-9_-]{0,31}$ ]] || die "--user: not a valid system user name: $service_user"
    [[ "$install_dir" == /* && "$install_dir" != */ && "$install_dir" != *[[:space:]]* ]] ||
        die "--dir: needs an absolute path without spaces or trailing slash: $install_dir"
    case "$install_dir" in
        / | /etc | /usr | /var | /opt | /home | /root | /tmp) die "--dir: refusing to use $install_dir" ;;
    esac
    if [[ -n "$root" ]]; then
        mkdir -p "$root"
        root=$(cd "$root" && pwd -P)
        [[ "$root" != / ]] || root=""
    fi
    if [[ -n "$sha256" ]]; then
        sha256=${sha256,,}
        [[ "$sha256" =~ ^[0-9a-f]{64}$ ]] || die "--sha256: expected 64 hexadecimal digits"
        [[ -n "$model" ]] || die "--sha256 only makes sense with --model"
        ((skip_sha256 == 0)) || die "--sha256 and --skip-sha256 contradict each other"
    fi
    [[ -n "$model" ]] || ((skip_sha256 + allow_http == 0)) || die "--skip-sha256 and --allow-http only make sense with --model"
    if [[ -n "$model" ]]; then
        local source=${MODEL_URLS[$model]:-$model}
        if [[ "$source" == http://* ]] && ((allow_http == 0)); then
            die "refusing to download over plain http: $source (use https, or --allow-http if you must)"
        fi
        if [[ "$source" == http://* || "$source" == https://* || -f "$source" ]] &&
            [[ -z "$sha256" ]] && ((skip_sha256 == 0)); then
            die "a model archive needs --sha256 HASH (or --skip-sha256 to install it unverified)"
        fi
    fi
    ((purge == 0)) || [[ "$action" == uninstall ]] || die "--purge only makes sense with --uninstall"
    [[ -z "$model" || "$action" == install ]] || die "--model only makes sense when installing"
}

require_root_privileges() {
    [[ -n "$root" || "$EUID" -eq 0 ]] || die "run as root (sudo ./install.sh ...), or stage with --root DIR"
}

# Write stdin to a file with the given mode when the content or mode differs; set changed=1 if so.
write_file() {
    local path=$1 mode=$2 tmp
    tmp=$(mktemp "$(dirname "$path")/.install.XXXXXX")
    cat >"$tmp"
    chmod "$mode" "$tmp"
    if [[ -f "$path" ]] && cmp -s "$tmp" "$path" && [[ "$(stat -c %a "$path")" == "${mode#0}" ]]; then
        rm -f "$tmp"
        return 0
    fi
    mv -f "$tmp" "$path"
    say "wrote ${path#"$root"}"
    changed=1
}

ensure_dir() {
    local path=$1 mode=$2 owner=${3:-}
    if [[ ! -d "$path" ]]; then
        install -d -m "$mode" "$path"
        say "created ${path#"$root"}"
    elif [[ "$(stat -c %a "$path")" != "${mode#0}" ]]; then
        chmod "$mode" "$path"
    fi
    if [[ -n "$owner" && -z "$root" ]]; then
        chown "$owner:" "$path"
    fi
}

ensure_user() {
    if [[ -n "$root" ]]; then
        say "staging: the service user $service_user is created at real install time, not now"
        return 0
    fi
    if getent passwd "$service_user" >/dev/null; then
        return 0
    fi
    useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home \
        --shell /usr/sbin/nologin --comment "AI dialogue backend" "$service_user"
    say "created system user $service_user"
}

# Copy the project code (without caches, tests, .git, .venv or a local model) into the install
# directory. Each entry is replaced only when its content or modes differ.
install_code() {
    local dest staging item
    dest=$(target "$install_dir")
    if [[ "$(cd "$dest" && pwd -P)" == "$SOURCE_DIR" ]]; then
        say "running from the install directory: code left as it is"
        return 0
    fi
    staging=$(mktemp -d "$dest/.install-code.XXXXXX")
    local present=()
    for item in "${CODE_ITEMS[@]}"; do
        [[ -e "$SOURCE_DIR/$item" ]] && present+=("$item")
    done
    tar -C "$SOURCE_DIR" --exclude=__pycache__ --exclude='*.pyc' --exclude=.mypy_cache \
        --exclude=.ruff_cache --exclude=.pytest_cache -cf - "${present[@]}" |
        tar -C "$staging" --no-same-owner -xf -
    chmod -R u=rwX,go=rX "$staging"
    for item in "${present[@]}"; do
        if [[ -e "$dest/$item" ]] && diff -rq "$staging/$item" "$dest/$item" >/dev/null 2>&1 &&
            [[ "$(tree_modes "$staging/$item")" == "$(tree_modes "$dest/$item")" ]]; then
            continue
        fi
        rm -rf "${dest:?}/$item"
        mv "$staging/$item" "$dest/$item"
        say "installed $install_dir/$item"
        changed=1
    done
    rm -rf "$staging"

    ensure_dir "$dest/model" 0755
    local file name
    for file in "$SOURCE_DIR"/model/*; do
        [[ -f "$file" ]] || continue
        name=${file##*/}
        case "$name" in *.zip | *.tar.gz | *.tgz) continue ;; esac
        write_file "$dest/model/$name" 0644 <"$SOURCE_DIR/model/$name"
    done
}

# Relative path, type and mode of every entry below $1 (or the mode of $1 when it is a file).
tree_modes() {
    if [[ -d "$1" ]]; then
        (cd "$1" && find . -printf '%P %y %m\n' | sort)
    else
        stat -c %a "$1"
    fi
}

python_ok() {
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}

# The virtualenv is (re)filled only when requirements.txt or the interpreter changed.
install_venv() {
    local dest venv stamp wanted
    dest=$(target "$install_dir")
    venv=$dest/.venv
    if ((create_venv == 0)); then
        say "skipping the virtualenv (--no-venv): create $install_dir/.venv before starting the service"
        return 0
    fi
    command -v "$python" >/dev/null || die "$python not found: install python3 (>= 3.11) and python3-venv"
    python_ok || die "$python is older than 3.11"
    stamp=$venv/.requirements.sha256
    wanted="$(sha256sum <"$SOURCE_DIR/requirements.txt" | cut -d' ' -f1) $("$python" -c 'import sys; print(sys.version.split()[0])')"
    if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$wanted" ]]; then
        return 0
    fi
    if [[ ! -x "$venv/bin/python" ]]; then
        say "creating the virtualenv $install_dir/.venv"
        "$python" -m venv "$venv" || die "could not create a virtualenv (on Debian/Ubuntu: apt-get install python3-venv)"
    fi
    say "installing the pinned requirements into $install_dir/.venv"
    "$venv/bin/python" -m pip install --quiet --no-input --requirement "$SOURCE_DIR/requirements.txt"
    printf '%s\n' "$wanted" >"$stamp"
    changed=1
}

env_template() {
    cat <<'EOF'
# Settings and secrets of ai-dialogue-backend, read by systemd (EnvironmentFile=) as root.
# Keep this file mode 0600 owned by root. Values here override the defaults in the unit.
# One KEY=VALUE per line, no spaces around '='; apply changes with:
#   systemctl restart ai-dialogue-backend

# LLM provider. Empty key = labelled mock suggestions.
OPENROUTER_API_KEY=
#OPENROUTER_MODEL=anthropic/claude-3-haiku
#OPENROUTER_BASE_URL=https://openrouter.ai/api/v1

# Bearer token required by GET /metrics (empty = no token).
METRICS_TOKEN=

# Listening address; keep 127.0.0.1 behind nginx.
#HOST=127.0.0.1
#PORT=8000
#WORKERS=1

# Speech recognition (the model is installed with: install.sh --model cn --sha256 ...).
#STT_WORKERS=2
#VOSK_MODEL_PATH=/opt/ai-dialogue-backend/model/vosk-model

#LOG_LEVEL=INFO
#LOG_FORMAT=json
EOF
}

install_env_file() {
    local path
    path=$(target "$ENV_FILE")
    ensure_dir "$(target "$ETC_DIR")" 0755
    if [[ -e "$path" ]]; then
        if [[ "$(stat -c %a "$path")" != 600 ]]; then
            chmod 0600 "$path"
            warn "$ENV_FILE was readable by others: mode set back to 0600"
        fi
        return 0
    fi
    env_template | write_file "$path" 0600
    if [[ "$EUID" -eq 0 ]]; then
        chown root:root "$path"
    fi
    say "edit $ENV_FILE to set OPENROUTER_API_KEY (the service uses mock suggestions until then)"
}

render_unit() {
    local dir_pattern=${DEFAULT_DIR//./\\.} dir_replacement=${install_dir//&/\\&}
    sed -e "s|$dir_pattern|$dir_replacement|g" \
        -e "s|^User=$DEFAULT_USER\$|User=$service_user|" \
        -e "s|^Group=$DEFAULT_USER\$|Group=$service_user|" \
        "$SOURCE_DIR/service/$SERVICE.service"
}

install_unit() {
    local unit_changed=$changed
    changed=0
    ensure_dir "$(target "$(dirname "$WANTS_LINK")")" 0755
    render_unit | write_file "$(target "$UNIT_FILE")" 0644
    local link
    link=$(target "$WANTS_LINK")
    if [[ -n "$root" ]]; then
        # What `systemctl enable` would create (systemctl is not called when staging).
        if [[ "$(readlink "$link" 2>/dev/null)" != "$UNIT_FILE" ]]; then
            ln -sfn "$UNIT_FILE" "$link"
            say "enabled $SERVICE (staged link in multi-user.target.wants)"
        fi
    else
        ((changed == 0)) || systemctl daemon-reload
        systemctl enable --quiet "$SERVICE"
    fi
    changed=$((unit_changed | changed))
}

# --- Vosk model ---------------------------------------------------------------------------------

extract_archive() {
    "$python" - "$1" "$2" <<'EOF'
import sys, tarfile, zipfile
from pathlib import PurePosixPath

archive, dest = sys.argv[1], sys.argv[2]

def check(name):
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        sys.exit(f"unsafe path in archive: {name}")

if zipfile.is_zipfile(archive):
    with zipfile.ZipFile(archive) as zf:
        bad = zf.testzip()
        if bad is not None:
            sys.exit(f"corrupt member in archive: {bad}")
        for name in zf.namelist():
            check(name)
        zf.extractall(dest)
elif tarfile.is_tarfile(archive):
    with tarfile.open(archive) as tf:
        for member in tf.getmembers():
            check(member.name)
            if not (member.isfile() or member.isdir()):
                sys.exit(f"unexpected entry in archive (only files and directories allowed): {member.name}")
        tf.extractall(dest, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
else:
    sys.exit("not a zip or tar archive")
EOF
}

download() {
    local url=$1 out=$2 protocols=https
    ((allow_http == 0)) || protocols=http,https
    command -v curl >/dev/null || die "downloading needs curl; or download the archive yourself and pass its path"
    say "downloading $url"
    # Redirects are followed only to the allowed protocols: an https URL cannot end up on http.
    curl --fail --location --proto "=$protocols" --proto-redir "=$protocols" --retry 3 --show-error --silent \
        --output "$out" "$url"
}

verify_archive() {
    local archive=$1 actual
    actual=$(sha256sum <"$archive" | cut -d' ' -f1)
    if ((skip_sha256)); then
        warn "**************************************************************************"
        warn "THE MODEL ARCHIVE IS UNVERIFIED: --skip-sha256 was given."
        warn "Its SHA-256 is $actual"
        warn "Compare it with a value from a source you trust, or re-run with --sha256."
        warn "**************************************************************************"
    elif [[ "$actual" != "$sha256" ]]; then
        die "SHA-256 mismatch for the model archive: expected $sha256, got $actual; nothing was installed"
    else
        say "SHA-256 verified: $actual"
    fi
}

# The directory inside an unpacked archive that holds the model (archives usually wrap it in one folder).
model_root() {
    local dir=$1 entries
    if [[ -d "$dir/am" || -d "$dir/conf" ]]; then
        printf '%s' "$dir"
        return 0
    fi
    mapfile -t entries < <(find "$dir" -mindepth 1 -maxdepth 1)
    if ((${#entries[@]} == 1)) && [[ -d "${entries[0]}" ]]; then
        printf '%s' "${entries[0]}"
        return 0
    fi
    printf '%s' "$dir"
}

check_model() {
    local dir=$1 missing=()
    [[ -f "$dir/am/final.mdl" ]] || missing+=(am/final.mdl)
    [[ -f "$dir/conf/mfcc.conf" ]] || missing+=(conf/mfcc.conf)
    # The same check as stt_pool/model.py: a full graph (HCLG) or a lookahead one (HCLr + Gr).
    [[ -f "$dir/graph/HCLG.fst" || -f "$dir/graph/HCLr.fst" ]] || missing+=("graph/HCLG.fst or graph/HCLr.fst")
    ((${#missing[@]} == 0)) || die "not a Vosk model (missing ${missing[*]}); nothing was installed"
}

install_model() {
    local models_dir dest work unpacked source created=""
    models_dir=$(target "$install_dir/model")
    dest=$models_dir/vosk-model
    # On failure, remove the directories this step created, so a bad archive leaves no trace.
    created=$models_dir
    while [[ ! -e "$(dirname "$created")" ]]; do created=$(dirname "$created"); done
    [[ ! -e "$created" ]] || created=""
    mkdir -p "$models_dir"
    # Work next to the destination so the final step is a rename on one file system.
    work=$(mktemp -d "$models_dir/.incoming.XXXXXX")
    # shellcheck disable=SC2064 # expand now: the trap must remove this run's directories
    trap "rm -rf '$work' ${created:+'$created'}" EXIT
    unpacked=$work/unpacked
    mkdir "$unpacked"

    source=${MODEL_URLS[$model]:-$model}
    case "$source" in
        http://* | https://*)
            download "$source" "$work/archive" || die "download failed: $source"
            verify_archive "$work/archive"
            extract_archive "$work/archive" "$unpacked" || die "could not unpack $source"
            ;;
        *)
            [[ -e "$source" ]] || die "--model: no such file or directory, and not cn, small-en or a URL: $source"
            if [[ -d "$source" ]]; then
                [[ -z "$sha256" ]] || die "--sha256 checks an archive; $source is a directory"
                say "copying the model directory $source"
                cp -R "$source/." "$unpacked/"
            else
                verify_archive "$source"
                extract_archive "$source" "$unpacked" || die "could not unpack $source"
            fi
            ;;
    esac

    local found
    found=$(model_root "$unpacked")
    check_model "$found"
    chmod -R u=rwX,go=rX "$found"
    if [[ -d "$dest" ]] && diff -rq "$found" "$dest" >/dev/null 2>&1; then
        say "the model in $install_dir/model/vosk-model is already this one"
    else
        [[ ! -e "$dest" ]] || mv "$dest" "$work/previous"
        mv "$found" "$dest"
        say "installed the Vosk model into $install_dir/model/vosk-model"
        changed=1
    fi
    rm -rf "$work"
    trap - EXIT
}

# --- service control ----------------------------------------------------------------------------

env_value() {
    local key=$1 default=$2 value
    value=$(sed -n "s/^[[:space:]]*$key=//p" "$ENV_FILE" 2>/dev/null | tail -n 1 | tr -d "\"'[:space:]")
    printf '%s' "${value:-$default}"
}

health_url() {
    local host port
    host=$(env_value HOST 127.0.0.1)
    port=$(env_value PORT 8000)
    case "$host" in 0.0.0.0 | "" | "::" | "[::]") host=127.0.0.1 ;; esac
    [[ "$host" != *:* ]] || host="[$host]"
    printf 'http://%s:%s/conversation/health' "$host" "$port"
}

fetch() {
    if command -v curl >/dev/null; then
        curl --fail --silent --show-error --max-time 3 "$1"
    else
        "$python" -c 'import sys, urllib.request
print(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode())' "$1"
    fi
}

start_service() {
    if ((changed)); then
        say "restarting $SERVICE"
        systemctl restart "$SERVICE"
    else
        systemctl start "$SERVICE"
    fi
    local url deadline
    url=$(health_url)
    deadline=$((SECONDS + health_timeout))
    say "waiting for $url"
    until fetch "$url" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)) || systemctl is-failed --quiet "$SERVICE"; then
            systemctl status --no-pager --lines=30 "$SERVICE" >&2 || true
            die "$SERVICE did not become healthy; see: journalctl -u $SERVICE -e"
        fi
        sleep 1
    done
    say "$SERVICE is running: $(fetch "$url")"
}

do_install() {
    require_root_privileges
    if [[ -n "$root" ]]; then
        say "staging the installation under $root"
    fi
    if [[ -n "$model" ]]; then
        # Before anything else changes, so that a bad archive leaves the system as it was.
        install_model
    fi
    ensure_user
    ensure_dir "$(target "$install_dir")" 0755
    ensure_dir "$(target "$LOG_DIR")" 0750 "$service_user"
    ensure_dir "$(target "$STATE_DIR")" 0750 "$service_user"
    install_code
    install_venv
    install_env_file
    install_unit

    if [[ -n "$root" ]]; then
        say "staged under $root (not started)"
    elif ((start == 0)); then
        say "installed and enabled; start with: systemctl start $SERVICE"
    else
        start_service
    fi
    [[ -d "$(target "$install_dir/model/vosk-model")" ]] ||
        warn "no Vosk model in $install_dir/model/vosk-model: speech recognition runs in mock mode (install.sh --model cn --sha256 HASH)"
}

do_uninstall() {
    require_root_privileges
    if [[ -z "$root" ]] && command -v systemctl >/dev/null; then
        systemctl disable --now --quiet "$SERVICE" 2>/dev/null || true
    fi
    local path
    for path in "$WANTS_LINK" "$UNIT_FILE"; do
        if [[ -e "$(target "$path")" || -L "$(target "$path")" ]]; then
            rm -f "$(target "$path")"
            say "removed $path"
        fi
    done
    [[ -n "$root" ]] || systemctl daemon-reload 2>/dev/null || true

    local dest item
    dest=$(target "$install_dir")
    if [[ -d "$dest" ]]; then
        for item in "${CODE_ITEMS[@]}" .venv; do
            rm -rf "${dest:?}/$item"
        done
        find "$dest/model" -mindepth 1 -maxdepth 1 ! -name vosk-model -exec rm -rf {} + 2>/dev/null || true
        say "removed the code and virtualenv from $install_dir"
    fi

    if ((purge)); then
        rm -rf "$dest" "$(target "$ETC_DIR")" "$(target "$STATE_DIR")" "$(target "$LOG_DIR")"
        say "purged $install_dir, $ETC_DIR, $STATE_DIR and $LOG_DIR"
        if [[ -z "$root" ]] && getent passwd "$service_user" >/dev/null; then
            userdel "$service_user" && say "removed user $service_user"
        fi
    else
        rmdir "$dest/model" "$dest" 2>/dev/null || true
        say "kept $ENV_FILE, $STATE_DIR, $LOG_DIR and the Vosk model (if any); --purge removes them"
    fi
}

do_status() {
    local rc=0 path body
    for path in "$UNIT_FILE" "$ENV_FILE" "$install_dir/.venv/bin/python" "$install_dir/model/vosk-model"; do
        if [[ -e "$(target "$path")" ]]; then
            printf '  %-52s present\n' "$path"
        else
            printf '  %-52s missing\n' "$path"
        fi
    done
    if [[ -e "$(target "$ENV_FILE")" ]]; then
        printf '  %-52s mode %s\n' "$ENV_FILE" "$(stat -c %a "$(target "$ENV_FILE")")"
    fi
    [[ -e "$(target "$UNIT_FILE")" ]] || rc=3
    if [[ -n "$root" ]]; then
        return "$rc"
    fi
    systemctl status --no-pager --lines=10 "$SERVICE" || rc=$?
    local url
    url=$(health_url)
    if body=$(fetch "$url" 2>&1); then
        printf 'health %s\n%s\n' "$url" "$body"
    else
        printf 'health %s: no answer\n' "$url"
        rc=3
    fi
    return "$rc"
}

do_logs() {
    if [[ -n "$root" ]]; then
        local log
        log=$(target "$LOG_DIR/server.log")
        [[ -f "$log" ]] || die "no log file at $log"
        tail -n 200 "$log"
        return 0
    fi
    if [[ -t 1 ]]; then
        exec journalctl --unit "$SERVICE" --lines 200 --follow
    fi
    exec journalctl --unit "$SERVICE" --lines 200 --no-pager
}

main() {
    umask 022
    parse_args "$@"
    case "$action" in
        install) do_install ;;
        uninstall) do_uninstall ;;
        status) do_status ;;
        logs) do_logs ;;
    esac
}

main "$@"
