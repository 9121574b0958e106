#!/usr/bin/env bash
# One device call's worth of GPU work: the gpu-marked tests, then the op benchmark case by
# case, everything logged under $OUT so that a call cut off at its time limit still returns
# what finished. Usage on the lent GPU (from the repo root, fla wheels carried in .whl/):
#
#   GDN_COMMIT=<commit> bash benchmarks/gpu_session.sh [tests|bench|sweep|stages|segments|check|ncu|l2norm|drift|split|compare|all] [case ...]
#
# Bound a bench with GDN_BENCH_TIMEOUT, which wraps each python process; `timeout` around
# this script kills the shell but leaves its python child on the GPU, sharing it with what
# runs next (NOTES.md §31.3).
#
# Budget from the first session with the Triton kernels (cold H100, Triton 3.6): the gpu
# tests take ~6-9 min (mostly compiling ~10 kernels per dtype/flag combination); one
# benchmark case with triton, fla and sdpa ~2.5 min cold, ~1 min warm. Keep each call under
# 10 minutes: run "tests" and "bench" in separate calls.
set -uo pipefail
what=${1:-all}
shift || true
out=${OUT:-/tmp/gdn-gpu}
mkdir -p "$out/results"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:src
else
    export PYTHONPATH=src
fi
export PYTHONUNBUFFERED=1
# Each device call starts on a cold machine; Triton's compile cache travels with the call
# (carry .triton_cache) and comes back in $OUT, so unchanged kernels are not compiled again.
export TRITON_CACHE_DIR=$PWD/.triton_cache
mkdir -p "$TRITON_CACHE_DIR"
[ -f .triton_cache.tgz ] && tar -xzf .triton_cache.tgz -C "$TRITON_CACHE_DIR"
# Files come back from $OUT in pieces of at most 16 MiB: rejoin with `cat tc.part.* >`.
# At most 8 files come back: result folders travel as one archive each.
save_cache() {
    # GDN_SAVE_CACHE=0: the kernels are about to change, so the cache is not worth 5 files.
    if [ "${GDN_SAVE_CACHE:-1}" = 1 ]; then
        tar -czf /tmp/triton_cache.tgz -C "$TRITON_CACHE_DIR" . && \
            split -b 15M /tmp/triton_cache.tgz "$out/tc.part."
    fi
    for d in stages results ncu; do
        if [ -n "$(ls -A "$out/$d" 2>/dev/null)" ]; then
            # One archive name per run: two runs in one call must not overwrite each other.
            archive="$out/$d-$what-$(date +%H%M%S)-$$.tgz"
            tar -czf "$archive" -C "$out" "$d" && rm -rf "${out:?}/$d"
        fi
    done
}
trap save_cache EXIT

# stages.py with its stderr kept aside: a run that fails prints why (two runs of NOTES.md §14
# printed nothing, their errors sent to /dev/null). GDN_STAGES_TIMEOUT bounds each run.
run_stages() {
    local err rc
    err=$(mktemp)
    timeout "${GDN_STAGES_TIMEOUT:-300}" python3 benchmarks/stages.py "$@" 2>"$err"
    rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "stages.py $* failed (rc $rc):"
        grep -v -i warn "$err" | tail -3
    fi
    rm -f "$err"
}

if [ "$what" = tests ] || [ "$what" = all ]; then
    # -v: each test's result is in the log as it finishes, even if the call is cut off.
    # GDN_TEST_K selects tests (pytest -k): a whole cold run takes ~1,100 s, more than one
    # call (NOTES.md §11), e.g. GDN_TEST_K="within_bounds" then GDN_TEST_K="not within_bounds".
    # GDN_TEST_WORKERS=n runs them in n processes (pytest-xdist, on the GPU machine): the
    # compiles, most of the time, then share the machine's cores (NOTES.md §24).
    python3 -m pytest -m gpu -v -p no:cacheprovider --durations=20 -k "${GDN_TEST_K:-}" \
        ${GDN_TEST_WORKERS:+-n "$GDN_TEST_WORKERS"} tests \
        2>&1 | tee "$out/gpu_tests.log" | grep -E "PASSED|FAILED|ERROR|passed|failed"
fi
if [ "$what" = l2norm ]; then
    # The q/k L2 norm, Triton kernels against PyTorch (benchmarks/l2norm.py).
    python3 benchmarks/l2norm.py --out "$out/results" 2>&1 | grep -v -i warn
fi
if [ "$what" = stages ]; then
    # Per-kernel times at the two reference shapes (NOTES.md).
    run_stages --out "$out/stages" | head -14
    run_stages --shape 1,65536,16,128,128 --out "$out/stages" \
        | head -6
    # The yardstick's kernels at the first shape, to compare stage by stage.
    run_stages --backend fla --out "$out/stages" | head -16
fi
stage_lines() { grep -E "ms of kernels|state_|wy_|output_|dv_local|failed|Error"; }
tile_sweep() {
    # Kernel times per tile choice (GDN_TRITON_TILES keys in triton/tiles.py), the default
    # first; the choices come from GDN_TILE_SWEEP, e.g. "state_bwd_warps=4 output_f32=1".
    for tiles in "" ${GDN_TILE_SWEEP:-}; do
        echo "== tiles: ${tiles:-default}"
        GDN_TRITON_TILES=$tiles run_stages --tag "t-${tiles//[=,]/-}" \
            --out "$out/stages" | stage_lines
    done
}
if [ "$what" = tiles ]; then
    # The tile sweep, then the segment length of the segmented passes on the long sequence
    # (NOTES.md §6).
    tile_sweep
    for seg in 0 128 64; do
        echo "== segment chunks: $seg"
        GDN_TRITON_SEGMENT_CHUNKS=$seg run_stages --shape 1,65536,16,128,128 \
            --tag "seg$seg" --out "$out/stages" | head -4
    done
fi
if [ "$what" = segments ]; then
    # Kernel times of one shape (GDN_SHAPE, default 2,16384,16,128,128) per segment length
    # of the segmented state passes (GDN_SEGMENT_SWEEP: "auto" is the heuristic, 0 plain),
    # then fla's kernels at the same shape (NOTES.md §6, §12).
    shape=${GDN_SHAPE:-2,16384,16,128,128}
    for seg in ${GDN_SEGMENT_SWEEP:-auto 0}; do
        echo "== $shape, segment chunks: $seg"
        if [ "$seg" = auto ]; then unset GDN_TRITON_SEGMENT_CHUNKS
        else export GDN_TRITON_SEGMENT_CHUNKS=$seg; fi
        # The tag names the tile choice too: runs under several GDN_TRITON_TILES in one call
        # would otherwise write one file name.
        tiles=${GDN_TRITON_TILES:-}
        GDN_STAGES_TIMEOUT=150 run_stages --shape "$shape" \
            --tag "seg$seg${tiles:+-${tiles//[=,]/-}}" \
            --out "$out/stages" | head -16
    done
    unset GDN_TRITON_SEGMENT_CHUNKS
    [ "${GDN_FLA:-1}" = 1 ] && echo "== $shape, fla" && GDN_STAGES_TIMEOUT=200 run_stages --backend fla --shape "$shape" --tag fla \
        --out "$out/stages" | head -16
fi
if [ "$what" = check ]; then
    # Each tile choice (default first, then GDN_TILE_SWEEP) probed against float64 at a
    # full shape, a K = 256 one and an awkward one, then its kernel times at each shape of
    # GDN_CHECK_SHAPES (default the first shape; e.g. "8,4096,16,128,128 8,4096,6,256,512":
    # the K = 256 figures of NOTES.md §28.1 took a second call without it): for a kernel
    # change whose variants may compute differently on the GPU (NOTES.md §9).
    for tiles in "" ${GDN_TILE_SWEEP:-}; do
        echo "== tiles: ${tiles:-default}"
        # GDN_PROBE=0: timings only (a sweep whose winners are probed in a later call).
        [ "${GDN_PROBE:-1}" = 0 ] || for shape in 8,4096,16,128,128 8,4096,6,256,512 2,512,4,100,72; do
            printf "%-18s " "$shape"
            GDN_TRITON_TILES=$tiles timeout 120 python3 benchmarks/probe_launch.py "$shape" \
                2>&1 | grep -v Warn | tail -1
        done
        for shape in ${GDN_CHECK_SHAPES:-8,4096,16,128,128}; do
            GDN_TRITON_TILES=$tiles run_stages --shape "$shape" --tag "t-${tiles//[=,]/-}" \
                --out "$out/stages" | stage_lines
        done
    done
fi
if [ "$what" = ncu ]; then
    # Nsight Compute on one kernel of stages.py --external (two forward+backward calls), once
    # per tile choice (default first, then GDN_TILE_SWEEP, e.g. "inline_gates=0"). GDN_SHAPE
    # (default 6,4096,16,128,128), GDN_NCU_KERNEL a regex (default state_backward),
    # GDN_NCU_SKIP launches of it to skip (default 1: the second call's, for a kernel launched
    # once a call; 2 for the forward pass, which the backward recomputes). NOTES.md §14.
    # GDN_NCU_VARIANTS: stages.py variants, each with every tile choice (e.g.
    # "gated_delta_rule deltanet": what the gate costs a kernel, NOTES.md §27.8). The DRAM and
    # L2 byte counts say whether a kernel reads its inputs once from HBM or again.
    shape=${GDN_SHAPE:-6,4096,16,128,128}
    kernel=${GDN_NCU_KERNEL:-state_backward}
    mkdir -p "$out/ncu"
    for variant in ${GDN_NCU_VARIANTS:-gated_delta_rule}; do
        for tiles in "" ${GDN_TILE_SWEEP:-}; do
            report="$out/ncu/${shape//,/x}-$variant-$kernel-${tiles:-default}.txt"
            report=${report//=/-}
            echo "== $shape $variant $kernel, tiles: ${tiles:-default}"
            GDN_TRITON_TILES=$tiles timeout 300 /usr/local/cuda/bin/ncu \
                --kernel-name "regex:$kernel" --launch-skip "${GDN_NCU_SKIP:-1}" \
                --launch-count 1 --section SpeedOfLight --section Occupancy \
                --section WarpStateStats --section LaunchStats \
                --section MemoryWorkloadAnalysis --section SchedulerStats \
                --metrics dram__bytes_read.sum,dram__bytes_write.sum,lts__t_bytes.sum,regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio \
                python3 benchmarks/stages.py --shape "$shape" --variant "$variant" \
                --external > "$report" 2>&1
            # The stall reasons (cycles a warp waits per instruction issued, by reason)
            # print where they are at least 0.1.
            grep -E "^\s+(Duration|Warp Cycles Per Issued|Achieved Active Warps|Registers Per|Dynamic Shared|Block Limit (Registers|Shared)|DRAM Throughput|No Eligible|dram__bytes|lts__t_bytes)" \
                "$report" || tail -3 "$report"
            grep -E "issue_stalled_.* [0-9.]+$" "$report" | awk '$NF >= 0.1 {sub(/smsp__average_warps_issue_stalled_/, "stall "); sub(/_per_issue_active.ratio/, ""); print "    " $1, $2, $NF}'
        done
    done
fi
if [ "$what" = state ]; then
    # Correctness against float64 at three full shapes (a kernel change first shows up
    # here: NOTES.md §8), then the tile sweep.
    for shape in 8,4096,16,128,128 8,4096,6,256,512 1,65536,16,128,128; do
        echo "== probe $shape"
        timeout 150 python3 benchmarks/probe_launch.py "$shape" 2>&1 | grep -v Warn | tail -4
    done
    tile_sweep
fi
if [ "$what" = train ]; then
    # Training throughput (issue 5), one preset per process so a time-out keeps the others.
    presets=("$@")
    [ ${#presets[@]} -eq 0 ] && presets=(gdn-0.4b transformer-0.4b mamba2-0.4b h1-0.4b \
                                          h2-0.4b deltanet-0.4b)
    for preset in "${presets[@]}"; do
        timeout 150 python3 benchmarks/train_throughput.py --presets "$preset" --steps 5 \
            --tag "$preset" --out "$out/results" 2>&1 | grep -E "^[a-z0-9]+-0|Error|error"
    done
fi
if [ "$what" = fsdp ]; then
    # `gdn train` on every GPU of the machine: FSDP2 over NCCL (issue 5, "show it on 2 GPUs").
    n=$(python3 -c "import torch; print(torch.cuda.device_count())")
    timeout 200 torchrun --standalone --nproc-per-node "$n" -m gdn train --preset gdn-0.4b \
        --seq-len 4096 --batch-size 2 --max-steps 16 --warmup-steps 4 --lr 1e-3 \
        --eval-every 8 --eval-batches 1 --save-every 8 --keep-last 1 --no-progress \
        --no-tensorboard --no-export-hf --out /tmp/run-fsdp 2>&1 | grep -v Warning | tail -6
    mkdir -p "$out/results"
    cp /tmp/run-fsdp/metrics.jsonl "$out/results/fsdp-${n}gpu-metrics.jsonl"
    ls /tmp/run-fsdp/checkpoints/*/ | head
    nvidia-smi --query-gpu=name,memory.used --format=csv
fi
if [ "$what" = sweep ]; then
    # RELIABILITY.md item 1 for the kernels: 200 configs, float32 exact and bfloat16, in
    # GDN_SWEEP_SHARDS processes side by side (compiling each config's kernels is most of the
    # time, and one process compiles on one core), none starting a config after
    # GDN_SWEEP_SECONDS and none running a config that GDN_SWEEP_SKIP's result files hold
    # (a sweep continued in a later call); then the shards joined into one result file.
    n=${GDN_SWEEP_SHARDS:-12}
    skip=()
    [ -n "${GDN_SWEEP_SKIP:-}" ] && skip=(--skip-done $GDN_SWEEP_SKIP)
    [ -n "${GDN_SWEEP_SKIP_INDICES:-}" ] && skip+=(--skip-indices "$GDN_SWEEP_SKIP_INDICES")
    # Each shard's file is copied to $OUT as it finishes: a call cut off before the merge
    # still returns them (NOTES.md §20).
    for r in $(seq 0 $((n - 1))); do
        (python3 benchmarks/accuracy.py --backend triton --device cuda --shard "$r/$n" \
            --time-limit "${GDN_SWEEP_SECONDS:-240}" "${skip[@]}" \
            > "$out/results/sweep-$r.log" 2>&1
         cp benchmarks/results/accuracy/*-triton-shard"$r"of"$n".json "$out/results/") &
    done
    wait
    python3 benchmarks/accuracy.py --merge benchmarks/results/accuracy/*-triton-shard*of"$n".json \
        2>&1 | tee "$out/results/sweep.log" | tail -12
    cp benchmarks/results/accuracy/*-triton.json "$out/results/" 2>/dev/null
fi
if [ "$what" = drift ]; then
    # The undamped rule's bf16 drift (benchmarks/drift.py, NOTES.md §21): for each config of
    # GDN_DRIFT_CONFIGS ("|"-separated drift.py arguments), the kernels once per operand
    # choice of GDN_TILE_SWEEP (default first) and the torch path and fla, processes side by
    # side.
    IFS='|' read -r -a configs <<< "${GDN_DRIFT_CONFIGS:---index 92}"
    i=0
    for config in "${configs[@]}"; do
        for tiles in "" ${GDN_TILE_SWEEP:-} torch-fla; do
            backends=triton
            [ "$tiles" = torch-fla ] && backends="torch fla" && tiles=""
            # shellcheck disable=SC2086
            GDN_TRITON_TILES=$tiles timeout "${GDN_DRIFT_SECONDS:-400}" \
                python3 benchmarks/drift.py $config --backends $backends \
                --out "$out/results/drift-$i.jsonl" > "$out/results/drift-$i.log" 2>&1 &
            i=$((i + 1))
        done
    done
    wait
    for f in "$out"/results/drift-*.log; do echo "== $f"; grep -v -i warn "$f" | tail -4; done
fi
if [ "$what" = split ]; then
    # NOTES.md §21-22: what precise_state costs (GDN_TRITON_TILES=state_split=1 is the same
    # launch for every call) and whether it holds the bf16 bounds on the sweep's undamped
    # configs (GDN_DRIFT_INDICES), its gpu tests, and any K = 256 launch (GDN_K256_TILES;
    # empty: skipped; exact mode's figures are in §22). First the accuracy side by side,
    # which also compiles every launch the timings need (stages.py --external: two calls,
    # no profile); then the timings one process at a time on a quiet GPU.
    sweep=${GDN_TILE_SWEEP:-"state_split=1"}
    k256=${GDN_K256_TILES:-}
    i=0
    for index in ${GDN_DRIFT_INDICES:-92 142 179 113 134}; do
        for tiles in "" $sweep; do
            GDN_TRITON_TILES=$tiles timeout 300 python3 benchmarks/drift.py --index "$index" \
                --out "$out/results/drift.jsonl" > "$out/results/drift-$i.log" 2>&1 &
            i=$((i + 1))
        done
    done
    timeout 400 python3 -m pytest -m gpu -v -p no:cacheprovider -k "undamped_rule" tests \
        > "$out/results/gpu_tests_split.log" 2>&1 &
    for variant in deltanet gated_delta_rule; do
        for tiles in $sweep; do
            GDN_TRITON_TILES=$tiles timeout 300 python3 benchmarks/stages.py \
                --variant "$variant" --external > /dev/null 2>&1 &
        done
    done
    for tiles in ${k256:+"" $k256}; do
        GDN_TRITON_TILES=$tiles timeout 300 python3 benchmarks/stages.py \
            --shape 8,4096,6,256,512 --external > /dev/null 2>&1 &
    done
    wait
    for f in "$out"/results/drift-*.log; do grep -v -i warn "$f" | tail -2; done
    grep -E "PASSED|FAILED|ERROR|passed|failed|^E " "$out/results/gpu_tests_split.log" | head -20
    for variant in deltanet gated_delta_rule; do
        for tiles in "" $sweep; do
            echo "== $variant ${tiles:-default}"
            GDN_TRITON_TILES=$tiles run_stages --variant "$variant" \
                --tag "t-${tiles//[=,]/-}" --out "$out/stages" | stage_lines
        done
    done
    for tiles in ${k256:+"" $k256}; do
        echo "== 8,4096,6,256,512 ${tiles:-default}"
        GDN_TRITON_TILES=$tiles run_stages --shape 8,4096,6,256,512 \
            --tag "t-${tiles//[=,]/-}" --out "$out/stages" | stage_lines
    done
    # End to end (do_bench, peak memory, errors) with the op's option, as README quotes.
    timeout 240 python3 benchmarks/ops.py --shapes 8x4096-h16 \
        --variants gated_delta_rule,deltanet --backends triton,triton-precise \
        --tag precise --out "$out/results" 2>&1 | grep -E "^\| [0-9]|skip|[Ee]rror"
fi
if [ "$what" = compare ]; then
    # This tree's kernels beside an earlier commit's in one call (NOTES.md §24): GDN_BASE is a
    # folder with that commit's src/ (`git archive <commit> src | tar -x -C .base`, carried),
    # GDN_BASE_COMMIT its name. First, side by side (which also compiles every launch the
    # timings need): this tree against float64 at GDN_PROBES ("shape:variant", variant
    # gated | deltanet | gla), and both trees' kernels for each GDN_COMPARE case run once;
    # then the timings of each case, base and this tree, one process at a time.
    base=${GDN_BASE:-.base}
    base_path=${PYTHONPATH/src/$base/src}
    probes=${GDN_PROBES:-"8,4096,16,128,128:gated 8,4096,16,128,128:deltanet 8,4096,16,128,128:gla 8,4096,6,256,512:gated 2,512,4,100,72:gated 1,65536,16,128,128:gated"}
    cases=${GDN_COMPARE:-"8,4096,16,128,128:gated_delta_rule 8,4096,16,128,128:deltanet 8,4096,6,256,512:gated_delta_rule 1,65536,16,128,128:gated_delta_rule"}
    i=0
    for probe in $probes; do
        timeout 200 python3 benchmarks/probe_launch.py "${probe%%:*}" bfloat16 "${probe##*:}" \
            > "$out/results/probe-$i.log" 2>&1 &
        i=$((i + 1))
    done
    for case in $cases; do
        PYTHONPATH=$base_path timeout 200 python3 benchmarks/stages.py --shape "${case%%:*}" \
            --variant "${case##*:}" --external > /dev/null 2>&1 &
        timeout 200 python3 benchmarks/stages.py --shape "${case%%:*}" \
            --variant "${case##*:}" --external > /dev/null 2>&1 &
    done
    wait
    i=0
    for probe in $probes; do
        printf "%-30s " "$probe"; grep -v -i warn "$out/results/probe-$i.log" | tail -1
        i=$((i + 1))
    done
    for case in $cases; do
        echo "== $case ${GDN_BASE_COMMIT:-base}"
        GDN_COMMIT=${GDN_BASE_COMMIT:-base} PYTHONPATH=$base_path run_stages \
            --shape "${case%%:*}" --variant "${case##*:}" --tag base --out "$out/stages" \
            | stage_lines
        echo "== $case this tree"
        run_stages --shape "${case%%:*}" --variant "${case##*:}" --out "$out/stages" \
            | stage_lines
    done
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
    cases=("$@")
    if [ ${#cases[@]} -eq 0 ]; then
        cases=(8x4096-h16 1x65536-h16 8x4096-h6-k256v512 8x4096-h16-deltanet
               8x4096-h16-gla 2x16384-h16 8x4096-h32 8x4096-h16-gva32)
    fi
    # GDN_BACKENDS, e.g. "triton,triton-keep" to time recompute=False without fla's autotune.
    # GDN_SPLIT_BACKENDS=1: each backend in a process of its own, each with GDN_BENCH_TIMEOUT
    # (default 300 s), so that one slow cold start (fla's autotune of chunk_gla ran past 300 s
    # with ours in one process, NOTES.md §27) does not cost the other's figures. The results
    # files then differ by a "-<backend>" suffix.
    backends=${GDN_BACKENDS:-triton,fla,sdpa}
    for case in "${cases[@]}"; do
        if [ "${GDN_SPLIT_BACKENDS:-0}" = 1 ]; then
            runs=${backends//,/ }
        else
            runs=$backends
        fi
        for run in $runs; do
            tag=$case
            [ "$run" != "$backends" ] && tag="$case-$run"
            timeout "${GDN_BENCH_TIMEOUT:-300}" python3 benchmarks/ops.py --shapes "$case" \
                --backends "$run" --tag "$tag" --out "$out/results" \
                2>&1 | grep -E "^\| [0-9]|skip|[Ee]rror"
        done
    done
fi
