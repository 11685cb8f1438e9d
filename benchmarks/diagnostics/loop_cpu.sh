#!/usr/bin/env bash
# CPU of a server's event-loop thread (its main thread) per request, over one wrk run: steadier than req/s on a
# noisy VM. Usage: loop_cpu.sh PID URL WRK_LUA_SCRIPT [SECONDS] [CONNECTIONS]
#   e.g. loop_cpu.sh "$(pgrep -f 'serve-dispatcher --port 9201')" http://127.0.0.1:9201/route/ body.lua 5
set -euo pipefail
pid=$1 url=$2 lua=$3 seconds=${4:-5} connections=${5:-32}
ticks() { awk '{print $14 + $15}' "$1"; }  # utime + stime, in clock ticks
loop0=$(ticks "/proc/$pid/task/$pid/stat") all0=$(ticks "/proc/$pid/stat")
out=$(wrk -t1 -c"$connections" -d"${seconds}s" -s "$lua" "$url")
loop1=$(ticks "/proc/$pid/task/$pid/stat") all1=$(ticks "/proc/$pid/stat")
requests=$(awk '/requests in/ {print $1}' <<<"$out")
rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
hz=$(getconf CLK_TCK)
python3 -c "print(f'req/s={float($rps):.0f} loop_us_per_req={($loop1 - $loop0) / $hz / $requests * 1e6:.1f} \
process_us_per_req={($all1 - $all0) / $hz / $requests * 1e6:.1f}')"
