//! The deploy files agree with the gateway and with each other.
//!
//! The source of truth for configuration names is `crates/gateway/src/config.rs`, read as text:
//! every `env = "PUSHGATE_..."` of a `serve` flag, with its default. Against it this checks
//! `docker-compose.yml`, every manifest in `deploy/k8s/`, the systemd unit, the example
//! environment files and the `Dockerfile`; and it checks that the nginx configuration lists the
//! compose nodes, renders from its template, passes `nginx -t`, and proxies `wss://` (and the
//! API and admin console over `https://`) to a real node with certificates from
//! `deploy/tls/make-certs.sh`; and that the nodes trust nginx, and only nginx, for client
//! addresses (`PUSHGATE_TRUSTED_PROXIES`), through real nginx too.
//!
//! The helpers to run nginx and make certificates live in the test kit (`tests/src/lib.rs`),
//! shared with the failure tests (`failover.rs`).
//!
//! Tools that may be missing on a developer machine (nginx, openssl, curl, kubectl) skip their
//! test with a note; under CI (`CI` set) a missing nginx, openssl or curl fails it instead,
//! since the test command installs them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use pushgate_tests::{
    API_KEY, Nginx, NodeProcess, Scratch, WAIT, free_port, make_certs, render_nginx, repo_root,
    run, test_nginx_vars, token, tool,
};
use serde_yaml_ng::Value;

// ---------------------------------------------------------------------------------------------
// Files and the gateway's configuration
// ---------------------------------------------------------------------------------------------

fn root() -> PathBuf {
    repo_root()
}

fn read(rel: &str) -> String {
    let path = root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The environment variables of `pushgate serve`, each with its default value (as written in
/// the source: `"25s"`, `100_000`, ...), read from the `#[arg(...)]` attributes of `ServeArgs`
/// in config.rs and of the structs it flattens. `PUSHGATE_LOG`, read by main.rs for the log
/// filter, is included without a default.
fn env_vars() -> BTreeMap<String, Option<String>> {
    let source = read("crates/gateway/src/config.rs");
    let mut vars = BTreeMap::new();
    let mut structs = vec!["ServeArgs".to_owned()];
    while let Some(name) = structs.pop() {
        let body = block(&source, &format!("pub struct {name}"));
        for attr in body.split("#[arg(").skip(1) {
            let attr = attr.split(")]").next().unwrap_or(attr);
            let Some(name) = quoted_after(attr, "env = ") else {
                continue;
            };
            let default = quoted_after(attr, "default_value = ").or_else(|| {
                let rest = attr.split("default_value_t = ").nth(1)?;
                let end = rest.find(',').unwrap_or(rest.len());
                Some(rest[..end].trim().to_owned())
            });
            vars.insert(name, default);
        }
        // `#[command(flatten)] pub jwt: JwtArgs,` brings in JwtArgs' flags.
        for field in body.split("#[command(flatten)]").skip(1) {
            let ty = field
                .split(':')
                .nth(1)
                .and_then(|rest| rest.split(',').next())
                .map(str::trim)
                .unwrap_or_else(|| panic!("a flattened field in {name}"));
            structs.push(ty.to_owned());
        }
    }
    let main = read("crates/gateway/src/main.rs");
    for part in main.split("from_env(").skip(1) {
        if let Some(name) = quoted_after(part, "").filter(|n| n.starts_with("PUSHGATE_")) {
            vars.insert(name, None);
        }
    }
    assert!(
        vars.len() > 20 && vars.keys().all(|k| k.starts_with("PUSHGATE_")),
        "parsing config.rs went wrong: {vars:?}"
    );
    vars
}

/// The string literal right after `prefix` in `text`.
fn quoted_after(text: &str, prefix: &str) -> Option<String> {
    let start = text.find(&format!("{prefix}\""))? + prefix.len() + 1;
    let len = text[start..].find('"')?;
    Some(text[start..start + len].to_owned())
}

/// A duration as pushgate, nginx, compose and systemd write them: `25s`, `500ms`, `10m`, `1h`,
/// `1m30s`, or plain seconds.
fn duration(text: &str) -> Duration {
    let text = text.trim().trim_matches('"');
    if let Ok(secs) = text.parse::<u64>() {
        return Duration::from_secs(secs);
    }
    let mut total = Duration::ZERO;
    let mut number = String::new();
    let mut chars = text.chars().filter(|c| !c.is_whitespace()).peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let value: u64 = number
            .parse()
            .unwrap_or_else(|_| panic!("duration {text:?}"));
        number.clear();
        let unit = match (c, chars.peek()) {
            ('m', Some('s')) => {
                chars.next();
                Duration::from_millis(1)
            }
            ('s', _) => Duration::from_secs(1),
            ('m', _) => Duration::from_secs(60),
            ('h', _) => Duration::from_secs(3600),
            _ => panic!("duration {text:?}: unknown unit {c}"),
        };
        total += unit * u32::try_from(value).expect("small duration");
    }
    assert!(number.is_empty(), "duration {text:?} lacks a unit");
    total
}

/// The default of a duration flag.
fn default_duration(vars: &BTreeMap<String, Option<String>>, name: &str) -> Duration {
    let default = vars
        .get(name)
        .and_then(Option::as_deref)
        .unwrap_or_else(|| panic!("{name} has no default in config.rs"));
    duration(default)
}

/// The port of a listen address such as `0.0.0.0:8080`.
fn port_of(addr: &str) -> u16 {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {addr:?}"))
}

/// The names a deploy file gives to pushgate must all be real, and carry a valid value where
/// the value can be checked offline.
fn assert_known(file: &str, names: impl IntoIterator<Item = String>) {
    let vars = env_vars();
    let unknown: Vec<String> = names
        .into_iter()
        .filter(|n| !vars.contains_key(n))
        .collect();
    assert!(
        unknown.is_empty(),
        "{file} sets {unknown:?}, which `pushgate serve` does not read (config.rs)"
    );
}

fn valid_instance_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// `KEY=value` lines of an environment file (comments and blank lines skipped).
fn env_file(rel: &str) -> BTreeMap<String, String> {
    read(rel)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("{rel}: not KEY=value: {l}"));
            (k.trim().to_owned(), v.trim().to_owned())
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// YAML
// ---------------------------------------------------------------------------------------------

/// Every document of a YAML file, with merge keys (`<<: *anchor`) applied.
fn yaml_docs(rel: &str) -> Vec<Value> {
    let text = read(rel);
    let mut docs = Vec::new();
    let mut current = String::new();
    let mut flush = |doc: &mut String| {
        if doc.trim().is_empty() {
            return;
        }
        let mut value: Value = serde_yaml_ng::from_str(doc)
            .unwrap_or_else(|e| panic!("{rel} does not parse as YAML: {e}"));
        // One pass leaves the merge keys of a merged anchor (`<<: *a` in an anchor that is
        // merged itself) in place; repeat until none is left.
        loop {
            let before = value.clone();
            value
                .apply_merge()
                .unwrap_or_else(|e| panic!("{rel}: merge keys: {e}"));
            if value == before {
                break;
            }
        }
        if !value.is_null() {
            docs.push(value);
        }
        doc.clear();
    };
    for line in text.lines() {
        if line.trim_end() == "---" {
            flush(&mut current);
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    flush(&mut current);
    docs
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => panic!("expected a scalar, got {other:?}"),
    }
}

fn map_keys(v: &Value) -> Vec<String> {
    v.as_mapping()
        .map(|m| m.keys().map(s).collect())
        .unwrap_or_default()
}

fn string_map(v: &Value) -> BTreeMap<String, String> {
    v.as_mapping()
        .map(|m| m.iter().map(|(k, v)| (s(k), s(v))).collect())
        .unwrap_or_default()
}

/// A compose `environment:` as a map, from either of its forms (mapping or `KEY=value` list).
fn compose_env(v: &Value) -> BTreeMap<String, String> {
    match v {
        Value::Sequence(items) => items
            .iter()
            .map(|i| {
                let i = s(i);
                let (k, v) = i.split_once('=').unwrap_or((&i, ""));
                (k.to_owned(), v.to_owned())
            })
            .collect(),
        other => string_map(other),
    }
}

// ---------------------------------------------------------------------------------------------
// nginx configuration, as text
// ---------------------------------------------------------------------------------------------

/// The configuration without comments.
fn strip_comments(conf: &str) -> String {
    conf.lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The arguments of every occurrence of `directive` (`proxy_read_timeout 120s;` -> `120s`).
fn directives(conf: &str, directive: &str) -> Vec<String> {
    strip_comments(conf)
        .split(';')
        .filter_map(|stmt| {
            // A statement may follow a `{` or `}` on the same piece of text.
            let stmt = stmt.rsplit(['{', '}']).next().unwrap_or(stmt).trim();
            let rest = stmt.strip_prefix(directive)?;
            rest.starts_with(char::is_whitespace)
                .then(|| rest.trim().to_owned())
        })
        .collect()
}

fn directive(conf: &str, name: &str) -> String {
    let all = directives(conf, name);
    assert_eq!(all.len(), 1, "expected one `{name}`, found {all:?}");
    all[0].clone()
}

/// The bodies of the blocks that start with `header {`, in order.
fn blocks<'a>(conf: &'a str, header: &str) -> Vec<&'a str> {
    let open = format!("{header} {{");
    conf.match_indices(&open)
        .filter(|(i, _)| *i == 0 || conf[..*i].ends_with(char::is_whitespace))
        .map(|(i, _)| {
            let start = i + open.len();
            let mut depth = 1;
            for (j, c) in conf[start..].char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            return &conf[start..start + j];
                        }
                    }
                    _ => {}
                }
            }
            panic!("`{header}` block is not closed");
        })
        .collect()
}

/// The body of the first block that starts with `header {`.
fn block<'a>(conf: &'a str, header: &str) -> &'a str {
    blocks(conf, header)
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("no `{header} {{` block"))
}

/// The `host:port` of each `server` of the `pushgate` upstream.
fn upstream_servers(conf: &str) -> Vec<String> {
    let conf = strip_comments(conf);
    directives(block(&conf, "upstream pushgate"), "server")
        .iter()
        .map(|args| args.split_whitespace().next().unwrap_or("").to_owned())
        .collect()
}

fn render(vars: &[(&str, String)]) -> String {
    render_nginx(vars)
}

// ---------------------------------------------------------------------------------------------
// Tools and scratch directories
// ---------------------------------------------------------------------------------------------

// tool, Scratch, run, make_certs and test_nginx_vars live in the test kit.

// ---------------------------------------------------------------------------------------------
// The configuration source
// ---------------------------------------------------------------------------------------------

#[test]
fn config_names_parse_from_the_source() {
    let vars = env_vars();
    for name in [
        "PUSHGATE_LISTEN",
        "PUSHGATE_REDIS_URL",
        "PUSHGATE_INSTANCE_ID",
        "PUSHGATE_JWT_SECRET",
        "PUSHGATE_API_KEY",
        "PUSHGATE_DRAIN_PERIOD",
        "PUSHGATE_PING_INTERVAL",
        "PUSHGATE_PONG_TIMEOUT",
    ] {
        assert!(vars.contains_key(name), "{name} missing from {vars:?}");
    }
    assert_eq!(
        default_duration(&vars, "PUSHGATE_PING_INTERVAL"),
        Duration::from_secs(25)
    );
    assert_eq!(
        default_duration(&vars, "PUSHGATE_DRAIN_PERIOD"),
        Duration::from_secs(10)
    );
    assert_eq!(port_of(vars["PUSHGATE_LISTEN"].as_deref().unwrap()), 8080);
    // The flattened JWT flags count; names of other subcommands do not.
    assert!(vars.contains_key("PUSHGATE_JWT_LEEWAY"));
    assert!(!vars.contains_key("PUSHGATE_TOKEN"));
    assert_eq!(duration("1m30s"), Duration::from_secs(90));
    assert_eq!(duration("500ms"), Duration::from_millis(500));
}

// ---------------------------------------------------------------------------------------------
// docker-compose.yml
// ---------------------------------------------------------------------------------------------

struct Compose {
    services: BTreeMap<String, Value>,
}

/// One setup of docker-compose.yml: three nodes on one broker mode behind their own nginx. The
/// default setup has no profile; the others are started with `--profile NAME`.
struct Setup {
    profile: Option<&'static str>,
    nginx: &'static str,
    /// The names of the nodes, with their number after it.
    gateway_prefix: &'static str,
    /// The broker setting of its nodes.
    broker_var: &'static str,
}

const SETUPS: [Setup; 3] = [
    Setup {
        profile: None,
        nginx: "nginx",
        gateway_prefix: "pushgate-",
        broker_var: "PUSHGATE_REDIS_URL",
    },
    Setup {
        profile: Some("cluster"),
        nginx: "nginx-cluster",
        gateway_prefix: "pushgate-cluster-",
        broker_var: "PUSHGATE_REDIS_CLUSTER",
    },
    Setup {
        profile: Some("sentinel"),
        nginx: "nginx-sentinel",
        gateway_prefix: "pushgate-sentinel-",
        broker_var: "PUSHGATE_REDIS_SENTINEL",
    },
];

impl Setup {
    /// The setup started with `--profile name`, or without a profile for `None`.
    fn of_profile(name: Option<&str>) -> &'static Setup {
        (SETUPS.iter())
            .find(|setup| setup.profile == name)
            .unwrap_or_else(|| panic!("no setup has profile {name:?}"))
    }

    /// The nginx configuration its nginx mounts: deploy/nginx/render.sh's output for its nodes.
    fn nginx_conf(&self) -> String {
        match self.profile {
            None => "deploy/nginx/pushgate.conf".into(),
            Some(profile) => format!("deploy/nginx/pushgate-{profile}.conf"),
        }
    }

    fn describe(&self) -> String {
        match self.profile {
            None => "the default setup".into(),
            Some(profile) => format!("profile {profile}"),
        }
    }
}

impl Compose {
    fn load() -> Self {
        let docs = yaml_docs("docker-compose.yml");
        assert_eq!(docs.len(), 1, "docker-compose.yml is one document");
        let services = docs[0]["services"]
            .as_mapping()
            .expect("docker-compose.yml has services")
            .iter()
            .map(|(k, v)| (s(k), v.clone()))
            .collect();
        Self { services }
    }

    /// The gateway nodes of every setup: the services built from this repository's Dockerfile.
    fn gateways(&self) -> BTreeMap<&str, &Value> {
        self.services
            .iter()
            .filter(|(_, svc)| svc.get("build").is_some())
            .map(|(name, svc)| (name.as_str(), svc))
            .collect()
    }

    /// The gateway nodes of one setup.
    fn gateways_of(&self, setup: &Setup) -> BTreeMap<&str, &Value> {
        let mut gateways = self.gateways();
        gateways.retain(|_, svc| profile(svc).as_deref() == setup.profile);
        gateways
    }

    fn service(&self, name: &str) -> &Value {
        self.services
            .get(name)
            .unwrap_or_else(|| panic!("docker-compose.yml has no service {name}"))
    }

    /// The services of one profile (`None`: those without one).
    fn in_profile(&self, wanted: Option<&str>) -> BTreeMap<&str, &Value> {
        self.services
            .iter()
            .filter(|(_, svc)| profile(svc).as_deref() == wanted)
            .map(|(name, svc)| (name.as_str(), svc))
            .collect()
    }

    /// The fixed address of a service on the project's network.
    fn address(&self, name: &str) -> Option<String> {
        let addr = &self.service(name)["networks"]["default"]["ipv4_address"];
        (!addr.is_null()).then(|| s(addr))
    }

    /// The service a host in a URL names: by service name or by fixed address.
    fn service_at(&self, host: &str) -> Option<&str> {
        if self.services.contains_key(host) {
            return self.services.get_key_value(host).map(|(k, _)| k.as_str());
        }
        (self.services.keys())
            .find(|name| self.address(name).as_deref() == Some(host))
            .map(String::as_str)
    }
}

/// The one profile of a compose service, if it has one.
fn profile(svc: &Value) -> Option<String> {
    let profiles = svc["profiles"].as_sequence()?;
    assert_eq!(profiles.len(), 1, "a service belongs to one setup");
    Some(s(&profiles[0]))
}

/// The host of each URL of a comma-separated list (`redis://host:port/db`).
fn url_hosts(urls: &str) -> Vec<String> {
    urls.split(',')
        .map(|url| {
            url.trim()
                .strip_prefix("redis://")
                .and_then(|rest| rest.split([':', '/']).next())
                .unwrap_or_else(|| panic!("redis URL {url}"))
                .to_owned()
        })
        .collect()
}

/// The listen port a node's environment gives it (or the flag's default).
fn listen_port(env: &BTreeMap<String, String>) -> u16 {
    let vars = env_vars();
    let listen = env
        .get("PUSHGATE_LISTEN")
        .cloned()
        .or_else(|| vars["PUSHGATE_LISTEN"].clone())
        .expect("a listen address");
    port_of(&listen)
}

/// `(host part, container port)` of each `ports:` entry of a compose service.
fn published_ports(svc: &Value) -> Vec<(String, u16)> {
    svc["ports"]
        .as_sequence()
        .map(|ports| {
            ports
                .iter()
                .map(|p| {
                    let p = s(p);
                    let (host, container) = p.rsplit_once(':').unwrap_or(("", &p));
                    let container = container.split('/').next().unwrap_or(container);
                    (host.to_owned(), container.parse().expect("container port"))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The `nofile` ulimit of a compose service: `(soft, hard)`.
fn nofile(name: &str, svc: &Value) -> (u64, u64) {
    let nofile = &svc["ulimits"]["nofile"];
    let (soft, hard) = match nofile {
        Value::Number(n) => (n.as_u64(), n.as_u64()),
        other => (other["soft"].as_u64(), other["hard"].as_u64()),
    };
    match (soft, hard) {
        (Some(soft), Some(hard)) => (soft, hard),
        _ => panic!("service {name} sets no `ulimits: nofile`"),
    }
}

#[test]
fn compose_has_three_gateways_and_nginx_per_broker_mode() {
    let compose = Compose::load();
    let redis = compose.service("redis");
    assert!(s(&redis["image"]).starts_with("redis"), "redis image");
    assert!(
        redis["healthcheck"]["test"].is_sequence(),
        "redis has a healthcheck"
    );
    for setup in &SETUPS {
        let what = setup.describe();
        let nginx = compose.service(setup.nginx);
        assert!(
            s(&nginx["image"]).starts_with("nginx"),
            "{what}: nginx image"
        );
        assert_eq!(profile(nginx).as_deref(), setup.profile, "{what}: nginx");
        let expected: Vec<String> = (1..=3)
            .map(|i| format!("{}{i}", setup.gateway_prefix))
            .collect();
        assert_eq!(
            compose
                .gateways_of(setup)
                .keys()
                .copied()
                .collect::<Vec<_>>(),
            expected,
            "{what}: three gateway nodes built from the Dockerfile"
        );
    }
    // Every profile is one of the setups, and a service depends only on services that start
    // with it: its own profile's, or those without a profile.
    for (name, svc) in &compose.services {
        let own = profile(svc);
        assert!(
            SETUPS.iter().any(|setup| setup.profile == own.as_deref()),
            "{name}: unknown profile {own:?}"
        );
        for dependency in map_keys(&svc["depends_on"]) {
            let theirs = profile(compose.service(&dependency));
            assert!(
                theirs.is_none() || theirs == own,
                "{name} ({own:?}) depends on {dependency} ({theirs:?})"
            );
            let condition = s(&svc["depends_on"][dependency.as_str()]["condition"]);
            assert!(
                ["service_healthy", "service_completed_successfully"].contains(&condition.as_str()),
                "{name} waits for {dependency} to be {condition}"
            );
            if condition == "service_healthy" {
                assert!(
                    compose.service(&dependency)["healthcheck"]["test"].is_sequence(),
                    "{name} waits for {dependency} to be healthy, which has no healthcheck"
                );
            }
        }
    }
    // A node waits for its broker: the Redis its URL names, the made cluster, or the sentinels.
    for (name, svc) in compose.gateways() {
        let waits_for = map_keys(&svc["depends_on"]);
        let env = compose_env(&svc["environment"]);
        if let Some(url) = env.get("PUSHGATE_REDIS_URL") {
            assert_eq!(waits_for, url_hosts(url), "{name} waits for its Redis");
        }
        if env.contains_key("PUSHGATE_REDIS_CLUSTER") {
            assert_eq!(waits_for, ["redis-cluster-create"], "{name}");
        }
        if let Some(urls) = env.get("PUSHGATE_REDIS_SENTINEL") {
            assert_eq!(waits_for, url_hosts(urls), "{name} waits for its sentinels");
        }
    }
}

#[test]
fn compose_cluster_profile_makes_a_cluster_of_its_members() {
    let compose = Compose::load();
    let members: BTreeMap<&str, &Value> = compose
        .in_profile(Some("cluster"))
        .into_iter()
        .filter(|(_, svc)| {
            let command = svc["command"]
                .as_sequence()
                .map(|c| c.iter().map(s).collect::<Vec<_>>());
            command.is_some_and(|c| c.windows(2).any(|w| w == ["--cluster-enabled", "yes"]))
        })
        .collect();
    assert_eq!(members.len(), 6, "three primaries and three replicas");
    let addresses: BTreeSet<String> = members
        .keys()
        .map(|name| {
            let addr = compose.address(name);
            format!(
                "{}:6379",
                addr.unwrap_or_else(|| panic!("{name} has no fixed address"))
            )
        })
        .collect();
    // The one-shot service runs deploy/redis/cluster-create.sh (tested by redis_cluster.rs
    // through deploy/redis/cluster.sh) on exactly those members, after they answer.
    let create = compose.service("redis-cluster-create");
    assert_eq!(s(&create["restart"]), "no");
    let command: Vec<String> = create["command"]
        .as_sequence()
        .expect("a command")
        .iter()
        .map(s)
        .collect();
    let mounts: Vec<String> = create["volumes"]
        .as_sequence()
        .expect("volumes")
        .iter()
        .map(s)
        .collect();
    assert_eq!(mounts, ["./deploy/redis:/redis:ro"]);
    assert_eq!(command[..2], ["sh", "/redis/cluster-create.sh"]);
    assert!(root().join("deploy/redis/cluster-create.sh").is_file());
    assert_eq!(
        command[2..].iter().cloned().collect::<BTreeSet<_>>(),
        addresses
    );
    assert_eq!(
        map_keys(&create["depends_on"])
            .into_iter()
            .collect::<BTreeSet<_>>(),
        members.keys().map(|n| n.to_string()).collect(),
        "the create service waits for every member"
    );
    // The nodes are seeded with every member.
    for (name, svc) in compose.gateways_of(Setup::of_profile(Some("cluster"))) {
        let env = compose_env(&svc["environment"]);
        let seeds: BTreeSet<String> = url_hosts(&env["PUSHGATE_REDIS_CLUSTER"])
            .into_iter()
            .map(|host| format!("{host}:6379"))
            .collect();
        assert_eq!(seeds, addresses, "{name}'s seeds");
    }
}

#[test]
fn compose_sentinel_profile_monitors_the_primary_the_nodes_ask_for() {
    let compose = Compose::load();
    let sentinels: Vec<&str> = compose
        .in_profile(Some("sentinel"))
        .into_iter()
        .filter(|(_, svc)| {
            svc["command"]
                .as_sequence()
                .is_some_and(|c| c.iter().map(s).any(|part| part.contains("--sentinel")))
        })
        .map(|(name, _)| name)
        .collect();
    assert_eq!(sentinels.len(), 3, "three sentinels: {sentinels:?}");
    for (name, svc) in compose.gateways_of(Setup::of_profile(Some("sentinel"))) {
        let env = compose_env(&svc["environment"]);
        let master = &env["PUSHGATE_REDIS_SENTINEL_MASTER"];
        assert_eq!(
            url_hosts(&env["PUSHGATE_REDIS_SENTINEL"]),
            sentinels,
            "{name} asks every sentinel"
        );
        for sentinel in &sentinels {
            let script = compose.service(sentinel)["command"]
                .as_sequence()
                .expect("a command")
                .iter()
                .map(s)
                .collect::<Vec<_>>()
                .join(" ");
            // `sentinel monitor NAME HOST PORT QUORUM`: the name the nodes ask for, a
            // primary of this profile, a majority of the three.
            let monitor = script
                .lines()
                .find_map(|l| l.trim().strip_prefix("sentinel monitor "))
                .unwrap_or_else(|| panic!("{sentinel} monitors nothing: {script}"))
                .split_whitespace()
                .collect::<Vec<_>>();
            assert_eq!(monitor[0], master, "{sentinel} monitors {monitor:?}");
            assert_eq!(
                profile(compose.service(monitor[1])).as_deref(),
                Some("sentinel")
            );
            assert_eq!(monitor[3], "2", "{sentinel}: quorum");
            assert!(
                script.contains("sentinel resolve-hostnames yes"),
                "{sentinel}"
            );
            // Through the image's entrypoint, which drops root for `redis-server` only.
            assert!(
                script.contains("exec docker-entrypoint.sh redis-server "),
                "{sentinel} runs as root: {script}"
            );
        }
    }
    let replica = compose.service("redis-replica")["command"]
        .as_sequence()
        .expect("a command")
        .iter()
        .map(s)
        .collect::<Vec<_>>();
    assert!(
        replica
            .windows(2)
            .any(|w| w == ["--replicaof", "redis-main"])
    );
}

#[test]
fn compose_gateway_env_names_are_real_flags() {
    let compose = Compose::load();
    let mut ids = BTreeSet::new();
    for (name, svc) in compose.gateways() {
        let env = compose_env(&svc["environment"]);
        assert_known(&format!("docker-compose.yml ({name})"), env.keys().cloned());
        for required in [
            "PUSHGATE_INSTANCE_ID",
            "PUSHGATE_JWT_SECRET",
            "PUSHGATE_API_KEY",
        ] {
            assert!(env.contains_key(required), "{name} lacks {required}");
        }
        // Exactly one broker mode, the setup's own.
        let setup = Setup::of_profile(profile(svc).as_deref());
        let modes: Vec<&str> = (SETUPS.iter())
            .map(|other| other.broker_var)
            .filter(|var| env.contains_key(*var))
            .collect();
        assert_eq!(modes, [setup.broker_var], "{name}'s broker");
        // The secrets come from the shell or .env, with defaults marked as local-only.
        for secret in ["PUSHGATE_JWT_SECRET", "PUSHGATE_API_KEY"] {
            let value = &env[secret];
            assert!(
                value.starts_with(&format!("${{{secret}:-")) && value.contains("local-only"),
                "{name}: {secret} should be ${{{secret}:-local-only...}}, is {value}"
            );
        }
        // The broker URLs name services of the same setup.
        for host in url_hosts(&env[setup.broker_var]) {
            let service = compose
                .service_at(&host)
                .unwrap_or_else(|| panic!("{name}: no service at {host}"));
            assert_eq!(
                profile(compose.service(service)).as_deref(),
                setup.profile,
                "{name} uses {service}"
            );
        }
        let id = env["PUSHGATE_INSTANCE_ID"].clone();
        assert!(valid_instance_id(&id), "{name}: instance ID {id:?}");
        assert!(ids.insert(id.clone()), "instance ID {id} is used twice");
    }
    assert_eq!(ids.len(), 3 * SETUPS.len());

    // .env.example sets exactly what compose substitutes, and only real names.
    let example = env_file(".env.example");
    assert_known(".env.example", example.keys().cloned());
    assert_eq!(
        example.keys().map(String::as_str).collect::<Vec<_>>(),
        ["PUSHGATE_API_KEY", "PUSHGATE_JWT_SECRET"]
    );
}

#[test]
fn compose_ports_limits_and_health() {
    let compose = Compose::load();
    let vars = env_vars();
    let mut host_ports = BTreeSet::new();
    for (name, svc) in compose.gateways() {
        let env = compose_env(&svc["environment"]);
        let port = listen_port(&env);
        let published = published_ports(svc);
        assert!(!published.is_empty(), "{name} publishes its port");
        for (host, container) in published {
            assert_eq!(container, port, "{name} publishes its listen port");
            assert!(host_ports.insert(host.clone()), "{name}: {host} used twice");
        }
        let (soft, hard) = nofile(name, svc);
        assert!(
            soft >= 10_000 && hard >= soft,
            "{name}: nofile {soft}/{hard}"
        );
        // docker stop waits stop_grace_period before SIGKILL: more than the drain.
        let drain = env
            .get("PUSHGATE_DRAIN_PERIOD")
            .map(|d| duration(d))
            .unwrap_or_else(|| default_duration(&vars, "PUSHGATE_DRAIN_PERIOD"));
        let grace = duration(&s(&svc["stop_grace_period"]));
        assert!(
            grace > drain,
            "{name}: stop_grace_period {grace:?} <= drain {drain:?}"
        );
        let check = svc["healthcheck"]["test"]
            .as_sequence()
            .unwrap_or_else(|| panic!("{name} has a healthcheck"))
            .iter()
            .map(s)
            .collect::<Vec<_>>()
            .join(" ");
        assert!(
            check.contains(&format!(":{port}/readyz"))
                || check.contains(&format!(":{port}/healthz")),
            "{name}: healthcheck {check} does not probe the node"
        );
        assert_eq!(
            s(&svc["restart"]),
            "unless-stopped",
            "{name} restarts after a crash"
        );
    }

    for setup in &SETUPS {
        let what = setup.describe();
        let nginx = compose.service(setup.nginx);
        let published = published_ports(nginx);
        assert!(
            published.iter().any(|(_, c)| *c == 443),
            "{what}: nginx publishes 443: {published:?}"
        );
        for (host, _) in published {
            assert!(host_ports.insert(host.clone()), "{what}: {host} used twice");
        }
        let (soft, _) = nofile(setup.nginx, nginx);
        let conf = read(&setup.nginx_conf());
        let rlimit: u64 = directive(&conf, "worker_rlimit_nofile").parse().unwrap();
        assert!(
            soft >= rlimit,
            "{what}: nginx's nofile ulimit {soft} is below worker_rlimit_nofile {rlimit}"
        );
        // nginx starts once the certificates exist and every node is ready.
        let depends = &nginx["depends_on"];
        assert_eq!(
            depends["certs"]["condition"].as_str(),
            Some("service_completed_successfully")
        );
        for name in compose.gateways_of(setup).keys() {
            assert_eq!(
                depends[*name]["condition"].as_str(),
                Some("service_healthy"),
                "{what}: nginx waits for {name}"
            );
        }
        assert!(
            nginx["healthcheck"]["test"].is_sequence(),
            "{what}: nginx healthcheck"
        );
    }
    assert!(
        host_ports.contains("443"),
        "the default nginx is on port 443"
    );
}

#[test]
fn compose_nginx_uses_the_rendered_config_and_the_certificates() {
    let compose = Compose::load();
    for setup in &SETUPS {
        nginx_uses_its_config_and_the_certificates(&compose, setup);
    }
}

fn nginx_uses_its_config_and_the_certificates(compose: &Compose, setup: &Setup) {
    let nginx = compose.service(setup.nginx);
    let volumes: Vec<(String, String)> = nginx["volumes"]
        .as_sequence()
        .expect("nginx volumes")
        .iter()
        .map(|v| {
            let v = s(v);
            let mut parts = v.split(':');
            (
                parts.next().unwrap_or("").to_owned(),
                parts.next().unwrap_or("").to_owned(),
            )
        })
        .collect();
    let conf_file = setup.nginx_conf();
    assert!(
        volumes.contains(&(format!("./{conf_file}"), "/etc/nginx/nginx.conf".into())),
        "{} mounts {conf_file} as its nginx.conf: {volumes:?}",
        setup.nginx
    );
    // The certificate paths of the configuration are inside the mounted certificate directory,
    // which the `certs` service fills with make-certs.sh.
    let conf = read(&conf_file);
    let (_, cert_dir) = volumes
        .iter()
        .find(|(host, _)| host == "./deploy/tls/certs")
        .expect("nginx mounts ./deploy/tls/certs");
    for (directive_name, file) in [
        ("ssl_certificate", "server.crt"),
        ("ssl_certificate_key", "server.key"),
    ] {
        assert_eq!(
            directive(&conf, directive_name),
            format!("{cert_dir}/{file}")
        );
    }
    let certs = compose.service("certs");
    let entry = certs["entrypoint"]
        .as_sequence()
        .expect("certs entrypoint")
        .iter()
        .map(s)
        .collect::<Vec<_>>()
        .join(" ");
    let mounts: Vec<String> = certs["volumes"]
        .as_sequence()
        .expect("certs volumes")
        .iter()
        .map(s)
        .collect();
    assert_eq!(mounts, ["./deploy/tls:/tls"]);
    assert!(
        entry.contains("/tls/make-certs.sh /tls/certs"),
        "certs runs make-certs.sh into deploy/tls/certs: {entry}"
    );
}

#[test]
fn nginx_upstream_matches_the_compose_nodes() {
    let compose = Compose::load();
    for setup in &SETUPS {
        let expected: BTreeSet<String> = compose
            .gateways_of(setup)
            .iter()
            .map(|(name, svc)| format!("{name}:{}", listen_port(&compose_env(&svc["environment"]))))
            .collect();
        let conf = read(&setup.nginx_conf());
        let servers: BTreeSet<String> = upstream_servers(&conf).into_iter().collect();
        assert_eq!(
            servers,
            expected,
            "{}: upstream servers vs gateways",
            setup.describe()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// nginx configuration
// ---------------------------------------------------------------------------------------------

#[test]
fn nginx_conf_is_the_template_rendered_with_defaults() {
    let rendered = render(&[]);
    assert_eq!(
        rendered,
        read("deploy/nginx/pushgate.conf"),
        "deploy/nginx/pushgate.conf is stale: run `bash deploy/nginx/render.sh deploy/nginx/pushgate.conf`"
    );
    // The profiles' nginx configurations are the same template with their nodes.
    let compose = Compose::load();
    for setup in SETUPS.iter().filter(|setup| setup.profile.is_some()) {
        let nodes: Vec<String> = compose
            .gateways_of(setup)
            .iter()
            .map(|(name, svc)| format!("{name}:{}", listen_port(&compose_env(&svc["environment"]))))
            .collect();
        let file = setup.nginx_conf();
        assert_eq!(
            render(&[("NGINX_UPSTREAMS", nodes.join(" "))]),
            read(&file),
            "{file} is stale: run `NGINX_UPSTREAMS=\"{}\" bash deploy/nginx/render.sh {file}`",
            nodes.join(" ")
        );
    }
    // The renderer substitutes every placeholder it is given, and refuses a broken value.
    let custom = render(&[
        ("NGINX_UPSTREAMS", "127.0.0.1:1,127.0.0.1:2".into()),
        ("NGINX_HTTPS_LISTEN", "127.0.0.1:8443".into()),
    ]);
    assert_eq!(upstream_servers(&custom), ["127.0.0.1:1", "127.0.0.1:2"]);
    assert!(custom.contains("listen 127.0.0.1:8443 ssl"));
    assert!(
        !strip_comments(&custom).contains("${NGINX_"),
        "a placeholder was left"
    );
    let refused = Command::new("bash")
        .arg(root().join("deploy/nginx/render.sh"))
        .env("NGINX_PID", "/tmp/x.pid; user root")
        .output()
        .expect("bash");
    assert!(!refused.status.success(), "render.sh accepted a ';'");
}

#[test]
fn nginx_conf_proxies_websockets_as_intended() {
    let conf = read("deploy/nginx/pushgate.conf");
    let vars = env_vars();
    let plain = strip_comments(&conf);

    // Upstream: least connections, shared state, no stickiness.
    let upstream = block(&plain, "upstream pushgate");
    assert!(
        upstream.contains("least_conn;"),
        "upstream balances with least_conn"
    );
    for sticky in ["ip_hash", "hash ", "sticky"] {
        assert!(!upstream.contains(sticky), "upstream uses {sticky}");
    }
    assert!(
        upstream.contains("zone pushgate"),
        "upstream has a shared zone"
    );

    // The WebSocket upgrade.
    let map = block(&plain, "map $http_upgrade $connection_upgrade");
    assert!(map.contains("default upgrade;"), "{map}");
    assert_eq!(directive(&conf, "proxy_http_version"), "1.1");
    let headers = directives(&conf, "proxy_set_header");
    for header in [
        "Upgrade $http_upgrade",
        "Connection $connection_upgrade",
        "Host $host",
        "X-Real-IP $remote_addr",
        "X-Forwarded-For $proxy_add_x_forwarded_for",
        "X-Forwarded-Proto $scheme",
    ] {
        assert!(
            headers
                .iter()
                .any(|h| h.split_whitespace().collect::<Vec<_>>().join(" ") == header),
            "missing proxy_set_header {header}: {headers:?}"
        );
    }

    // Timeouts well above the ping interval plus the pong timeout.
    let ping = default_duration(&vars, "PUSHGATE_PING_INTERVAL");
    let pong = default_duration(&vars, "PUSHGATE_PONG_TIMEOUT");
    for name in ["proxy_read_timeout", "proxy_send_timeout"] {
        let timeout = duration(&directive(&conf, name));
        assert!(
            timeout >= 2 * (ping + pong),
            "{name} {timeout:?} is too close to ping {ping:?} + pong {pong:?}"
        );
    }

    // TLS: modern protocols only.
    assert_eq!(directive(&conf, "ssl_protocols"), "TLSv1.2 TLSv1.3");
    let ciphers = directive(&conf, "ssl_ciphers");
    for weak in ["RC4", "3DES", "MD5", "CBC", "NULL", "EXPORT"] {
        assert!(!ciphers.contains(weak), "weak cipher {weak} in {ciphers}");
    }
    assert!(
        directives(&conf, "listen")
            .iter()
            .any(|l| l.contains(" ssl")),
        "an ssl listener"
    );

    // Unbuffered (server-sent events), health passthrough, WebSocket endpoints, /metrics closed.
    assert_eq!(directive(&conf, "proxy_buffering"), "off");
    let https = blocks(&plain, "server")
        .into_iter()
        .find(|server| server.contains("ssl_certificate"))
        .expect("an HTTPS server");
    for location in [
        "location = /ws",
        "location = /healthz",
        "location = /sse",
        "location /api/",
        "location = /admin",
        "location = /pushgate.js",
    ] {
        assert!(
            block(https, location).contains("proxy_pass http://pushgate;"),
            "{location} is passed to the nodes"
        );
    }
    assert!(!https.contains("location = /metrics") && !https.contains("location /metrics"));
    assert!(
        block(https, "location /").contains("return 404"),
        "unlisted paths (/metrics, /readyz) are not proxied"
    );

    // Capacity: two descriptors per proxied connection fit the open-file limit.
    let connections: u64 = directive(&conf, "worker_connections").parse().unwrap();
    let rlimit: u64 = directive(&conf, "worker_rlimit_nofile").parse().unwrap();
    assert!(connections >= 8192 && connections < rlimit);
    assert!(duration(&directive(&conf, "worker_shutdown_timeout")) > Duration::ZERO);

    // Tokens travel in query strings: the access log format must not record them.
    let format = directive(&conf, "log_format");
    for leaky in [
        "$request ",
        "$request\"",
        "$request_uri",
        "$args",
        "$query_string",
        "$arg_",
    ] {
        assert!(
            !format.contains(leaky),
            "log_format records {leaky}: {format}"
        );
    }
}

#[test]
fn nginx_config_test_passes() {
    let (Some(nginx), Some(_)) = (tool("nginx", true), tool("openssl", true)) else {
        return;
    };
    let scratch = Scratch::new("nginx-t");
    make_certs(&scratch.path("certs"));
    let conf = scratch.path("nginx.conf");
    let rendered = render(&test_nginx_vars(
        &scratch,
        &format!("127.0.0.1:{} 127.0.0.1:{}", free_port(), free_port()),
        free_port(),
        free_port(),
    ));
    std::fs::write(&conf, rendered).unwrap();
    let out = run(Command::new(&nginx)
        .args(["-t", "-c", &conf, "-p", &scratch.path(""), "-e"])
        .arg(scratch.path("error.log")));
    let said = String::from_utf8_lossy(&out.stderr);
    eprintln!("{said}");
    assert!(said.contains("test is successful"), "{said}");
}

fn curl(args: &[&str]) -> Output {
    Command::new("curl")
        .args(["-sS", "--max-time", "5"])
        .args(args)
        .output()
        .expect("running curl")
}

#[tokio::test]
async fn nginx_terminates_tls_and_proxies_websockets_to_a_node() {
    let (Some(nginx), Some(_), Some(_)) = (
        tool("nginx", true),
        tool("openssl", true),
        tool("curl", true),
    ) else {
        return;
    };
    let node = NodeProcess::spawn("n1", None, &[]).await;
    // The first upstream is an address nobody listens on (every node of every test binds
    // 127.0.0.1): nginx must move on to the live node.
    let upstreams = format!("127.0.0.2:{},{}", free_port(), node.addr);
    let mut running = Nginx::start(&nginx, &upstreams, &[]);
    let (https, http) = (running.https, running.http);
    let scratch = &running.scratch;
    let ca = running.ca_file();
    let base = format!("https://localhost:{https}");

    // TLS with the test CA (the certificate names localhost), /healthz passed to the node.
    let out = curl(&["--cacert", &ca, &format!("{base}/healthz")]);
    let health: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("/healthz: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(health["status"], "ok", "{health}");
    // /metrics stays private; plain HTTP redirects to HTTPS.
    let out = curl(&[
        "--cacert",
        &ca,
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("{base}/metrics"),
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "404");
    let out = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("http://127.0.0.1:{http}/ws"),
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "301");

    // The SDK, for pages that import it from the gateway.
    let out = curl(&["--cacert", &ca, "-i", &format!("{base}/pushgate.js")]);
    let sdk = String::from_utf8_lossy(&out.stdout);
    assert!(
        sdk.starts_with("HTTP/1.1 200") && sdk.contains("export class Pushgate"),
        "no SDK through nginx: {}",
        &sdk[..sdk.len().min(300)]
    );

    // The admin console and the API it calls, through nginx (the node has an API key).
    let out = curl(&["--cacert", &ca, "-i", &format!("{base}/admin")]);
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(
        page.starts_with("HTTP/1.1 200") && page.contains("<title>pushgate admin</title>"),
        "no admin console through nginx: {page}"
    );
    let auth = format!("Authorization: Bearer {API_KEY}");
    let out = curl(&[
        "--cacert",
        &ca,
        "-H",
        &auth,
        &format!("{base}/api/channels"),
    ]);
    let channels: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("/api/channels through nginx: {e}: {out:?}"));
    assert_eq!(
        channels,
        serde_json::json!({"channels": [], "approximate": false})
    );
    let out = curl(&[
        "--cacert",
        &ca,
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("{base}/api/channels"),
    ]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "401",
        "the key is checked"
    );

    // A WebSocket handshake through nginx: 101, then the node's welcome frame. curl does not
    // speak WebSocket, so it waits until --max-time and that exit status is expected.
    let jwt = token("deploy", &["room:*"], &[]);
    let out = Command::new("curl")
        .args(["-sS", "-i", "--http1.1", "--max-time", "2", "--cacert", &ca])
        .args(["-H", "Connection: Upgrade", "-H", "Upgrade: websocket"])
        .args(["-H", "Sec-WebSocket-Version: 13"])
        .args(["-H", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="])
        .arg(format!("{base}/ws?token={jwt}"))
        .output()
        .expect("running curl");
    let reply = String::from_utf8_lossy(&out.stdout);
    assert!(
        reply.starts_with("HTTP/1.1 101"),
        "no upgrade through nginx: {reply}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        reply.contains("\"type\":\"welcome\"") && reply.contains("\"node\":\"n1\""),
        "no welcome from the node: {reply}"
    );

    // The access log has the WebSocket's line (written when it closed) without the token. The
    // plain-HTTP redirect of /ws above has a line of its own (301), which may come first.
    let log_path = scratch.path("access.log");
    let deadline = Instant::now() + WAIT;
    let log = loop {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        if log
            .lines()
            .any(|l| l.contains("GET /ws") && l.contains(" 101 "))
        {
            break log;
        }
        assert!(
            Instant::now() < deadline,
            "no 101 line for /ws in the access log: {log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        !log.contains(&jwt),
        "the access log records the token: {log}"
    );
    running.stop();
}

// ---------------------------------------------------------------------------------------------
// Kubernetes
// ---------------------------------------------------------------------------------------------

struct Manifests {
    objects: Vec<(String, Value)>,
}

impl Manifests {
    fn load() -> Self {
        let dir = root().join("deploy/k8s");
        let mut files: Vec<String> = std::fs::read_dir(&dir)
            .expect("deploy/k8s")
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|f| f.ends_with(".yaml") || f.ends_with(".yml"))
            .collect();
        files.sort();
        let mut objects = Vec::new();
        for file in files {
            for doc in yaml_docs(&format!("deploy/k8s/{file}")) {
                assert!(
                    doc["apiVersion"].is_string() && doc["kind"].is_string(),
                    "{file}: a document without apiVersion and kind"
                );
                objects.push((file.clone(), doc));
            }
        }
        Self { objects }
    }

    fn all(&self, kind: &str) -> Vec<&Value> {
        self.objects
            .iter()
            .filter(|(_, o)| o["kind"].as_str() == Some(kind))
            .map(|(_, o)| o)
            .collect()
    }

    fn one(&self, kind: &str) -> &Value {
        let all = self.all(kind);
        assert_eq!(all.len(), 1, "expected one {kind} in deploy/k8s");
        all[0]
    }

    fn named(&self, kind: &str, name: &str) -> &Value {
        self.all(kind)
            .into_iter()
            .find(|o| o["metadata"]["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("deploy/k8s has no {kind} {name}"))
    }
}

/// Every label of `selector` is on the pods.
fn selects(selector: &Value, pod_labels: &BTreeMap<String, String>) -> bool {
    let selector = string_map(selector);
    !selector.is_empty() && selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v))
}

/// The environment a Deployment's container gets: `env` entries and the keys of the ConfigMaps
/// and Secrets named in `envFrom`, with their values where known.
fn container_env(k8s: &Manifests, container: &Value) -> BTreeMap<String, Option<String>> {
    let mut env = BTreeMap::new();
    for source in container["envFrom"].as_sequence().into_iter().flatten() {
        if let Some(name) = source["configMapRef"]["name"].as_str() {
            for (k, v) in string_map(&k8s.named("ConfigMap", name)["data"]) {
                env.insert(k, Some(v));
            }
        }
        if let Some(name) = source["secretRef"]["name"].as_str() {
            let secret = k8s.named("Secret", name);
            for key in map_keys(&secret["stringData"])
                .into_iter()
                .chain(map_keys(&secret["data"]))
            {
                env.insert(key, None);
            }
        }
    }
    for var in container["env"].as_sequence().into_iter().flatten() {
        env.insert(s(&var["name"]), var.get("value").map(s));
    }
    env
}

#[test]
fn k8s_manifests_parse_and_are_all_in_the_kustomization() {
    let k8s = Manifests::load();
    let kustomization = k8s.one("Kustomization");
    let listed: BTreeSet<String> = kustomization["resources"]
        .as_sequence()
        .expect("resources")
        .iter()
        .map(s)
        .collect();
    let files: BTreeSet<String> = k8s
        .objects
        .iter()
        .filter(|(_, o)| o["kind"].as_str() != Some("Kustomization"))
        .map(|(f, _)| f.clone())
        .collect();
    assert_eq!(listed, files, "kustomization.yaml resources vs files");
    for kind in [
        "Deployment",
        "Service",
        "Ingress",
        "PodDisruptionBudget",
        "ConfigMap",
        "Secret",
    ] {
        k8s.one(kind);
    }
}

#[test]
fn k8s_deployment_probes_drain_and_env() {
    let k8s = Manifests::load();
    let vars = env_vars();
    let deployment = k8s.one("Deployment");
    let spec = &deployment["spec"];
    assert_eq!(spec["replicas"].as_u64(), Some(3));
    let pod_labels = string_map(&spec["template"]["metadata"]["labels"]);
    assert!(
        selects(&spec["selector"]["matchLabels"], &pod_labels),
        "the Deployment selects its own pods"
    );
    assert_eq!(
        spec["strategy"]["rollingUpdate"]["maxUnavailable"].as_u64(),
        Some(0),
        "rolling updates keep full capacity"
    );

    let pod = &spec["template"]["spec"];
    let containers = pod["containers"].as_sequence().expect("containers");
    assert_eq!(containers.len(), 1);
    let container = &containers[0];

    // Environment: only real names, the required ones present. A variable pushgate does not
    // read may only be an input of another's `$(NAME)` (a Kubernetes dependent variable).
    let env = container_env(&k8s, container);
    let inputs: BTreeSet<String> = env
        .values()
        .flatten()
        .flat_map(|v| v.split("$(").skip(1))
        .filter_map(|rest| rest.split_once(')').map(|(name, _)| name.to_owned()))
        .collect();
    assert_known(
        "deploy/k8s",
        env.keys().filter(|k| !inputs.contains(*k)).cloned(),
    );
    for input in &inputs {
        assert!(
            env.contains_key(input),
            "$({input}) is not defined before use"
        );
    }
    for required in [
        "PUSHGATE_REDIS_URL",
        "PUSHGATE_ADVERTISE_URL",
        "PUSHGATE_INSTANCE_ID",
        "PUSHGATE_JWT_SECRET",
        "PUSHGATE_API_KEY",
    ] {
        assert!(env.contains_key(required), "the pods lack {required}");
    }
    let secret_keys: BTreeSet<String> = map_keys(&k8s.one("Secret")["stringData"])
        .into_iter()
        .collect();
    assert!(
        secret_keys.contains("PUSHGATE_JWT_SECRET") && secret_keys.contains("PUSHGATE_API_KEY"),
        "the keys live in the Secret"
    );

    // Probes on the container port the node listens on.
    let listen = env
        .get("PUSHGATE_LISTEN")
        .cloned()
        .flatten()
        .or_else(|| vars["PUSHGATE_LISTEN"].clone())
        .unwrap();
    let port = u64::from(port_of(&listen));
    let ports = container["ports"].as_sequence().expect("container ports");
    let resolve = |p: &Value| -> u64 {
        match p {
            Value::Number(n) => n.as_u64().unwrap(),
            Value::String(name) => ports
                .iter()
                .find(|cp| cp["name"].as_str() == Some(name))
                .and_then(|cp| cp["containerPort"].as_u64())
                .unwrap_or_else(|| panic!("no container port named {name}")),
            other => panic!("port {other:?}"),
        }
    };
    assert!(
        ports
            .iter()
            .any(|p| p["containerPort"].as_u64() == Some(port)),
        "the container exposes port {port}"
    );
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{probe}");
        assert_eq!(resolve(&get["port"]), port, "{probe} port");
    }

    // preStop sleep, then the drain, both inside the grace period.
    let pre_stop = &container["lifecycle"]["preStop"];
    let sleep = pre_stop["sleep"]["seconds"].as_u64().unwrap_or_else(|| {
        let cmd = pre_stop["exec"]["command"]
            .as_sequence()
            .expect("preStop is a sleep");
        s(cmd.last().unwrap()).parse().expect("sleep seconds")
    });
    let drain = env
        .get("PUSHGATE_DRAIN_PERIOD")
        .cloned()
        .flatten()
        .map(|d| duration(&d))
        .unwrap_or_else(|| default_duration(&vars, "PUSHGATE_DRAIN_PERIOD"));
    let grace = Duration::from_secs(
        pod["terminationGracePeriodSeconds"]
            .as_u64()
            .expect("terminationGracePeriodSeconds"),
    );
    assert!(sleep > 0, "preStop sleeps");
    assert!(
        grace > Duration::from_secs(sleep) + drain,
        "terminationGracePeriodSeconds {grace:?} <= preStop {sleep}s + drain {drain:?}"
    );

    // Resources and a non-root, unprivileged container.
    for kind in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(
                !container["resources"][kind][resource].is_null(),
                "resources.{kind}.{resource}"
            );
        }
    }
    let run_as_non_root = container["securityContext"]["runAsNonRoot"]
        .as_bool()
        .or(pod["securityContext"]["runAsNonRoot"].as_bool());
    assert_eq!(run_as_non_root, Some(true));
    let uid = container["securityContext"]["runAsUser"]
        .as_u64()
        .or(pod["securityContext"]["runAsUser"].as_u64());
    assert!(uid.is_some_and(|u| u != 0), "runAsUser {uid:?}");
    assert_eq!(
        container["securityContext"]["allowPrivilegeEscalation"].as_bool(),
        Some(false)
    );
}

#[test]
fn k8s_service_ingress_and_pdb_select_the_pods() {
    let k8s = Manifests::load();
    let vars = env_vars();
    let deployment = k8s.one("Deployment");
    let pod_labels = string_map(&deployment["spec"]["template"]["metadata"]["labels"]);
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let container_ports = container["ports"].as_sequence().unwrap();

    // Service -> pods.
    let service = k8s.one("Service");
    assert!(
        selects(&service["spec"]["selector"], &pod_labels),
        "the Service selects the Deployment's pods"
    );
    let service_ports = service["spec"]["ports"].as_sequence().expect("ports");
    for port in service_ports {
        let target = &port["targetPort"];
        let ok = container_ports.iter().any(|cp| match target {
            Value::String(name) => cp["name"].as_str() == Some(name),
            Value::Number(n) => cp["containerPort"].as_u64() == n.as_u64(),
            _ => false,
        });
        assert!(ok, "Service targetPort {target:?} is not a container port");
    }

    // Ingress -> Service.
    let ingress = k8s.one("Ingress");
    let service_name = service["metadata"]["name"].as_str().unwrap();
    let mut paths = BTreeSet::new();
    for rule in ingress["spec"]["rules"].as_sequence().expect("rules") {
        for path in rule["http"]["paths"].as_sequence().expect("paths") {
            paths.insert(s(&path["path"]));
            let backend = &path["backend"]["service"];
            assert_eq!(backend["name"].as_str(), Some(service_name));
            let port = &backend["port"];
            let ok = service_ports.iter().any(|sp| {
                port["name"]
                    .as_str()
                    .is_some_and(|n| sp["name"].as_str() == Some(n))
                    || port["number"]
                        .as_u64()
                        .is_some_and(|n| sp["port"].as_u64() == Some(n))
            });
            assert!(ok, "Ingress backend port {port:?} is not a Service port");
        }
    }
    assert!(
        paths.contains("/ws") && paths.contains("/healthz"),
        "{paths:?}"
    );
    assert!(
        !paths.iter().any(|p| p == "/" || p.starts_with("/metrics")),
        "{paths:?}"
    );
    assert_eq!(ingress["spec"]["ingressClassName"].as_str(), Some("nginx"));
    let annotations = string_map(&ingress["metadata"]["annotations"]);
    let ping = default_duration(&vars, "PUSHGATE_PING_INTERVAL");
    let pong = default_duration(&vars, "PUSHGATE_PONG_TIMEOUT");
    for name in ["proxy-read-timeout", "proxy-send-timeout"] {
        let key = format!("nginx.ingress.kubernetes.io/{name}");
        let value = annotations
            .get(&key)
            .unwrap_or_else(|| panic!("Ingress lacks {key}"));
        assert!(
            duration(value) >= 2 * (ping + pong),
            "{key} {value} is too close to the ping interval"
        );
    }
    assert_eq!(
        annotations
            .get("nginx.ingress.kubernetes.io/proxy-buffering")
            .map(String::as_str),
        Some("off")
    );

    // PDB -> the same pods.
    let pdb = k8s.one("PodDisruptionBudget");
    assert!(
        selects(&pdb["spec"]["selector"]["matchLabels"], &pod_labels),
        "the PodDisruptionBudget selects the Deployment's pods"
    );
    assert_eq!(
        string_map(&pdb["spec"]["selector"]["matchLabels"]),
        string_map(&deployment["spec"]["selector"]["matchLabels"])
    );
    assert!(
        !pdb["spec"]["maxUnavailable"].is_null() || !pdb["spec"]["minAvailable"].is_null(),
        "the PodDisruptionBudget sets a budget"
    );
}

#[test]
fn k8s_kustomization_builds() {
    let Some(kubectl) = tool("kubectl", false) else {
        return;
    };
    let out = run(Command::new(kubectl)
        .args(["kustomize"])
        .arg(root().join("deploy/k8s")));
    let built = String::from_utf8_lossy(&out.stdout);
    assert!(built.contains("kind: Deployment"), "{built}");
}

// ---------------------------------------------------------------------------------------------
// Dockerfile, systemd, scripts, TLS, docs
// ---------------------------------------------------------------------------------------------

#[test]
fn dockerfile_builds_pushgate_and_runs_it_unprivileged() {
    let dockerfile = read("Dockerfile");
    // Instructions, with continuation lines joined.
    let joined = dockerfile
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("\\\n", " ");
    let instructions: Vec<(String, String)> = joined
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let (op, rest) = l.split_once(char::is_whitespace)?;
            Some((op.to_uppercase(), rest.trim().to_owned()))
        })
        .collect();
    let all = |op: &str| -> Vec<&str> {
        instructions
            .iter()
            .filter(|(o, _)| o == op)
            .map(|(_, r)| r.as_str())
            .collect()
    };

    assert!(all("FROM").len() >= 2, "multi-stage build");
    let build = all("RUN")
        .into_iter()
        .find(|r| r.contains("cargo build"))
        .expect("a cargo build");
    let words: Vec<&str> = build.split_whitespace().collect();
    assert!(words.contains(&"--release"), "{build}");
    assert!(
        words
            .windows(2)
            .any(|w| w == ["-p", "pushgate"] || w == ["--package", "pushgate"])
            || words.contains(&"--package=pushgate"),
        "the image builds the pushgate package: {build}"
    );

    let user = *all("USER").last().expect("a USER");
    let name = user.split(':').next().unwrap();
    assert!(name != "root" && name != "0", "runs as {user}");
    let health = all("HEALTHCHECK");
    assert_eq!(health.len(), 1, "one HEALTHCHECK");
    assert!(health[0].contains("/healthz"), "{}", health[0]);
    let entry = *all("ENTRYPOINT").last().expect("an ENTRYPOINT");
    assert!(
        entry.contains("pushgate") && entry.contains("\"serve\""),
        "{entry}"
    );

    // The port the node listens on is exposed and probed.
    let env: Vec<(String, String)> = all("ENV")
        .iter()
        .filter_map(|e| e.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    assert_known(
        "Dockerfile",
        env.iter()
            .filter(|(k, _)| k.starts_with("PUSHGATE_"))
            .map(|(k, _)| k.clone()),
    );
    let listen = env
        .iter()
        .find(|(k, _)| k == "PUSHGATE_LISTEN")
        .map(|(_, v)| v.clone())
        .or_else(|| env_vars()["PUSHGATE_LISTEN"].clone())
        .unwrap();
    let port = port_of(&listen);
    assert!(
        all("EXPOSE")
            .iter()
            .any(|e| e.split_whitespace().any(|p| p == port.to_string()))
    );
    assert!(
        health[0].contains(&format!(":{port}/healthz")),
        "{}",
        health[0]
    );

    // No build output or private keys in the build context.
    let ignore = read(".dockerignore");
    for entry in ["target", ".git", "deploy/tls/certs", ".env"] {
        assert!(
            ignore
                .lines()
                .any(|l| l.trim().trim_end_matches('/') == entry),
            ".dockerignore lacks {entry}"
        );
    }
}

#[test]
fn systemd_unit_drains_and_raises_the_open_file_limit() {
    let unit = read("deploy/systemd/pushgate.service");
    let mut settings: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('#') || line.starts_with('[') || line.is_empty() {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            settings.entry(k.to_owned()).or_default().push(v.to_owned());
        }
    }
    let one = |key: &str| -> &str {
        settings
            .get(key)
            .and_then(|v| v.last())
            .unwrap_or_else(|| panic!("pushgate.service lacks {key}="))
    };
    let nofile: u64 = one("LimitNOFILE")
        .split(':')
        .next_back()
        .unwrap()
        .parse()
        .unwrap();
    assert!(nofile >= 65536, "LimitNOFILE={nofile}");
    assert!(
        one("ExecStart").ends_with("pushgate serve"),
        "{}",
        one("ExecStart")
    );
    assert!(!one("User").is_empty() && one("User") != "root");
    assert!(one("EnvironmentFile").starts_with('/') || one("EnvironmentFile").starts_with("-/"));
    assert_eq!(one("Restart"), "on-failure");
    assert_eq!(one("KillSignal"), "SIGTERM");
    assert_eq!(one("NoNewPrivileges"), "yes");
    let vars = env_vars();
    let drain = default_duration(&vars, "PUSHGATE_DRAIN_PERIOD");
    let stop = duration(one("TimeoutStopSec"));
    assert!(stop > drain, "TimeoutStopSec {stop:?} <= drain {drain:?}");

    let example = env_file("deploy/systemd/pushgate.env.example");
    assert_known(
        "deploy/systemd/pushgate.env.example",
        example.keys().cloned(),
    );
    if let Some(d) = example.get("PUSHGATE_DRAIN_PERIOD") {
        assert!(
            stop > duration(d),
            "TimeoutStopSec vs the example's drain period"
        );
    }
}

#[test]
fn scripts_parse() {
    let mut scripts = vec![
        "deploy/nginx/render.sh".to_owned(),
        "deploy/tls/make-certs.sh".to_owned(),
        ".ci/run".to_owned(),
    ];
    for entry in std::fs::read_dir(root().join("scripts")).expect("scripts/") {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if name.ends_with(".sh") {
            scripts.push(format!("scripts/{name}"));
        }
    }
    for script in scripts {
        run(Command::new("bash").arg("-n").arg(root().join(&script)));
    }
    // These are plain POSIX sh: they run in minimal containers.
    for script in ["deploy/tls/make-certs.sh", "deploy/redis/cluster-create.sh"] {
        run(Command::new("sh").arg("-n").arg(root().join(script)));
    }
}

#[test]
fn make_certs_is_idempotent_and_names_localhost() {
    let Some(_) = tool("openssl", true) else {
        return;
    };
    let scratch = Scratch::new("certs");
    let dir = scratch.path("certs");
    let first = make_certs(&dir);
    assert!(first.contains("made CA and server certificate"), "{first}");
    let files = ["ca.crt", "ca.key", "server.crt", "server.key"];
    let snapshot = || -> Vec<Vec<u8>> {
        files
            .iter()
            .map(|f| std::fs::read(scratch.path(&format!("certs/{f}"))).unwrap())
            .collect()
    };
    let before = snapshot();
    let second = make_certs(&dir);
    assert!(second.contains("are current"), "{second}");
    assert_eq!(before, snapshot(), "a second run changed the certificates");

    run(Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(scratch.path("certs/ca.crt"))
        .arg(scratch.path("certs/server.crt")));
    let text = run(Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(scratch.path("certs/server.crt")));
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("DNS:localhost") && text.contains("IP Address:127.0.0.1"),
        "{text}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for key in ["ca.key", "server.key"] {
            let mode = std::fs::metadata(scratch.path(&format!("certs/{key}")))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "{key} is readable by others: {mode:o}");
        }
    }
}

#[test]
fn operations_doc_names_real_metrics() {
    let source = read("crates/gateway/src/metrics.rs");
    let registered: BTreeSet<String> = source
        .split(".register(")
        .skip(1)
        .filter_map(|rest| quoted_after(rest.trim_start(), ""))
        .map(|name| format!("pushgate_{name}"))
        .collect();
    assert!(registered.contains("pushgate_redis_up"), "{registered:?}");
    let doc = read("docs/operations.md");
    let mut named = BTreeSet::new();
    for (i, _) in doc.match_indices("pushgate_") {
        if i > 0 && doc[..i].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let end = doc[i..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(doc.len(), |e| i + e);
        named.insert(doc[i..end].to_owned());
    }
    for name in &named {
        let base = ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .filter(|base| registered.contains(*base))
            .unwrap_or(name);
        assert!(
            registered.contains(base),
            "docs/operations.md names {name}, which metrics.rs does not register"
        );
    }
    for alert in [
        "pushgate_redis_up",
        "pushgate_drops_total",
        "pushgate_redis_probe_failures_total",
        "pushgate_auth_failures_total",
        "pushgate_connections",
        "pushgate_redis_publish_seconds_bucket",
    ] {
        assert!(
            named.contains(alert),
            "docs/operations.md does not cover {alert}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Client addresses behind the proxy
// ---------------------------------------------------------------------------------------------

/// An IPv4 address or CIDR as `(network, prefix length)`.
fn ipv4_cidr(text: &str) -> (u32, u32) {
    let (addr, prefix) = text.trim().split_once('/').unwrap_or((text.trim(), "32"));
    let addr: std::net::Ipv4Addr = addr
        .parse()
        .unwrap_or_else(|_| panic!("{text:?} is not an IPv4 address or CIDR"));
    let prefix: u32 = prefix.parse().expect("prefix length");
    assert!(prefix <= 32, "{text:?}");
    (u32::from(addr), prefix)
}

fn cidr_contains(cidr: (u32, u32), ip: u32) -> bool {
    let mask = u32::MAX.checked_shl(32 - cidr.1).unwrap_or(0);
    cidr.0 & mask == ip & mask
}

/// The entries of a `PUSHGATE_TRUSTED_PROXIES` value, each a valid IPv4 address or CIDR.
fn trusted_proxies(file: &str, value: &str) -> Vec<(u32, u32)> {
    let entries: Vec<(u32, u32)> = value
        .split(',')
        .filter(|e| !e.trim().is_empty())
        .map(ipv4_cidr)
        .collect();
    assert!(
        !entries.is_empty(),
        "{file}: PUSHGATE_TRUSTED_PROXIES is empty"
    );
    entries
}

#[test]
fn compose_fixed_addresses_are_in_the_subnet_and_outside_the_dynamic_range() {
    let compose = Compose::load();
    let docs = yaml_docs("docker-compose.yml");
    let config = &docs[0]["networks"]["default"]["ipam"]["config"][0];
    let subnet = ipv4_cidr(&s(&config["subnet"]));
    let dynamic = ipv4_cidr(&s(&config["ip_range"]));
    assert!(
        cidr_contains(subnet, dynamic.0) && dynamic.1 >= subnet.1,
        "ip_range lies in the subnet"
    );
    let fixed: Vec<(&String, String)> = (compose.services.keys())
        .filter_map(|name| Some((name, compose.address(name)?)))
        .collect();
    assert!(
        fixed.len() >= 9,
        "the nginx services and cluster members: {fixed:?}"
    );
    for (name, addr) in fixed {
        let ip = ipv4_cidr(&addr).0;
        assert!(
            cidr_contains(subnet, ip),
            "{name}'s {addr} is in the subnet"
        );
        // Docker does not hold an address back for a container not started yet.
        assert!(
            !cidr_contains(dynamic, ip),
            "{name}'s {addr} is outside ip_range, so no other container can take it first"
        );
    }
}

#[test]
fn compose_gateways_trust_nginx_and_only_nginx() {
    let compose = Compose::load();
    for setup in &SETUPS {
        gateways_trust_their_nginx_and_only_it(&compose, setup);
    }
}

fn gateways_trust_their_nginx_and_only_it(compose: &Compose, setup: &Setup) {
    let nginx = compose
        .address(setup.nginx)
        .unwrap_or_else(|| panic!("{} has no fixed address", setup.nginx));
    let nginx_ip = ipv4_cidr(&nginx).0;
    let docs = yaml_docs("docker-compose.yml");
    let subnets: Vec<(u32, u32)> = docs[0]["networks"]["default"]["ipam"]["config"]
        .as_sequence()
        .expect("docker-compose.yml fixes the default network's subnet")
        .iter()
        .map(|c| ipv4_cidr(&s(&c["subnet"])))
        .collect();
    assert!(
        subnets.iter().any(|net| cidr_contains(*net, nginx_ip)),
        "nginx's address is in the network's subnet"
    );
    for (name, svc) in compose.gateways_of(setup) {
        let env = compose_env(&svc["environment"]);
        let value = env
            .get("PUSHGATE_TRUSTED_PROXIES")
            .unwrap_or_else(|| panic!("{name} does not trust nginx (PUSHGATE_TRUSTED_PROXIES)"));
        let trusted = trusted_proxies(&format!("docker-compose.yml ({name})"), value);
        assert!(
            trusted.iter().any(|net| cidr_contains(*net, nginx_ip)),
            "{name} trusts {value}, which is not nginx's address"
        );
        // Only nginx: not the network's gateway, through which host connections arrive.
        for net in &subnets {
            let gateway = net.0 + 1;
            assert!(
                !trusted.iter().any(|t| cidr_contains(*t, gateway)),
                "{name} trusts the network's gateway (any host process could then set \
                 X-Forwarded-For)"
            );
        }
    }
}

#[test]
fn k8s_and_systemd_name_their_trusted_proxies() {
    let k8s = Manifests::load();
    let config = string_map(&k8s.named("ConfigMap", "pushgate-config")["data"]);
    trusted_proxies(
        "deploy/k8s/configmap.yaml",
        config
            .get("PUSHGATE_TRUSTED_PROXIES")
            .expect("the ConfigMap sets PUSHGATE_TRUSTED_PROXIES (ingress-nginx's addresses)"),
    );
    let example = env_file("deploy/systemd/pushgate.env.example");
    trusted_proxies(
        "deploy/systemd/pushgate.env.example",
        example
            .get("PUSHGATE_TRUSTED_PROXIES")
            .expect("the example sets PUSHGATE_TRUSTED_PROXIES (its nginx hosts)"),
    );
}

/// A WebSocket handshake through nginx with curl from the local address `from`, with
/// `X-Forwarded-For: xff` when given; the status line of the reply. curl holds the connection
/// until `--max-time`.
fn curl_ws_from(
    base: &str,
    ca: &str,
    from: &str,
    xff: Option<&str>,
    hold: &str,
) -> std::process::Child {
    let jwt = token("deploy", &["room:*"], &[]);
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-i", "--http1.1", "--max-time", hold, "--cacert", ca])
        .args(["--interface", from])
        .args(["-H", "Connection: Upgrade", "-H", "Upgrade: websocket"])
        .args(["-H", "Sec-WebSocket-Version: 13"])
        .args(["-H", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="]);
    if let Some(xff) = xff {
        cmd.args(["-H", &format!("X-Forwarded-For: {xff}")]);
    }
    cmd.arg(format!("{base}/ws?token={jwt}"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("running curl")
}

fn status_line(child: std::process::Child) -> String {
    let out = child.wait_with_output().expect("curl output");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned()
}

#[tokio::test]
async fn nodes_behind_nginx_count_clients_by_their_own_address() {
    let (Some(nginx), Some(_), Some(_)) = (
        tool("nginx", true),
        tool("openssl", true),
        tool("curl", true),
    ) else {
        return;
    };
    // One connection per client address; nginx (127.0.0.1) is trusted.
    let node = NodeProcess::spawn(
        "n1",
        None,
        &[
            "--trusted-proxies",
            "127.0.0.1",
            "--max-connections-per-ip",
            "1",
        ],
    )
    .await;
    let running = Nginx::start(&nginx, &node.addr.to_string(), &[]);
    let (base, ca) = (running.url(""), running.ca_file());

    // A client at 127.0.0.5 that claims to be someone else: nginx appends 127.0.0.5, and that
    // is what the node counts.
    let first = curl_ws_from(&base, &ca, "127.0.0.5", Some("203.0.113.9"), "4");
    pushgate_tests::eventually("the first client is connected", || async {
        pushgate_tests::metric(&node.base(), "pushgate_connections").await == 1.0
    })
    .await;
    let again = curl_ws_from(&base, &ca, "127.0.0.5", Some("203.0.113.10"), "2");
    assert!(
        status_line(again).starts_with("HTTP/1.1 429"),
        "a second connection from 127.0.0.5 is over its limit, whatever it claims"
    );
    let other = curl_ws_from(&base, &ca, "127.0.0.6", None, "1");
    assert!(
        status_line(other).starts_with("HTTP/1.1 101"),
        "another client address has its own limit"
    );
    assert!(status_line(first).starts_with("HTTP/1.1 101"));
}
