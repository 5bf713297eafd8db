# Shared by the bench-* scripts (sourced, not run).

# seconds CMD...: runs CMD and prints its wall time in seconds. Dirty data
# of earlier runs is flushed first, so no run pays for another's writes.
seconds() {
    local start end
    sync
    start=$(date +%s.%N)
    "$@"
    end=$(date +%s.%N)
    awk -v s="$start" -v e="$end" 'BEGIN { printf "%.3f", e - s }'
}

# report LABEL BASELINE TREEFLASH TARGET: one line with both times and the ratio.
report() {
    printf '%-26s how-to %7.2f s   treeflash %7.2f s   ratio %.2f (target <= %s)\n' \
        "$1" "$2" "$3" "$(awk -v h="$2" -v t="$3" 'BEGIN { print t / h }')" "$4"
}
