#!/usr/bin/env bash
# run_sweep.sh - a grid of GRPO runs on one box. Every run is one ./run_algo.sh with its own GPUs,
# ports, run name, output directory and logs; runs beyond the free GPU slots wait in a queue;
# Ctrl-C stops them all; at the end, one table and one PNG compare them (train_trl_grpo.py --compare).
# Run `./run_sweep.sh -h` for the full description.
# The stop functions are reached only through traps:
# shellcheck disable=SC2317

set -uo pipefail

PROG=run_sweep.sh
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CALLER_PWD=$PWD

usage() {
    cat <<'EOF'
Usage: ./run_sweep.sh DATASET 'FIELD=V1,V2,... [FIELD=...]' [-- extra trainer flags]

Runs one ./run_algo.sh per point of the grid (the product of every FIELD's values; FIELD is a
Config field such as lr or beta, also written learning-rate style: max-completion-length).
The GPUs are cut into slots of 1 server GPU + GPUS_PER_RUN trainer GPUs; each run gets a slot,
its own ports (server PORT_BASE+i, weight sync GROUP_PORT_BASE+i, accelerate MAIN_PORT_BASE+i
for run i = 0, 1, ...), run_name DATASET-FIELDVALUE..., output_dir SWEEP_DIR/<run_name> and
log SWEEP_DIR/logs/<run_name>.log (run_algo.sh's own server and trainer logs sit beside it).
Runs beyond the slots wait and start as soon as a slot frees. A failed run does not stop the
others. Ctrl-C or SIGTERM stops every running run (each run_algo.sh stops its own server and
trainer) and starts no queued one. Before anything starts, every run is checked (run_algo.sh's
DRY_RUN and the trainer's config validation), so a bad value fails in seconds, not after the
servers have loaded. At the end: a status line per run, then train_trl_grpo.py --compare over
every run that evaluated (final metrics with 95 % intervals, paired differences from the first
run, SWEEP_DIR/compare.png; also saved as SWEEP_DIR/results.txt). Exit status: 0 when every run
succeeded, 1 when any failed (named), 130/143 after Ctrl-C/SIGTERM, 2 for bad input.

Environment (default in brackets):
  GPUS              GPUs to use, e.g. 0,1,2,3,4,5,6,7 [every GPU nvidia-smi lists]
  GPUS_PER_RUN      trainer GPUs per run; more than 1 runs accelerate (ACCELERATE_CONFIG) [1]
  VLLM_MODE         server | colocate | none [server]; colocate/none use no server GPU
  PORT_BASE         server port of run 0 [8000]
  GROUP_PORT_BASE   weight-sync port of run 0 [51216]
  MAIN_PORT_BASE    accelerate rendezvous port of run 0 [29500]
  SWEEP_NAME        names the sweep directory and the wandb group of its runs
                    [sweep-DATASET-FIELDS-YYYYmmdd-HHMMSS]
  SWEEP_DIR         where run directories and logs go [outputs/SWEEP_NAME]
  DRY_RUN           1: print every run's slot, ports and run_algo.sh command lines; run nothing
  GRPO_*, MODEL_ID, ACCELERATE_CONFIG, VLLM_GPU_MEMORY_UTILIZATION, VLLM_SERVE_ARGS,
  HEALTH_TIMEOUT, STOP_GRACE
                    reach every run_algo.sh unchanged (a grid FIELD overrides its GRPO_*)
The per-run variables of run_algo.sh (VLLM_GPU, TRAIN_GPU, VLLM_PORT, VLLM_GROUP_PORT,
MAIN_PROCESS_PORT, LOG_DIR, VLLM_HOST, START_SERVER, SERVE_ONLY) are set by this script and
refused in its environment; so are GRPO_RUN_NAME and GRPO_OUTPUT_DIR, and trainer flags after
`--` for --run-name, --output-dir or a grid FIELD. wandb runs (report_to=wandb) share the group
SWEEP_NAME (WANDB_RUN_GROUP).

Examples:
  ./run_sweep.sh gsm8k 'lr=1e-6,3e-6,1e-5,3e-5'               # 4 runs on an 8-GPU box
  ./run_sweep.sh math 'lr=1e-6,3e-6 beta=0,0.04' -- --total-steps 200   # 2 x 2 = 4 runs
  GPUS=0,1,2,3,4,5 GPUS_PER_RUN=2 ACCELERATE_CONFIG=ddp ./run_sweep.sh mbpp 'seed=1,2'
  DRY_RUN=1 GPUS=0,1,2,3,4,5,6,7 ./run_sweep.sh gsm8k 'lr=1e-6,3e-6,1e-5,3e-5'
EOF
}

# shellcheck source=scripts/launcher_common.sh
source "$ROOT/scripts/launcher_common.sh"
duration() {
    local s=$1
    if ((s >= 3600)); then
        printf '%dh%02dm' $((s / 3600)) $((s % 3600 / 60))
    elif ((s >= 60)); then
        printf '%dm%02ds' $((s / 60)) $((s % 60))
    else
        printf '%ds' "$s"
    fi
}

# ---------------------------------------------------------------- arguments
DATASET=
SPECS=()
EXTRA_ARGS=()
while (($#)); do
    case $1 in
    -h | --help)
        usage
        exit 0
        ;;
    --)
        shift
        EXTRA_ARGS=("$@")
        break
        ;;
    gsm8k | math | mbpp)
        [[ -z $DATASET ]] || die "two datasets given ('$DATASET' and '$1'); a sweep trains on one"
        DATASET=$1
        ;;
    *=*)
        read -r -a _words <<<"$1"
        SPECS+=("${_words[@]}")
        ;;
    *) die "unknown argument '$1' (expected gsm8k|math|mbpp, then 'field=v1,v2 ...', then -- and trainer flags; see -h)" ;;
    esac
    shift
done
[[ -n $DATASET ]] || die "no dataset: ./run_sweep.sh gsm8k|math|mbpp 'lr=1e-6,3e-6' (see -h)"
((${#SPECS[@]})) || die "no grid: give at least one 'field=v1,v2,...' such as 'lr=1e-6,3e-6' (see -h)"

for var in VLLM_GPU TRAIN_GPU VLLM_PORT VLLM_GROUP_PORT MAIN_PROCESS_PORT LOG_DIR VLLM_HOST \
    START_SERVER SERVE_ONLY GRPO_RUN_NAME GRPO_OUTPUT_DIR; do
    [[ -z ${!var+x} ]] || die "$var is set per run by this script; unset it (GPUS, PORT_BASE, SWEEP_DIR and SWEEP_NAME choose them)"
done

# The Config fields, as the trainer itself lists them, so the list never goes stale.
PY=${VIRTUAL_ENV:-$ROOT/.venv}/bin/python
[[ -x $PY ]] || PY=python3
mapfile -t CONFIG_FIELDS < <("$PY" "$ROOT/train_trl_grpo.py" --config-fields 2>/dev/null)
((${#CONFIG_FIELDS[@]})) || die "cannot list the Config fields ($PY $ROOT/train_trl_grpo.py --config-fields failed): set up the environment first with uv sync"
is_field() {
    local f
    for f in "${CONFIG_FIELDS[@]}"; do [[ $f == "$1" ]] && return 0; done
    return 1
}

FIELDS=()
VALUES=()
for spec in "${SPECS[@]}"; do
    field=${spec%%=*}
    field=${field//-/_}
    values=${spec#*=}
    is_field "$field" || die "'${spec%%=*}' is not a Config field of train_trl_grpo.py (e.g. lr, beta, seed, num_generations)"
    case $field in
    dataset | model_id | vllm_mode | vllm_host | vllm_port | vllm_group_port | run_name | output_dir)
        die "'$field' is set by the sweep or run_algo.sh, not a grid field (use the DATASET argument, MODEL_ID or VLLM_MODE)"
        ;;
    esac
    for f in "${FIELDS[@]}"; do
        [[ $f == "$field" ]] && die "field '$field' appears twice in the grid; list its values once: $field=a,b"
    done
    [[ $values =~ ^[^,]+(,[^,]+)*$ ]] || die "'$spec': give one or more comma-separated values, none empty"
    IFS=, read -r -a _vals <<<"$values"
    mapfile -t _uniq < <(printf '%s\n' "${_vals[@]}" | sort -u)
    ((${#_uniq[@]} == ${#_vals[@]})) || die "'$spec' lists a value twice"
    FIELDS+=("$field")
    VALUES+=("$values")
done

for arg in "${EXTRA_ARGS[@]}"; do
    flag=${arg%%=*}
    case $flag in
    --run-name | --output-dir) die "trainer flag '$flag' is set per run by this script (see SWEEP_DIR)" ;;
    esac
    for f in "${FIELDS[@]}"; do
        if [[ $flag == "--${f//_/-}" || $flag == "--no-${f//_/-}" ]]; then
            die "trainer flag '$flag' would override the grid field '$f'"
        fi
    done
done

# The grid: one line per run, "field=value field=value ...", the first field varying slowest.
RUNS=("")
for idx in "${!FIELDS[@]}"; do
    IFS=, read -r -a _vals <<<"${VALUES[idx]}"
    _next=()
    for r in "${RUNS[@]}"; do
        for v in "${_vals[@]}"; do _next+=("${r:+$r }${FIELDS[idx]}=$v"); done
    done
    RUNS=("${_next[@]}")
done
N=${#RUNS[@]}

# ---------------------------------------------------------------- GPUs, slots, ports, names
VLLM_MODE=${VLLM_MODE:-server}
case $VLLM_MODE in
server) SERVER_GPUS=1 ;;
colocate | none) SERVER_GPUS=0 ;;
*) die "VLLM_MODE must be server, colocate or none, got '$VLLM_MODE'" ;;
esac
GPUS_PER_RUN=${GPUS_PER_RUN:-1}
if ! is_uint "$GPUS_PER_RUN" || ((GPUS_PER_RUN < 1)); then
    die "GPUS_PER_RUN must be a whole number >= 1, got '$GPUS_PER_RUN'"
fi
if [[ -z ${GPUS:-} ]]; then
    command -v nvidia-smi >/dev/null || die "GPUS is not set and nvidia-smi is not available; set GPUS=0,1,..."
    GPUS=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | tr -d ' ' | paste -sd, -)
    [[ -n $GPUS ]] || die "nvidia-smi lists no GPU; set GPUS=0,1,..."
fi
[[ $GPUS =~ ^[A-Za-z0-9-]+(,[A-Za-z0-9-]+)*$ ]] || die "GPUS must be a comma-separated GPU list such as 0,1,2,3, got '$GPUS'"
IFS=, read -r -a GPU_LIST <<<"$GPUS"
mapfile -t _uniq < <(printf '%s\n' "${GPU_LIST[@]}" | sort -u)
((${#_uniq[@]} == ${#GPU_LIST[@]})) || die "GPUS lists a GPU twice: '$GPUS'"
SLOT_SIZE=$((SERVER_GPUS + GPUS_PER_RUN))
SLOTS=$((${#GPU_LIST[@]} / SLOT_SIZE))
((SLOTS >= 1)) || die "each run needs $SLOT_SIZE GPUs ($SERVER_GPUS server + $GPUS_PER_RUN trainer) and GPUS=$GPUS has ${#GPU_LIST[@]}"
SLOT_SERVER=()
SLOT_TRAIN=()
for ((s = 0; s < SLOTS; s++)); do
    first=$((s * SLOT_SIZE))
    if ((SERVER_GPUS)); then SLOT_SERVER+=("${GPU_LIST[first]}"); else SLOT_SERVER+=(""); fi
    _train=("${GPU_LIST[@]:first+SERVER_GPUS:GPUS_PER_RUN}")
    SLOT_TRAIN+=("$(IFS=,; echo "${_train[*]}")")
done
UNUSED=$((${#GPU_LIST[@]} - SLOTS * SLOT_SIZE))

PORT_BASE=${PORT_BASE:-8000}
GROUP_PORT_BASE=${GROUP_PORT_BASE:-51216}
MAIN_PORT_BASE=${MAIN_PORT_BASE:-29500}
for var in PORT_BASE GROUP_PORT_BASE MAIN_PORT_BASE; do
    if ! is_uint "${!var}" || ((10#${!var} < 1024 || 10#${!var} + N - 1 > 65535)); then
        die "$var must be a port number from 1024 with room for $N runs below 65536, got '${!var}'"
    fi
done
PORT_BASE=$((10#$PORT_BASE)) GROUP_PORT_BASE=$((10#$GROUP_PORT_BASE)) MAIN_PORT_BASE=$((10#$MAIN_PORT_BASE))
overlap() { (($1 < $2 + N && $2 < $1 + N)); }
if overlap "$PORT_BASE" "$GROUP_PORT_BASE" || overlap "$PORT_BASE" "$MAIN_PORT_BASE" ||
    overlap "$GROUP_PORT_BASE" "$MAIN_PORT_BASE"; then
    die "the port ranges of $N runs from PORT_BASE=$PORT_BASE, GROUP_PORT_BASE=$GROUP_PORT_BASE and MAIN_PORT_BASE=$MAIN_PORT_BASE overlap"
fi

if [[ -z ${SWEEP_NAME:-} ]]; then
    SWEEP_NAME=sweep-$DATASET-$(IFS=_; echo "${FIELDS[*]}")-$(date +%Y%m%d-%H%M%S)
fi
[[ $SWEEP_NAME =~ ^[A-Za-z0-9._-]+$ ]] || die "SWEEP_NAME may use letters, digits, '.', '_' and '-', got '$SWEEP_NAME'"
SWEEP_DIR=${SWEEP_DIR:-outputs/$SWEEP_NAME}
[[ $SWEEP_DIR == /* ]] || SWEEP_DIR=$CALLER_PWD/$SWEEP_DIR
LOGS=$SWEEP_DIR/logs

# Run names say their values: gsm8k-lr1e-6-beta0.04 (other characters become '_').
NAMES=()
for i in "${!RUNS[@]}"; do
    name=$DATASET
    for kv in ${RUNS[i]}; do name+=-${kv%%=*}${kv#*=}; done
    name=${name//[^A-Za-z0-9._-]/_}
    for n in "${NAMES[@]}"; do [[ $n == "$name" ]] && name+=-$i; done
    NAMES+=("$name")
done

# Everything one run's run_algo.sh gets, into RUN_ENV (as env assignments) for slot $2.
run_env() {
    local i=$1 s=$2 kv field
    RUN_ENV=(VLLM_MODE="$VLLM_MODE" TRAIN_GPU="${SLOT_TRAIN[s]}" VLLM_PORT=$((PORT_BASE + i))
        VLLM_GROUP_PORT=$((GROUP_PORT_BASE + i)) MAIN_PROCESS_PORT=$((MAIN_PORT_BASE + i))
        LOG_DIR="$LOGS" WANDB_RUN_GROUP="$SWEEP_NAME"
        GRPO_RUN_NAME="${NAMES[i]}" GRPO_OUTPUT_DIR="$SWEEP_DIR/${NAMES[i]}")
    ((SERVER_GPUS)) && RUN_ENV+=(VLLM_GPU="${SLOT_SERVER[s]}")
    for kv in ${RUNS[i]}; do
        field=${kv%%=*}
        RUN_ENV+=("GRPO_${field^^}=${kv#*=}")
    done
}
where() {
    local s=$1
    if ((SERVER_GPUS)); then
        printf 'server GPU %s, trainer GPU %s' "${SLOT_SERVER[s]}" "${SLOT_TRAIN[s]}"
    else
        printf 'GPU %s' "${SLOT_TRAIN[s]}"
    fi
}
ports() {
    local i=$1
    printf 'ports %d (server), %d (weight sync), %d (accelerate)' \
        $((PORT_BASE + i)) $((GROUP_PORT_BASE + i)) $((MAIN_PORT_BASE + i))
}

# ---------------------------------------------------------------- checks before anything runs
# run_algo.sh's own checks, through its DRY_RUN, for every run; its command lines for ours.
DRY_OUT=()
for i in "${!RUNS[@]}"; do
    run_env "$i" $((i % SLOTS))
    if ! out=$(env "${RUN_ENV[@]}" DRY_RUN=1 "$ROOT/run_algo.sh" "$DATASET" -- "${EXTRA_ARGS[@]}" 2>&1); then
        die "run ${NAMES[i]}: $(tail -n 1 <<<"$out")"
    fi
    DRY_OUT+=("$out")
done

# The trainer's config validation, for every run in one Python process (a bad value would
# otherwise fail each run only after its server has loaded). Skipped when there is no
# environment yet: then run_algo.sh sets it up and each trainer checks itself.
CHECK='
import os, sys
try:
    import train_trl_grpo as T
except ImportError:
    sys.exit(3)
dataset, nextra = sys.argv[1], int(sys.argv[2])
extra, runs = sys.argv[3 : 3 + nextra], sys.argv[3 + nextra :]
base = dict(os.environ)
for spec in runs:
    name, *assignments = spec.split(" ")
    os.environ.clear()
    os.environ.update(base)
    os.environ.update(a.split("=", 1) for a in assignments)
    try:
        T.resolve_config(["--dataset", dataset, *extra])
    except T.ConfigError as e:
        sys.exit(f"run {name}: {e}")
'
CHECK_RUNS=()
for i in "${!RUNS[@]}"; do
    spec=${NAMES[i]}
    for kv in ${RUNS[i]}; do
        field=${kv%%=*}
        spec+=" GRPO_${field^^}=${kv#*=}"
    done
    CHECK_RUNS+=("$spec")
done
rc=0
err=$(cd "$ROOT" && "$PY" -c "$CHECK" "$DATASET" "${#EXTRA_ARGS[@]}" "${EXTRA_ARGS[@]}" "${CHECK_RUNS[@]}" 2>&1) || rc=$?
if ((rc == 3 || rc == 127)); then
    log "no Python environment yet: each trainer checks its own config when it starts"
elif ((rc)); then
    die "$(tail -n 1 <<<"$err")"
fi

# ---------------------------------------------------------------- dry run
summary_line() {
    printf '%d runs of %s on %d slot(s) of %d GPU(s) (%s)' "$N" "$DATASET" "$SLOTS" "$SLOT_SIZE" "$GPUS"
    ((N > SLOTS)) && printf '; %d queued' $((N - SLOTS))
    ((UNUSED)) && printf '; %d GPU(s) unused' "$UNUSED"
    printf '\n'
}
if is_true "${DRY_RUN:-0}"; then
    printf '# sweep %s: ' "$SWEEP_NAME"
    summary_line
    printf '# runs in %s, logs in %s, wandb group %s\n' "$SWEEP_DIR" "$LOGS" "$SWEEP_NAME"
    for i in "${!RUNS[@]}"; do
        s=$((i % SLOTS))
        if ((i < SLOTS)); then
            printf '# run %d/%d %s: %s; %s\n' $((i + 1)) "$N" "${NAMES[i]}" "$(where "$s")" "$(ports "$i")"
        else
            printf '# run %d/%d %s: queued, takes the first slot that frees (shown: slot %d, %s); %s\n' \
                $((i + 1)) "$N" "${NAMES[i]}" "$s" "$(where "$s")" "$(ports "$i")"
        fi
        printf '%s\n' "${DRY_OUT[i]}"
    done
    exit 0
fi

# ---------------------------------------------------------------- run
mkdir -p "$LOGS" || die "cannot create $LOGS"
command -v setsid >/dev/null || die "'setsid' (util-linux) is needed to give each run its own process group"

PID=()    # run_algo.sh's pid (= its process group) while the run is going
SLOT_OF=() # slot of a started run
STATUS=() # exit status of a finished run
START=()
ELAPSED=()
BUSY=()   # run index holding each slot, or ""
for ((s = 0; s < SLOTS; s++)); do BUSY+=(""); done
NEXT=0
STOP_SIG=
EXIT_CODE=0

start_run() {
    local i=$1 s=$2
    run_env "$i" "$s"
    log "run $((i + 1))/$N ${NAMES[i]}: $(where "$s"); $(ports "$i"); log $LOGS/${NAMES[i]}.log"
    # Own session (Ctrl-C reaches it only through this script, once), and SIGINT restored:
    # background commands start with it ignored, and run_algo.sh stops its trainer on it.
    (
        trap - INT QUIT
        cd "$CALLER_PWD" && exec setsid env "${RUN_ENV[@]}" "$ROOT/run_algo.sh" "$DATASET" -- "${EXTRA_ARGS[@]}"
    ) >"$LOGS/${NAMES[i]}.log" 2>&1 </dev/null &
    PID[i]=$!
    SLOT_OF[i]=$s
    START[i]=$SECONDS
    BUSY[s]=$i
}

# Reap every run that has ended; report each one.
reap() {
    local s i rc
    for ((s = 0; s < SLOTS; s++)); do
        i=${BUSY[s]}
        [[ -n $i ]] || continue
        kill -0 "${PID[i]}" 2>/dev/null && continue
        rc=0
        wait "${PID[i]}" || rc=$?
        STATUS[i]=$rc
        ELAPSED[i]=$((SECONDS - START[i]))
        PID[i]=
        BUSY[s]=
        if ((rc == 0)); then
            log "run ${NAMES[i]} finished in $(duration "${ELAPSED[i]}")"
        else
            log "run ${NAMES[i]} failed with status $rc after $(duration "${ELAPSED[i]}"); last lines of $LOGS/${NAMES[i]}.log:"
            tail -n 5 "$LOGS/${NAMES[i]}.log" | sed 's/^/    /' >&2
        fi
    done
}

running() {
    local s
    for ((s = 0; s < SLOTS; s++)); do [[ -n ${BUSY[s]} ]] && return 0; done
    return 1
}

# A pause that the signal traps can cut short: with a plain foreground `sleep`, bash skips the INT
# trap when the sleep has just exited on its own as Ctrl-C arrives (it takes the child to have
# handled the signal), and the script would carry on as if nothing happened.
nap() {
    sleep "$1" &
    wait "$!"
}

# Signal every running run_algo.sh (each stops its own server and trainer) and wait for all.
stop_runs() {
    local sig=$1 s
    for ((s = 0; s < SLOTS; s++)); do
        [[ -n ${BUSY[s]} ]] && kill -"$sig" "${PID[BUSY[s]]}" 2>/dev/null
    done
    while running; do
        sleep 0.2
        reap
    done
}

on_signal() {
    trap '' INT TERM HUP
    STOP_SIG=$1
    EXIT_CODE=$2
    log "caught SIG$1; stopping the running runs; $((N - NEXT)) queued run(s) will not start"
    # Ctrl-C reaches each run_algo.sh as SIGINT, so its trainer stops as on KeyboardInterrupt.
    stop_runs "$1"
}
on_exit() {
    trap '' INT TERM HUP
    running && stop_runs TERM
}
trap on_exit EXIT
trap 'on_signal INT 130' INT
trap 'on_signal TERM 143' TERM
trap 'on_signal HUP 129' HUP

log "sweep $SWEEP_NAME: $(summary_line)"
log "runs in $SWEEP_DIR; follow one with: tail -f $LOGS/<run name>.log"
while [[ -z $STOP_SIG ]]; do
    reap
    for ((s = 0; s < SLOTS && NEXT < N; s++)); do
        [[ -z $STOP_SIG && -z ${BUSY[s]} ]] || continue
        start_run "$NEXT" "$s"
        NEXT=$((NEXT + 1))
    done
    ((NEXT < N)) || running || break
    nap 0.5
done

# ---------------------------------------------------------------- report
FAILED=()
DIRS=()
echo
printf '%-32s %-28s %-6s %-14s %s\n' run GPUs port status time
for i in "${!RUNS[@]}"; do
    gpus=- took=-
    if [[ -n ${SLOT_OF[i]:-} ]]; then
        gpus=$(where "${SLOT_OF[i]}")
        took=$(duration "${ELAPSED[i]:-0}")
    fi
    if [[ -z ${STATUS[i]:-} ]]; then
        state="not started"
    elif [[ -n $STOP_SIG ]] && ((STATUS[i] >= 128)); then
        state=stopped
    elif ((STATUS[i] == 0)); then
        state=ok
    else
        state="failed ($((STATUS[i])))"
        FAILED+=("${NAMES[i]}")
    fi
    printf '%-32s %-28s %-6s %-14s %s\n' "${NAMES[i]}" "$gpus" $((PORT_BASE + i)) "$state" "$took"
    compgen -G "$SWEEP_DIR/${NAMES[i]}/eval/step_*.json" >/dev/null && DIRS+=("$SWEEP_DIR/${NAMES[i]}")
done
echo
if [[ -n $STOP_SIG ]]; then
    ((${#DIRS[@]})) && log "to compare what they evaluated: train_trl_grpo.py --compare ${DIRS[*]}"
elif ((${#DIRS[@]})); then
    if ! "$PY" "$ROOT/train_trl_grpo.py" --compare "${DIRS[@]}" --png "$SWEEP_DIR/compare.png" |
        tee "$SWEEP_DIR/results.txt"; then
        log "the comparison failed (train_trl_grpo.py --compare); the runs themselves are in $SWEEP_DIR"
        ((EXIT_CODE)) || EXIT_CODE=1
    fi
else
    log "no run has an evaluation to compare"
fi
if ((${#FAILED[@]})); then
    log "${#FAILED[@]} of $N run(s) failed: ${FAILED[*]}"
    ((EXIT_CODE)) || EXIT_CODE=1
fi
exit "$EXIT_CODE"
