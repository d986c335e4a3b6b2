//! What `deploy/` ships, checked with the tools an operator would use:
//! `systemd-analyze security` (exposure ≤ 2.0 per unit) and `verify`, the
//! Headscale ACL parsed as HuJSON and checked for least privilege,
//! `install.sh` staged under a DESTDIR, shellcheck, the compose file,
//! the agent's `sd_notify` conversation as a real process, and the
//! `FROM scratch` agent image running halo-agent and llama-server.
//! A missing tool fails the test with the command that installs it.

use rustix::process::{Pid, Signal};
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use tests::{free_port, llama_bin, text, wait_for};

/// The highest `systemd-analyze security` exposure a unit may have.
const MAX_EXPOSURE: f64 = 2.0;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

fn units() -> Vec<PathBuf> {
    let dir = repo().join("deploy/systemd");
    let mut units: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("deploy/systemd")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "service"))
        .collect();
    units.sort();
    let names: Vec<_> = units.iter().filter_map(|p| p.file_name()).collect();
    assert_eq!(
        names,
        ["halo-agent.service", "halo-controller.service"],
        "units in deploy/systemd"
    );
    units
}

/// Runs a tool; a missing tool panics with how to install it.
fn tool(program: &str, install: &str, args: &[&str], cwd: Option<&Path>) -> Output {
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null());
    if let Some(d) = cwd {
        cmd.current_dir(d);
    }
    match cmd.output() {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("`{program}` is not installed; install it: {install}")
        }
        Err(e) => panic!("run {program}: {e}"),
    }
}

const SYSTEMD_HINT: &str = "apt-get install -y systemd (systemd-analyze >= 250 for --offline)";

/// `Key=value` lines of a unit, every value per key in order.
fn directives(unit: &Path) -> BTreeMap<String, Vec<String>> {
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let body = std::fs::read_to_string(unit).expect("read unit");
    for line in body.lines().map(str::trim) {
        if line.starts_with('#') || line.starts_with('[') || line.is_empty() {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            map.entry(k.trim().to_owned())
                .or_default()
                .push(v.trim().to_owned());
        }
    }
    map
}

#[test]
fn systemd_units_score_at_most_2_0_in_systemd_analyze_security() {
    for unit in units() {
        let path = unit.to_str().expect("utf-8 path");
        // --threshold=20: fail above 2.0 (the scale is 0..100 internally).
        let out = tool(
            "systemd-analyze",
            SYSTEMD_HINT,
            &[
                "security",
                "--offline=true",
                "--threshold=20",
                "--no-pager",
                path,
            ],
            None,
        );
        let stdout = text(&out.stdout);
        let line = stdout
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or_else(|| {
                panic!(
                    "no exposure line for {path}:\n{stdout}\n{}",
                    text(&out.stderr)
                )
            });
        let score: f64 = line
            .split(':')
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("cannot read the score in {line:?}"));
        eprintln!("{}: exposure {score}", unit.display());
        assert!(
            score <= MAX_EXPOSURE && out.status.success(),
            "{path}: exposure {score} > {MAX_EXPOSURE} (status {}):\n{stdout}",
            out.status
        );
    }
}

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    // verify checks that ExecStart's program exists, so each unit is
    // checked as a copy whose program is this test binary.
    let exe = std::env::current_exe().expect("current exe");
    let dir = tempfile::tempdir().expect("tempdir");
    for unit in units() {
        let name = unit.file_name().expect("name");
        let body = std::fs::read_to_string(&unit).expect("read unit");
        let mut n = 0;
        let body: String = body
            .lines()
            .map(|l| match l.strip_prefix("ExecStart=") {
                Some(rest) => {
                    n += 1;
                    let args = rest.split_once(' ').map_or("", |(_, a)| a);
                    format!("ExecStart={} {args}\n", exe.display())
                }
                None => format!("{l}\n"),
            })
            .collect();
        assert_eq!(n, 1, "{}: one ExecStart", unit.display());
        let copy = dir.path().join(name);
        std::fs::write(&copy, body).expect("write copy");
        let out = tool(
            "systemd-analyze",
            SYSTEMD_HINT,
            &["verify", "--man=no", copy.to_str().expect("utf-8")],
            None,
        );
        let stderr = text(&out.stderr);
        assert!(
            out.status.success() && stderr.trim().is_empty(),
            "systemd-analyze verify {}: {}\n{stderr}",
            unit.display(),
            out.status
        );
    }
}

#[test]
fn agent_unit_keeps_instances_across_restarts_and_shields_the_agent_from_oom() {
    let dir = repo().join("deploy/systemd");
    let a = directives(&dir.join("halo-agent.service"));
    let one = |k: &str| -> String {
        let v = a
            .get(k)
            .unwrap_or_else(|| panic!("halo-agent.service lacks {k}="));
        v.last().cloned().unwrap_or_default()
    };
    assert_eq!(one("Type"), "notify");
    assert_eq!(one("KillMode"), "process", "instances survive restarts");
    assert_eq!(
        one("OOMPolicy"),
        "continue",
        "an instance OOM kill must not stop the unit"
    );
    assert!(one("OOMScoreAdjust").parse::<i32>().expect("number") < 0);
    assert!(one("WatchdogSec").ends_with('s'));
    assert_eq!(one("Restart"), "on-failure");
    assert_eq!(one("User"), "halo");
    assert_eq!(one("SupplementaryGroups"), "video render");
    assert_eq!(one("StateDirectory"), "halo-agent");
    assert_eq!(one("ConfigurationDirectory"), "halo");
    assert_eq!(one("ProtectSystem"), "strict");
    assert_eq!(one("PrivateDevices"), "no", "the GPU lives in /dev");
    let allow = &a["DeviceAllow"];
    assert!(allow.iter().any(|d| d.starts_with("/dev/kfd")), "{allow:?}");
    assert!(allow.iter().any(|d| d.starts_with("char-drm")), "{allow:?}");
    assert!(
        !a.contains_key("MemoryMax"),
        "MemoryMax would cap the instances"
    );
    assert_eq!(one("CapabilityBoundingSet"), "");
    assert_eq!(one("AmbientCapabilities"), "");

    let c = directives(&dir.join("halo-controller.service"));
    assert_eq!(c["Type"], ["notify"]);
    assert_eq!(c["StateDirectory"], ["halo-controller"]);
    for (name, u) in [("agent", &a), ("controller", &c)] {
        let filters = &u["SystemCallFilter"];
        assert_eq!(filters[0], "@system-service", "{name}");
        assert_eq!(
            u["RestrictAddressFamilies"],
            ["AF_UNIX AF_INET AF_INET6"],
            "{name}"
        );
    }
}

/// HuJSON → JSON: drops `//` and `/* */` comments outside strings and
/// commas before `}` or `]`.
fn hujson_to_json(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut chars = src.chars().peekable();
    let mut in_string = false;
    while let Some(c) = chars.next() {
        if in_string {
            out.push(c);
            match c {
                '\\' => out.extend(chars.next()),
                '"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match (c, chars.peek()) {
            ('"', _) => {
                in_string = true;
                out.push(c);
            }
            ('/', Some('/')) => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                        break;
                    }
                }
            }
            ('/', Some('*')) => {
                chars.next();
                let mut prev = ' ';
                for c in chars.by_ref() {
                    if prev == '*' && c == '/' {
                        break;
                    }
                    prev = c;
                }
            }
            _ => out.push(c),
        }
    }
    // Trailing commas: a comma followed only by whitespace then } or ].
    let bytes: Vec<char> = out.chars().collect();
    let mut json = String::with_capacity(bytes.len());
    let mut in_string = false;
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if in_string {
            json.push(c);
            if c == '\\' {
                i += 1;
                if let Some(&n) = bytes.get(i) {
                    json.push(n);
                }
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
            json.push(c);
        } else if c == ',' {
            let next = bytes[i + 1..].iter().find(|c| !c.is_whitespace());
            if !matches!(next, Some('}') | Some(']')) {
                json.push(c);
            }
        } else {
            json.push(c);
        }
        i += 1;
    }
    json
}

#[test]
fn hujson_stripping_keeps_strings_intact() {
    let src = "{\n  // c\n  \"a\": \"http://x//y\", /* b */\n  \"b\": [1, 2,],\n}\n";
    let v: serde_json::Value = serde_json::from_str(&hujson_to_json(src)).expect("json");
    assert_eq!(v["a"], "http://x//y");
    assert_eq!(v["b"], serde_json::json!([1, 2]));
}

/// `tag:x:7301` → ("tag:x", ports 7301..=7301); "a,b" and "x-y" allowed.
fn parse_dst(dst: &str) -> (String, Vec<(u16, u16)>) {
    let (host, ports) = dst.rsplit_once(':').expect("host:ports");
    let ranges = ports
        .split(',')
        .map(|p| {
            assert_ne!(p, "*", "{dst}: every port must be named");
            match p.split_once('-') {
                Some((a, b)) => (a.parse().expect("port"), b.parse().expect("port")),
                None => {
                    let n = p.parse().expect("port");
                    (n, n)
                }
            }
        })
        .collect();
    (host.to_owned(), ranges)
}

#[test]
fn headscale_acl_lets_each_port_be_reached_only_by_its_role() {
    let path = repo().join("deploy/headscale/acl.hujson");
    let src = std::fs::read_to_string(&path).expect("acl.hujson");
    let policy: serde_json::Value = serde_json::from_str(&hujson_to_json(&src))
        .unwrap_or_else(|e| panic!("{} is not valid HuJSON: {e}", path.display()));
    let owners = policy["tagOwners"].as_object().expect("tagOwners");
    let rules = policy["acls"].as_array().expect("acls");
    assert!(!rules.is_empty(), "an empty acls list denies everything");

    // (source, destination host, first port, last port)
    let mut grants = Vec::new();
    for rule in rules {
        assert_eq!(rule["action"], "accept", "{rule}");
        let srcs: Vec<&str> = rule["src"]
            .as_array()
            .expect("src")
            .iter()
            .map(|s| s.as_str().expect("src string"))
            .collect();
        for dst in rule["dst"].as_array().expect("dst") {
            let dst = dst.as_str().expect("dst string");
            let (host, ranges) = parse_dst(dst);
            assert_ne!(host, "*", "{dst}: no rule may reach every machine");
            for s in &srcs {
                assert_ne!(*s, "*", "no rule may come from anywhere: {rule}");
                for &(a, b) in &ranges {
                    grants.push((s.to_string(), host.clone(), a, b));
                }
            }
        }
    }
    for (s, d, _, _) in &grants {
        for tag in [s, d].into_iter().filter(|t| t.starts_with("tag:")) {
            assert!(
                owners.contains_key(tag.as_str()),
                "{tag} has no tagOwners entry"
            );
        }
    }
    let who = |port: u16| -> BTreeSet<(String, String)> {
        grants
            .iter()
            .filter(|(_, _, a, b)| (*a..=*b).contains(&port))
            .map(|(s, d, _, _)| (s.clone(), d.clone()))
            .collect()
    };
    let only = |src: &str, dst: &str| -> BTreeSet<(String, String)> {
        [(src.to_owned(), dst.to_owned())].into()
    };
    let agent_port: u16 = agent::config::DEFAULT_LISTEN
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .expect("agent port");
    let (first, last) = agent::config::DEFAULT_PORT_RANGE
        .split_once('-')
        .map(|(a, b)| {
            (
                a.parse::<u16>().expect("port"),
                b.parse::<u16>().expect("port"),
            )
        })
        .expect("range");
    assert_eq!(
        who(agent_port),
        only("tag:halo-controller", "tag:halo-node")
    );
    for port in [first, (first + last) / 2, last] {
        assert_eq!(
            who(port),
            only("tag:editor", "tag:halo-node"),
            "port {port}"
        );
    }
    assert!(who(first - 1).is_empty());
    assert_eq!(who(7300), only("tag:halo-admin", "tag:halo-controller"));
    // ggml-rpc-server ports: the example agent.toml's rpc_port_range, only
    // from split hosts (never from editors).
    let agent_toml = std::fs::read_to_string(repo().join("deploy/config/agent.toml"))
        .expect("deploy/config/agent.toml");
    let rpc = agent_toml
        .lines()
        .find_map(|l| l.strip_prefix("rpc_port_range = "))
        .map(|v| v.trim_matches('"'))
        .and_then(|v| v.split_once('-'))
        .map(|(a, b)| {
            (
                a.parse::<u16>().expect("port"),
                b.parse::<u16>().expect("port"),
            )
        })
        .expect("rpc_port_range in deploy/config/agent.toml");
    for port in [rpc.0, rpc.1] {
        assert_eq!(
            who(port),
            only("tag:halo-rpc-host", "tag:halo-node"),
            "port {port}"
        );
    }
    assert!(who(rpc.1 + 1).is_empty() && who(last + 1) != only("tag:editor", "tag:halo-node"));
    for port in [2379, 2380] {
        assert_eq!(
            who(port),
            only("tag:halo-controller", "tag:halo-controller")
        );
    }
}

#[test]
fn shell_scripts_pass_shellcheck() {
    // Every shell script in the repository.
    let scripts = [
        ".ci/run",
        "deploy/build-llama.sh",
        "deploy/images/build.sh",
        "deploy/systemd/install.sh",
        "tests/compose.sh",
        "tests/deps.sh",
        "tests/run.sh",
    ];
    let out = tool(
        "shellcheck",
        "apt-get install -y shellcheck",
        &scripts,
        Some(&repo()),
    );
    assert!(
        out.status.success(),
        "shellcheck:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

fn write_exe(path: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, body).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

#[test]
fn install_script_stages_a_node_under_destdir_and_keeps_existing_config() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bin = tmp.path().join("bin");
    let llama = tmp.path().join("llama");
    let stage = tmp.path().join("stage");
    for d in [&bin, &llama] {
        std::fs::create_dir(d).expect("mkdir");
    }
    for b in ["halo-agent", "halo-controller", "haloctl"] {
        write_exe(&bin.join(b), "#!/bin/sh\n");
    }
    write_exe(&llama.join("llama-server"), "#!/bin/sh\n");
    std::fs::write(llama.join("libllama.so.0.6.0"), "").expect("lib");
    std::os::unix::fs::symlink("libllama.so.0.6.0", llama.join("libllama.so.0")).expect("link");
    let run = || {
        let out = Command::new("bash")
            .arg(repo().join("deploy/systemd/install.sh"))
            .args(["--agent", "--controller", "--etcd", "--prefix", "/usr"])
            .arg("--bin-dir")
            .arg(&bin)
            .arg("--llama-dir")
            .arg(&llama)
            .arg("--destdir")
            .arg(&stage)
            .output()
            .expect("run install.sh");
        assert!(
            out.status.success(),
            "install.sh: {}\n{}{}",
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    };
    let first = run();
    assert!(first.contains("dry run"), "{first}");
    for f in [
        "usr/bin/halo-agent",
        "usr/bin/halo-controller",
        "usr/bin/haloctl",
        "opt/llama.cpp/bin/llama-server",
        "opt/llama.cpp/bin/libllama.so.0.6.0",
        "etc/systemd/system/halo-agent.service",
        "etc/systemd/system/halo-controller.service",
        "etc/systemd/system/halo-controller.service.d/etcd.conf",
        "etc/halo/agent.toml",
        "etc/default/etcd.halo-example",
    ] {
        assert!(stage.join(f).exists(), "{f} not staged:\n{first}");
    }
    let link = stage.join("opt/llama.cpp/bin/libllama.so.0");
    assert!(link.is_symlink(), "library symlinks are kept");
    let unit =
        std::fs::read_to_string(stage.join("etc/systemd/system/halo-agent.service")).expect("unit");
    assert!(unit.contains("ExecStart=/usr/bin/halo-agent --config /etc/halo/agent.toml"));

    let config = stage.join("etc/halo/agent.toml");
    std::fs::write(&config, "node_name = \"mine\"\n").expect("edit config");
    // The node's key as haloctl certs writes it (0600), and a person's.
    use std::os::unix::fs::PermissionsExt;
    let tls = stage.join("etc/halo/tls");
    for k in ["agent-halo1.key", "admin-alice.key"] {
        std::fs::write(tls.join(k), "key").expect("key");
        std::fs::set_permissions(tls.join(k), std::fs::Permissions::from_mode(0o600))
            .expect("chmod");
    }
    let second = run();
    assert!(second.contains("kept existing"), "{second}");
    assert_eq!(
        std::fs::read_to_string(&config).expect("config"),
        "node_name = \"mine\"\n",
        "a second run never overwrites config"
    );
    let mode = |k: &str| {
        std::fs::metadata(tls.join(k))
            .expect("key")
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("agent-halo1.key"), 0o640, "the unit's group reads it");
    assert_eq!(
        mode("admin-alice.key"),
        0o600,
        "a person's key is left alone"
    );
}

#[test]
fn install_script_writes_a_controller_config_and_catalog_that_start_a_controller() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bin = tmp.path().join("bin");
    let stage = tmp.path().join("stage");
    std::fs::create_dir(&bin).expect("mkdir");
    for b in ["halo-controller", "haloctl"] {
        write_exe(&bin.join(b), "#!/bin/sh\n");
    }
    let out = Command::new("bash")
        .arg(repo().join("deploy/systemd/install.sh"))
        .arg("--controller")
        .arg("--bin-dir")
        .arg(&bin)
        .arg("--destdir")
        .arg(&stage)
        .output()
        .expect("run install.sh");
    let said = text(&out.stdout);
    assert!(
        out.status.success(),
        "install.sh: {said}{}",
        text(&out.stderr)
    );
    // The next steps name keys controller.toml has.
    assert!(said.contains("catalog.toml"), "{said}");
    assert!(
        !said.contains("model_dirs and"),
        "agent keys offered for the controller: {said}"
    );
    assert!(said.contains("next steps"), "{said}");

    // The person's part: certificates in /etc/halo/tls (README: TLS). The
    // staged root stands in for /, and the example's tailnet addresses for
    // loopback ones; everything else is as install.sh wrote it.
    let etc = stage.join("etc/halo");
    tests::pki::pki().export(
        &etc.join("tls"),
        "controller",
        "installtest",
        &[],
        "controller-ctl",
    );
    let config = etc.join("controller.toml");
    let written = std::fs::read_to_string(&config).expect("controller.toml");
    assert!(
        written.contains("catalog = \"/etc/halo/catalog.toml\""),
        "{written}"
    );
    let rebased = written
        .replace("\"/etc/halo/", &format!("\"{}/", etc.display()))
        .replace("100.64.0.", "127.0.0.");
    std::fs::write(&config, rebased).expect("rebase config");

    let port = free_port();
    let log = tmp.path().join("controller.log");
    let out = std::fs::File::create(&log).expect("log");
    let child = Command::new(env!("CARGO_BIN_EXE_halo-controller-shim"))
        .arg("--config")
        .arg(&config)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--store-path")
        .arg(tmp.path().join("state.json"))
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("log"))
        .stderr(out)
        .spawn()
        .expect("start halo-controller");
    let mut daemon = Daemon {
        name: "halo-controller",
        child,
        log,
    };
    let up = wait_for(Duration::from_secs(20), || {
        if let Ok(Some(status)) = daemon.child.try_wait() {
            panic!("halo-controller exited ({status}) on the installed config");
        }
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    assert!(up.is_some(), "halo-controller never listened");

    // The installed catalog is the one it serves.
    let mut ctl = Command::new(env!("CARGO_BIN_EXE_haloctl-shim"));
    ctl.args(["models", "--controller"])
        .arg(format!("https://127.0.0.1:{port}"));
    for (k, v) in tests::pki::pki().env("admin", "installtest") {
        ctl.env(k, v);
    }
    let out = ctl.output().expect("haloctl models");
    let models = text(&out.stdout);
    assert!(
        out.status.success(),
        "haloctl models: {models}{}",
        text(&out.stderr)
    );
    for name in ["gpt-oss-20b", "qwen3-coder-30b", "deepseek-v3.1-1bit"] {
        assert!(models.contains(name), "{name} missing from:\n{models}");
    }
}

#[test]
fn compose_draft_is_valid_for_docker_compose_v1() {
    let file = repo().join("deploy/compose/docker-compose.yml");
    let out = tool(
        "docker-compose",
        "apt-get install -y docker-compose (1.x)",
        &["-f", file.to_str().expect("utf-8"), "config", "--quiet"],
        None,
    );
    assert!(
        out.status.success(),
        "docker-compose config: {}",
        text(&out.stderr)
    );
}

/// Reads datagrams until `pred` matches one or the deadline passes.
fn recv_until(sock: &UnixDatagram, timeout: Duration, pred: impl Fn(&str) -> bool) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = text(&buf[..n]);
            let done = pred(&msg);
            seen.push(msg);
            if done {
                return seen;
            }
        }
    }
    panic!("no matching notification within {timeout:?}; got {seen:?}");
}

/// A child killed (and reaped) on drop, its output in a log printed when
/// the test fails.
/// A daemon under test, killed on drop; its log is printed on failure.
struct Daemon {
    name: &'static str,
    child: std::process::Child,
    log: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!("----- {} log -----\n{log}", self.name);
        }
    }
}

/// Starts `cmd` with a notify socket and a 200 ms watchdog, and checks what
/// systemd would see: READY=1 once `port` accepts connections, WATCHDOG=1
/// about every 100 ms, STOPPING=1 after SIGTERM, then a clean exit.
fn tells_systemd_ready_feeds_the_watchdog_and_says_stopping(
    name: &'static str,
    mut cmd: Command,
    port: u16,
    tmp: &Path,
) {
    let sock_path = tmp.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let log = tmp.join(format!("{name}.log"));
    let out = std::fs::File::create(&log).expect("log");
    let child = cmd
        .env("NOTIFY_SOCKET", &sock_path)
        // 200 ms: a ping every 100 ms. No WATCHDOG_PID: allowed.
        .env("WATCHDOG_USEC", "200000")
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("log"))
        .stderr(out)
        .spawn()
        .unwrap_or_else(|e| panic!("start {name}: {e}"));
    let mut daemon = Daemon { name, child, log };

    let seen = recv_until(&sock, Duration::from_secs(20), |m| m.contains("READY=1"));
    let ready = seen.last().expect("ready");
    assert!(
        ready.contains(&format!("STATUS=serving on 127.0.0.1:{port}")),
        "{ready}"
    );
    // Ready means serving: the port accepts a connection now.
    std::net::TcpStream::connect(("127.0.0.1", port)).expect("listener is up at READY=1");
    let start = Instant::now();
    for _ in 0..3 {
        recv_until(&sock, Duration::from_secs(5), |m| m == "WATCHDOG=1");
    }
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "pings every ~100 ms"
    );

    let pid = Pid::from_raw(i32::try_from(daemon.child.id()).expect("pid")).expect("pid");
    rustix::process::kill_process(pid, Signal::TERM).expect("SIGTERM");
    let seen = recv_until(&sock, Duration::from_secs(10), |m| m.contains("STOPPING=1"));
    assert!(
        seen.last().is_some_and(|m| m.contains("STATUS=")),
        "{seen:?}"
    );
    let status = wait_for(Duration::from_secs(20), || {
        daemon.child.try_wait().ok().flatten()
    })
    .unwrap_or_else(|| panic!("{name} exits after SIGTERM"));
    assert!(status.success(), "{name} exit after SIGTERM: {status}");
}

#[test]
fn agent_tells_systemd_ready_feeds_the_watchdog_and_says_stopping() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let models = tmp.path().join("models");
    std::fs::create_dir(&models).expect("models");
    let port = free_port();
    let first = free_port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_halo-agent-shim"));
    cmd.args(["--node-name", "n1", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--model-dir")
        .arg(&models)
        .arg("--state-dir")
        .arg(tmp.path().join("state"))
        .arg("--port-range")
        .arg(format!("{first}-{first}"))
        // Never started here; it only has to be an executable.
        .arg("--llama-server")
        .arg(std::env::current_exe().expect("exe"))
        .arg("--insecure-loopback-only");
    tells_systemd_ready_feeds_the_watchdog_and_says_stopping("halo-agent", cmd, port, tmp.path());
}

#[test]
fn controller_tells_systemd_ready_feeds_the_watchdog_and_says_stopping() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_halo-controller-shim"));
    cmd.arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--store-path")
        .arg(tmp.path().join("state.json"))
        .arg("--insecure-loopback-only");
    tells_systemd_ready_feeds_the_watchdog_and_says_stopping(
        "halo-controller",
        cmd,
        port,
        tmp.path(),
    );
}

/// The image tag this test run builds (never `dev`, which people use).
fn test_tag() -> String {
    format!("test-{}", std::process::id())
}

/// Removes the test image (and containers) even when the test fails.
struct ImageGuard {
    tag: String,
    containers: Vec<String>,
}

impl Drop for ImageGuard {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = Command::new("docker").args(["rm", "-f", "-v", c]).output();
        }
        let _ = Command::new("docker")
            .args(["rmi", "-f", &format!("halo-agent:{}", self.tag)])
            .output();
    }
}

fn docker(args: &[&str]) -> Output {
    tool(
        "docker",
        "a Docker engine and client (docker.io)",
        args,
        None,
    )
}

#[test]
fn agent_image_from_scratch_runs_the_agent_and_serves_the_tiny_model() {
    let info = docker(&["info", "--format", "{{.ServerVersion}}"]);
    assert!(
        info.status.success(),
        "the Docker engine is not reachable: {}",
        text(&info.stderr)
    );
    let llama_server = llama_bin("llama-server");
    let llama_dir = llama_server.parent().expect("llama bin dir");
    let tmp = tempfile::tempdir().expect("tempdir");
    // The image takes the agent from --bin-dir: this package's shim is the
    // real agent (agent::cli::main).
    let bin = tmp.path().join("bin");
    std::fs::create_dir(&bin).expect("bin");
    std::fs::copy(
        env!("CARGO_BIN_EXE_halo-agent-shim"),
        bin.join("halo-agent"),
    )
    .expect("copy");
    let models = tmp.path().join("models");
    std::fs::create_dir(&models).expect("models");
    agent::gguf::fixtures::write_tiny_llama(&models.join("tiny.gguf"), 7).expect("tiny");

    let tag = test_tag();
    let mut guard = ImageGuard {
        tag: tag.clone(),
        containers: Vec::new(),
    };
    let out = Command::new("bash")
        .arg(repo().join("deploy/images/build.sh"))
        .args(["--only", "agent", "--tag", &tag, "--bin-dir"])
        .arg(&bin)
        .arg("--llama-dir")
        .arg(llama_dir)
        .output()
        .expect("run build.sh");
    assert!(
        out.status.success(),
        "build.sh: {}\n{}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    let image = format!("halo-agent:{tag}");

    let help = docker(&["run", "--rm", &image, "/usr/local/bin/halo-agent", "--help"]);
    assert!(help.status.success(), "{}", text(&help.stderr));
    assert!(text(&help.stdout).contains("Usage: halo-agent"));
    let version = docker(&[
        "run",
        "--rm",
        &image,
        "/opt/llama.cpp/bin/llama-server",
        "--version",
    ]);
    assert!(
        version.status.success() && text(&version.stderr).contains("version"),
        "llama-server --version in the image: {}",
        text(&version.stderr)
    );

    // The agent itself, as the image runs it, with the model and its
    // certificates mounted (a non-loopback address needs TLS). The key is
    // made readable for the image's user (uid 10001) in this copy only.
    let mount = format!("{}:/srv/models:ro", models.display());
    let tls = tmp.path().join("tls");
    tests::pki::pki().export(&tls, "agent", "img", &[], "agent");
    let tls_mount = format!("{}:/etc/halo/tls:ro", tls.display());
    let started = docker(&[
        "run",
        "-d",
        "-v",
        &mount,
        "-v",
        &tls_mount,
        "-e",
        "HALO_AGENT_NODE_NAME=img",
        "-e",
        "HALO_AGENT_LISTEN=0.0.0.0:7301",
        "-e",
        "HALO_AGENT_TLS_CERT=/etc/halo/tls/agent.pem",
        "-e",
        "HALO_AGENT_TLS_KEY=/etc/halo/tls/agent.key",
        "-e",
        "HALO_AGENT_TLS_CA=/etc/halo/tls/ca.pem",
        &image,
    ]);
    assert!(started.status.success(), "{}", text(&started.stderr));
    let agent = text(&started.stdout).trim().to_owned();
    guard.containers.push(agent.clone());
    let logs = wait_for(Duration::from_secs(20), || {
        let l = docker(&["logs", &agent]);
        let all = text(&l.stdout) + &text(&l.stderr);
        all.contains("halo-agent serving").then_some(all)
    });
    assert!(
        logs.is_some(),
        "agent in the image never served: {:?}",
        docker(&["logs", &agent])
    );

    // llama-server from the image answers a completion on the tiny model.
    let served = docker(&[
        "run",
        "-d",
        "-v",
        &mount,
        &image,
        "/opt/llama.cpp/bin/llama-server",
        "-m",
        "/srv/models/tiny.gguf",
        "--host",
        "0.0.0.0",
        "--port",
        "8100",
        "-c",
        "256",
        "-t",
        "1",
    ]);
    assert!(served.status.success(), "{}", text(&served.stderr));
    let server = text(&served.stdout).trim().to_owned();
    guard.containers.push(server.clone());
    let ip = text(
        &docker(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            &server,
        ])
        .stdout,
    )
    .trim()
    .to_owned();
    let base = format!("http://{ip}:8100");
    let ready = wait_for(Duration::from_secs(60), || {
        (tests::http_status(&format!("{base}/health")) == Some(200)).then_some(())
    });
    assert!(
        ready.is_some(),
        "llama-server in the image never became ready"
    );
    let reply = tests::post_json(
        &format!("{base}/completion"),
        &serde_json::json!({"prompt": "hello", "n_predict": 4}),
    )
    .expect("completion");
    assert!(reply["content"].is_string(), "{reply}");

    let size = text(&docker(&["image", "inspect", "--format", "{{.Size}}", &image]).stdout);
    let mib = size.trim().parse::<u64>().unwrap_or(0) / (1 << 20);
    eprintln!("{image}: {mib} MiB");
}
