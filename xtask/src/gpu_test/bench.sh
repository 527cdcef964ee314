#!/usr/bin/env bash
# rvllm GPU benchmarks (the suite behind BENCHMARKS.md), gathered by `cargo xtask gpu-test`.
# Usage: ./bench.sh [latency] [latency-f16] [latency-nopdl] [latency-skip:PATTERNS]
#                   [latency-env:VAR=VALUE,...] [latency-bin:PATH] [ttft]
#                   [throughput] [throughput-1024] [throughput-default] [throughput-default-f16]
#                   [throughput-default-sync] [throughput-mixed] [throughput-default-bin:PATH]
#                   [latency-sync] [trace] [trace-env:VAR=VALUE,...] [serve] [serve-c1]
#                   [serve-structured] [throughput-structured]
#                   [peers] [hf] [profile] [profile-throughput]
#        (no argument: latency ttft throughput). Model: the Llama-3.1-8B shape with dummy weights.
# Env: RESULTS=<dir> for the logs and JSON (default ./results); PEERS=<dir> holding
# fast_peer.py / fast_peer_batch.py / hf_baseline.py (needed by `peers` and `hf`);
# SERVE_PROMPTS (default 1000) and SERVE_C1_PROMPTS (default 1000) size the serving runs;
# serve-c1-shardIofN runs part I of N of the concurrency-1 run (merge with bench serve-merge).
# SERVE_STRUCTURED_PROMPTS (default 256) sizes serve-structured and throughput-structured,
# which run on a copy of the model folder given a synthetic tokenizer (make_bench_tokenizer.py):
# structured output needs one whose vocabulary matches the model's.
# Every rvllm run measures the copy bandwidth and the bf16 GEMM rate in the same process and
# prints its figure as a fraction of them.
set -uo pipefail
cd "$(dirname "$0")"
RES="${RESULTS:-./results}"
mkdir -p "$RES"
MODEL=./configs/llama-3.1-8b
RVLLM=./bin/rvllm
failed=0
# The batch-1 decode benchmark of the issue (its variants add settings); the trace target
# runs the same workload once.
LATENCY_WORKLOAD=("$RVLLM" bench latency --model "$MODEL" --load-format dummy --batch-size 1
    --input-len 128 --output-len 256 --max-model-len 2048 --max-num-seqs 8)
LATENCY=("${LATENCY_WORKLOAD[@]}" --num-iters-warmup 1 --num-iters 3)

run() { # name command...: runs it, keeps the log, prints its last lines
    local name=$1
    shift
    echo "=== $name: $*"
    local t0=$SECONDS
    "$@" >"$RES/$name.log" 2>&1
    local rc=$?
    grep -v '^\s*$' "$RES/$name.log" | grep -iv 'warn' | tail -n 14
    echo "--- $name: exit $rc, $((SECONDS - t0)) s"
    [ $rc -eq 0 ] || failed=$((failed + 1))
}

wait_healthy() { # port pid: until the server on port answers /health, it exits, or 300 s pass
    local port=$1 pid=$2
    for _ in $(seq 1 300); do
        curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
        kill -0 "$pid" 2>/dev/null || break
        sleep 1
    done
}

serve_bench() { # name concurrency prompts [shard I/N]
    local name=$1 conc=$2 prompts=$3 shard=${4:-} port=8123
    "$RVLLM" serve "$MODEL" --load-format dummy --port $port --max-model-len 2048 \
        --max-num-seqs 256 --max-num-batched-tokens 16384 >"$RES/$name-server.log" 2>&1 &
    local pid=$!
    wait_healthy $port $pid
    local extra=()
    [ "$conc" != inf ] && extra=(--max-concurrency "$conc")
    [ -n "$shard" ] && extra+=(--shard "$shard")
    run "$name" "$RVLLM" bench serve --base-url "http://127.0.0.1:$port" --dataset-name random \
        --random-prompt-format ids --random-vocab-size 100000 --random-input-len 1024 \
        --random-output-len 128 --ignore-eos --seed 0 --num-prompts "$prompts" "${extra[@]}" \
        --save-result --result-filename "$RES/$name.json"
    curl -s "http://127.0.0.1:$port/metrics" | grep -E '^rvllm:(kv_cache|num_requests|request_success)' >"$RES/$name-metrics.txt"
    kill -TERM $pid
    wait $pid
}

tokenized_model() { # prints the folder: the model's config with a synthetic tokenizer
    local dir=./configs/$(basename "$MODEL")-synthetic-tokenizer
    python3 ./make_bench_tokenizer.py "$MODEL" "$dir" >&2 && echo "$dir"
}

# Issue 21's benchmark: bench serve at concurrency 64, every request unconstrained, then
# every request constrained by a JSON schema (the built-in one: an unbounded string, so
# with --ignore-eos each request still generates all its tokens), the same prompts; prints
# the two mean TPOTs, their ratio (the issue asks <= 1.10), the server's graph capture, and
# each run's step counts from /metrics (scraped after the warm-up and after each run:
# decode-graph replays, eager steps, steps with grammar masks). This suite runs on CUDA, so a
# constrained run that replayed no decode graph fails the target ("CUDA graphs still used").
# The prefix cache is off: the second run would otherwise find the first one's prompts cached.
serve_structured() {
    local name=serve-structured port=8124 model
    model=$(tokenized_model) || { echo "=== $name: making the tokenizer failed"; failed=$((failed + 1)); return; }
    "$RVLLM" serve "$model" --load-format dummy --port $port --max-model-len 2048 \
        --max-num-seqs 256 --max-num-batched-tokens 16384 --no-enable-prefix-caching \
        >"$RES/$name-server.log" 2>&1 &
    local pid=$!
    wait_healthy $port $pid
    local prompts=${SERVE_STRUCTURED_PROMPTS:-256}
    local bench=("$RVLLM" bench serve --base-url "http://127.0.0.1:$port" --dataset-name random
        --random-prompt-format ids --random-vocab-size 100000 --random-input-len 256
        --ignore-eos --max-concurrency 64 --save-result)
    # The runner's step counters (rvllm:*_steps_total), one "series value" a line.
    local steps=(curl -sf "http://127.0.0.1:$port/metrics")
    local step_series='^rvllm:(cuda_graph_decode|eager|grammar_mask)_steps_total'
    # Warms the graphs and builds the grammar engine's vocabulary (once per server) first.
    run "$name-warmup" "${bench[@]}" --seed 1 --num-prompts 64 --random-output-len 16 \
        --structured-output-ratio 1 --result-filename "$RES/$name-warmup.json"
    "${steps[@]}" | grep -E "$step_series" >"$RES/$name-steps-warmup.txt"
    for ratio in 0 1; do
        run "$name-ratio$ratio" "${bench[@]}" --seed 0 --num-prompts "$prompts" \
            --random-output-len 256 --structured-output-ratio $ratio \
            --result-filename "$RES/$name-ratio$ratio.json"
        "${steps[@]}" | grep -E "$step_series" >"$RES/$name-steps-ratio$ratio.txt"
    done
    kill -TERM $pid
    wait $pid
    echo "=== $name: result"
    python3 - "$RES/$name-ratio0.json" "$RES/$name-ratio1.json" "$RES/$name-steps-warmup.txt" \
        "$RES/$name-steps-ratio0.txt" "$RES/$name-steps-ratio1.txt" <<'PY' | tee "$RES/$name-summary.txt"
import json, sys
off, on = (json.load(open(p)) for p in sys.argv[1:3])

def counters(path):  # {"eager_steps_total": 12.0, ...} from "rvllm:NAME{labels} VALUE" lines
    out = {}
    for line in open(path):
        series, value = line.rsplit(" ", 1)
        out[series.split("{")[0].removeprefix("rvllm:")] = float(value)
    return out

warm, after0, after1 = (counters(p) for p in sys.argv[3:6])
names = ("cuda_graph_decode_steps_total", "eager_steps_total", "grammar_mask_steps_total")
missing = [n for n in names if not all(n in c for c in (warm, after0, after1))]

def steps(before, after):
    if missing:
        return "steps: not on /metrics (" + ", ".join(missing) + ")"
    g, e, m = (int(after[n] - before[n]) for n in names)
    return f"steps: {g} decode-graph replays, {e} eager, {m} with grammar masks"

a, b = off["mean_tpot_ms"], on["mean_tpot_ms"]
print(f"Mean TPOT unconstrained (ratio 0): {a:.3f} ms ({off['completed']} requests)")
print(f"  {steps(warm, after0)}")
print(f"Mean TPOT constrained (ratio 1):   {b:.3f} ms ({on['completed']} requests, "
      f"{on.get('structured_output_requests', 0)} constrained, "
      f"{on.get('structured_output_valid', 0)} valid, {on.get('structured_output_truncated', 0)} "
      f"cut off by max_tokens)")
print(f"  {steps(after0, after1)}")
ratio = b / a if a > 0 else float("inf")
print(f"FINAL TPOT ratio constrained/unconstrained: {ratio:.3f} "
      f"({'within' if ratio <= 1.10 else 'ABOVE'} issue 21's 1.10)")
graphs = 0 if missing else after1[names[0]] - after0[names[0]]
print(f"FINAL constrained run on CUDA graphs: {'yes' if graphs > 0 else 'NO'} "
      f"({int(graphs)} decode-graph replays)")
sys.exit(0 if graphs > 0 else 1)
PY
    [ "${PIPESTATUS[0]}" -eq 0 ] || failed=$((failed + 1))
    if grep -q "captured [1-9][0-9]* decode graphs" "$RES/$name-server.log"; then
        echo "CUDA graphs: $(grep -o 'captured [0-9]* decode graphs[^)]*' "$RES/$name-server.log" | head -1)"
    else
        echo "CUDA graphs: NONE captured (see $RES/$name-server.log)"
        failed=$((failed + 1))
    fi
}

peer() { # name script [env...]
    local name=$1 script=$2
    shift 2
    if [ -z "${PEERS:-}" ] || [ ! -f "$PEERS/$script" ]; then
        echo "=== $name: skipped (PEERS=<dir with $script> not set)"
        return
    fi
    run "$name" env PYTHONUNBUFFERED=1 OUT="$RES" "$@" python3 "$PEERS/$script"
}

[ $# -eq 0 ] && set -- latency ttft throughput
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader || true
for what in "$@"; do
    case "$what" in
    latency)
        run latency "${LATENCY[@]}" --output-json "$RES/latency.json" ;;
    latency-f16)
        # The same in float16 (the f16 build of every kernel, f16 cuBLAS GEMMs).
        run latency-f16 "${LATENCY[@]}" --dtype float16 --output-json "$RES/latency-f16.json" ;;
    latency-nopdl) run latency-nopdl env RVLLM_PDL=0 "${LATENCY[@]}" ;;
    latency-sync) run latency-sync "${LATENCY[@]}" --no-async-scheduling ;;
    latency-skip:*)
        # What the kernels matching PATTERNS (comma-separated) cost inside the decode graphs:
        # the same run with them not launched (RVLLM_SKIP_KERNELS; its tokens are wrong).
        pats=${what#latency-skip:}
        run "latency-skip-${pats//,/_}" env RVLLM_SKIP_KERNELS="$pats" "${LATENCY[@]}" ;;
    latency-bin:*)
        # The latency run with another rvllm binary copied into the folder (e.g. an older
        # build's, for a same-machine A/B: latency latency-bin:./bin/rvllm-old latency).
        bin=${what#latency-bin:}
        run "latency-bin-$(basename "$bin")" "$bin" "${LATENCY[@]:1}" ;;
    latency-env:*)
        # The latency run with diagnostic settings, e.g. latency-env:RVLLM_DECODE_COMPACT=0
        # (comma-separated VAR=VALUE pairs; the log is named after them).
        IFS=, read -r -a vars <<<"${what#latency-env:}"
        run "latency-env-$(IFS=_; echo "${vars[*]}")" env "${vars[@]}" "${LATENCY[@]}" ;;
    trace|trace-env:*)
        # The block timeline of batch-1 decode inside the graphs (RVLLM_TRACE_BLOCKS, see
        # engine/src/backend/cuda/block_trace.rs): the last ~12 tokens' kernels, block by block.
        # Needs a folder built with RVLLM_KERNEL_TRACE=1 (the default kernels carry no probes).
        vars=()
        [ "$what" != trace ] && IFS=, read -r -a vars <<<"${what#trace-env:}"
        name="$what"; name=${name//[:=,]/_}
        run "$name" env "${vars[@]}" RVLLM_TRACE_BLOCKS="$RES/$name.bin" "${LATENCY_WORKLOAD[@]}" \
            --num-iters-warmup 0 --num-iters 1
        gzip -f "$RES/$name.bin"
        python3 ./trace_report.py "$RES/$name.bin.gz" 9 | tee "$RES/$name-report.txt" ;;
    ttft)
        # Every iteration sends the same prompt: without the prefix cache each one prefills it
        # whole (the issue's "no prefix-cache hit"; with it, later iterations reuse its blocks).
        run ttft "$RVLLM" bench latency --model "$MODEL" --load-format dummy --batch-size 1 \
            --input-len 2048 --output-len 2 --num-iters-warmup 1 --num-iters 5 \
            --max-model-len 4096 --enforce-eager --no-enable-prefix-caching \
            --output-json "$RES/ttft.json" ;;
    throughput-1024)
        # vLLM's offline defaults on GPUs of 70 GiB and more (not A100): 1024 sequences.
        run throughput-1024 "$RVLLM" bench throughput --model "$MODEL" --load-format dummy \
            --input-len 256 --output-len 256 --num-prompts 1000 --max-model-len 1024 \
            --max-num-seqs 1024 --max-num-batched-tokens 16384 \
            --output-json "$RES/throughput-1024.json" ;;
    throughput-default)
        # The issue's command as a user types it: every other setting at its default
        # (--max-model-len from config.json: 131,072 tokens; vLLM's batch limits).
        run throughput-default "$RVLLM" bench throughput --model "$MODEL" --load-format dummy \
            --input-len 256 --output-len 256 --num-prompts 1000 \
            --output-json "$RES/throughput-default.json" ;;
    throughput-mixed)
        # The same with 10 % of the requests asking logprobs=5 and 10 % a repetition penalty
        # of 1.1: those rows are sampled on the device beside the others (issue 17).
        run throughput-mixed "$RVLLM" bench throughput --model "$MODEL" --load-format dummy \
            --input-len 256 --output-len 256 --num-prompts 1000 \
            --logprobs-fraction 0.1 --penalty-fraction 0.1 \
            --output-json "$RES/throughput-mixed.json" ;;
    throughput-default-bin:*)
        # throughput-default with another rvllm binary copied into the folder (an older
        # build's, for a same-machine A/B).
        bin=${what#throughput-default-bin:}
        run "throughput-default-bin-$(basename "$bin")" "$bin" bench throughput --model "$MODEL" \
            --load-format dummy --input-len 256 --output-len 256 --num-prompts 1000 ;;
    throughput-default-f16)
        run throughput-default-f16 "$RVLLM" bench throughput --model "$MODEL" --load-format dummy \
            --input-len 256 --output-len 256 --num-prompts 1000 --dtype float16 \
            --output-json "$RES/throughput-default-f16.json" ;;
    throughput-default-sync)
        # The same with each step scheduled only after the last one's output (no overlap).
        run throughput-default-sync "$RVLLM" bench throughput --model "$MODEL" --load-format dummy \
            --input-len 256 --output-len 256 --num-prompts 1000 --no-async-scheduling \
            --output-json "$RES/throughput-default-sync.json" ;;
    throughput)
        run throughput "$RVLLM" bench throughput --model "$MODEL" --load-format dummy \
            --input-len 256 --output-len 256 --num-prompts 1000 --max-model-len 1024 \
            --max-num-seqs 512 --max-num-batched-tokens 16384 --output-json "$RES/throughput.json" ;;
    profile)
        # Per-kernel GPU times (RVLLM_PROFILE_KERNELS): eager, so decode kernels are seen too.
        run profile env RVLLM_PROFILE_KERNELS=1 "$RVLLM" bench latency --model "$MODEL" \
            --load-format dummy --batch-size 1 --input-len 128 --output-len 64 \
            --num-iters-warmup 0 --num-iters 1 --max-model-len 2048 --enforce-eager ;;
    profile-throughput)
        run profile-throughput env RVLLM_PROFILE_KERNELS=1 "$RVLLM" bench throughput \
            --model "$MODEL" --load-format dummy --input-len 256 --output-len 256 \
            --num-prompts 1000 --max-model-len 1024 --max-num-seqs 512 \
            --max-num-batched-tokens 16384 --enforce-eager ;;
    serve) serve_bench serve inf "${SERVE_PROMPTS:-1000}" ;;
    serve-structured) serve_structured ;;
    throughput-structured)
        # The offline engine at 64 sequences, unconstrained then every request constrained:
        # its step profile ("Engine steps") counts decode-graph replays and grammar-mask steps.
        if model=$(tokenized_model); then
            for ratio in 0 1; do
                run "throughput-structured-ratio$ratio" "$RVLLM" bench throughput --model "$model" \
                    --load-format dummy --input-len 256 --output-len 256 \
                    --num-prompts "${SERVE_STRUCTURED_PROMPTS:-256}" --max-model-len 1024 \
                    --max-num-seqs 64 --structured-output-ratio $ratio \
                    --output-json "$RES/throughput-structured-ratio$ratio.json"
                grep -h -A3 "^Engine steps: [0-9]* device steps" "$RES/throughput-structured-ratio$ratio.log"
            done
        else
            echo "=== throughput-structured: making the tokenizer failed"; failed=$((failed + 1))
        fi ;;
    serve-c1) serve_bench serve-c1 1 "${SERVE_C1_PROMPTS:-1000}" ;;
    serve-c1-shard*)
        # One part of the concurrency-1 run (1,000 requests outlast a 10-minute command):
        # serve-c1-shard0of2, then serve-c1-shard1of2; `rvllm bench serve-merge` joins them.
        spec=${what#serve-c1-shard}
        serve_bench "$what" 1 "${SERVE_C1_PROMPTS:-1000}" "${spec%of*}/${spec#*of}" ;;
    peers)
        peer fast_peer fast_peer.py
        peer fast_peer_batch fast_peer_batch.py B=512 ;;
    hf) peer hf_baseline hf_baseline.py ;;
    *) echo "unknown benchmark \`$what\`"; failed=$((failed + 1)) ;;
    esac
done
echo
echo "=== summary"
grep -h -E "^(Decode|Avg time to first|Throughput|Device ceilings|Request throughput|Output token|Total token|Mean TTFT|Mean TPOT|FINAL)" "$RES"/*.log 2>/dev/null || true
[ $failed -eq 0 ] || { echo "$failed benchmark(s) failed"; exit 1; }
