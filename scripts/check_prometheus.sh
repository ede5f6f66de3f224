#!/usr/bin/env bash
# Checks pushgate's monitoring files: deploy/prometheus/prometheus.yml, the alerting rules
# deploy/prometheus/alerts.yml with their unit tests alerts_test.yml, and the Grafana dashboard
# deploy/grafana/pushgate.json.
#
#     scripts/check_prometheus.sh                      # static checks
#     scripts/check_prometheus.sh HOST:PORT [...]      # static checks, then against live nodes
#
# Static checks (promtool, python3):
#   - `promtool check config deploy/prometheus/prometheus.yml` (which also checks the rule file
#     it loads), `promtool check rules deploy/prometheus/alerts.yml`,
#     `promtool test rules deploy/prometheus/alerts_test.yml`;
#   - the dashboard is valid JSON, every panel query uses only variables the dashboard defines;
#   - every metric name in alerts.yml and in the dashboard is in the metrics table of
#     docs/protocol.md (or is Prometheus's `up`), and every label value they match on a label
#     whose values the table lists (reason, source, result) is one of those values.
#
# Live checks, given the addresses of running pushgate nodes that serve plain HTTP (HOST:PORT;
# a URL such as http://HOST:PORT/metrics is accepted too):
#   1. each node's /metrics must answer; then the script makes four refused WebSocket handshakes
#      per node (no token, a malformed token, an `alg: none` token, a token signed with a random
#      key), so that pushgate_auth_failures_total, whose series a node creates on the first
#      failure of each reason, exists;
#   2. it starts a Prometheus of its own on a free port of 127.0.0.1 (data in a temporary
#      directory) that scrapes the nodes every second as job="pushgate" and loads alerts.yml;
#      waits until every target is up and has been scraped at least 5 times, and until every
#      rule has been evaluated; any rule whose evaluation failed (health "err") fails the check;
#   3. every metric name used by alerts.yml or by the dashboard must be exported by the nodes;
#   4. alert expressions (read back from Prometheus's /api/v1/rules, so exactly what alerts.yml
#      loaded): the whole expression must evaluate without error (alerts are usually quiet, so
#      it may be empty). When its top level is a comparison (`A > 0.8`, `A < B`), each operand is
#      evaluated on its own and must return data: that is the metric side of the alert, and it
#      being empty means a wrong name, label value or window. Exception: an operand that reads
#      only families whose series appear on their first event (pushgate_auth_failures_total, for
#      the reasons step 1 cannot produce without the nodes' key: expired, issuer, ...) needs only
#      to evaluate without error. Expressions without a top-level comparison (absent(...)) need
#      only to evaluate without error;
#   5. dashboard queries: Grafana's variables are replaced first ($instance and other "All"
#      variables by their allValue or `.*`, query variables by the first value their
#      label_values(...) query finds, which must find one; textbox, custom and constant variables
#      by their current value; $__rate_interval, $__interval by 1m, $__range by 5m); then every
#      query must evaluate without error and return at least one series.
#   Firing and pending alerts are listed for information.
#
# The Prometheus started here is stopped, and its directory removed, on exit (also on failure
# or Ctrl-C). Every wait is bounded by CHECK_TIMEOUT seconds (default 60).
#
# Needs promtool and prometheus (Debian: `apt-get install prometheus`; the package may start a
# system Prometheus on :9090, which this script does not use: `service prometheus stop`),
# python3 and curl. PROMTOOL and PROMETHEUS override the binaries.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

PROMTOOL=${PROMTOOL:-promtool}
PROMETHEUS=${PROMETHEUS:-prometheus}
TIMEOUT=${CHECK_TIMEOUT:-60}
CONFIG=deploy/prometheus/prometheus.yml
RULES=deploy/prometheus/alerts.yml
TESTS=deploy/prometheus/alerts_test.yml
DASHBOARD=deploy/grafana/pushgate.json
DOCS=docs/protocol.md
JOB=pushgate

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

targets=()
for arg in "$@"; do
  case "$arg" in
    -h | --help) usage; exit 0 ;;
    -*) echo "check_prometheus: unknown option $arg (see --help)" >&2; exit 2 ;;
    *)
      t=${arg#http://}
      t=${t%%/*}
      [[ "$t" == *:* ]] || { echo "check_prometheus: $arg is not HOST:PORT" >&2; exit 2; }
      targets+=("$t")
      ;;
  esac
done

need=()
command -v "$PROMTOOL" >/dev/null 2>&1 || need+=("promtool ($PROMTOOL)")
command -v python3 >/dev/null 2>&1 || need+=(python3)
if ((${#targets[@]})); then
  command -v "$PROMETHEUS" >/dev/null 2>&1 || need+=("prometheus ($PROMETHEUS)")
  command -v curl >/dev/null 2>&1 || need+=(curl)
fi
if ((${#need[@]})); then
  echo "check_prometheus: missing ${need[*]}; on Debian: apt-get install prometheus python3 curl" >&2
  exit 2
fi

step() { printf '\n== %s\n' "$*"; }

# --- Static checks ---------------------------------------------------------------------------
step "promtool check config $CONFIG"
"$PROMTOOL" check config "$CONFIG"
step "promtool check rules $RULES"
"$PROMTOOL" check rules "$RULES"
step "promtool test rules $TESTS"
"$PROMTOOL" test rules "$TESTS"

# The static checks of names and the live evaluation, in one helper:
# `lint DASHBOARD RULES DOCS` or `live DASHBOARD RULES PROMETHEUS_URL JOB`.
dashcheck() {
  python3 - "$@" <<'PY'
import json
import re
import sys
import urllib.error
import urllib.parse
import urllib.request

mode, dashboard_path = sys.argv[1], sys.argv[2]
dash = json.load(open(dashboard_path))

# Families whose series a node creates on the first event (one per label value), so that a
# healthy node may have none for a given label value.
LAZY = {"pushgate_auth_failures_total"}
BUILTINS = {"__rate_interval": "1m", "__interval": "1m", "__range": "5m"}
VAR_RE = re.compile(r"\$\{(\w+)(?::[\w]+)?\}|\$(\w+)|\[\[(\w+)\]\]")
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
            "and", "or", "unless", "inf", "nan"}


def panels(items):
    for p in items:
        yield p
        yield from panels(p.get("panels", []))


def queries():
    for p in panels(dash.get("panels", [])):
        for t in p.get("targets", []):
            if t.get("expr"):
                yield p.get("title", "?"), t.get("refId", "?"), t["expr"]


variables = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
failures = []


def fail(msg):
    failures.append(msg)
    print("FAIL  " + msg)


def var_names(expr):
    return [next(g for g in m.groups() if g) for m in VAR_RE.finditer(expr)]


def metric_names(expr):
    """The metric names an expression reads (all of pushgate's are plain identifiers)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    s = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w:.$])([a-zA-Z_:][\w:]*)(\s*\()?", s):
        if m.group(2) or m.group(1) in KEYWORDS:
            continue
        names.add(m.group(1))
    return names


def split_comparison(expr):
    """(left, op, right) of a comparison at the top level of expr, else None."""
    depth, i, n = 0, 0, len(expr)
    while i < n:
        c = expr[i]
        if c in "\"'`":
            j = i + 1
            while j < n and expr[j] != c:
                j += 2 if expr[j] == "\\" and c != "`" else 1
            i = j + 1
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0:
            for op in ("==", "!=", ">=", "<=", ">", "<"):
                if expr.startswith(op, i):
                    right = expr[i + len(op):]
                    right = re.sub(r"^\s*(bool\b)?\s*((on|ignoring)\s*\([^)]*\))?\s*"
                                   r"((group_left|group_right)\s*(\([^)]*\))?)?", "", right)
                    return expr[:i].strip(), op, right.strip()
        i += 1
    return None


def alert_exprs(path):
    """The expr of every rule in a rules file (PyYAML when installed, else one-line exprs)."""
    try:
        import yaml
    except ImportError:
        return [m.group(1).strip().strip("'\"") for m in
                re.finditer(r"^\s*expr:\s*(.+)$", open(path).read(), re.M)]
    doc = yaml.safe_load(open(path))
    return [str(r["expr"]) for g in doc["groups"] for r in g["rules"]]


def documented_metrics(path):
    """{name: {label: {values}}} from the table of docs/protocol.md, "Metrics"."""
    text = open(path).read().split("\n## Metrics", 1)[1]
    out = {}
    for m in re.finditer(r"^\|\s*`([a-z_:]+)`\s*\|\s*(\w+)\s*\|([^|]*)\|", text, re.M):
        name, kind, cell = m.groups()
        labels = {lm.group(1): set(re.findall(r"`([^`]+)`", lm.group(2)))
                  for lm in re.finditer(r"`(\w+)`:\s*((?:`[^`]+`,?\s*)+)", cell)}
        for suffix in ("", "_bucket", "_sum", "_count") if kind == "histogram" else ("",):
            out[name + suffix] = labels
    return out


def check_against_docs(where, expr, docs):
    """Metric names and label values of expr must be documented (`up` is Prometheus's own)."""
    for name in metric_names(VAR_RE.sub("1", expr)):
        if name not in docs and name != "up":
            fail(f"{where}: metric {name} is not in docs/protocol.md, Metrics: {expr}")
    for sel in re.finditer(r"([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}", expr):
        labels = docs.get(sel.group(1), {})
        for lm in re.finditer(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', sel.group(2)):
            label, op, value = lm.groups()
            if label not in labels or "$" in value:
                continue
            values = value.split("|") if op in ("=~", "!~") else [value]
            for v in values:
                if v not in labels[label]:
                    fail(f"{where}: {sel.group(1)} has no {label} {v!r} "
                         f"(documented: {', '.join(sorted(labels[label]))})")


if mode == "lint":
    rules_path, docs_path = sys.argv[3], sys.argv[4]
    docs = documented_metrics(docs_path)
    exprs = alert_exprs(rules_path)
    for expr in exprs:
        check_against_docs(f"{rules_path}", expr, docs)
    count = 0
    for title, ref, expr in queries():
        count += 1
        for name in var_names(expr):
            if name not in variables and name not in BUILTINS:
                fail(f"dashboard panel {title!r} {ref}: unknown variable ${name} in {expr}")
        check_against_docs(f"dashboard panel {title!r} {ref}", expr, docs)
    for v in variables.values():
        q = v.get("query")
        q = q.get("query", "") if isinstance(q, dict) else (q or "")
        for name in var_names(q):
            if name not in variables:
                fail(f"dashboard variable {v['name']}: unknown variable ${name} in {q}")
    if not count:
        fail("dashboard has no panel queries")
    if "instance" not in variables:
        fail("dashboard has no instance variable")
    if failures:
        sys.exit(1)
    print(f"{rules_path}: {len(exprs)} expressions; {dashboard_path}: {count} panel queries, "
          f"variables {', '.join(variables)}; metric names and label values as documented in "
          f"{docs_path}: OK")
    sys.exit(0)

# --- live ------------------------------------------------------------------------------------
rules_path, base, job = sys.argv[3], sys.argv[4], sys.argv[5]


def api(path, params=None):
    url = base + path
    if params:
        url += "?" + urllib.parse.urlencode(params, doseq=True)
    try:
        with urllib.request.urlopen(url, timeout=15) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        try:
            return json.load(e)
        except ValueError:
            return {"status": "error", "error": f"HTTP {e.code}"}


def evaluate(expr):
    """(number of series, or None on error; error text)."""
    body = api("/api/v1/query", {"query": expr})
    if body.get("status") != "success":
        return None, body.get("error", json.dumps(body))
    data = body["data"]
    if data["resultType"] in ("vector", "matrix"):
        return len(data["result"]), ""
    return 1, ""  # scalar or string


exported = set(api("/api/v1/label/__name__/values", {"match[]": f'{{job="{job}"}}'})["data"])
print(f"metrics exported by the nodes: {len(exported)}")

# Every metric name used must exist.
used = {}
rules = [r for g in api("/api/v1/rules")["data"]["groups"] for r in g["rules"]]
for r in rules:
    for name in metric_names(r["query"]):
        used.setdefault(name, set()).add(f"alert {r['name']}")
for title, ref, expr in queries():
    for name in metric_names(VAR_RE.sub("1", expr)):
        used.setdefault(name, set()).add(f"panel {title!r}")
for name, where in sorted(used.items()):
    if name not in exported:
        fail(f"metric {name} (used by {', '.join(sorted(where))}) is not exported by the nodes")

# Alert rules as Prometheus loaded them.
declared = sum(1 for line in open(rules_path) if re.match(r"\s*- (alert|record):", line))
if len(rules) != declared:
    fail(f"Prometheus loaded {len(rules)} rules, {rules_path} declares {declared}")
for r in rules:
    name, expr = r["name"], r["query"]
    if r.get("health") != "ok":
        fail(f"alert {name}: rule health {r.get('health')}: {r.get('lastError', '')}")
    n, err = evaluate(expr)
    if n is None:
        fail(f"alert {name}: {err}: {expr}")
        continue
    parts = split_comparison(expr)
    if parts is None:
        print(f"ok    alert {name}: {n} series (no comparison: evaluated only)")
        continue
    left, op, right = parts
    notes = []
    for side, operand in (("left", left), ("right", right)):
        m, err = evaluate(operand)
        if m is None:
            fail(f"alert {name}: {side} operand: {err}: {operand}")
        elif m == 0:
            names = metric_names(operand)
            if names and names <= LAZY and names <= exported:
                notes.append(f"{side} empty (no such event yet)")
            else:
                fail(f"alert {name}: {side} operand returns no data: {operand}")
        else:
            notes.append(f"{side} {m}")
    print(f"ok    alert {name}: {n} series match now; operands of {op!r}: {', '.join(notes)}")

# Dashboard variables, then panel queries.
values = dict(BUILTINS)


def substitute(expr):
    return VAR_RE.sub(lambda m: values[next(g for g in m.groups() if g)], expr)


for v in dash.get("templating", {}).get("list", []):
    name, kind = v["name"], v.get("type")
    if kind == "datasource":
        values[name] = ""
    elif v.get("includeAll") and kind == "query":
        values[name] = v.get("allValue") or ".*"
    elif kind == "query":
        q = v.get("query")
        q = q.get("query", "") if isinstance(q, dict) else q
        q = substitute(q)
        m = re.fullmatch(r"\s*label_values\((?:(.*),)?\s*(\w+)\s*\)\s*", q)
        if not m:
            fail(f"dashboard variable {name}: cannot evaluate {q}")
            values[name] = ".*"
            continue
        match, label = m.group(1), m.group(2)
        params = {"match[]": match.strip()} if match else None
        found = api(f"/api/v1/label/{label}/values", params).get("data") or []
        if not found:
            fail(f"dashboard variable {name}: {q} finds no value")
            values[name] = ".*"
        else:
            values[name] = found[0]
            print(f"ok    variable {name}: {q} -> {found}")
    else:
        cur = v.get("current", {}).get("value", v.get("query", ""))
        values[name] = cur[0] if isinstance(cur, list) else str(cur)

for title, ref, expr in queries():
    q = substitute(expr)
    n, err = evaluate(q)
    if n is None:
        fail(f"panel {title!r} {ref}: {err}: {q}")
    elif n == 0:
        fail(f"panel {title!r} {ref}: no data: {q}")
    else:
        print(f"ok    panel {title!r} {ref}: {n} series")

alerts = api("/api/v1/alerts")["data"]["alerts"]
for a in alerts:
    labels = a["labels"]
    print(f"info  {a['state']} alert {labels.get('alertname')} on {labels.get('instance', '-')}")
if failures:
    print(f"\n{len(failures)} failure(s)")
    sys.exit(1)
print("\nall alert expressions and dashboard queries evaluate")
PY
}

step "metric names and dashboard variables"
dashcheck lint "$DASHBOARD" "$RULES" "$DOCS"

if ((${#targets[@]} == 0)); then
  step "static checks passed (give node addresses to check against live nodes)"
  exit 0
fi

# --- Live checks -----------------------------------------------------------------------------
tmp=$(mktemp -d "${TMPDIR:-/tmp}/check_prometheus.XXXXXX")
prom_pid=""
cleanup() {
  if [[ -n "$prom_pid" ]] && kill -0 "$prom_pid" 2>/dev/null; then
    kill "$prom_pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$prom_pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$prom_pid" 2>/dev/null || true
    wait "$prom_pid" 2>/dev/null || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# until_ok DESCRIPTION COMMAND...: runs COMMAND every second until it succeeds, for at most
# CHECK_TIMEOUT seconds.
until_ok() {
  local what=$1 deadline=$((SECONDS + TIMEOUT))
  shift
  until "$@"; do
    if ((SECONDS >= deadline)); then
      echo "check_prometheus: timed out after ${TIMEOUT}s waiting for $what" >&2
      [[ -f "$tmp/prometheus.log" ]] && tail -n 20 "$tmp/prometheus.log" >&2
      return 1
    fi
    if [[ -n "$prom_pid" ]] && ! kill -0 "$prom_pid" 2>/dev/null; then
      echo "check_prometheus: prometheus exited" >&2
      tail -n 20 "$tmp/prometheus.log" >&2
      return 1
    fi
    sleep 1
  done
}

step "nodes: ${targets[*]}"
# Tokens refused for four different reasons: missing, malformed, algorithm, signature.
read -r tok_none tok_foreign < <(python3 - <<'PY'
import base64, hashlib, hmac, json, os, time
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
claims = b64(json.dumps({"sub": "check-prometheus", "exp": int(time.time()) + 600}).encode())
none = b64(b'{"alg":"none","typ":"JWT"}') + "." + claims + "."
head = b64(b'{"alg":"HS256","typ":"JWT"}') + "." + claims
sig = b64(hmac.new(os.urandom(32), head.encode(), hashlib.sha256).digest())
print(none, head + "." + sig)
PY
)
for t in "${targets[@]}"; do
  if ! curl -fsS --max-time 5 -o /dev/null "http://$t/metrics"; then
    echo "check_prometheus: http://$t/metrics does not answer" >&2
    exit 1
  fi
  for query in "" "?token=not-a-jwt" "?token=$tok_none" "?token=$tok_foreign"; do
    code=$(curl -s --max-time 5 -o /dev/null -w '%{http_code}' "http://$t/ws$query" || true)
    if [[ "$code" != 401 ]]; then
      echo "check_prometheus: a handshake with a bad token got $code from $t, not 401" >&2
      exit 1
    fi
  done
  echo "$t: /metrics answers; 4 refused handshakes made"
done

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
base="http://127.0.0.1:$port"
{
  echo "global:"
  echo "  scrape_interval: 1s"
  echo "  scrape_timeout: 1s"
  echo "  evaluation_interval: 1s"
  echo "rule_files:"
  echo "  - $ROOT/$RULES"
  echo "scrape_configs:"
  echo "  - job_name: $JOB"
  echo "    static_configs:"
  echo "      - targets:"
  for t in "${targets[@]}"; do echo "          - \"$t\""; done
} >"$tmp/prometheus.yml"
"$PROMTOOL" check config "$tmp/prometheus.yml" >/dev/null

step "prometheus on $base"
"$PROMETHEUS" --config.file="$tmp/prometheus.yml" --storage.tsdb.path="$tmp/data" \
  --web.listen-address="127.0.0.1:$port" --log.level=warn >"$tmp/prometheus.log" 2>&1 &
prom_pid=$!

ready() { curl -fs --max-time 2 -o /dev/null "$base/-/ready"; }
until_ok "prometheus to be ready" ready

targets_up() {
  curl -fs --max-time 5 "$base/api/v1/targets?state=active" | python3 -c '
import json, sys
want = int(sys.argv[1])
targets = json.load(sys.stdin)["data"]["activeTargets"]
up = [t for t in targets if t["health"] == "up"]
sys.exit(0 if len(targets) == want and len(up) == want else 1)' "${#targets[@]}"
}
until_ok "every target to be up" targets_up

# Five scrapes of each node, so that rate() over 1m has samples; then every rule evaluated.
scraped() {
  curl -fs --max-time 5 "$base/api/v1/query" \
    --data-urlencode "query=min(count_over_time(up{job=\"$JOB\"}[1m])) >= 5" |
    python3 -c 'import json, sys; sys.exit(0 if json.load(sys.stdin)["data"]["result"] else 1)'
}
until_ok "five scrapes of each node" scraped
evaluated() {
  curl -fs --max-time 5 "$base/api/v1/rules" | python3 -c '
import json, sys
rules = [r for g in json.load(sys.stdin)["data"]["groups"] for r in g["rules"]]
sys.exit(0 if rules and all(r["health"] != "unknown" for r in rules) else 1)'
}
until_ok "every rule to be evaluated" evaluated
echo "targets up and scraped, rules evaluated"

step "alert expressions and dashboard queries"
dashcheck live "$DASHBOARD" "$RULES" "$base" "$JOB"
