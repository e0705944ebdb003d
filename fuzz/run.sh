#!/usr/bin/env bash
# Runs each fuzz target for SECONDS (default 60), one after another, and
# exits non-zero when any of them crashed (or failed to build).
#
#   fuzz/run.sh            # 60 s each
#   fuzz/run.sh 600        # 10 minutes each
#   TARGETS="keys sizes" fuzz/run.sh 30
#   SANITIZER=none fuzz/run.sh   # without AddressSanitizer (faster; for
#                                # toolchains where it does not link)
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`). cargo-fuzz passes nightly
# flags to rustc; RUSTC_BOOTSTRAP=1 lets a stable toolchain accept them.
# The corpus grows in fuzz/corpus/TARGET (not committed) from the seeds in
# fuzz/seeds/TARGET; a crash leaves its input in fuzz/artifacts/TARGET/,
# and `cargo fuzz run TARGET fuzz/artifacts/TARGET/crash-...` replays it.
set -uo pipefail
cd "$(dirname "$0")"

seconds="${1:-60}"
targets="${TARGETS:-fast_path cache_control keys sizes config_file}"
sanitizer="${SANITIZER:-address}"
export RUSTC_BOOTSTRAP=1

if ! command -v cargo-fuzz >/dev/null; then
    echo "run.sh: cargo-fuzz is not installed: cargo install cargo-fuzz" >&2
    exit 2
fi
if ! cargo fuzz build -s "$sanitizer"; then
    echo "run.sh: the fuzz targets do not build" >&2
    exit 2
fi

failed=()
for target in $targets; do
    mkdir -p "corpus/$target"
    dict=()
    if [ -f "dict/$target.dict" ]; then dict=("-dict=dict/$target.dict"); fi
    echo "== $target: ${seconds}s"
    if ! cargo fuzz run -s "$sanitizer" "$target" "corpus/$target" "seeds/$target" -- \
        -max_total_time="$seconds" -timeout=30 -print_final_stats=1 "${dict[@]}"; then
        failed+=("$target")
    fi
done

if ((${#failed[@]})); then
    echo "run.sh: crashed: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
echo "run.sh: ${seconds}s each, no crash: $targets"
