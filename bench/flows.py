#!/usr/bin/env python3
"""Flow benchmarks for upgate, each against a baseline measured in the same run.

  forward: one file through upgate to a loopback upstream vs the same file sent straight to
           that upstream, twice: the upstream is the project's Dify mock, then a second
           upgate (Dify dialect, local provider); the first upgate uses the dify plugin with
           sync delivery (passed through while it arrives).
  kore:    one file through Kore chunked sessions (8 MiB chunks) vs the same file as one
           Dify upload, both to the local provider.
  memory:  the daemon's RSS with idle connections (a partial request head each) and then
           with concurrent 5 MiB uploads on top, with the default `intake_memory` vs with
           the budget lifted (every upload writing large slices): what an idle connection
           and an upload in progress cost, and what the budget bounds.

Prints time, MiB/s, the ratio, and the daemon's peak RSS (VmHWM) for each run. Needs a
release build (`cargo build --release --workspace`) and curl. Usage:

  bench/flows.py [forward|kore|memory|all] [--size-mib 1024] [--workdir DIR]
                 [--connections 320] [--uploads 200]
"""
import argparse
import contextlib
import hashlib
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASE = os.path.join(ROOT, "target", "release")
UPGATE = os.path.join(RELEASE, "upgate")
MOCK = os.path.join(RELEASE, "mock-upstream")
KEY = "bench-key"
UPSTREAM_KEY = "upstream-key"


@contextlib.contextmanager
def running(argv, pattern):
    """Starts a server, yields (process, url), and kills it at the end."""
    proc, url = start(argv, pattern)
    try:
        yield proc, url
    finally:
        proc.kill()
        proc.wait()


def measured_upgate(workdir, provider_yaml, work):
    """Runs `work(url)` against a fresh upgate; returns its result and the peak RSS."""
    with running(upgate_argv(workdir, provider_yaml), r"upgate: listening on (http://\S+)") as (proc, url):
        result = work(url)
        return result, peak_rss_mib(proc.pid)


def start(argv, pattern, env=None):
    errors = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errors, text=True, env=env)
    deadline = time.time() + 30
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        found = re.search(pattern, line)
        if found:
            return proc, found.group(1)
    proc.kill()
    errors.seek(0)
    sys.exit(f"{argv[0]} did not start: {errors.read()[-2000:]}")


def peak_rss_mib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid):
    """(user, system) CPU seconds a process has used so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def settle(source):
    """Before a measured upload: no dirty pages (the previous phase's writeback would land in
    it) and, as root, an emptied page cache with only `source` read back into it. On a
    virtual machine the first write to a page the guest never used costs the host's fault,
    which lands in the writer's copy into the page cache: a phase that came after others
    had used the memory ran up to 3x faster than the first. Dropping the cache gives every
    phase memory that was used before; the file to send is read from memory, as before."""
    os.sync()
    if os.geteuid() == 0:
        with open("/proc/sys/vm/drop_caches", "w") as caches:
            caches.write("3\n")
        with open(source, "rb") as data:
            while data.read(1 << 20):
                pass


def upgate_argv(workdir, provider_yaml, server_yaml="", key=KEY):
    data = os.path.join(workdir, "data")
    shutil.rmtree(data, ignore_errors=True)
    config = os.path.join(workdir, "config.yaml")
    with open(config, "w") as out:
        out.write(
            f"server:\n  listen: 127.0.0.1:0\n  metrics_listen: null\n  data_dir: {data}\n"
            f"  plugin_dir: {RELEASE}\n  disk_free_floor: 64MiB\n{server_yaml}"
            f"plans:\n  big: {{ max_file_size: 64GiB }}\n"
            f"providers:\n{provider_yaml}"
            f"tenants:\n  bench: {{ plan: big, provider: up, keys: [{key}] }}\n"
        )
    return [UPGATE, "serve", "--config", config]


def curl_upload(url, headers, path):
    return curl_upload_cpu(url, headers, path)[0]


def curl_upload_cpu(url, headers, path):
    """One multipart upload with curl: (seconds, curl's own CPU seconds)."""
    argv = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-F", f"file=@{path}", url]
    for header in headers:
        argv += ["-H", header]
    children = os.times()
    started = time.time()
    code = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()
    elapsed = time.time() - started
    after = os.times()
    if not code.startswith("2"):
        sys.exit(f"upload to {url} answered {code}")
    return elapsed, (after.children_user - children.children_user) + (after.children_system - children.children_system)


def row(label, seconds, size_mib, rss=None):
    rss_text = f"{rss:8.1f} MiB" if rss is not None else "           -"
    print(f"  {label:<44} {seconds:8.2f} s {size_mib / seconds:9.1f} MiB/s   peak RSS {rss_text}")


def forward_through(workdir, path, upstream_url, upstream_pid):
    """One upload straight to a Dify-shaped upstream, then through an upgate in front of it
    (dify plugin, sync); two each, alternating. Returns the fastest of each as a dict of
    seconds and the CPU seconds each process spent on it (`client`, `first`, `upstream`),
    and the first upgate's peak RSS."""
    provider = (
        f"  up:\n    plugin: dify\n    timeout: 1h\n"
        f"    settings: {{ base_url: '{upstream_url}/v1', api_key: {UPSTREAM_KEY}, timeout: 1h }}\n"
    )
    first = os.path.join(workdir, "first")
    os.makedirs(first, exist_ok=True)
    direct, through = [], []

    def measured(url, key, first_pid=None):
        settle(path)
        before = [cpu_seconds(pid) for pid in (first_pid, upstream_pid) if pid]
        seconds, client = curl_upload_cpu(f"{url}/v1/files/upload", [f"Authorization: Bearer {key}"], path)
        after = [cpu_seconds(pid) for pid in (first_pid, upstream_pid) if pid]
        spent = [sum(a) - sum(b) for a, b in zip(after, before)]
        run = {"seconds": seconds, "client": client, "upstream": spent[-1]}
        if first_pid:
            run["first"] = spent[0]
            run["first_split"] = tuple(a - b for a, b in zip(after[0], before[0]))
        return run

    with running(upgate_argv(first, provider), r"upgate: listening on (http://\S+)") as (proc, url):
        for _ in range(2):
            direct.append(measured(upstream_url, UPSTREAM_KEY))
            through.append(measured(url, KEY, proc.pid))
        rss = peak_rss_mib(proc.pid)
    fastest = lambda runs: min(runs, key=lambda run: run["seconds"])
    return fastest(direct), fastest(through), rss


def cpu_rows(direct, through, cores):
    """The CPU each process spent, and what that allows on this machine's cores: a path whose
    processes need C CPU seconds in all cannot take less than C / cores, however well they
    overlap, so the ratio the cores allow is the direct time over the through path's floor."""
    user, system = through["first_split"]
    print(f"  CPU of the first upgate for that upload: {user + system:.2f} s ({user:.2f} user, {system:.2f} system)")
    direct_cpu = direct["client"] + direct["upstream"]
    through_cpu = through["client"] + through["first"] + through["upstream"]
    print(f"  CPU in all, direct: {direct_cpu:.2f} s (client {direct['client']:.2f}, upstream {direct['upstream']:.2f})"
          f" = {direct_cpu / direct['seconds'] / cores:.0%} of {cores} cores for its {direct['seconds']:.2f} s")
    floor = through_cpu / cores
    print(f"  CPU in all, through: {through_cpu:.2f} s (client {through['client']:.2f}, first upgate {through['first']:.2f},"
          f" upstream {through['upstream']:.2f}): at least {floor:.2f} s on {cores} cores")
    print(f"  best ratio these {cores} cores allow with that CPU: {min(1.0, direct['seconds'] / floor):.2f}x;"
          f" 0.9x needs the first upgate at most {max(0.0, direct['seconds'] / 0.9 * cores - through['client'] - through['upstream']):.2f} s of CPU")


def bench_forward(workdir, path, size_mib):
    print(f"forward: {size_mib} MiB, client -> upgate (dify plugin, sync) -> upstream vs client -> upstream")
    cores = os.cpu_count() or 1
    mock_argv = [MOCK, "--vendor", "dify", "--api-key", UPSTREAM_KEY]
    with running(mock_argv, r"listening on (http://\S+)") as (mock, mock_url):
        direct, through, rss = forward_through(workdir, path, mock_url, mock.pid)
    row("direct to the Dify mock (baseline)", direct["seconds"], size_mib)
    row("through upgate to the Dify mock", through["seconds"], size_mib, rss)
    cpu_rows(direct, through, cores)
    print(f"  ratio upgate/direct throughput: {direct['seconds'] / through['seconds']:.2f}x")
    second = os.path.join(workdir, "second")
    os.makedirs(second, exist_ok=True)
    local = f"  up:\n    plugin: local\n    settings: {{ root: {os.path.join(second, 'files')} }}\n"
    argv = upgate_argv(second, local, key=UPSTREAM_KEY)
    with running(argv, r"upgate: listening on (http://\S+)") as (upstream, upstream_url):
        direct, through, rss = forward_through(workdir, path, upstream_url, upstream.pid)
        upstream_rss = peak_rss_mib(upstream.pid)
    row("direct to a second upgate (baseline)", direct["seconds"], size_mib, upstream_rss)
    row("through upgate to the second upgate", through["seconds"], size_mib, rss)
    cpu_rows(direct, through, cores)
    print(f"  ratio upgate/direct throughput: {direct['seconds'] / through['seconds']:.2f}x\n")


def post(conn, path, body, headers):
    conn.request("POST", path, body=body, headers=headers)
    response = conn.getresponse()
    data = response.read()
    if response.status // 100 != 2:
        sys.exit(f"POST {path}: {response.status} {data[:300]!r}")
    return json.loads(data)


def kore_chunked(url, path, size, chunk):
    host = url.removeprefix("http://")
    conn = http.client.HTTPConnection(host, timeout=600)
    total = (size + chunk - 1) // chunk
    started = time.time()
    session = post(
        conn,
        "/api/public/files/session/start",
        json.dumps({"fileContext": "bulkImport", "totalChunks": total, "fileExtension": "bin",
                    "fileName": "big.bin", "fileSize": size}),
        {"X-api-key": KEY, "Content-Type": "application/json"},
    )
    boundary = uuid.uuid4().hex
    # One buffer for every chunk, as curl reads into one: a fresh 8 MiB object per chunk
    # cost the client page faults (a few ms a chunk) that the single upload does not pay.
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    with open(path, "rb") as source:
        for number in range(total):
            data = view[: source.readinto(buffer)]
            # The form's framing and the chunk go out as they are: no copy of the chunk into
            # one body (the client's own cost stays small next to the server's).
            head = (
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"chunkNumber\"\r\n\r\n{number}\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.bin\"\r\n"
                f"Content-Type: application/octet-stream\r\n\r\n"
            ).encode()
            tail = f"\r\n--{boundary}--\r\n".encode()
            conn.putrequest("POST", f"/api/public/files/session/{session['sessionId']}")
            conn.putheader("X-api-key", KEY)
            conn.putheader("Content-Type", f"multipart/form-data; boundary={boundary}")
            conn.putheader("Content-Length", str(len(head) + len(data) + len(tail)))
            conn.endheaders()
            for piece in (head, data, tail):
                conn.send(piece)
            response = conn.getresponse()
            answer = response.read()
            if response.status // 100 != 2:
                sys.exit(f"chunk {number}: {response.status} {answer[:300]!r}")
    done = post(conn, f"/api/public/files/session/{session['sessionId']}/complete", b"", {"X-api-key": KEY})
    return time.time() - started, done["fileId"]


def bench_kore(workdir, path, size_mib):
    print(f"kore: {size_mib} MiB as Kore chunked sessions (8 MiB chunks) vs one Dify upload (best of 2 each)")
    files = os.path.join(workdir, "files")
    provider = f"  up: {{ plugin: local, settings: {{ root: {files} }} }}\n"
    upload = lambda url: curl_upload(f"{url}/v1/files/upload", [f"Authorization: Bearer {KEY}"], path)
    chunks = lambda url: kore_chunked(url, path, os.path.getsize(path), 8 << 20)
    # Each phase starts with no dirty pages (the previous phase's writeback would land in
    # it) and runs twice, alternating; the best of each counts.
    singles, chunkeds = [], []
    for _ in range(2):
        settle(path)
        singles.append(measured_upgate(workdir, provider, upload))
        settle(path)
        chunkeds.append(measured_upgate(workdir, provider, chunks))
    single, single_rss = min(singles, key=lambda run: run[0])
    (chunked, file_id), chunked_rss = min(chunkeds, key=lambda run: run[0][0])
    stored = os.path.join(files, file_id)
    same = sha256(stored) == sha256(path)
    row("one Dify upload (baseline)", single, size_mib, single_rss)
    row("Kore chunked session, 8 MiB chunks", chunked, size_mib, chunked_rss)
    print(f"  ratio chunked/single time: {chunked / single:.2f}x; stored sha256 matches: {same}\n")
    if not same:
        sys.exit("the assembled file differs from the original")


def rss_mib(pid, field="VmRSS:"):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return float("nan")


def memory_run(workdir, connections, uploads, intake_memory):
    """(idle RSS, RSS with idle connections, peak with uploads on top) of one fresh daemon."""
    import socket
    import threading

    files = os.path.join(workdir, "files")
    shutil.rmtree(files, ignore_errors=True)
    provider = f"  up: {{ plugin: local, settings: {{ root: {files} }} }}\n"
    server = (f"  header_timeout: 120s\n  idle_timeout: 120s\n  max_connections: 100000\n"
              f"  intake_memory: {intake_memory}\n")
    with running(upgate_argv(workdir, provider, server), r"upgate: listening on (http://\S+)") as (proc, url):
        host, port = url.removeprefix("http://").rsplit(":", 1)
        time.sleep(0.5)
        idle = rss_mib(proc.pid)
        idle_sockets = []
        for _ in range(connections):
            sock = socket.create_connection((host, int(port)))
            sock.sendall(b"POST /v1/files/upload HTTP/1.1\r\nHost: bench\r\n")
            idle_sockets.append(sock)
        time.sleep(1.0)
        with_idle = rss_mib(proc.pid)
        size = 5 << 20
        boundary = uuid.uuid4().hex
        head_of_body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"m.bin\"\r\n"
                        f"Content-Type: application/octet-stream\r\n\r\n").encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        length = len(head_of_body) + size + len(tail)
        piece = os.urandom(64 << 10)
        ready = threading.Barrier(uploads + 1)
        statuses = []

        def one_upload():
            sock = socket.create_connection((host, int(port)))
            sock.sendall((f"POST /v1/files/upload HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {KEY}\r\n"
                          f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                          f"Content-Length: {length}\r\n\r\n").encode() + head_of_body)
            ready.wait()
            for _ in range(size // len(piece)):
                sock.sendall(piece)
            sock.sendall(tail)
            answer = sock.recv(65536).decode(errors="replace")
            statuses.append(answer.split(" ", 2)[1] if " " in answer else "none")
            sock.close()

        threads = [threading.Thread(target=one_upload) for _ in range(uploads)]
        for thread in threads:
            thread.start()
        ready.wait()
        for thread in threads:
            thread.join()
        peak = rss_mib(proc.pid, "VmHWM:")
        for sock in idle_sockets:
            sock.close()
        bad = [status for status in statuses if not status.startswith("2")]
        if bad:
            sys.exit(f"memory: {len(bad)} of {uploads} uploads failed: {bad[:5]}")
        return idle, with_idle, peak


def bench_memory(workdir, connections, uploads):
    print(f"memory: {connections} idle connections, then {uploads} concurrent 5 MiB uploads (Dify, local provider)")
    results = []
    for label, budget in (("budget lifted (baseline: large slices for all)", "1TiB"),
                          ("default intake_memory (32 MiB)", "32MiB")):
        idle, with_idle, peak = memory_run(workdir, connections, uploads, budget)
        per_connection = (with_idle - idle) * 1024 / connections
        per_upload = (peak - with_idle) * 1024 / uploads
        results.append(peak)
        print(f"  {label:<52} idle {idle:6.1f} MiB  +conns {with_idle:6.1f} MiB "
              f"({per_connection:5.1f} KiB each)  peak {peak:6.1f} MiB ({per_upload:6.1f} KiB per upload)")
    print(f"  ratio peak RSS default/lifted: {results[1] / results[0]:.2f}x\n")


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while block := source.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", nargs="?", default="all", choices=["forward", "kore", "memory", "all"])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--connections", type=int, default=320)
    parser.add_argument("--uploads", type=int, default=200)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    for binary in (UPGATE, MOCK):
        if not os.access(binary, os.X_OK):
            sys.exit(f"{binary} missing: run `cargo build --release --workspace` first")
    workdir = args.workdir or tempfile.mkdtemp(prefix="upgate-flows-")
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "big.bin")
    needs_file = args.which != "memory"
    if needs_file and (not os.path.exists(path) or os.path.getsize(path) != args.size_mib << 20):
        with open(path, "wb") as out:
            for _ in range(args.size_mib):
                out.write(os.urandom(1 << 20))
    try:
        if args.which in ("forward", "all"):
            bench_forward(workdir, path, args.size_mib)
        if args.which in ("kore", "all"):
            bench_kore(workdir, path, args.size_mib)
        if args.which in ("memory", "all"):
            bench_memory(workdir, args.connections, args.uploads)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
