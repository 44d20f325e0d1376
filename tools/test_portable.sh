#!/usr/bin/env bash
# Run `make test` (or the make target given) as other processors would, on this one machine:
# under each instruction-set limit and each thread count, one after the other, then a summary.
#
#   tools/test_portable.sh                  # make test under the 6 settings (6 x make test)
#   tools/test_portable.sh notebooks        # only the notebooks (the checked outputs)
#   ISAS="default avx2" THREADS=1 tools/test_portable.sh notebooks
#
# An instruction-set limit caps the kernels of the three libraries that compute torch's floats:
# ATen's own vectorised code (ATEN_CPU_CAPABILITY), MKL's matrix products (MKL_ENABLE_INSTRUCTIONS)
# and oneDNN's convolutions (ONEDNN_MAX_CPU_ISA). "default" is torch's build without vector
# extensions (SSE4.2 for MKL, SSE4.1 for oneDNN); a limit above what the processor has runs what it
# has. The thread count is set for torch (OMP_NUM_THREADS, MKL_NUM_THREADS) and for the notebooks'
# cells (FRCNN_THREADS). Exit status: 1 if any setting failed.
set -uo pipefail
target=${1:-test}
# make test runs its two parts side by side, one core each: with 2 threads they would share a core
goals=$([ "$target" = test ] && echo "unit notebooks" || echo "$target")
isas=${ISAS:-default avx2 avx512}
threads=${THREADS:-1 2}
cd "$(dirname "$0")/.."

limits() {
    case $1 in
        default) echo "ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41" ;;
        avx2) echo "ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2" ;;
        avx512) echo "ATEN_CPU_CAPABILITY=avx512 MKL_ENABLE_INSTRUCTIONS=AVX512 ONEDNN_MAX_CPU_ISA=AVX512_CORE" ;;
        *) echo "unknown instruction set '$1': use default, avx2 or avx512" >&2; exit 2 ;;
    esac
}

results=()
status=0
for isa in $isas; do
    settings=$(limits "$isa") || exit 2
    for n in $threads; do
        echo "=== make $target with $settings, $n thread(s)"
        start=$SECONDS
        if env $settings OMP_NUM_THREADS=$n MKL_NUM_THREADS=$n FRCNN_THREADS=$n make --no-print-directory $goals; then
            verdict=passed
        else
            verdict=FAILED
            status=1
        fi
        results+=("$verdict  $isa, $n thread(s)  ($((SECONDS - start)) s)")
    done
done
echo "=== make $target under each setting:"
printf '  %s\n' "${results[@]}"
exit $status
