#!/usr/bin/env bash
# Ingress throughput: accepted/s of `relay ingress` under wrk at 50 connections, every request a
# new signed webhook (published and confirmed), against GET /healthz as the same-run baseline.
# Usage: deploy/bench-ingress.sh [runs=5] [seconds=10] [connections=50]
# Needs wrk (apt-get install wrk). Talks only to 127.0.0.1; stops by itself.
source "$(dirname "$0")/setup.sh"
ensure_venv ""
ensure_rabbitmq
command -v wrk >/dev/null || { say "wrk is not installed: apt-get install wrk"; exit 1; }
RUNS=${1:-5} SECONDS_PER_RUN=${2:-10} CONNECTIONS=${3:-50}
PORT=${BENCH_PORT:-8099}
WORK=$(mktemp -d)
trap 'kill $INGRESS 2>/dev/null; wait $INGRESS 2>/dev/null; rm -rf "$WORK"' EXIT

cat > "$WORK/bench.toml" <<TOML
[broker]
exchange = "relay.bench"
[ingress]
host = "127.0.0.1"
port = $PORT
[[sources]]
name = "envoice"
path = "/webhooks/envoice"
scheme = "envoice"
secrets = ["bench-secret"]
tolerance_seconds = 0
[[handlers]]
name = "sink"
events = ["envoice.#"]
call = "relay.handlers:log"
partitions = 4
TOML

# Bodies: more than wrk can send, so every request is a new event id (no duplicates).
PER_RUN=$((SECONDS_PER_RUN * 12000))
"$VENV/bin/python" - "$WORK" "$((RUNS * PER_RUN))" <<'PY'
import sys, time
from relay.config import load
from relay.providers import PROVIDERS
work, count = sys.argv[1], int(sys.argv[2])
source = load(f"{work}/bench.toml").sources[0]
first = time.time_ns() // 1000
with open(f"{work}/bodies", "wb") as out:
    for i in range(count):
        out.write(PROVIDERS["envoice"].sample(source, event_id=first + i, key=i % 1000, now=0).body + b"\n")
PY

cat > "$WORK/post.lua" <<'LUA'
local counter = 0
local threads = {}
function setup(thread)
  thread:set("id", counter); counter = counter + 1; table.insert(threads, thread)
end
function init(args)
  local first, last = tonumber(args[1]), tonumber(args[2])
  local per_thread = math.floor((last - first) / 2)
  bodies, i, accepted, other = {}, 0, 0, 0
  local n, lo = 0, first + id * per_thread
  for line in io.lines(args[3]) do
    if n >= lo and n < lo + per_thread then table.insert(bodies, line) end
    n = n + 1
  end
  wrk.method = "POST"; wrk.headers["Content-Type"] = "application/json"
end
function request()
  i = i % #bodies + 1
  return wrk.format(nil, nil, nil, bodies[i])
end
function response(status, headers, body)
  if status == 200 and body:find('"accepted"', 1, true) then accepted = accepted + 1 else other = other + 1 end
end
function done(summary, latency, requests)
  local a, o = 0, 0
  for _, t in ipairs(threads) do a = a + t:get("accepted"); o = o + t:get("other") end
  io.write(string.format("ACCEPTED %d OTHER %d P50_MS %.2f P99_MS %.2f\n",
    a, o, latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
LUA

"$VENV/bin/relay" topology declare --config "$WORK/bench.toml" > /dev/null  # as an operator would
"$VENV/bin/relay" ingress --config "$WORK/bench.toml" --log-level warning > "$WORK/ingress.log" 2>&1 &
INGRESS=$!
for _ in $(seq 1 100); do curl -sf "127.0.0.1:$PORT/readyz" >/dev/null && break; sleep 0.1; done

for run in $(seq 0 $((RUNS - 1))); do
  base=$(wrk -t2 -c"$CONNECTIONS" -d"${SECONDS_PER_RUN}s" "http://127.0.0.1:$PORT/healthz" \
         | awk '/Requests\/sec/ {print $2}')
  out=$(wrk -t2 -c"$CONNECTIONS" -d"${SECONDS_PER_RUN}s" -s "$WORK/post.lua" \
        "http://127.0.0.1:$PORT/webhooks/envoice" -- "$((run * PER_RUN))" "$(((run + 1) * PER_RUN))" "$WORK/bodies")
  read -r _ accepted _ other _ p50 _ p99 <<<"$(grep ^ACCEPTED <<<"$out")"
  rate=$(awk -v a="$accepted" -v s="$SECONDS_PER_RUN" 'BEGIN {printf "%.0f", a / s}')
  echo "run $((run + 1)): accepted/s $rate (non-accepted $other, p50 ${p50} ms, p99 ${p99} ms);" \
       "healthz/s $base; ratio $(awk -v r="$rate" -v b="$base" 'BEGIN {printf "%.3f", r / b}')"
done | tee "$WORK/results"
awk '{print $4}' "$WORK/results" | sort -n | awk '{v[NR]=$1} END {print "median accepted/s:", v[int((NR+1)/2)]}'

"$VENV/bin/python" - <<'PY'
import asyncio, aio_pika
async def main():
    async with await aio_pika.connect("amqp://guest:guest@localhost/") as c:
        ch = await c.channel()
        for q in [f"relay.sink.{i}" for i in range(4)] + ["relay.sink.dlq"]:
            await ch.queue_delete(q)
        await ch.exchange_delete("relay.sink")
        await ch.exchange_delete("relay.bench")
asyncio.run(main())
PY
