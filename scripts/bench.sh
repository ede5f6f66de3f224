#!/usr/bin/env bash
# Runs the scenarios of BENCHMARKS.md back to back, pushgate then the baseline for each, and
# keeps every run's output in target/bench/ (one .txt per run; the JSON lines start with '{').
#
#   scripts/bench.sh [mission] [idle] [connect] [fanout] [deflate] [cross] [small] [history] [socketio] [scale]
#                                                          (default: all but socketio and scale)
#
# `mission` is the headline: Redis and two nodes, subscribers on both, publishers on the first,
# for client, API and backend (plain Redis PUBLISH) publishes, against the bare baseline server
# in the same run. MISSION_WORKERS sets each node's --workers (default 1: two nodes share the
# machine's two cores); MISSION_SUBS the subscriber counts (default "2000 10000"); MISSION_ROUNDS
# how many times each find-max runs, alternating pushgate and the baseline (default 1; the summary
# gives medians and each round's ratio); MISSION_VIAS the publish paths (default "ws http redis").
# MISSION_PARTS picks parts (default "idle findmax moderate one"); `steady` (not by default)
# holds STEADY_RATE msg/s (default 20) to MISSION_SUBS (default 10000) for four 5-second runs.
#
# `socketio` runs mission's 2,000-subscriber find-max and moderate load against Socket.IO with its
# Redis adapter, two Node.js processes (crates/bench/socketio/server.js), for comparison. It needs
# Node.js and npm (it runs `npm ci` there when node_modules is missing), hence not by default.
#
# `scale` holds 100,000 connections over 6 nodes for 10 minutes, then broadcasts, room traffic and
# a rolling restart (SCALE_NODES, SCALE_CONNECTIONS, SCALE_PROCS, SCALE_HOLD; see the case below).
# Each process may hold at most 20,000 open files here, so no node takes more than that.
#
# `shards` runs the same history-room traffic (SHARDS_RATE messages/s over 1,000 rooms, 10,000
# connections on two nodes) on one Redis and then on a local Redis Cluster (deploy/redis/cluster.sh:
# three primaries, three replicas), and reports each primary's share of the publishes and the
# Redis CPU per 1,000 messages. Not run by default.
#
# Run it on a quiet machine: the load generator and the servers share the cores.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --release --locked -p pushgate -p pushgate-bench
export PUSHGATE_JWT_SECRET=bench-secret PUSHGATE_API_KEY=bench-key PUSHGATE_LOG=warn
ulimit -n "$(ulimit -Hn)"
B=./target/release/pushgate-bench
G=${PUSHGATE_BIN:-./target/release/pushgate}
out=target/bench
mkdir -p "$out"
scenarios=("$@")
((${#scenarios[@]})) || scenarios=(mission idle connect fanout cross small history)

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 1 200); do curl -fsS "$1" >/dev/null 2>&1 && return; sleep 0.05; done; echo "no answer from $1" >&2; exit 1; }
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
node() { # node PORT [flags...]: starts a node, waits for /healthz, records its pid in NODE
  local port=$1; shift
  "$G" serve --listen "127.0.0.1:$port" --client-rate 100000 --client-burst 100000 "$@" &
  NODE=$!; pids+=("$NODE"); wait_http "http://127.0.0.1:$port/healthz"
}
run() { local name=$1; shift; echo "== $name: $*"; "$@" 2>&1 | tee "$out/$name.txt"; }
start_redis() { # start_redis: a fresh redis-server on a free port, its port in RP
  # A few tries: right after a large run, a "free" port can still be the local end of a socket
  # that is closing, and the bind fails.
  for _ in 1 2 3; do
    RP=$(free_port)
    redis-server --port "$RP" --save '' --appendonly no >/dev/null & pids+=($!)
    for _ in $(seq 1 100); do redis-cli -p "$RP" ping >/dev/null 2>&1 && return; sleep 0.05; done
  done
  echo "redis-server did not start" >&2; exit 1
}

for s in "${scenarios[@]}"; do
  case $s in
    mission)
      parts=" ${MISSION_PARTS:-idle findmax moderate one} "
      workers=(--workers "${MISSION_WORKERS:-1}")
      # find-max: the highest rate with zero loss, no refused publish, on pace, p99 < 250 ms.
      findmax=(--payload-size 100 --find-max --step-factor 1.25 --refine 3 --duration 5s --p99-bound 250ms)
      cluster() { # cluster: Redis and nodes n1, n2 (fresh), their URLs in URLS (n1 first)
        start_redis
        local flags=(--redis-url "redis://127.0.0.1:$RP/" "${workers[@]}")
        p1=$(free_port); node "$p1" --instance-id n1 "${flags[@]}"; n1=$NODE
        p2=$(free_port); node "$p2" --instance-id n2 "${flags[@]}"; n2=$NODE
        wait_http "http://127.0.0.1:$p1/readyz"; wait_http "http://127.0.0.1:$p2/readyz"
        URLS="ws://127.0.0.1:$p1/ws,ws://127.0.0.1:$p2/ws"
      }
      if [[ $parts == *" idle "* ]]; then
        # Idle memory with Redis: 5,000 connections on each of two fresh nodes, both held open.
        rm -f "$out"/mission-idle-*.txt
        cluster
        run mission-idle-n2 $B idle --url "ws://127.0.0.1:$p2/ws" --pid "$n2" -n 5000 -c 64 --hold 30s &
        idle2=$!
        run mission-idle-n1 $B idle --url "ws://127.0.0.1:$p1/ws" --pid "$n1" -n 5000 -c 64 --hold 10s
        wait "$idle2" || true
        cleanup; pids=()
      fi
      if [[ $parts == *" findmax "* ]]; then
        for subs in ${MISSION_SUBS:-2000 10000}; do
          rm -f "$out"/mission-"$subs"-*.txt
          # Where the search starts (the same for pushgate and the baseline). With 10,000
          # subscribers a 5-second step at a few msg/s holds only a few dozen bursts of 10,000
          # deliveries, so one slow burst fails the step and ends the search far below the
          # sustained rate; from 20 msg/s each step holds 100 or more.
          start=$(( subs >= 10000 ? 20 : 100 ))
          # Rounds alternate pushgate and the baseline; the summary takes the medians. One
          # search moves by half or more between runs at 10,000 subscribers.
          for round in $(seq 1 "${MISSION_ROUNDS:-1}"); do
            for via in ${MISSION_VIAS:-ws http redis}; do
              # One HTTP client waits for each response: several publish side by side.
              publishers=1; [[ $via == http ]] && publishers=8
              cluster
              run "mission-$subs-$via-$round" $B fanout --url "$URLS" -s "$subs" -p "$publishers" \
                --via "$via" --redis-url "redis://127.0.0.1:$RP/" -r "$start" "${findmax[@]}"
              cleanup; pids=()
            done
            run "mission-$subs-baseline-$round" $B baseline fanout -s "$subs" -p 1 -r "$start" "${findmax[@]}"
          done
        done
      fi
      if [[ $parts == *" moderate "* ]]; then
        # A moderate load, where latency is what matters: 25 msg/s to 2,000 subscribers, in
        # alternating rounds (single runs swing by several ms on two shared cores).
        rm -f "$out"/mission-moderate-*.txt "$out"/mission-moderate-*.metrics
        cluster
        # The nodes' own latency histograms around each run (delivery lag, Redis hop).
        scrape() { curl -fsS "http://127.0.0.1:$p1/metrics" >"$out/$1-n1.metrics"; curl -fsS "http://127.0.0.1:$p2/metrics" >"$out/$1-n2.metrics"; }
        for round in $(seq 1 "${MODERATE_ROUNDS:-3}"); do
          for via in ws http redis; do
            scrape "mission-moderate-$via-$round-before"
            run "mission-moderate-$via-$round" $B fanout --url "$URLS" -s 2000 -p 1 --via "$via" \
              --redis-url "redis://127.0.0.1:$RP/" -r 25 --payload-size 100 --duration 10s
            scrape "mission-moderate-$via-$round-after"
          done
          run "mission-moderate-baseline-$round" $B baseline fanout -s 2000 -p 1 -r 25 --payload-size 100 --duration 10s
        done
        cleanup; pids=()
      fi
      if [[ $parts == *" steady "* ]]; then
        # Latency at one rate (STEADY_RATE, 20 msg/s) to MISSION_SUBS (here 10,000) subscribers:
        # four 5-second runs on the same connections, alternating rounds as in findmax, for each
        # path on the two nodes, then client publishes on one node with both cores, then the
        # baseline. Where a search's p99 sits near its bound, whether a step passes is luck;
        # this shows the p99 itself.
        rm -f "$out"/mission-steady-*
        steady=(-r "${STEADY_RATE:-20}" --payload-size 100 --duration 5s --steps 4)
        for subs in ${MISSION_SUBS:-10000}; do
          for round in $(seq 1 "${MISSION_ROUNDS:-1}"); do
            for via in ${MISSION_VIAS:-ws http redis}; do
              publishers=1; [[ $via == http ]] && publishers=8
              cluster
              run "mission-steady-$subs-$via-$round" $B fanout --url "$URLS" -s "$subs" -p "$publishers" \
                --via "$via" --redis-url "redis://127.0.0.1:$RP/" "${steady[@]}"
              cleanup; pids=()
            done
            # The same on one node with both cores (--workers 2), every subscriber on it: what
            # splitting a burst over two single-worker processes costs the tail.
            start_redis
            p1=$(free_port); node "$p1" --instance-id single --redis-url "redis://127.0.0.1:$RP/" --workers 2
            wait_http "http://127.0.0.1:$p1/readyz"
            run "mission-steady-$subs-single-$round" $B fanout --url "ws://127.0.0.1:$p1/ws" -s "$subs" \
              -p 1 --via ws "${steady[@]}"
            cleanup; pids=()
            run "mission-steady-$subs-baseline-$round" $B baseline fanout -s "$subs" -p 1 "${steady[@]}"
          done
        done
      fi
      if [[ $parts == *" one "* ]]; then
        # One publishing connection, pipelined through Redis to a subscriber on each node.
        cluster
        run mission-one-connection $B fanout --url "$URLS" -s 2 -p 1 --via ws -r 2000 "${findmax[@]}" \
          --max-rate 200000
        cleanup; pids=()
      fi
      python3 scripts/mission_summary.py "$out" | tee "$out/mission-summary.txt" ;;
    scale)
      # SCALE_NODES nodes on one Redis (--workers 1 each), SCALE_CONNECTIONS connections over
      # SCALE_PROCS bench processes, each connection on its own user channel and one of 1,000
      # history rooms; held SCALE_HOLD, then broadcasts, room traffic, and room traffic through
      # a rolling restart of every node (scripts/rolling_restart.sh; each node drains over SCALE_DRAIN).
      nodes=${SCALE_NODES:-6} conns=${SCALE_CONNECTIONS:-100000} procs=${SCALE_PROCS:-6}
      per_node=$(( (conns + nodes - 1) / nodes ))
      state=$(mktemp -d)
      start_redis
      urls=()
      for i in $(seq 1 "$nodes"); do
        p=$(free_port)
        args=("$G" serve --listen "127.0.0.1:$p" --instance-id "n$i" --redis-url "redis://127.0.0.1:$RP/"
          --workers 1 --history 'room:*=1000/10m' --drain-period "${SCALE_DRAIN:-20s}" --max-connections "$((per_node + 100))")
        printf '%s\n' "${args[@]}" > "$state/n$i.args"
        echo "$p" > "$state/n$i.port"
        "${args[@]}" & echo $! > "$state/n$i.pid"
        wait_http "http://127.0.0.1:$p/readyz"
        urls+=("ws://127.0.0.1:$p/ws")
      done
      # Nodes the restart started are not this shell's children: stop them by their pid files.
      stop_nodes() { for f in "$state"/*.pid; do kill "$(cat "$f")" 2>/dev/null || true; done; }
      trap 'stop_nodes; cleanup; rm -rf "$state"' EXIT
      run scale $B scale --url "$(IFS=,; echo "${urls[*]}")" -n "$conns" --rooms 1000 \
        --procs "$procs" -c 256 --hold "${SCALE_HOLD:-10m}" --room-rate 200 \
        --room-duration 30s --during "bash scripts/rolling_restart.sh $state"
      stop_nodes; cleanup; pids=(); trap cleanup EXIT ;;
    shards)
      rate=${SHARDS_RATE:-1000} duration=${SHARDS_DURATION:-20s}
      redis_cpu() { # redis_cpu PORT: used_cpu_sys + used_cpu_user, seconds
        redis-cli -p "$1" INFO cpu | tr -d '\r' |
          awk -F: '/^used_cpu_(sys|user):/ { s += $2 } END { printf "%.3f", s }'
      }
      cluster_ports() { # the first of 6 free ports whose cluster bus ports (10,000 up) are free too
        python3 -c '
import socket
def free(p):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p)); return True
    except OSError:
        return False
    finally:
        s.close()
for base in range(20000, 50000, 10):
    if all(free(p) and free(p + 10000) for p in range(base, base + 6)):
        print(base); break'
      }
      fcalls() { # fcalls PORT: FCALLs served so far
        redis-cli -p "$1" INFO commandstats | tr -d '\r' |
          sed -n 's/^cmdstat_fcall:calls=\([0-9]*\).*/\1/p' | grep . || echo 0
      }
      for mode in single cluster; do
        state=$(mktemp -d)
        if [[ $mode == single ]]; then
          start_redis; ports=("$RP"); flags=(--redis-url "redis://127.0.0.1:$RP/")
        else
          base=$(cluster_ports)
          seeds=$(bash deploy/redis/cluster.sh up "$state" "$base" | sed -n 's/^PUSHGATE_REDIS_CLUSTER=//p')
          trap 'bash deploy/redis/cluster.sh down "$state"; cleanup' EXIT
          ports=($(seq "$base" $((base + 5)))); flags=(--redis-cluster "$seeds")
        fi
        urls=()
        for i in 1 2; do
          p=$(free_port)
          node "$p" --instance-id "n$i" --workers 1 --history 'room:*=1000/10m' "${flags[@]}"
          wait_http "http://127.0.0.1:$p/readyz"; urls+=("ws://127.0.0.1:$p/ws")
        done
        declare -A cpu0=() calls0=()
        for p in "${ports[@]}"; do cpu0[$p]=$(redis_cpu "$p"); calls0[$p]=$(fcalls "$p"); done
        run "shards-$mode" $B scale --url "$(IFS=,; echo "${urls[*]}")" -n 10000 --rooms 1000 \
          --procs 2 -c 256 --hold 2s --broadcasts 1 --room-rate "$rate" --room-duration "$duration"
        messages=$(sed -n 's/^scale: rooms: \([0-9]*\) messages.*/\1/p' "$out/shards-$mode.txt")
        total_calls=0 total_cpu=0
        for p in "${ports[@]}"; do
          c=$(( $(fcalls "$p") - ${calls0[$p]} ))
          total_calls=$((total_calls + c))
          total_cpu=$(echo "$total_cpu + $(redis_cpu "$p") - ${cpu0[$p]}" | bc)
        done
        {
          # The CPU covers the whole run: the connections' history reads at subscribe, the
          # broadcast and the room messages; the same work in both modes.
          echo "redis ($mode): $messages room messages, $total_calls FCALLs, Redis CPU ${total_cpu}s in all," \
            "$(echo "scale=1; 1000 * 1000 * $total_cpu / $messages" | bc) ms per 1,000 room messages"
          for p in "${ports[@]}"; do
            role=$(redis-cli -p "$p" INFO replication | tr -d '\r' | sed -n 's/^role://p')
            c=$(( $(fcalls "$p") - ${calls0[$p]} ))
            cpu=$(echo "$(redis_cpu "$p") - ${cpu0[$p]}" | bc)
            echo "  :$p $role: $c FCALL ($(( 100 * c / (total_calls > 0 ? total_calls : 1) ))%), CPU ${cpu}s"
          done
        } | tee -a "$out/shards-$mode.txt"
        cleanup; pids=()
        [[ $mode == cluster ]] && bash deploy/redis/cluster.sh down "$state"
        trap cleanup EXIT; rm -rf "$state"
      done ;;
    socketio)
      sio=crates/bench/socketio
      [[ -d $sio/node_modules ]] || (cd "$sio" && npm ci --no-audit --no-fund)
      rm -f "$out"/socketio-*.txt
      findmax=(--payload-size 100 --find-max --step-factor 1.25 --refine 3 --duration 5s --p99-bound 250ms)
      sio_cluster() { # sio_cluster: Redis and two fresh Socket.IO processes, their URLs in URLS
        start_redis
        URLS=
        for _ in 1 2; do
          local port; port=$(free_port)
          # `command`: this script's own node() starts a pushgate node.
          command node "$sio/server.js" "$port" "redis://127.0.0.1:$RP/" & pids+=($!)
          # It listens only once its Redis clients are connected.
          local up=
          for _ in $(seq 1 200); do
            (: >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && up=1 && break; sleep 0.05
          done
          [[ $up ]] || { echo "server.js on port $port did not start" >&2; exit 1; }
          URLS+=${URLS:+,}ws://127.0.0.1:$port
        done
      }
      sio_cluster
      run socketio-2000 $B socketio fanout --url "$URLS" -s 2000 -p 1 -r 10 "${findmax[@]}"
      cleanup; pids=()
      # The moderate load of mission: 25 msg/s to 2,000 subscribers.
      sio_cluster
      run socketio-moderate $B socketio fanout --url "$URLS" -s 2000 -p 1 -r 25 --payload-size 100 --duration 20s
      cleanup; pids=() ;;
    idle)
      p=$(free_port); node "$p"
      run idle-pushgate $B idle --url "ws://127.0.0.1:$p/ws" --pid "$NODE" -n 15000 -c 64
      kill "$NODE"; wait "$NODE" 2>/dev/null || true
      # The same with permessage-deflate negotiated on every connection.
      p=$(free_port); node "$p"
      PUSHGATE_BENCH_DEFLATE=offer run idle-pushgate-deflate $B idle --url "ws://127.0.0.1:$p/ws" \
        --pid "$NODE" -n 15000 -c 64
      kill "$NODE"; wait "$NODE" 2>/dev/null || true
      run idle-baseline $B baseline idle -n 15000 -c 64 ;;
    connect)
      p=$(free_port); node "$p"
      run connect-pushgate $B connect --url "ws://127.0.0.1:$p/ws" -c 64 --duration 10s
      PUSHGATE_BENCH_DEFLATE=offer run connect-pushgate-deflate $B connect \
        --url "ws://127.0.0.1:$p/ws" -c 64 --duration 10s
      kill "$NODE"; wait "$NODE" 2>/dev/null || true
      run connect-baseline $B baseline connect -c 64 --duration 10s ;;
    fanout)
      # Two servers and the load generator share two cores, so single runs swing by ±20 %:
      # alternate pushgate and the baseline, round by round, and compare the medians.
      # Saturated: 1,000 messages offered at 250/s, faster than either delivers (the backlog
      # stays under both servers' 1,024-frame queues); deliveries/s = received / time to the last.
      saturated=(-s 10000 -p 1 --payload-size 100 -r 250 --duration 4s)
      # Find-max: the highest rate with zero loss and p99 <= 500 ms.
      findmax=(-s 10000 -p 1 --payload-size 100 --find-max -r "${FANOUT_START:-60}" --step-factor 1.2
        --refine 2 --duration 5s --p99-bound 500ms)
      rm -f "$out"/fanout-*.txt
      for round in $(seq 1 "${FANOUT_ROUNDS:-5}"); do
        p=$(free_port); node "$p"
        run "fanout-saturated-pushgate-$round" $B fanout --url "ws://127.0.0.1:$p/ws" "${saturated[@]}"
        kill "$NODE"; wait "$NODE" 2>/dev/null || true
        run "fanout-saturated-baseline-$round" $B baseline fanout "${saturated[@]}"
      done
      for round in $(seq 1 "${FANOUT_FINDMAX_ROUNDS:-3}"); do
        p=$(free_port); node "$p"
        run "fanout-findmax-pushgate-$round" $B fanout --url "ws://127.0.0.1:$p/ws" "${findmax[@]}"
        kill "$NODE"; wait "$NODE" 2>/dev/null || true
        run "fanout-findmax-baseline-$round" $B baseline fanout "${findmax[@]}"
      done
      python3 scripts/fanout_summary.py "$out" | tee "$out/fanout-summary.txt" ;;
    deflate)
      # Fan-out with permessage-deflate on every subscriber (which inflates every message)
      # against the same without, round by round: 10,000 subscribers, a backlog drained at
      # full speed as in fanout.
      saturated=(-s 10000 -p 1 --payload-size "${DEFLATE_PAYLOAD:-100}" -r 250 --duration 4s)
      rm -f "$out"/deflate-*.txt
      for round in $(seq 1 "${DEFLATE_ROUNDS:-3}"); do
        for mode in plain inflate; do
          p=$(free_port); node "$p"
          # The node's own CPU time (user + system, in clock ticks) over the run.
          before=$(awk '{print $14 + $15}' "/proc/$NODE/stat")
          # `plain` is not a value the bench knows: it offers no deflate.
          PUSHGATE_BENCH_DEFLATE=$mode run "deflate-$mode-$round" $B fanout \
            --url "ws://127.0.0.1:$p/ws" "${saturated[@]}"
          after=$(awk '{print $14 + $15}' "/proc/$NODE/stat")
          echo "node cpu ticks: $((after - before)) (of $(getconf CLK_TCK)/s)" | tee -a "$out/deflate-$mode-$round.txt"
          curl -fsS "http://127.0.0.1:$p/metrics" | grep -E '^pushgate_(message_compressions|deliveries)_total' \
            | tee -a "$out/deflate-$mode-$round.txt"
          kill "$NODE"; wait "$NODE" 2>/dev/null || true
        done
      done
      for f in "$out"/deflate-*-[0-9]*.txt; do
        printf '%s deliveries/s %s, %s\n' "$(basename "$f" .txt)" \
          "$(grep -o '"deliveries_per_sec":[0-9.]*' "$f" | tail -1 | cut -d: -f2)" \
          "$(grep -o 'node cpu ticks: [0-9]*' "$f")"
      done | tee "$out/deflate-summary.txt" ;;
    cross|small|history)
      rp=$(free_port)
      redis-server --port "$rp" --save '' --appendonly no >/dev/null & pids+=($!)
      for _ in $(seq 1 100); do redis-cli -p "$rp" ping >/dev/null 2>&1 && break; sleep 0.05; done
      flags=(--redis-url "redis://127.0.0.1:$rp/" --history 'hist:*=1000/10m')
      p1=$(free_port); node "$p1" --instance-id n1 "${flags[@]}"; n1=$NODE
      p2=$(free_port); node "$p2" --instance-id n2 "${flags[@]}"; n2=$NODE
      wait_http "http://127.0.0.1:$p1/readyz"; wait_http "http://127.0.0.1:$p2/readyz"
      urls="ws://127.0.0.1:$p1/ws,ws://127.0.0.1:$p2/ws"
      case $s in
        cross)
          rate=${CROSS_RATE:-50}
          run cross-ws $B fanout --url "$urls" -s 10000 -p 2 --payload-size 100 -r "$rate" --duration 10s
          run cross-redis $B fanout --url "$urls" -s 10000 -p 1 --payload-size 100 -r "$rate" --duration 10s \
            --via redis --redis-url "redis://127.0.0.1:$rp/"
          run cross-http $B fanout --url "$urls" -s 10000 -p 2 --payload-size 100 -r "$rate" --duration 10s --via http
          kill "$n1" "$n2"
          run cross-baseline $B baseline fanout -s 10000 -p 2 --payload-size 100 -r "$rate" --duration 10s ;;
        small)
          run small-pushgate $B fanout --url "$urls" -s 20 -p 2 --payload-size 100 -r 1000 --duration 10s
          kill "$n1" "$n2"
          run small-baseline $B baseline fanout -s 20 -p 2 --payload-size 100 -r 1000 --duration 10s ;;
        history)
          run history-plain $B fanout --url "$urls" -s 20 -p 2 --payload-size 100 -r 1000 --duration 10s --channel plain:bench
          run history-channel $B fanout --url "$urls" -s 20 -p 2 --payload-size 100 -r 1000 --duration 10s --channel hist:bench
          used() { redis-cli -p "$rp" info memory | sed -n 's/^used_memory:\([0-9]*\).*/\1/p'; }
          before=$(used)
          for i in $(seq 1 1000); do
            echo "FCALL pushgate_publish 2 pushgate:history:hist:mem pushgate:meta:hist:mem pushgate:ch:hist:mem '{\"data\":\"$(printf 'x%.0s' $(seq 1 88))\"}' 1000 600000"
          done | redis-cli -p "$rp" >/dev/null
          after=$(used)
          echo "redis memory for 1000 retained 100-byte messages: $((after - before)) bytes" | tee "$out/history-memory.txt"
          kill "$n1" "$n2" ;;
      esac
      cleanup; pids=() ;;
    *) echo "unknown scenario $s" >&2; exit 2 ;;
  esac
done
