# shellcheck shell=bash
# The helpers run_algo.sh and run_sweep.sh share; each sets PROG before sourcing this file.

log() { printf '[%s] %s\n' "$PROG" "$*" >&2; }
die() {
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    exit 2
}
is_true() { [[ ${1,,} == 1 || ${1,,} == true || ${1,,} == yes || ${1,,} == on ]]; }
is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }
