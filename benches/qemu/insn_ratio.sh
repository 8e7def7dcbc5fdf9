#!/bin/sh
# Instructions per workload, the portable fast path ("baseline") against the NEON table, on
# aarch64 under qemu-user with the instruction-counting plugin insn_count.c. A proxy for
# speed where no ARM hardware is at hand: it counts work, not cycles (no cache misses, no
# latencies, no dual issue). Never read qemu's wall time as performance.
#
#   benches/qemu/insn_ratio.sh [reps]       (default 2; needs gcc, qemu-aarch64 with plugin
#                                            support, the aarch64 Rust target and linker)
set -eu
cd "$(dirname "$0")/../.."
reps=${1:-2}
target=${CARGO_TARGET_DIR:-target}
mkdir -p "$target"
plugin=$target/insn_count.so
gcc -shared -fPIC -O2 -o "$plugin" benches/qemu/insn_count.c
bin=$(cargo bench --no-run --bench kernel_insns --target aarch64-unknown-linux-gnu --no-default-features --features std \
    --message-format=json 2>/dev/null | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)
out=$(mktemp)
trap 'rm -f "$out"' EXIT

# Instructions of one run: count <table> <workload> <reps>
count() {
    qemu-aarch64 -L /usr/aarch64-linux-gnu -plugin "$plugin,out=$out" "$bin" "$1" "$2" "$3" >/dev/null
    cat "$out"
}

printf '%-14s %16s %16s %8s\n' workload baseline "aarch64 neon" ratio
for w in $(qemu-aarch64 -L /usr/aarch64-linux-gnu "$bin" list); do
    set --
    for t in baseline "aarch64 neon"; do
        n0=$(count "$t" "$w" 0)
        n=$(count "$t" "$w" "$reps")
        set -- "$@" $(((n - n0) / reps))
    done
    printf '%-14s %16d %16d %8s\n' "$w" "$1" "$2" "$(awk "BEGIN { printf \"%.2f\", $1 / $2 }")"
done
