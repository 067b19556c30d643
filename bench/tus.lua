-- wrk script for bench/run.sh --tus, workload "tus small": one tus creation-with-upload per
-- request (the whole upload in one POST), a unique file name each.
--   wrk -t2 -c32 -d10s --latency -s bench/tus.lua http://127.0.0.1:18080 -- /files/ 1024 bench-key
--   wrk -t2 -c32 -d10s --latency -s bench/tus.lua http://127.0.0.1:18082 -- /files 1024
-- Arguments: the creation path, SIZE (body bytes = Upload-Length), and an optional key sent as
-- "Authorization: Bearer KEY" (upgate; rustus and @tus/server get no Authorization header).
-- An answer counts as "ok" only if it is 201 with "Upload-Offset: SIZE" (the upload complete in
-- one request); anything else is "bad" and the first bad answer's status, Upload-Offset and
-- body are kept. Prints one machine-readable "BENCH ..." line in done(), as bench/upload.lua.

local threads = {}
local counter = 0

function setup(thread)
    thread:set("id", counter)
    table.insert(threads, thread)
    counter = counter + 1
end

local b64chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
local function base64(s)
    local out = {}
    for i = 1, #s, 3 do
        local a, b, c = string.byte(s, i, i + 2)
        local n = a * 65536 + (b or 0) * 256 + (c or 0)
        local c1 = math.floor(n / 262144) % 64
        local c2 = math.floor(n / 4096) % 64
        local c3 = math.floor(n / 64) % 64
        local c4 = n % 64
        out[#out + 1] = string.sub(b64chars, c1 + 1, c1 + 1) .. string.sub(b64chars, c2 + 1, c2 + 1)
            .. (b and string.sub(b64chars, c3 + 1, c3 + 1) or "=")
            .. (c and string.sub(b64chars, c4 + 1, c4 + 1) or "=")
    end
    return table.concat(out)
end

function init(args)
    path = args[1] or "/files/"
    size = tonumber(args[2] or "1024")
    key = args[3]
    n = 0
    ok = 0
    bad = 0
    badstatus = 0
    badoffset = ""
    badbody = ""
    local chars = {}
    for i = 0, size - 1 do
        chars[#chars + 1] = string.char(97 + (i * 7 + id) % 26)
    end
    data = table.concat(chars)
    want_offset = tostring(size)
    headers = {
        ["Tus-Resumable"] = "1.0.0",
        ["Upload-Length"] = want_offset,
        ["Content-Type"] = "application/offset+octet-stream",
    }
    if key and key ~= "" then
        headers["Authorization"] = "Bearer " .. key
    end
end

function request()
    n = n + 1
    headers["Upload-Metadata"] = "filename " .. base64("t" .. id .. "-" .. n .. ".bin")
    return wrk.format("POST", path, headers, data)
end

local function upload_offset(hdrs)
    local v = hdrs["Upload-Offset"] or hdrs["upload-offset"]
    if v then return v end
    for k, value in pairs(hdrs) do
        if string.lower(k) == "upload-offset" then return value end
    end
    return nil
end

function response(status, hdrs, body)
    local offset = upload_offset(hdrs)
    if status == 201 and offset == want_offset then
        ok = ok + 1
    else
        bad = bad + 1
        if badstatus == 0 then
            badstatus = status
            badoffset = offset or "none"
            badbody = string.sub(body or "", 1, 300)
        end
    end
end

function done(summary, latency, requests)
    local tok, tbad, fstatus, foffset, fbody = 0, 0, 0, "", ""
    for _, t in ipairs(threads) do
        tok = tok + t:get("ok")
        tbad = tbad + t:get("bad")
        if fstatus == 0 and t:get("badstatus") ~= 0 then
            fstatus = t:get("badstatus")
            foffset = t:get("badoffset")
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
        io.write("BENCH_FIRST_BAD_BODY Upload-Offset: " .. foffset .. "; body: "
            .. string.gsub(fbody, "[\r\n]", " ") .. "\n")
    end
end
