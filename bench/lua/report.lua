-- done(): one machine-readable line that bench/scenarios.py parses (wrk's own summary rounds latencies
-- to two digits and hides error counts in prose). Latencies are wrk's, in microseconds; `status` counts
-- responses with a status above 399, as wrk does.
function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    "BENCH-RESULT requests=%d duration_us=%d connect=%d read=%d write=%d timeout=%d status=%d " ..
    "p50_us=%.1f p99_us=%.1f\n",
    summary.requests, summary.duration, errors.connect, errors.read, errors.write, errors.timeout,
    errors.status, latency:percentile(50.0), latency:percentile(99.0)))
end
