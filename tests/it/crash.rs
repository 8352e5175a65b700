//! The crash harness's short form: `kill -9` of `vessel run` and `vessel apply` at random
//! moments during random changes, for process and docker sessions; then no duplicates, no
//! orphans, nothing lost. The long form: `cargo bench --bench crash` (see the README).

#[path = "../harness/crash.rs"]
mod harness;

use std::path::PathBuf;
use std::time::Duration;

use crate::daemon_support::free_port;

fn options(seed: u64) -> harness::Options {
    harness::Options {
        vessel: PathBuf::from(env!("CARGO_BIN_EXE_vessel")),
        cycles: 12,
        seed,
        port_base: 24_000 + (std::process::id() % 40) as u16 * 100,
        proxy_port: free_port(),
        status_port: free_port(),
        docker: None,
        max_life: Duration::from_millis(2_500),
        verbose: false,
    }
}

fn check(r: &harness::Report) {
    eprintln!(
        "{} cycles ({} run, {} apply killed), {} changes in {:.1}s: {} duplicates, {} orphans, {} lost, {} work lost",
        r.cycles,
        r.run_kills,
        r.apply_kills,
        r.changes,
        r.took.as_secs_f64(),
        r.duplicates,
        r.orphans,
        r.lost,
        r.work_lost
    );
    assert!(r.clean(), "{:#?}", r.details);
    assert_eq!(
        r.final_apply,
        Some(0),
        "the last apply converges: {:#?}",
        r.details
    );
}

#[test]
fn kill_9_mid_run_and_mid_apply_loses_nothing_with_process_sessions() {
    let seed = std::process::id() as u64 * 7919 + 17;
    check(&harness::run(&options(seed)));
}

#[test]
fn kill_9_mid_run_and_mid_apply_loses_nothing_with_docker_sessions() {
    let pod = crate::podman_support::podman();
    let mut o = options(std::process::id() as u64 * 104_729 + 3);
    o.cycles = 6;
    o.docker = Some(pod.socket.clone());
    check(&harness::run(&o));
}
