#!/usr/bin/env bash
# Load-test the gstream demo with Locust, headless, for a bounded time.
#
#   bash loadtests/run.sh [locustfile] [users] [seconds] [--workers N] [--spawn-rate R]
#
#   locustfile  sse_idle (default), ws_chat, mixed, or a path to a locustfile
#   users       concurrent Locust users (default 100)
#   seconds     test duration (default 30)
#   --workers N distributed form: a Locust master plus N workers on this machine
#   --spawn-rate R  users started per second (default: all within ~5 s)
#
# Starts `python -m gstream demo --no-ticker` on a free port (or the command in
# GSTREAM_SERVER_CMD, with {port} replaced), waits until it answers, runs
# Locust, writes its HTML report and CSV statistics into
# loadtests/reports/<name>-<timestamp>/, stops everything it started, and exits
# non-zero when Locust reported any failure or any missed/duplicate event.
# Settings of the locustfiles (GSTREAM_STREAMS, GSTREAM_PUBLISH_INTERVAL...) are
# read from the environment: see loadtests/_common.py.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
if [ -n "${PYTHON:-}" ]; then
    PY="$PYTHON"
elif [ -x "$ROOT/.venv/bin/python" ]; then
    PY="$ROOT/.venv/bin/python"
else
    PY="$(command -v python3)"
fi

usage() { sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 2; }

WORKERS=0
RATE=""
POS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --workers) WORKERS="${2:?--workers needs a number}"; shift 2 ;;
        --workers=*) WORKERS="${1#*=}"; shift ;;
        --spawn-rate) RATE="${2:?--spawn-rate needs a number}"; shift 2 ;;
        --spawn-rate=*) RATE="${1#*=}"; shift ;;
        -h|--help) usage ;;
        -*) echo "run.sh: unknown option $1" >&2; usage ;;
        *) POS+=("$1"); shift ;;
    esac
done
FILE="${POS[0]:-sse_idle}"
USERS="${POS[1]:-100}"
SECONDS_RUN="${POS[2]:-30}"
for n in "$USERS" "$SECONDS_RUN" "$WORKERS"; do
    [[ "$n" =~ ^[0-9]+$ ]] || { echo "run.sh: not a number: $n" >&2; usage; }
done
case "$FILE" in
    */*|*.py) LOCUSTFILE="$FILE" ;;
    *) LOCUSTFILE="$HERE/$FILE.py" ;;
esac
[ -f "$LOCUSTFILE" ] || { echo "run.sh: no locustfile $LOCUSTFILE" >&2; exit 2; }
NAME="$(basename "$LOCUSTFILE" .py)"
# Default: every user started within about five seconds.
[ -n "$RATE" ] || RATE=$(( USERS / 5 > 10 ? USERS / 5 : 10 ))

# Each user holds sockets (and the server one per user): use the hard limit.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

OUT="$HERE/reports/$NAME-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

free_port() {
    "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

PIDS=()
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    # Stop what this script started, by pid: workers and master first, then the server.
    for ((i=${#PIDS[@]}-1; i>=0; i--)); do
        kill -TERM "${PIDS[i]}" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

PORT="$(free_port)"
HOST="http://127.0.0.1:$PORT"
CONN_CAP=$(( USERS * ${GSTREAM_STREAMS:-1} * 2 + 1000 ))
[ "$CONN_CAP" -ge 10000 ] || CONN_CAP=10000
if [ -n "${GSTREAM_SERVER_CMD:-}" ]; then
    SERVER_CMD="${GSTREAM_SERVER_CMD//\{port\}/$PORT}"
    bash -c "exec $SERVER_CMD" >"$OUT/server.log" 2>&1 &
else
    "$PY" -m gstream demo --port "$PORT" --no-ticker --max-connections "$CONN_CAP" \
        --log-level warning >"$OUT/server.log" 2>&1 &
fi
PIDS+=($!)
SERVER_PID=$!

echo ">> server on $HOST (log: $OUT/server.log)"
ready=0
for _ in $(seq 150); do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        echo "run.sh: the server exited:" >&2; cat "$OUT/server.log" >&2; exit 2
    fi
    if "$PY" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)" \
        "$HOST/healthz" 2>/dev/null; then ready=1; break; fi
    sleep 0.1
done
[ $ready -eq 1 ] || { echo "run.sh: the server did not answer $HOST/healthz in 15 s" >&2; exit 2; }

COMMON=(-f "$LOCUSTFILE" --host "$HOST")
RUN=(--headless -u "$USERS" -r "$RATE" -t "${SECONDS_RUN}s" --stop-timeout 5
     --html "$OUT/report.html" --csv "$OUT/stats" --only-summary
     --logfile "$OUT/locust.log" --loglevel INFO)
echo ">> locust $NAME: $USERS users, spawn rate $RATE/s, ${SECONDS_RUN} s, workers $WORKERS -> $OUT"
set +e
if [ "$WORKERS" -gt 0 ]; then
    MPORT="$(free_port)"
    "$PY" -m locust "${COMMON[@]}" "${RUN[@]}" --master --master-bind-host 127.0.0.1 \
        --master-bind-port "$MPORT" --expect-workers "$WORKERS" --expect-workers-max-wait 30 \
        > >(tee "$OUT/locust.out") 2>&1 &
    MASTER_PID=$!
    PIDS+=($MASTER_PID)
    for i in $(seq "$WORKERS"); do
        "$PY" -m locust "${COMMON[@]}" --worker --master-host 127.0.0.1 --master-port "$MPORT" \
            --logfile "$OUT/worker-$i.log" >"$OUT/worker-$i.out" 2>&1 &
        PIDS+=($!)
    done
    wait "$MASTER_PID"
    LOCUST_RC=$?
else
    "$PY" -m locust "${COMMON[@]}" "${RUN[@]}" 2>&1 | tee "$OUT/locust.out"
    LOCUST_RC=${PIPESTATUS[0]}
fi
set -e

# Locust exits 1 on any failure; check the CSV too, so a lost event is named.
status=$LOCUST_RC
if [ ! -f "$OUT/stats_stats.csv" ]; then
    echo "run.sh: Locust wrote no statistics" >&2
    status=1
else
    "$PY" - "$OUT" <<'EOF' || status=1
import csv, sys
out = sys.argv[1]
rows = list(csv.DictReader(open(f"{out}/stats_stats.csv")))
print(f"\n{'type':6} {'name':28} {'count':>9} {'fail':>6} {'med ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>9}")
for r in rows:
    print(f"{r['Type'][:6]:6} {r['Name'][:28]:28} {r['Request Count']:>9} {r['Failure Count']:>6} "
          f"{r['Median Response Time']:>8} {r['95%']:>8} {r['99%']:>8} {float(r['Max Response Time']):>9.1f}")
bad = 0
for r in csv.DictReader(open(f"{out}/stats_failures.csv")):
    print(f"FAILURE {r['Method']} {r['Name']}: {r['Error']} x{r['Occurrences']}", file=sys.stderr)
    bad += 1
missed = [r for r in rows if r["Name"].endswith(("missed", "duplicate")) and int(r["Request Count"])]
for r in missed:
    print(f"LOST/REPEATED EVENTS: {r['Type']} {r['Name']}: {r['Request Count']} reports", file=sys.stderr)
sys.exit(1 if bad or missed else 0)
EOF
fi
echo ">> report: $OUT/report.html (exit $status)"
exit $status
