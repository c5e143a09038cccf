//! The command line of the real binary: shell completions and man pages that cover every
//! subcommand, and `vmq run`'s logging (no colour codes into a pipe, JSON lines that parse,
//! `--log-level` over `RUST_LOG`, bad filters refused).

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const VMQ: &str = env!("CARGO_BIN_EXE_vmq");
const WAIT: Duration = Duration::from_secs(20);

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("vqcli-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Output {
    code: Option<i32>,
    stdout: Vec<u8>,
    stderr: String,
}

/// Runs vmq to its end, killed past a deadline.
fn vmq(args: &[&str]) -> Output {
    let mut child = Command::new(VMQ)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut v = Vec::new();
        stdout.read_to_end(&mut v).map(|_| v)
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        stderr.read_to_string(&mut s).map(|_| s)
    });
    let status = wait_or_kill(&mut child, WAIT);
    Output { code: status, stdout: out.join().unwrap().unwrap(), stderr: err.join().unwrap().unwrap() }
}

fn wait_or_kill(child: &mut Child, limit: Duration) -> Option<i32> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("vmq did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The subcommands `--help` lists for `args` (`[]`: top level, `["ctl"]`), without `help`.
fn subcommands(args: &[&str]) -> Vec<String> {
    let mut all = args.to_vec();
    all.push("--help");
    let out = vmq(&all);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let text = String::from_utf8(out.stdout).unwrap();
    let section = text.split("Commands:\n").nth(1).unwrap_or_else(|| panic!("no Commands: in {text}"));
    let names: Vec<String> = section
        .lines()
        .take_while(|l| l.starts_with("  "))
        .filter(|l| !l.starts_with("   ")) // wrapped help text
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| *n != "help")
        .map(str::to_string)
        .collect();
    assert!(!names.is_empty(), "{text}");
    names
}

fn every_command() -> Vec<String> {
    let top = subcommands(&[]);
    // The list the README documents, so that a `--help` that lost some would not pass.
    for expected in ["demo", "run", "check-config", "default-config", "bench", "ctl", "top", "completions", "man"] {
        assert!(top.iter().any(|c| c == expected), "{expected} not in {top:?}");
    }
    let ctl = subcommands(&["ctl"]);
    for expected in ["show", "ports", "queues", "fdb", "stats", "add-port", "del-port", "set", "rebalance", "workers"] {
        assert!(ctl.iter().any(|c| c == expected), "{expected} not in {ctl:?}");
    }
    top.into_iter().chain(ctl).collect()
}

#[test]
fn completions_name_every_subcommand_for_every_shell() {
    let commands = every_command();
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = vmq(&["completions", shell]);
        assert_eq!(out.code, Some(0), "{shell}: {}", out.stderr);
        let script = String::from_utf8(out.stdout).unwrap();
        assert!(script.len() > 1000, "{shell}: {script}");
        for c in &commands {
            assert!(script.contains(c.as_str()), "{shell} completion lacks {c}");
        }
    }
    // Flags after the subcommand complete too: ctl's global flags are offered under `ctl show`.
    let bash = String::from_utf8(vmq(&["completions", "bash"]).stdout).unwrap();
    let show = bash.split("vmq__subcmd__ctl__subcmd__show)").nth(1).expect("a `ctl show` case");
    let opts = show.lines().find(|l| l.contains("opts=")).unwrap();
    for flag in ["--socket", "--json", "--timeout-ms"] {
        assert!(opts.contains(flag), "`vmq ctl show` does not complete {flag}: {opts}");
    }
    let out = vmq(&["completions", "tcsh"]);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
}

#[test]
fn bash_completion_script_is_valid_bash() {
    let out = vmq(&["completions", "bash"]);
    assert_eq!(out.code, Some(0));
    let dir = TempDir::new("bash");
    let script = dir.join("vmq.bash");
    std::fs::write(&script, &out.stdout).unwrap();
    let status = Command::new("bash").arg("-n").arg(&script).status().unwrap();
    assert!(status.success(), "bash -n refused the completion script");
}

#[test]
fn man_page_on_stdout_lists_every_subcommand() {
    let out = vmq(&["man"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let page = String::from_utf8(out.stdout).unwrap();
    assert!(page.starts_with(".ie"), "not roff: {}", &page[..page.len().min(200)]);
    assert!(page.contains(".TH vmq 1"), "{page}");
    for c in subcommands(&[]) {
        // roff escapes hyphens.
        assert!(page.contains(&c.replace('-', "\\-")), "man page lacks {c}");
    }
}

#[test]
fn man_dir_gets_one_page_per_command_and_subcommand() {
    let dir = TempDir::new("man");
    let out_dir = dir.join("share/man/man1");
    let out = vmq(&["man", out_dir.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let page = |name: &str| -> String {
        let path = out_dir.join(name);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(text.contains(".TH"), "{name} is not a man page");
        text
    };
    assert!(page("vmq.1").contains("vmq\\-ctl"));
    for c in subcommands(&[]) {
        page(&format!("vmq-{c}.1"));
    }
    for c in subcommands(&["ctl"]) {
        page(&format!("vmq-ctl-{c}.1"));
    }
    assert!(page("vmq-ctl-show.1").contains("\\-\\-json"), "ctl's global flags on its subcommand's page");
    // A directory that cannot be made: an error, not a panic.
    let blocked = dir.join("file");
    std::fs::write(&blocked, "").unwrap();
    let out = vmq(&["man", blocked.join("sub").to_str().unwrap()]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(out.stderr.starts_with("vmq man: "), "{}", out.stderr);
}

/// `vmq run` on a configuration without ports (control socket in `dir`, no metrics), stderr to
/// a pipe; collects stderr until a line containing `until` shows, then stops it with SIGTERM.
fn run_until(dir: &TempDir, extra: &[&str], env: &[(&str, &str)], until: &str) -> (Vec<u8>, Option<i32>) {
    let config = dir.join("vmq.toml");
    let socket = dir.join("vmq.sock");
    std::fs::write(&config, format!("[switch]\nworkers = 1\n[control]\nsocket = {socket:?}\nmetrics = \"off\"\n"))
        .unwrap();
    let mut command = Command::new(VMQ);
    command.args(["run", "--config", config.to_str().unwrap()]).args(extra);
    command.env_remove("RUST_LOG").env_remove("NO_COLOR");
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut lines = BufReader::new(stderr);
        let mut line = Vec::new();
        while lines.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
            let _ = tx.send(String::from_utf8_lossy(&line).to_string());
            all.append(&mut line);
        }
        all
    });
    let deadline = Instant::now() + WAIT;
    let mut seen = false;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(until) => {
                seen = true;
                break;
            }
            Ok(_) => {}
            // vmq exited (stderr closed) or the deadline passed.
            Err(_) => break,
        }
    }
    if matches!(child.try_wait(), Ok(None)) {
        // By PID: only the process this test started.
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    }
    let code = wait_or_kill(&mut child, Duration::from_secs(10));
    let log = reader.join().unwrap();
    assert!(seen, "no log line with {until:?} within {WAIT:?}:\n{}", String::from_utf8_lossy(&log));
    (log, code)
}

#[test]
fn run_logs_no_colour_codes_into_a_pipe() {
    let dir = TempDir::new("ansi");
    let (log, code) = run_until(&dir, &[], &[], "vmq running");
    assert_eq!(code, Some(0), "{}", String::from_utf8_lossy(&log));
    let text = String::from_utf8_lossy(&log);
    assert!(text.contains(" INFO "), "{text}");
    assert!(!log.contains(&0x1b), "ESC bytes in a piped log:\n{text:?}");
    // The same with debug events on: nothing coloured either.
    let (log, _) = run_until(&dir, &["--log-level", "debug"], &[], "vmq running");
    assert!(!log.contains(&0x1b), "ESC bytes in a piped debug log:\n{:?}", String::from_utf8_lossy(&log));
}

#[test]
fn run_log_format_json_writes_one_object_per_line() {
    let dir = TempDir::new("json");
    let (log, code) = run_until(&dir, &["--log-format", "json"], &[], "vmq running");
    assert_eq!(code, Some(0));
    let text = String::from_utf8(log).unwrap();
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}")))
        .collect();
    let running = events
        .iter()
        .find(|e| e["fields"]["message"] == "vmq running")
        .unwrap_or_else(|| panic!("no `vmq running` event in {text}"));
    assert_eq!(running["level"], "INFO");
    assert_eq!(running["fields"]["ports"], 0);
    assert!(running["timestamp"].is_string(), "{running}");
    assert!(!text.contains('\u{1b}'));
}

#[test]
fn log_level_takes_precedence_over_rust_log() {
    let dir = TempDir::new("level");
    // RUST_LOG alone would hide the info line waited for.
    let (log, code) = run_until(&dir, &["--log-level", "info"], &[("RUST_LOG", "error")], "vmq running");
    assert_eq!(code, Some(0), "{}", String::from_utf8_lossy(&log));
    // Without --log-level, RUST_LOG=error hides every info line: vmq is started, seen serving
    // (its control socket answers), stopped; "vmq running" is logged before vmq looks at the
    // signal, so a RUST_LOG that was ignored would show it.
    let config = dir.join("vmq.toml");
    let socket = dir.join("vmq.sock");
    let _ = std::fs::remove_file(&socket);
    let mut child = Command::new(VMQ)
        .args(["run", "--config", config.to_str().unwrap()])
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    let serving = loop {
        if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
            break true;
        }
        if Instant::now() > deadline || !matches!(child.try_wait(), Ok(None)) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    if matches!(child.try_wait(), Ok(None)) {
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    }
    let mut stderr = String::new();
    let mut pipe = child.stderr.take().unwrap();
    let code = wait_or_kill(&mut child, Duration::from_secs(10));
    pipe.read_to_string(&mut stderr).unwrap();
    assert!(serving, "vmq never served its control socket: {stderr}");
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!stderr.contains("INFO"), "RUST_LOG=error was ignored: {stderr}");
}

#[test]
fn bad_log_filters_are_refused_with_usage_exit_code() {
    let dir = TempDir::new("badlog");
    let config = dir.join("vmq.toml");
    std::fs::write(&config, "").unwrap();
    let config = config.to_str().unwrap();
    let out = vmq(&["run", "--config", config, "--log-level", "vmq=loudest"]);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("--log-level \"vmq=loudest\""), "{}", out.stderr);
    let out = vmq(&["run", "--config", config, "--log-format", "xml"]);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    let mut command = Command::new(VMQ);
    let bad_env = command.args(["run", "--config", config]).env("RUST_LOG", "vmq=loudest").output().unwrap();
    assert_eq!(bad_env.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad_env.stderr).contains("RUST_LOG=\"vmq=loudest\""));
}
