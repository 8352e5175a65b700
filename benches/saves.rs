//! Saves as editors make them, against a running daemon (release binary) with a process
//! session that has work in its workspace: N times `: > alice.yaml` for 0.6 s, then the old
//! content back. Counts how often anything of alice's was destroyed or lost (target 0), then
//! times genuine deletions from `rm` to the session's process gone (target: the settle time,
//! 2 s, plus one pass).
//!
//! Run: `cargo bench --bench saves -- [--cycles 100] [--deletions 5]`. Prints its figures.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn port() -> u16 {
    let base = 27_000 + (std::process::id() % 40) as u16 * 100;
    (base..base + 100)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port")
}

fn get(port: u16, host: &str, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").ok()?;
    let mut b = String::new();
    s.read_to_string(&mut b).ok()?;
    Some((b.get(9..12)?.parse().ok()?, b))
}

fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if f() {
            return Some(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

fn pid_of(state: &Path) -> Option<i64> {
    let t = std::fs::read_to_string(state.join("sessions/alice/session.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&t).ok()?;
    v["pid"].as_i64()
}

fn alive(pid: i64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str, d: u64| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(d)
    };
    let (cycles, deletions) = (value("--cycles", 100), value("--deletions", 5));
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::create_dir_all(d.join("src")).expect("mkdir");
    for f in ["plan.yaml", "alice.yaml", "bob.yaml"] {
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("examples/quickstart")
                .join(f),
            d.join("src").join(f),
        )
        .expect("copy the quickstart");
    }
    let (proxy, status) = (port(), port() + 1);
    std::fs::write(
        d.join("vessel.yaml"),
        format!(
            "source: {{dir: src}}\nstate_dir: state\nproviders:\n  compute:\n    process: {{port_base: 23000, keep_on_exit: false}}\n  proxy:\n    embedded: {{listen: '127.0.0.1:{proxy}'}}\nstatus: {{listen: '127.0.0.1:{status}'}}\n"
        ),
    )
    .expect("config");
    let log = std::fs::File::create(d.join("vessel.log")).expect("log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_vessel"))
        .args(["run", "vessel.yaml"])
        .current_dir(d)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("vessel runs");
    let serves = || get(proxy, "alice.localhost", "/healthz").is_some_and(|(c, _)| c == 200);
    wait_for(Duration::from_secs(30), serves).expect("alice serves");
    let state = d.join("state");
    let notes = state.join("sessions/alice/workspace/notes.md");
    std::fs::write(&notes, "work in progress").expect("work");
    let pid = pid_of(&state).expect("alice's pid");
    let file = d.join("src/alice.yaml");
    let text = std::fs::read_to_string(&file).expect("alice.yaml");

    let mut destroyed = 0;
    let mut lost = 0;
    let mut restarted = 0;
    let t0 = Instant::now();
    for _ in 0..cycles {
        std::fs::write(&file, "").expect("truncate");
        std::thread::sleep(Duration::from_millis(600));
        std::fs::write(&file, &text).expect("restore");
        std::thread::sleep(Duration::from_millis(200));
        if !alive(pid) || pid_of(&state) != Some(pid) {
            restarted += 1;
        }
        if std::fs::read_to_string(&notes).ok().as_deref() != Some("work in progress") {
            lost += 1;
        }
    }
    // Past the settle time, then the events: was anything of alice's destroyed or removed?
    std::thread::sleep(Duration::from_secs(3));
    let events = std::fs::read_to_string(state.join("events.jsonl")).unwrap_or_default();
    for l in events.lines() {
        if l.contains("\"action\":\"destroy\",\"object\":\"session alice\"")
            || (l.contains("\"action\":\"remove-route\"") && l.contains("alice.localhost"))
        {
            destroyed += 1;
        }
    }
    let serving = serves();
    println!(
        "editor saves: {cycles} x (truncate alice.yaml for 0.6 s, then the old content back), {:.0} s",
        t0.elapsed().as_secs_f64()
    );
    println!("| | count | target |");
    println!("|---|---|---|");
    println!("| destroys or route removals of alice | {destroyed} | 0 |");
    println!("| times alice's process was not the same | {restarted} | 0 |");
    println!("| times her work was missing | {lost} | 0 |");
    println!("| alice serves at the end | {serving} | true |");

    // Genuine deletions: rm, then time until her process is gone and her route answers 404.
    let mut took = Vec::new();
    for _ in 0..deletions {
        let pid = pid_of(&state).expect("alice runs");
        let t = Instant::now();
        std::fs::remove_file(&file).expect("rm");
        let gone = wait_for(Duration::from_secs(30), || {
            !alive(pid) && get(proxy, "alice.localhost", "/").is_some_and(|(c, _)| c == 404)
        });
        took.push(gone.unwrap_or(t.elapsed()));
        std::fs::write(&file, &text).expect("back");
        wait_for(Duration::from_secs(30), serves).expect("alice serves again");
    }
    took.sort();
    let ms: Vec<String> = took
        .iter()
        .map(|d| format!("{} ms", d.as_millis()))
        .collect();
    println!(
        "\ngenuine deletion, rm to process gone and 404 ({deletions} runs): {} (settle time 2000 ms + one pass)",
        ms.join(", ")
    );
    let _ = child.kill();
    let _ = child.wait();
    let _ = Command::new("pkill")
        .args(["-f", &format!("{}", state.join("sessions").display())])
        .status();
}
