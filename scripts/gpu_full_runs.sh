#!/usr/bin/env bash
# The `full` recipe on one GPU, every task at once (how docs/RESULTS.md's GPU tables were made).
#
#   scripts/gpu_full_runs.sh minilm BACKBONE_DIR WORK_DIR   # SST-2, MRPC, RTE, SQuAD + baselines
#   scripts/gpu_full_runs.sh mpnet  BACKBONE_DIR WORK_DIR   # SST-2 on the base-size backbone
#   scripts/gpu_full_runs.sh status WORK_DIR                # which runs are done, last log lines
#
# Each task is a chain of `dynabert train` calls (the DynaBERT run, then its baselines with the
# run's own teacher) in its own background process, so the chains share the GPU: a MiniLM-sized
# step is too small to keep an H100 busy alone. Data come from $DYNABERT_DATA_DIR. Logs go to
# WORK_DIR/logs/CHAIN.log; a finished chain leaves WORK_DIR/logs/CHAIN.done (its exit status).
# Extra `dynabert train` options for the MPNet run go in $MPNET_SET (e.g. "--set depth_stage.epochs=1");
# $RECIPE (default full) and $THREADS (CPU threads per run, default 2) change every run.
set -u

train() { python3 -m model.cli train --recipe "${RECIPE:-full}" --threads "${THREADS:-2}" "$@"; }

chain() {  # chain NAME COMMAND...: run in the background, log, mark done with the exit status
    local name=$1
    shift
    (
        "$@" >"$WORK/logs/$name.log" 2>&1
        echo $? >"$WORK/logs/$name.done"
    ) &
}

task_chain() {  # task_chain TASK BASELINES...: the DynaBERT run, then each baseline
    local task=$1 out=$WORK/runs/$1-minilm-full
    shift
    train --task "$task" --backbone "$BACKBONE" --out "$out" --resume || return
    for b in "$@"; do
        train --task "$task" --backbone "$BACKBONE" --ablation "$b" \
            --teacher "$out/stages/teacher" --out "$out/baselines/$b" --resume || return
    done
}

case "${1:-}" in
minilm)
    BACKBONE=$2 WORK=$3
    mkdir -p "$WORK/logs" "$WORK/runs"
    chain sst2 task_chain sst2 separate
    chain squad task_chain squad separate
    chain mrpc task_chain mrpc separate vanilla
    chain rte task_chain rte separate vanilla
    ;;
mpnet)
    BACKBONE=$2 WORK=$3
    mkdir -p "$WORK/logs" "$WORK/runs"
    # shellcheck disable=SC2086  # MPNET_SET is a list of options
    chain mpnet-sst2 train --task sst2 --backbone "$BACKBONE" --out "$WORK/runs/sst2-mpnet-full" --resume ${MPNET_SET:-}
    ;;
status)
    WORK=$2
    for log in "$WORK"/logs/*.log; do
        name=$(basename "$log" .log)
        state=running
        [ -f "$WORK/logs/$name.done" ] && state="done rc=$(cat "$WORK/logs/$name.done")"
        echo "== $name: $state"
        grep -E "step [0-9]+/|eval w=|done in|average|Error|error" "$log" | tail -n 3
    done
    ;;
*)
    sed -n '2,12p' "$0"
    exit 2
    ;;
esac
