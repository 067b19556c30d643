-- wrk script for bench/run.sh workload B: one small upload per request, a unique name each.
--   wrk -t2 -c32 -d10s --latency -s bench/upload.lua http://127.0.0.1:18081 -- nginx
--   wrk -t2 -c32 -d10s --latency -s bench/upload.lua http://127.0.0.1:18080 -- upgate bench-key [SIZE]
-- nginx: WebDAV PUT /bench/t<thread>-<n>.bin with a SIZE-byte body.
-- upgate: Dify-dialect POST /v1/files/upload, multipart with one SIZE-byte file part, Bearer key.
-- Prints one machine-readable "BENCH ..." line in done(); 2xx responses count as "ok".

local threads = {}
local counter = 0

function setup(thread)
    thread:set("id", counter)
    table.insert(threads, thread)
    counter = counter + 1
end

function init(args)
    mode = args[1] or "nginx"
    key = args[2] or "bench-key"
    size = tonumber(args[3] or "1024")
    n = 0
    ok = 0
    bad = 0
    badstatus = 0
    badbody = ""
    local chars = {}
    for i = 0, size - 1 do
        chars[#chars + 1] = string.char(97 + (i * 7 + id) % 26)
    end
    data = table.concat(chars)
    boundary = "----upgatebench7f3a9c0d"
    if mode == "upgate" then
        headers = {
            ["Authorization"] = "Bearer " .. key,
            ["Content-Type"] = "multipart/form-data; boundary=" .. boundary,
        }
        part_head = "--" .. boundary .. "\r\nContent-Disposition: form-data; name=\"file\"; filename=\""
        part_mid = "\"\r\nContent-Type: application/octet-stream\r\n\r\n"
        part_tail = "\r\n--" .. boundary .. "--\r\n"
    else
        headers = {}
    end
end

function request()
    n = n + 1
    local name = "t" .. id .. "-" .. n .. ".bin"
    if mode == "upgate" then
        return wrk.format("POST", "/v1/files/upload", headers, part_head .. name .. part_mid .. data .. part_tail)
    else
        return wrk.format("PUT", "/bench/" .. name, headers, data)
    end
end

function response(status, hdrs, body)
    if status >= 200 and status < 300 then
        ok = ok + 1
    else
        bad = bad + 1
        if badstatus == 0 then
            badstatus = status
            badbody = string.sub(body or "", 1, 300)
        end
    end
end

function done(summary, latency, requests)
    local tok, tbad, fstatus, fbody = 0, 0, 0, ""
    for _, t in ipairs(threads) do
        tok = tok + t:get("ok")
        tbad = tbad + t:get("bad")
        if fstatus == 0 and t:get("badstatus") ~= 0 then
            fstatus = t:get("badstatus")
            fbody = t:get("badbody")
        end
    end
    local e = summary.errors
    io.write(string.format(
        "BENCH ok=%d bad=%d requests=%d duration_us=%d p50_us=%d p90_us=%d p99_us=%d max_us=%d "
            .. "err_connect=%d err_read=%d err_write=%d err_timeout=%d first_bad_status=%d\n",
        tok, tbad, summary.requests, summary.duration,
        math.floor(latency:percentile(50)), math.floor(latency:percentile(90)),
        math.floor(latency:percentile(99)), math.floor(latency.max),
        e.connect, e.read, e.write, e.timeout, fstatus))
    if fstatus ~= 0 then
        io.write("BENCH_FIRST_BAD_BODY " .. string.gsub(fbody, "[\r\n]", " ") .. "\n")
    end
end
