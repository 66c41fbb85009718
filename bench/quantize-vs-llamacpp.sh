#!/usr/bin/env bash
# One-pass falcon-quantize against llama.cpp's two-step pipeline (convert_hf_to_gguf.py to f16,
# then llama-quantize) on a random-weight checkpoint with Falcon-7B's real shapes: wall time,
# peak RSS and peak extra disk, for Q4_0 and Q8_0, in one run.
#
# usage: bench/quantize-vs-llamacpp.sh LLAMA_CPP_DIR [WORK_DIR]
#   LLAMA_CPP_DIR: a complete llama.cpp checkout whose build/bin/llama-quantize is built
#                  (cmake -B build && cmake --build build --target llama-quantize); its converter
#                  needs python3 with torch, numpy, sentencepiece and safetensors.
#   WORK_DIR:      where the synthetic checkpoint and outputs go (default /tmp/falcon-bench);
#                  needs about 40 GB free.
# Page caches are dropped before each run when running as root, so every run reads cold.
set -euo pipefail
LLAMA=$(realpath "${1:?usage: $0 LLAMA_CPP_DIR [WORK_DIR]}")
WORK=${2:-/tmp/falcon-bench}
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin falcon-quantize
FQ=$PWD/target/release/falcon-quantize
mkdir -p "$WORK"
CK=$WORK/synth-falcon-7b
[ -f "$CK/config.json" ] || "$FQ" synth --shape falcon-7b -o "$CK"

# llama.cpp's converter crashes on the 7B config that current transformers writes
# (num_kv_heads = 71 while the checkpoint has 1 KV head): give it a copy that says 1.
LCK=$WORK/synth-falcon-7b-for-llama.cpp
mkdir -p "$LCK"
for f in "$CK"/*; do ln -sf "$f" "$LCK/"; done
rm -f "$LCK/config.json"
python3 - "$CK/config.json" "$LCK/config.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1])); c["num_kv_heads"] = 1; json.dump(c, open(sys.argv[2], "w"), indent=2)
PY

drop_caches() { sync; [ "$(id -u)" = 0 ] && echo 3 > /proc/sys/vm/drop_caches || true; }
used() { df --output=used -B1 "$WORK" | tail -1; }

# run NAME CMD...: prints "NAME wall_s maxrss_kB peak_extra_disk_bytes"
run() {
    local name=$1; shift
    drop_caches
    local base; base=$(used)
    local peak=$base
    ( while :; do u=$(used); [ "$u" -gt "$peak" ] && peak=$u && echo "$peak" > "$WORK/.peak"; sleep 0.5; done ) &
    local mon=$!
    echo "$base" > "$WORK/.peak"
    /usr/bin/time -f "%e %M" -o "$WORK/.time" "$@" > "$WORK/$name.log" 2>&1
    kill $mon; wait $mon 2>/dev/null || true
    read -r wall rss < "$WORK/.time"
    echo "$name $wall $rss $(( $(cat "$WORK/.peak") - base ))"
}

results=()
for ty in q4_0 q8_0; do
    TY=$(echo $ty | tr a-z A-Z)
    rm -f "$WORK"/*.gguf
    results+=("$(run "falcon-quantize-$ty" "$FQ" "$CK" -o "$WORK/ours-$ty.gguf" --type $ty --quiet)")
    rm -f "$WORK"/*.gguf
    results+=("$(run "llama.cpp-$ty" bash -c "PYTHONPATH='$LLAMA/gguf-py' python3 '$LLAMA/convert_hf_to_gguf.py' '$LCK' --outtype f16 --outfile '$WORK/f16.gguf' && '$LLAMA/build/bin/llama-quantize' '$WORK/f16.gguf' '$WORK/llama-$ty.gguf' $TY $(nproc) && rm '$WORK/f16.gguf'")")
done
rm -f "$WORK"/*.gguf

printf '\n%-22s %10s %14s %18s\n' run "wall (s)" "peak RSS (MB)" "peak extra disk (GB)"
for r in "${results[@]}"; do
    set -- $r
    awk -v n="$1" -v w="$2" -v r="$3" -v d="$4" 'BEGIN { printf "%-22s %10.1f %14.0f %18.2f\n", n, w, r / 1024, d / 1e9 }'
done
echo
for ty in q4_0 q8_0; do
    ours=$(printf '%s\n' "${results[@]}" | awk -v n="falcon-quantize-$ty" '$1==n {print $2}')
    theirs=$(printf '%s\n' "${results[@]}" | awk -v n="llama.cpp-$ty" '$1==n {print $2}')
    awk -v t="$ty" -v a="$ours" -v b="$theirs" 'BEGIN { printf "%s: falcon-quantize is %.2fx faster than llama.cpp convert + quantize\n", t, b / a }'
done
