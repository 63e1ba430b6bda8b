#!/usr/bin/env bash
# Launch training under torchrun:  launch/torchrun.sh NPROC CONFIG [section.key=value ...]
#
# NPROC processes on this node (one per GPU; on CPU, processes sharing the cores). Passes
# checkpoint.load=auto unless an override sets checkpoint.load, so a restarted launch
# resumes from the run's latest checkpoint.
#
# Environment:
#   MAX_RESTARTS   worker-group restarts after a failure (default 0); each restart resumes
#                  from the latest checkpoint
#   NNODES         nodes in the job (default 1: a standalone single-node rendezvous)
#   RDZV_ENDPOINT  host:port of the c10d rendezvous, required when NNODES > 1 (one agent,
#                  by default the one running on that host, serves it)
#   RDZV_ID        job id shared by all nodes' agents (default stem_megatron)
#   RDZV_TIMEOUT   seconds for all NNODES agents to join before giving up (default 300)
#   RDZV_CONF      extra rendezvous options, comma-separated (e.g. is_host=true)
#   NODE_RANK      this node's rank (optional; otherwise assigned by the rendezvous)
#   LOCAL_ADDR     this node's address as the others reach it (optional)
#   PYTHON         interpreter (default: the repo's .venv, else python on PATH)
#   OMP_NUM_THREADS  CPU threads per rank (default: this node's cores / NPROC, not torchrun's 1)
# The exit code is torchrun's.
set -euo pipefail

usage() {
    [[ $# -gt 0 ]] && echo "launch/torchrun.sh: $*" >&2
    echo "usage: launch/torchrun.sh NPROC CONFIG [section.key=value ...]" >&2
    echo "  env: MAX_RESTARTS NNODES RDZV_ENDPOINT RDZV_ID RDZV_TIMEOUT RDZV_CONF NODE_RANK" \
         "LOCAL_ADDR PYTHON (see the header of launch/torchrun.sh)" >&2
    exit 2
}

[[ $# -ge 2 ]] || usage "expected NPROC and CONFIG"
nproc=$1 config=$2
shift 2
[[ $nproc =~ ^[1-9][0-9]*$ ]] || usage "NPROC must be a positive integer, got '$nproc'"
[[ -f $config ]] || usage "config file not found: $config"
nnodes=${NNODES:-1} max_restarts=${MAX_RESTARTS:-0} rdzv_timeout=${RDZV_TIMEOUT:-300}
[[ $nnodes =~ ^[1-9][0-9]*$ ]] || usage "NNODES must be a positive integer, got '$nnodes'"
[[ $max_restarts =~ ^[0-9]+$ ]] || usage "MAX_RESTARTS must be >= 0, got '$max_restarts'"
[[ $rdzv_timeout =~ ^[1-9][0-9]*$ ]] || usage "RDZV_TIMEOUT must be seconds > 0: '$rdzv_timeout'"

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-}
if [[ -z $python ]]; then
    if [[ -x $root/.venv/bin/python ]]; then python=$root/.venv/bin/python
    else python=$(command -v python || command -v python3) || usage "no python on PATH"; fi
fi
"$python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)" \
    || usage "interpreter '$python' cannot import torch: set PYTHON to one that can" \
             "(e.g. PYTHON=$root/.venv/bin/python after 'make install')"
"$python" -c "import stem_megatron" 2>/dev/null \
    || usage "interpreter '$python' cannot import stem_megatron: install it with" \
             "'$python -m pip install -e $root' (make install does, into $root/.venv)"

# Workers get their own TCPStore (rank 0 hosts it) instead of sharing the rendezvous store:
# with the shared store, restarted workers read the previous attempt's gloo/NCCL addresses
# and fail to connect (pytorch/pytorch#135712; seen here with torch 2.13 and gloo).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}

# torchrun sets OMP_NUM_THREADS=1 where it is unset; the workers cannot tell that from a
# user's 1, so the user's value (empty: unset) goes along, and without one each rank sizes
# its threads by the node's cores (stem_megatron/parallel/process_env.py).
export STEM_USER_OMP_NUM_THREADS=${OMP_NUM_THREADS:-}

# First, not last: train.py's argparse takes positionals only before its options.
overrides=("$@")
[[ " ${overrides[*]} " == *" checkpoint.load="* ]] || overrides=(checkpoint.load=auto "$@")

args=(--nproc_per_node "$nproc" --max-restarts "$max_restarts")
if [[ $nnodes -eq 1 && -z ${RDZV_ENDPOINT:-} ]]; then
    args+=(--standalone)
else
    [[ -n ${RDZV_ENDPOINT:-} ]] || usage "NNODES=$nnodes needs RDZV_ENDPOINT=host:port"
    args+=(--nnodes "$nnodes" --rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT"
           --rdzv_id "${RDZV_ID:-stem_megatron}"
           --rdzv_conf "join_timeout=$rdzv_timeout${RDZV_CONF:+,$RDZV_CONF}")
    [[ -n ${NODE_RANK:-} ]] && args+=(--node_rank "$NODE_RANK")
    [[ -n ${LOCAL_ADDR:-} ]] && args+=(--local_addr "$LOCAL_ADDR")
fi

# exec: torchrun receives the launcher's signals (SLURM's SIGTERM) and forwards them to the
# workers; its exit code is ours.
exec "$python" "$root/launch/torchrun_agent.py" "${args[@]}" \
    -m stem_megatron.train --config "$config" "${overrides[@]}"
