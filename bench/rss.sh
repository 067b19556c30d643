#!/usr/bin/env bash
# bench/rss.sh PID OUTFILE [INTERVAL_S]
# Samples VmRSS and VmHWM (KiB) of PID every INTERVAL_S (default 0.1 s) until it exits,
# appending "unix_ms vmrss_kib vmhwm_kib" lines to OUTFILE. The last line therefore holds
# the peak (VmHWM) seen while the process lived. Run it in the background.
set -euo pipefail
pid=${1:?usage: rss.sh PID OUTFILE [INTERVAL_S]}
out=${2:?usage: rss.sh PID OUTFILE [INTERVAL_S]}
interval=${3:-0.1}
: >"$out"
while [[ -r /proc/$pid/status ]]; do
    rss=0 hwm=0
    while read -r key value _; do
        case $key in
            VmRSS:) rss=$value ;;
            VmHWM:) hwm=$value ;;
        esac
    done </proc/"$pid"/status 2>/dev/null || break
    [[ $hwm == 0 ]] && break # zombie / exited
    printf '%s %s %s\n' "$(date +%s%3N)" "$rss" "$hwm" >>"$out"
    sleep "$interval"
done
