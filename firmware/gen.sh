#!/usr/bin/env bash
# Regenerates the firmware's fixtures in firmware/data/ (committed; rerun after a change of
# the backbone or task format, or of training):
#   backbone.ecb   a random LeNet-300-100 SupSup backbone (`edgecl init --arch lenet`)
#   *.ect          tasks learned on the host on the embedded Fashion-MNIST subset:
#                  clothes (supsup, classes 0-4), shoes-bags (supsup, 5-9), all10 (linear head)
#   tasks.txt      the task files, in the order the firmware runs them
#   inputs.npy     the first test image of each class, as f32 network inputs [10, 1, 28, 28]
#   inputs.txt     which test images those are
# Files are byte-for-byte reproducible (SOURCE_DATE_EPOCH fixes the tasks' creation time).
# Needs the host edgecl without tract: cargo build --release --no-default-features --features cli,embedded-data
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
target="${CARGO_TARGET_DIR:-$root/target}"
data="$here/data"
export SOURCE_DATE_EPOCH=1700000000

(cd "$root" && cargo build --release --no-default-features --features cli,embedded-data --quiet)
edgecl="$target/release/edgecl"
# The helper runs on the host: name the host target, or firmware/.cargo/config.toml's would apply.
host="$(rustc -vV | sed -n 's/^host: //p')"
(cd "$here/gen" && cargo build --release --quiet --target "$host" --target-dir "$target/firmware-gen")
gen="$target/firmware-gen/$host/release/edgecl-firmware-gen"

mkdir -p "$data"
rm -f "$data"/*.ect
"$edgecl" init --arch lenet --outputs 10 --seed 1 -o "$data/backbone.ecb"
learn() { "$edgecl" learn --backbone "$data/backbone.ecb" --data embedded --no-scores "$@"; }
learn --task clothes --method supsup --classes 0,1,2,3,4 --density 0.1 --epochs 5 -o "$data/clothes.ect"
learn --task shoes-bags --method supsup --classes 5,6,7,8,9 --density 0.1 --epochs 5 -o "$data/shoes-bags.ect"
learn --task all10 --method linear --lr 0.01 --epochs 5 -o "$data/all10.ect"
printf '%s\n' clothes.ect shoes-bags.ect all10.ect > "$data/tasks.txt"
"$gen" "$data/backbone.ecb" 10 "$data/inputs.npy" > "$data/inputs.txt"
ls -l "$data"
