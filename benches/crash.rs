//! The crash harness's long form: N `kill -9` cycles of `vessel run` and `vessel apply` at
//! random moments during random changes, for process sessions and for docker sessions on a
//! real Podman (started here, on a socket of its own), then the counts of duplicates,
//! orphans, lost sessions and lost work. Target: 0/0/0 over 200 cycles each.
//!
//! Run: `cargo bench --bench crash -- [--cycles 200] [--seed N] [--process-only | --docker-only]`.
//! Prints its figures; asserts nothing.

#[path = "../tests/harness/crash.rs"]
mod harness;
#[allow(dead_code)]
#[path = "../tests/it/podman_support.rs"]
mod podman_support;

use std::path::PathBuf;
use std::time::Duration;

fn free_port() -> u16 {
    // Below the ephemeral range (32768 and up), bindable now.
    let base = 26_000 + (std::process::id() % 50) as u16 * 100;
    (base..base + 100)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    let cycles = value("--cycles").unwrap_or(200) as usize;
    let seed = value("--seed").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let only_process = args.iter().any(|a| a == "--process-only");
    let only_docker = args.iter().any(|a| a == "--docker-only");
    let proxy = free_port();
    let status = (proxy + 1..proxy + 100)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port");
    let base = harness::Options {
        vessel: PathBuf::from(env!("CARGO_BIN_EXE_vessel")),
        cycles,
        seed,
        port_base: 22_000,
        proxy_port: proxy,
        status_port: status,
        docker: None,
        max_life: Duration::from_millis(2_500),
        verbose: std::env::var_os("VESSEL_BENCH_VERBOSE").is_some(),
    };
    println!("crash harness: {cycles} cycles each, seed {seed}");
    println!(
        "| sessions | cycles | run killed | apply killed | duplicates | orphans | lost | work lost | final apply | took |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut runs: Vec<(&str, harness::Options)> = Vec::new();
    if !only_docker {
        runs.push((
            "process",
            harness::Options {
                docker: None,
                ..base.clone()
            },
        ));
    }
    if !only_process {
        let pod = podman_support::podman();
        runs.push((
            "docker (Podman)",
            harness::Options {
                docker: Some(pod.socket.clone()),
                seed: seed.wrapping_mul(31),
                ..base.clone()
            },
        ));
    }
    for (what, o) in runs {
        let r = harness::run(&o);
        println!(
            "| {what} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} s |",
            r.cycles,
            r.run_kills,
            r.apply_kills,
            r.duplicates,
            r.orphans,
            r.lost,
            r.work_lost,
            r.final_apply.map(|c| c.to_string()).unwrap_or("-".into()),
            r.took.as_secs_f64()
        );
        for d in &r.details {
            println!("  {what}: {d}");
        }
    }
}
