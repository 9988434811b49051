#!/usr/bin/env bash
# Launcher: prepares venv/ and the pinned requirements, then starts webui.py.
# Settings for this script live in webui-user.sh (COMMANDLINE_ARGS, python_cmd, venv_dir).
#   ./webui.sh [flags]        run the web UI (flags as in A1111, see README)
#   ./webui.sh --exit         prepare the environment and exit
#   ./webui.sh --test [args]  also install test requirements and run pytest (args go to pytest)
set -u

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$script_dir" || exit 1

if [[ -f webui-user.sh ]]; then
    # shellcheck source=webui-user.sh
    source ./webui-user.sh
fi
python_cmd="${python_cmd:-python3}"
venv_dir="${venv_dir:-venv}"
export COMMANDLINE_ARGS="${COMMANDLINE_ARGS:-}"

# Launcher flags may come from the command line or from COMMANDLINE_ARGS, as in A1111.
skip_install=0; exit_after_prepare=0; test_mode=0
read -r -a env_args <<< "$COMMANDLINE_ARGS"
for arg in "$@" ${env_args[@]+"${env_args[@]}"}; do
    case "$arg" in
        --skip-install) skip_install=1 ;;
        --exit) exit_after_prepare=1 ;;
    esac
done
if [[ "${1:-}" == "--test" ]]; then
    test_mode=1
    shift
fi

say() { printf '%s\n' "$*"; }
die() { printf 'webui.sh: error: %s\n' "$*" >&2; exit 1; }

if ! command -v "$python_cmd" >/dev/null 2>&1; then
    die "$python_cmd not found. Install Python 3.10 or newer, or set python_cmd in webui-user.sh."
fi
"$python_cmd" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
    || die "Python 3.10 or newer is required; $python_cmd is $("$python_cmd" --version 2>&1)."

if [[ "$venv_dir" == "-" ]]; then
    python="$python_cmd"
else
    if [[ ! -x "$venv_dir/bin/python" ]]; then
        say "Creating venv in $venv_dir"
        "$python_cmd" -m venv "$venv_dir" || die "could not create a venv in $venv_dir (on Debian/Ubuntu: apt install python3-venv)."
    fi
    python="$script_dir/$venv_dir/bin/python"
    [[ "$venv_dir" = /* ]] && python="$venv_dir/bin/python"
fi

# tools/install_requirements.py installs a file only when it changed (a stamp in the venv).
install_requirements() {
    "$python" tools/install_requirements.py "$1" || die "could not install $1"
}

if [[ "$skip_install" == 0 ]]; then
    install_requirements requirements.txt
    if [[ "$test_mode" == 1 ]]; then
        install_requirements requirements-test.txt
    fi
fi

if [[ "$exit_after_prepare" == 1 ]]; then
    say "Environment ready; exiting (--exit)."
    exit 0
fi

if [[ "$test_mode" == 1 ]]; then
    exec "$python" -m pytest "$@"
fi

exec "$python" -u webui.py "$@"
