#!/usr/bin/env bash
# Builds the firmware, runs it under QEMU (mps2-an386, Cortex-M4F), and checks that its
# predictions equal `edgecl predict` on the host for the same inputs and tasks:
#   - the predicted class (index and name) exactly, for every image and task;
#   - the top-class probability within 1e-6 (the logits are computed by the same portable
#     kernels in the same order on both sides, so they are the same floats; only `exp` may
#     differ in the last bit: the libm crate on the device, the C library on the host).
# Then prints flash and RAM use and fails over 1 MiB of flash or 256 KiB of RAM (statics plus
# the stack's measured peak). Needs qemu-system-arm and a size tool: arm-none-eabi-size
# (Debian's binutils-arm-none-eabi) or llvm-size.
#
# EDGECL=path/to/edgecl uses that host binary (any build with the `cli` feature, e.g. the
# target/debug/edgecl that `cargo test` leaves) instead of building one without tract.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
target="${CARGO_TARGET_DIR:-$root/target}"
data="$here/data"
FLASH_MAX=$((1024 * 1024))
RAM_MAX=$((256 * 1024))
TOLERANCE=1e-6

edgecl="${EDGECL:-}"
if [[ -z "$edgecl" ]]; then
    echo "== building the host edgecl (no tract)"
    (cd "$root" && cargo build --release --no-default-features --features cli --quiet)
    edgecl="$target/release/edgecl"
fi
echo "== building the firmware"
(cd "$here" && cargo build --release --quiet --target-dir "$target/firmware")
elf="$target/firmware/thumbv7em-none-eabihf/release/edgecl-firmware"

echo "== running the firmware under qemu-system-arm -M mps2-an386"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
start=$(date +%s.%N)
if ! timeout 120 qemu-system-arm -M mps2-an386 -nographic -semihosting-config enable=on,target=native \
    -kernel "$elf" > "$out/device.txt" 2>&1; then
    cat "$out/device.txt"
    echo "FAIL: the firmware did not exit successfully" >&2
    exit 1
fi
awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "ran in %.1f s\n", b - a }'
cat "$out/device.txt"

echo "== the same predictions on the host"
files=()
while read -r f; do
    [[ -z "$f" || "$f" == \#* ]] && continue
    files+=(--task-file "$data/$f")
done < "$data/tasks.txt"
while read -r f; do
    [[ -z "$f" || "$f" == \#* ]] && continue
    # gen.sh names every task file after its task.
    "$edgecl" predict --backbone "$data/backbone.ecb" "${files[@]}" --task "${f%.ect}" --json "$data/inputs.npy"
done < "$data/tasks.txt" > "$out/host.json"
# {"input":"…/inputs.npy#I","label":"TEXT","label_index":L,"score":P,"task":"NAME",…}
sed -E 's/.*"input":"[^"]*#([0-9]+)".*"label":"([^"]*)".*"label_index":([0-9]+).*"score":([^,}]+).*"task":"([^"]*)".*/predict image=\1 task=\5 label_index=\3 score=\4 label=\2/' \
    "$out/host.json" > "$out/host.txt"
grep '^predict ' "$out/device.txt" > "$out/device-predictions.txt" || true

# Join on (image, task): every host prediction must have its device twin and vice versa.
awk -v tol="$TOLERANCE" '
    function field(line, key,    m) { return match(line, key "=[^ ]*") ? substr(line, RSTART + length(key) + 1, RLENGTH - length(key) - 1) : "" }
    function label(line) { return substr(line, index(line, " label=") + 7) }
    FNR == NR { k = field($0, "image") " " field($0, "task"); host[k] = $0; n++; next }
    {
        k = field($0, "image") " " field($0, "task")
        if (!(k in host)) { print "device only: " $0; bad++; next }
        h = host[k]; delete host[k]; m++
        d = field($0, "score") - field(h, "score"); if (d < 0) d = -d
        if (field($0, "score") == field(h, "score") "") same++
        if (d > worst) worst = d
        if (field($0, "label_index") != field(h, "label_index") || label($0) != label(h) || d > tol) {
            print "MISMATCH\n  device: " $0 "\n  host:   " h; bad++
        }
    }
    END {
        for (k in host) { print "host only: " host[k]; bad++ }
        printf "%d host predictions, %d device predictions compared: %d mismatches; %d scores print the same digits, largest difference %.3g (tolerance %s)\n", n, m, bad, same, worst, tol
        exit (bad > 0 || n == 0)
    }' "$out/host.txt" "$out/device-predictions.txt"

echo "== flash and RAM"
size_tool="$(command -v arm-none-eabi-size || command -v llvm-size)" || { echo "FAIL: no arm-none-eabi-size or llvm-size" >&2; exit 1; }
"$size_tool" -A "$elf" | grep -E '^(section|\.vector_table|\.text|\.rodata|\.data|\.bss|\.uninit) '
sect() { "$size_tool" -A "$elf" | awk -v s="$1" '$1 == s { print $2 }' | head -1; }
n() { local v; v="$(sect "$1")"; echo "${v:-0}"; }
flash=$(( $(n .vector_table) + $(n .text) + $(n .rodata) + $(n .data) ))
static_ram=$(( $(n .data) + $(n .bss) + $(n .uninit) ))
stack=$(sed -nE 's/.*stack peak ([0-9]+) bytes.*/\1/p' "$out/device.txt")
ram=$(( static_ram + ${stack:?the firmware did not report its stack} ))
inputs=$(stat -c %s "$data/inputs.npy")
assets=$(( $(stat -c %s "$data/backbone.ecb") + inputs ))
while read -r f; do [[ -z "$f" || "$f" == \#* ]] || assets=$(( assets + $(stat -c %s "$data/$f") )); done < "$data/tasks.txt"
kib() { awk -v v="$1" 'BEGIN { printf "%.1f", v / 1024 }'; }
echo "flash: $flash bytes ($(kib "$flash") KiB of $((FLASH_MAX / 1024)) KiB; backbone, tasks and images: $assets bytes)"
echo "RAM:   $ram bytes ($(kib "$ram") KiB of $((RAM_MAX / 1024)) KiB): static $static_ram (.data + .bss), stack peak $stack"
if (( flash > FLASH_MAX || ram > RAM_MAX )); then
    echo "FAIL: over budget" >&2
    exit 1
fi
echo "firmware check passed"
