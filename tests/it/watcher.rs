//! The source watcher wakes the loop for changes only: the daemon's own reads of its many files
//! (every pass reads them all) wake nothing, and every kind of change (create, write in place,
//! remove, rename, an atomic save) still does.

use std::io::Write;
use std::time::Duration;

use crate::daemon_support::{Daemon, wait_for};

/// A change to make to the tree.
type Change<'a> = Box<dyn Fn() + 'a>;

/// The pass count once it has not moved for `quiet`.
fn quiet_passes(d: &Daemon, quiet: Duration) -> u64 {
    let mut last = d.passes();
    let mut since = std::time::Instant::now();
    let deadline = since + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        let now = d.passes();
        if now != last {
            (last, since) = (now, std::time::Instant::now());
        } else if since.elapsed() >= quiet {
            return now;
        }
    }
    panic!("the loop never goes quiet; log:\n{}", d.log());
}

#[test]
fn the_daemons_own_reads_do_not_wake_it_and_every_change_does() {
    let mut d = Daemon::new();
    d.edit_config(|c| c.replace("resync_interval: 1s", "resync_interval: 1h"));
    std::fs::create_dir_all(d.source().join("many")).expect("mkdir");
    for i in 0..500 {
        std::fs::write(
            d.source().join(format!("many/s{i}.yaml")),
            format!("kind: Session\nname: s{i}\nplan: web\nstate: stopped\n"),
        )
        .expect("write");
    }
    d.start();
    wait_for(Duration::from_secs(30), || d.passes() >= 1).expect("a first pass");

    // Idle: once the first passes (and the settle time of the files just written) are over,
    // nothing moves, though each pass read 501 files, and someone else reads them all too.
    let before = quiet_passes(&d, Duration::from_secs(3));
    for i in 0..500 {
        let _ = std::fs::read(d.source().join(format!("many/s{i}.yaml"))).expect("read");
    }
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(d.passes(), before, "idle, reads only; log:\n{}", d.log());

    // Each kind of change wakes it.
    let source = d.source();
    let changes: Vec<(&str, Change<'_>)> = vec![
        (
            "create",
            Box::new(|| {
                std::fs::write(
                    source.join("new.yaml"),
                    "kind: Session\nname: fresh\nplan: web\nstate: stopped\n",
                )
                .expect("create")
            }),
        ),
        (
            "write in place",
            Box::new(|| {
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .open(source.join("new.yaml"))
                    .expect("open");
                f.write_all(b"owner: me@example.com\n").expect("append");
            }),
        ),
        (
            "rename",
            Box::new(|| {
                std::fs::rename(source.join("new.yaml"), source.join("renamed.yaml"))
                    .expect("rename")
            }),
        ),
        (
            "atomic save",
            Box::new(|| d.write("renamed.yaml", "kind: Session\nname: fresh\nplan: web\n")),
        ),
        (
            "remove",
            Box::new(|| std::fs::remove_file(source.join("many/s7.yaml")).expect("rm")),
        ),
        (
            "new directory",
            Box::new(|| {
                std::fs::create_dir_all(source.join("later")).expect("mkdir");
                std::fs::write(
                    source.join("later/x.yaml"),
                    "kind: Session\nname: x\nplan: web\nstate: stopped\n",
                )
                .expect("write")
            }),
        ),
    ];
    for (what, change) in &changes {
        // Quiet for longer than the settle time (2 s), whose end is a pass of its own.
        let before = quiet_passes(&d, Duration::from_millis(2500));
        change();
        wait_for(Duration::from_secs(20), || d.passes() > before)
            .unwrap_or_else(|| panic!("{what} did not wake the loop; log:\n{}", d.log()));
    }
    // And once it has taken them in, it is quiet again.
    let before = quiet_passes(&d, Duration::from_secs(3));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        d.passes(),
        before,
        "quiet after the changes; log:\n{}",
        d.log()
    );
}

/// Files arriving one after another while the periodic pass comes due are loaded together: the
/// timer's pass waits for the change still settling instead of loading part of the burst and
/// leaving the rest until its steps are done.
#[test]
fn a_burst_of_files_is_loaded_whole_when_the_timer_fires_amid_it() {
    let mut d = Daemon::new();
    d.edit_config(|c| c.replace("resync_interval: 1s", "resync_interval: 300ms"));
    d.start();
    wait_for(Duration::from_secs(30), || d.passes() >= 2).expect("passes");
    // Just after a pass: the next timer pass comes due about 300 ms from now, in the middle of
    // the 360 ms over which the files arrive.
    let p = d.passes();
    wait_for(Duration::from_secs(10), || d.passes() > p).expect("a pass");
    for i in 0..10 {
        let tmp = d.source().join(format!(".b{i}.tmp"));
        std::fs::write(
            &tmp,
            format!("kind: Session\nname: b{i}\nplan: web\nstate: stopped\n"),
        )
        .expect("write");
        std::fs::rename(&tmp, d.source().join(format!("b{i}.yaml"))).expect("rename");
        std::thread::sleep(Duration::from_millis(40));
    }
    wait_for(Duration::from_secs(30), || {
        (0..10).all(|i| d.event_line("create", &format!("session b{i}")).is_some())
    })
    .unwrap_or_else(|| panic!("not all made; log:\n{}", d.log()));
    let passes: std::collections::BTreeSet<u64> = d
        .events()
        .lines()
        .filter(|l| l.contains("\"action\":\"create\"") && l.contains("\"object\":\"session b"))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["pass"].as_u64())
        .collect();
    assert_eq!(
        passes.len(),
        1,
        "made in passes {passes:?}; log:\n{}",
        d.log()
    );
}
