#!/usr/bin/env bash
# Sourced by run.sh, which defines most of the variables used here and uses those set here:
# shellcheck disable=SC2034,SC2154
# The tus workloads of bench/run.sh: upgate's tus endpoint against rustus and @tus/server.
# See bench/README.md ("tus").
#
#   bench/tus.sh [--quick] [--skip-build] [--keep-logs]    (the same as: bench/run.sh --tus ...)
#
# Run directly, it runs `bench/run.sh --tus`; bench/run.sh sources it for its functions (the
# fresh filesystem, idle wait, CPU and RSS accounting, integrity checks live in run.sh).
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    exec bash "$(dirname "${BASH_SOURCE[0]}")/run.sh" --tus "$@"
fi
# Everything below is sourced by run.sh, which defines REPO, BENCH_DIR, WORK, DATA, SRC, WARM,
# the ports and the helpers used here (log, die, problem, apt_install, ...).

RUSTUS_VERSION=${BENCH_RUSTUS_VERSION:-0.5.10} # the newest rustus on crates.io
BENCH_TOOLS="$REPO/target/bench-tools"          # git-ignored, like the rest of target/
RUSTUS_BIN="$BENCH_TOOLS/bin/rustus"
TUSNODE_DIR="$BENCH_DIR/tus-node"
TUSNODE_WORKERS=${BENCH_TUSNODE_WORKERS:-2}
RUSTUS_WORKERS=${BENCH_RUSTUS_WORKERS:-2}
RUSTUS_PID=""
TUSNODE_PID=""
# Display names of the tus servers (the short names are keys of the result arrays).
declare -A TUS_NAME=([upgate]=upgate [rustus]=rustus [tusnode]=@tus/server)

# ---------------------------------------------------------------------------------------------
# Installing the other two servers
# ---------------------------------------------------------------------------------------------
# rustus from crates.io into target/bench-tools (its build directory there too, so a second
# install after a failure does not start from scratch). One job: the machine is shared.
ensure_rustus() {
    if [[ -x $RUSTUS_BIN ]] && "$RUSTUS_BIN" --version 2>/dev/null | grep -qF "$RUSTUS_VERSION"; then
        return 0
    fi
    command -v cargo >/dev/null 2>&1 || die "rustus is not installed ($RUSTUS_BIN) and there is no cargo to install it"
    log "installing rustus $RUSTUS_VERSION from crates.io into ${BENCH_TOOLS#"$REPO"/} (release build, one job: several minutes)"
    CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-1} cargo install rustus --version "$RUSTUS_VERSION" --locked \
        --root "$BENCH_TOOLS" --target-dir "$BENCH_TOOLS/build" ||
        die "cargo install rustus $RUSTUS_VERSION failed"
    [[ -x $RUSTUS_BIN ]] || die "cargo install rustus did not leave $RUSTUS_BIN"
}

# @tus/server 2.x needs Node.js >= 20.19 (its package.json "engines").
node_recent() {
    command -v node >/dev/null 2>&1 &&
        node -e 'const [a, b] = process.versions.node.split(".").map(Number); process.exit(a > 20 || (a == 20 && b >= 19) ? 0 : 1)'
}
ensure_node() {
    if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
        apt_install nodejs npm
    fi
    node_recent || die "@tus/server 2.x needs Node.js >= 20.19, this is $(node --version 2>/dev/null || echo 'no node') (Debian 12's nodejs is 18: install a newer one, e.g. from NodeSource)"
}
# bench/tus-node/node_modules from the committed package-lock.json.
ensure_tusnode() {
    ensure_node
    [[ -d $TUSNODE_DIR/node_modules/@tus/server && -d $TUSNODE_DIR/node_modules/@tus/file-store ]] && return 0
    log "npm ci in ${TUSNODE_DIR#"$REPO"/} (@tus/server, @tus/file-store)"
    (cd "$TUSNODE_DIR" && npm ci --no-audit --no-fund --loglevel=error) || die "npm ci in $TUSNODE_DIR failed"
}
ensure_tus_servers() {
    ensure_rustus
    ensure_tusnode
}

# ---------------------------------------------------------------------------------------------
# Servers (upgate's start is run.sh's start_upgate: the same config as the nginx comparison)
# ---------------------------------------------------------------------------------------------
tus_port() {
    case $1 in
        upgate) echo "$UPGATE_PORT" ;;
        rustus) echo "$RUSTUS_PORT" ;;
        tusnode) echo "$TUSNODE_PORT" ;;
    esac
}
tus_endpoint() { echo "http://127.0.0.1:$(tus_port "$1")/files/"; }

# Wait (up to 30 s) until the server answers OPTIONS /files/; fails if it exits first.
wait_http() { # $1 = server, $2 = pid, $3 = its log file
    local i
    for ((i = 0; i < 300; i++)); do
        [[ $(curl -s -o /dev/null -w '%{http_code}' -X OPTIONS "$(tus_endpoint "$1")" 2>/dev/null) != 000 ]] && return 0
        if ! kill -0 "$2" 2>/dev/null; then
            tail -20 "$3" >&2
            return 1
        fi
        sleep 0.1
    done
    warn "$1 did not answer within 30 s"
    return 1
}

# rustus: file storage and file info storage (an <id>.info JSON per upload) on the scratch
# filesystem, in separate directories so the bytes can be counted. Its default extensions and
# hooks (no notifier is configured, so the hooks go nowhere). rustus reads a request's whole
# body into memory before it handles it, up to --max-body-size (256 KiB by default): the single
# PATCH of the big file needs a limit that large.
start_rustus() { # $1 = file for its output
    local log_file=$1
    mkdir -p "$DATA/rustus/data" "$DATA/rustus/info"
    "$RUSTUS_BIN" --host 127.0.0.1 --port "$RUSTUS_PORT" --workers "$RUSTUS_WORKERS" \
        --storage file-storage --data-dir "$DATA/rustus/data" \
        --info-storage file-info-storage --info-dir "$DATA/rustus/info" \
        --max-body-size "$((SRC_BYTES + 1048576))" \
        --tus-extensions getting,creation,termination,creation-with-upload,creation-defer-length,concatenation,checksum \
        >"$log_file" 2>&1 &
    RUSTUS_PID=$!
    wait_http rustus "$RUSTUS_PID" "$log_file" || {
        RUSTUS_PID=""
        die "rustus did not start"
    }
    "$BENCH_DIR/rss.sh" "$RUSTUS_PID" "$WORK/rss-rustus.txt" &
    SAMPLER_PIDS+=($!)
}

# @tus/server with @tus/file-store (bench/tus-node/server.js): BENCH_TUSNODE_WORKERS processes
# (node:cluster), 2 by default, one per core like the other servers' workers.
start_tusnode() { # $1 = file for its stderr
    local errlog=$1 w
    mkdir -p "$DATA/tus-node"
    : >"$WORK/tusnode.out"
    node "$TUSNODE_DIR/server.js" "$TUSNODE_PORT" "$DATA/tus-node" "$TUSNODE_WORKERS" \
        >"$WORK/tusnode.out" 2>"$errlog" &
    TUSNODE_PID=$!
    local i
    for ((i = 0; i < 300; i++)); do
        grep -q 'tus-node: listening on' "$WORK/tusnode.out" && break
        if ! kill -0 "$TUSNODE_PID" 2>/dev/null; then
            cat "$WORK/tusnode.out" >&2
            [[ $errlog != /dev/null ]] && tail -20 "$errlog" >&2
            TUSNODE_PID=""
            die "@tus/server (node) exited during startup"
        fi
        sleep 0.1
    done
    ((i < 300)) || die "@tus/server did not print 'listening on' within 30 s"
    for w in $(tusnode_workers); do
        "$BENCH_DIR/rss.sh" "$w" "$WORK/rss-tusnode-$w.txt" &
        SAMPLER_PIDS+=($!)
    done
}
# The processes that serve: the cluster's workers, or the one process without a cluster.
tusnode_workers() {
    [[ -n $TUSNODE_PID ]] || return 0
    local children
    children=$(pgrep -P "$TUSNODE_PID" 2>/dev/null || true)
    if [[ -n $children ]]; then echo "$children"; else echo "$TUSNODE_PID"; fi
}

# SIGTERM and wait (up to 40 s: both finish the requests in flight), then SIGKILL.
stop_pid() { # $1 = pid, $2 = name
    local pid=$1 i
    [[ -n $pid ]] || return 0
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 400; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            warn "$2 (pid $pid) ignored SIGTERM for 40 s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    wait "$pid" 2>/dev/null || true
}
stop_rustus() {
    stop_pid "$RUSTUS_PID" rustus
    RUSTUS_PID=""
}
stop_tusnode() {
    stop_pid "$TUSNODE_PID" "@tus/server"
    TUSNODE_PID=""
}

# ---------------------------------------------------------------------------------------------
# One tus request with curl: the answer's headers in $WORK/resp-headers, its body in
# $WORK/resp; prints "HTTP_CODE TIME_TOTAL SIZE_UPLOAD". upgate gets the Bearer key, the others
# no Authorization header (they have no authentication).
# ---------------------------------------------------------------------------------------------
tus_curl() { # $1 = server, $2 = URL, then curl arguments
    local server=$1 url=$2 auth=()
    shift 2
    [[ $server == upgate ]] && auth=(-H 'Authorization: Bearer bench-key')
    curl -sS -D "$WORK/resp-headers" -o "$WORK/resp" -w '%{http_code} %{time_total} %{size_upload}' \
        -H 'Tus-Resumable: 1.0.0' "${auth[@]}" "$@" "$url" || true
}
resp_header() { # $1 = header name: its value in the last answer (of the last response block)
    awk -v want="$1" '
        /^HTTP\// { value = "" }
        { sub(/\r$/, "") }
        (i = index($0, ":")) > 1 && tolower(substr($0, 1, i - 1)) == tolower(want) {
            value = substr($0, i + 1); sub(/^[ \t]+/, "", value)
        }
        END { print value }' "$WORK/resp-headers" 2>/dev/null
}
# A Location, absolute or relative to the creation URL, as an absolute URL.
resolve_location() { # $1 = server, $2 = Location
    local loc=$2
    case $loc in
        http://* | https://*) echo "$loc" ;;
        /*) echo "http://127.0.0.1:$(tus_port "$1")$loc" ;;
        *) echo "$(tus_endpoint "$1")$loc" ;;
    esac
}
# The id in an upload URL: its last path segment (rustus' URLs end with a slash).
upload_id() { local u=${1%/}; echo "${u##*/}"; }

# Creation with upload: the whole of FILE in the POST. Checks 201 and Upload-Offset = its size;
# on success sets TUS_URL to the upload's URL, else reports a problem and sets it to "".
TUS_URL=""
tus_create_with_upload() { # $1 = server, $2 = file, $3 = filename, $4 = phase for messages
    local server=$1 file=$2 name=$3 phase=$4 size out code offset loc
    TUS_URL=""
    size=$(stat -c %s "$file")
    out=$(tus_curl "$server" "$(tus_endpoint "$server")" -X POST --data-binary "@$file" \
        -H "Upload-Length: $size" -H 'Content-Type: application/offset+octet-stream' \
        -H "Upload-Metadata: filename $(printf %s "$name" | base64 -w0)")
    read -r code _ <<<"${out:-000 0}"
    offset=$(resp_header Upload-Offset)
    loc=$(resp_header Location)
    if [[ $code != 201 || $offset != "$size" || -z $loc ]]; then
        problem "$phase ${TUS_NAME[$server]}: creation-with-upload of $size bytes answered HTTP $code, Upload-Offset '${offset:-none}', Location '${loc:-none}': $(head -c 200 "$WORK/resp" 2>/dev/null)"
        return 0
    fi
    TUS_URL=$(resolve_location "$server" "$loc")
}

# Creation (POST with Upload-Length) then one PATCH of the whole file. Sets BIG_CODE and
# BIG_TIME (the PATCH's HTTP status and curl time_total) and BIG_STORED (where the server keeps
# the bytes, "" when unknown). The creation POST is not part of the time (it takes a millisecond).
tus_send_big() { # $1 = server, $2 = file, $3 = filename, $4 = phase for messages
    local server=$1 file=$2 name=$3 phase=$4 size out code loc url offset id
    BIG_CODE=000 BIG_TIME=0 BIG_STORED=""
    size=$(stat -c %s "$file")
    out=$(tus_curl "$server" "$(tus_endpoint "$server")" -X POST -H "Upload-Length: $size" \
        -H "Upload-Metadata: filename $(printf %s "$name" | base64 -w0)")
    read -r code _ <<<"${out:-000 0}"
    loc=$(resp_header Location)
    if [[ $code != 201 || -z $loc ]]; then
        problem "$phase ${TUS_NAME[$server]}: creation answered HTTP $code, Location '${loc:-none}': $(head -c 200 "$WORK/resp" 2>/dev/null)"
        return 0
    fi
    url=$(resolve_location "$server" "$loc")
    # -T streams the file (--data-binary @file would read all of it into curl's memory first).
    out=$(tus_curl "$server" "$url" -X PATCH -T "$file" -H 'Upload-Offset: 0' \
        -H 'Content-Type: application/offset+octet-stream')
    read -r BIG_CODE BIG_TIME _ <<<"${out:-000 0 0}"
    offset=$(resp_header Upload-Offset)
    if [[ $BIG_CODE != 204 || $offset != "$size" ]]; then
        problem "$phase ${TUS_NAME[$server]}: PATCH of $size bytes answered HTTP $BIG_CODE, Upload-Offset '${offset:-none}': $(head -c 200 "$WORK/resp" 2>/dev/null)"
        BIG_CODE="${BIG_CODE}!" # not a success, whatever the status
        return 0
    fi
    id=$(upload_id "$url")
    case $server in
        upgate)
            # The complete upload's record id; the local provider keeps the bytes as <root>/<id>.
            id=$(resp_header Upgate-Upload-Id)
            [[ -n $id ]] || problem "$phase upgate: the final PATCH's answer has no Upgate-Upload-Id"
            BIG_STORED="$DATA/upgate-data/files/$id"
            ;;
        rustus) BIG_STORED="$DATA/rustus/data/$id" ;;
        tusnode) BIG_STORED="$DATA/tus-node/$id" ;;
    esac
}

# Files each server stored on the scratch filesystem: "ALL COMPLETE LEFTOVERS", COMPLETE being
# those of exactly $SMALL_BYTES bytes. Leftovers are what must not stay after a graceful stop
# (upgate: spool/ and sessions/ files).
tus_stored_counts() { # $1 = server
    local dir all complete leftovers=0
    case $1 in
        upgate)
            dir="$DATA/upgate-data/files"
            leftovers=$(find "$DATA/upgate-data/spool" "$DATA/upgate-data/sessions" -type f 2>/dev/null | wc -l)
            ;;
        rustus) dir="$DATA/rustus/data" ;;
        tusnode) dir="$DATA/tus-node" ;;
    esac
    all=$(find "$dir" -type f ! -name '*.json' | wc -l)
    complete=$(find "$dir" -type f ! -name '*.json' -size "${SMALL_BYTES}c" | wc -l)
    echo "$all $complete $leftovers"
}

# What each server announces (OPTIONS /files/), for the table.
declare -A TUS_EXT
tus_extensions() { # $1 = server
    tus_curl "$1" "$(tus_endpoint "$1")" -X OPTIONS >/dev/null
    TUS_EXT[$1]=$(resp_header Tus-Extension)
}

# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
tus_report() {
    local s u r t
    row() { printf '%-22s | %-16s | %13s | %13s | %13s | %13s | %13s\n' "$@"; }
    # A figure of the three servers, and upgate's ratio to each of the other two.
    row3() { # $1 workload, $2 metric, $3 upgate, $4 rustus, $5 tusnode, [$6 = no ratios]
        if [[ ${6:-} == noratio ]]; then
            row "$1" "$2" "$3" "$4" "$5" "" ""
        else
            row "$1" "$2" "$3" "$4" "$5" "$(ratio "$3" "$4")" "$(ratio "$3" "$5")"
        fi
    }
    echo "upgate tus benchmark — $(date -u '+%Y-%m-%d %H:%M UTC'), git $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$REPO" diff --quiet HEAD -- crates plugins 2>/dev/null || echo '+dirty')"
    echo "mode: $([[ $QUICK == 1 ]] && echo quick || echo full); $(nproc) cores; kernel $(uname -r); rustus $RUSTUS_VERSION ($RUSTUS_WORKERS workers); @tus/server $(tusnode_version server) + @tus/file-store $(tusnode_version file-store) on node $(node --version) ($TUSNODE_WORKERS processes); $(wrk --version 2>&1 | head -1 | awk '{print $1, $2}'); before the run: $LOAD_BEFORE"
    if ((${#BUSY_PHASES[@]})); then
        echo "NOISY: other processes used the CPU in: ${BUSY_PHASES[*]}; re-run on an idle machine"
    fi
    echo "filesystem: $([[ $USE_LOOP == 1 ]] && echo "fresh loop-mounted ext4 ($IMG_SIZE) per phase" || echo "fresh directory per phase in $IMG_DIR (NO loop mount)"); the run took $((SECONDS / 60)) min $((SECONDS % 60)) s"
    echo "auth: upgate checks a Bearer key, hashes (sha256) and records (SQLite) every upload; rustus and @tus/server: no auth, no hash, a JSON file per upload"
    echo
    row "workload" "metric" "upgate" "rustus" "@tus/server" "upgate/rustus" "upgate/@tus"
    row "----------------------" "----------------" "-------------" "-------------" "-------------" "-------------" "-------------"
    row3 "$BIG_LABEL x1 (best of $REPS)" "MiB/s" "${A_RATE[upgate]:-0}" "${A_RATE[rustus]:-0}" "${A_RATE[tusnode]:-0}"
    row3 "$BIG_LABEL x1" "MiB/s, each run" "${A_RUNS[upgate]:-}" "${A_RUNS[rustus]:-}" "${A_RUNS[tusnode]:-}" noratio
    row3 "$BIG_LABEL x1" "peak RSS MiB" "$(mib "${A_PEAK[upgate]:-0}")" "$(mib "${A_PEAK[rustus]:-0}")" "$(mib "${A_PEAK[tusnode]:-0}")"
    local label="tus 1KiB x$CONNS"
    ((SMALL_BYTES == 1024)) || label="tus ${SMALL_BYTES}B x$CONNS"
    row3 "$label" "uploads/s" "${B_RATE[upgate]:-0}" "${B_RATE[rustus]:-0}" "${B_RATE[tusnode]:-0}"
    u=${B_P50[upgate]:-0} r=${B_P50[rustus]:-0} t=${B_P50[tusnode]:-0}
    row "$label" "p50 latency ms" "$(ms "$u")" "$(ms "$r")" "$(ms "$t")" "$(ratio "$u" "$r")" "$(ratio "$u" "$t")"
    u=${B_P99[upgate]:-0} r=${B_P99[rustus]:-0} t=${B_P99[tusnode]:-0}
    row "$label" "p99 latency ms" "$(ms "$u")" "$(ms "$r")" "$(ms "$t")" "$(ratio "$u" "$r")" "$(ratio "$u" "$t")"
    row3 "$label" "CPU us/upload" "${B_CPU[upgate]:-0}" "${B_CPU[rustus]:-0}" "${B_CPU[tusnode]:-0}"
    row3 "$label" "peak RSS MiB" "$(mib "${B_PEAK[upgate]:-0}")" "$(mib "${B_PEAK[rustus]:-0}")" "$(mib "${B_PEAK[tusnode]:-0}")"
    row3 "$label" "2xx / other" "${B_OK[upgate]:-0}/${B_BAD[upgate]:-0}" "${B_OK[rustus]:-0}/${B_BAD[rustus]:-0}" "${B_OK[tusnode]:-0}/${B_BAD[tusnode]:-0}" noratio
    row3 "$label" "files stored" "${B_STORED[upgate]:-0}" "${B_STORED[rustus]:-0}" "${B_STORED[tusnode]:-0}" noratio
    echo
    echo "2xx = 201 with Upload-Offset: $SMALL_BYTES (the upload complete in its creation POST). Big file: a creation POST, then"
    echo "one PATCH of the whole file with curl -T; MiB/s from the PATCH's time_total."
    echo "peak RSS: upgate and rustus = the process's VmHWM; @tus/server = the sum of its workers' VmHWM (fresh processes per run)."
    echo "Tus-Extension announced:"
    for s in upgate rustus tusnode; do printf '  %-12s %s\n' "${TUS_NAME[$s]}" "${TUS_EXT[$s]:-?}"; done
    echo
    local rss_peak=${A_PEAK[upgate]:-0}
    ((${B_PEAK[upgate]:-0} > rss_peak)) && rss_peak=${B_PEAK[upgate]}
    echo "targets:"
    printf '  %-4s upgate peak RSS < 64 MiB: %s MiB\n' "$( ((rss_peak < 65536)) && echo PASS || echo FAIL)" "$(mib "$rss_peak")"
    if [[ $INTEGRITY_OK == 1 ]]; then
        echo "  PASS integrity: every big file stored byte-exact (sha256) by all three; files stored match the 2xx answers"
    else
        echo "  FAIL integrity / errors:"
        local p
        for p in "${PROBLEMS[@]}"; do echo "       !!! $p"; done
    fi
}
tusnode_version() { # $1 = server | file-store
    node -p "require('$TUSNODE_DIR/node_modules/@tus/$1/package.json').version" 2>/dev/null || echo '?'
}
