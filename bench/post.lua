-- wrk script: POST one fixed body, read from the file named by $BENCH_BODY.
-- $BENCH_CONTENT_TYPE sets Content-Type (default application/json); a non-empty
-- $BENCH_HEADER_LEN adds Triton's Inference-Header-Content-Length (binary tensor extension).

local function slurp(path)
  local file = assert(io.open(path, "rb"), "cannot open body file " .. tostring(path))
  local body = file:read("*a")
  file:close()
  return body
end

wrk.method = "POST"
wrk.body = slurp(assert(os.getenv("BENCH_BODY"), "BENCH_BODY is not set"))
wrk.headers["Content-Type"] = os.getenv("BENCH_CONTENT_TYPE") or "application/json"

local header_len = os.getenv("BENCH_HEADER_LEN")
if header_len and header_len ~= "" then
  wrk.headers["Inference-Header-Content-Length"] = header_len
end
