//! Notifications, measured in one run:
//!
//! 1. the outbox's throughput to a local receiver (an axum server answering 204): 2,000
//!    events queued in batches of 100 (as passes queue them: each file written and renamed,
//!    the filesystem synced once per batch), events per second; then delivered one at a time
//!    from the full queue (as after a target comes back), events per second;
//! 2. the loop's no-op pass time (a real `Reconciler` on the process provider, 200 sessions
//!    held by `limits.max_running: 0`: every pass plans them, finds nothing to do, and the
//!    notifier looks at every one) with no `notify:` at all, with its target down (connections
//!    refused; and a port that accepts but never answers), and with it up. Passes interleaved,
//!    100 of each, p50 and p95 (target: the same within noise).
//!
//! Run: `cargo bench --bench notify`. Prints the figures; asserts nothing about time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vessel::config::{Config, SecretRef};
use vessel::notify::{CloudEvent, EventData, Notifier, NotifyTarget, Outbox};
use vessel::reconcile::{Reconciler, Trigger};
use vessel::state::StateDir;

mod support;
use support::{free_port, ms, percentile};

const N: u64 = 2_000;

/// A receiver answering 204 to every POST, counting them.
fn receiver(rt: &tokio::runtime::Runtime) -> (u16, Arc<AtomicU64>) {
    let count = Arc::new(AtomicU64::new(0));
    let c = count.clone();
    let app = axum::Router::new().fallback(move || {
        let c = c.clone();
        async move {
            c.fetch_add(1, Ordering::Relaxed);
            axum::http::StatusCode::NO_CONTENT
        }
    });
    let port = free_port();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(("127.0.0.1", port)))
        .expect("bind");
    rt.spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (port, count)
}

fn target(dir: &std::path::Path, name: &str, port: u16) -> NotifyTarget {
    let url = dir.join(format!("{name}-url"));
    let key = dir.join(format!("{name}-key"));
    std::fs::write(&url, format!("http://127.0.0.1:{port}/hook")).expect("url");
    std::fs::write(&key, "bench-secret-key").expect("key");
    NotifyTarget {
        name: name.into(),
        url: SecretRef::File(url),
        secret: SecretRef::File(key),
        events: Vec::new(),
        template: None,
        content_type: None,
        retry_for: vessel::model::Duration::from_secs(3600),
        tls: None,
    }
}

fn event(id: u64) -> CloudEvent {
    CloudEvent {
        specversion: "1.0".into(),
        id: id.to_string(),
        source: "urn:vessel:bench".into(),
        kind: "dev.vessel.session.ready".into(),
        subject: format!("user-{}", id % 50),
        time: chrono::Utc::now(),
        datacontenttype: "application/json".into(),
        data: EventData {
            text: format!(
                "user-{} is ready: http://user-{}.localhost/",
                id % 50,
                id % 50
            ),
            event: "ready".into(),
            sequence: id,
            session: Some(format!("user-{}", id % 50)),
            urls: vec![format!("http://user-{}.localhost/", id % 50)],
            ..EventData::default()
        },
    }
}

fn throughput(rt: &tokio::runtime::Runtime) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (port, count) = receiver(rt);
    let t = target(dir.path(), "bench", port);
    let (outbox, deliveries, _) =
        Outbox::open(dir.path(), &[t], vessel::notify::MAX_BACKOFF).expect("outbox");
    let stats = outbox.stats();
    let cancel = tokio_util::sync::CancellationToken::new();
    let t0 = Instant::now();
    for batch in 0..N / 100 {
        let events: Vec<_> = (0..100)
            .map(|i| {
                let id = batch * 100 + i + 1;
                (id, vec!["bench".to_string()], event(id))
            })
            .collect();
        outbox.push(&events).expect("queued");
    }
    let queued = t0.elapsed();
    // Delivery alone, from a full queue (as after a target comes back).
    let t0 = Instant::now();
    let _g = rt.enter();
    for d in deliveries {
        rt.spawn(d.run(cancel.clone()));
    }
    while stats["bench"].delivered.load(Ordering::Relaxed) < N {
        std::thread::sleep(Duration::from_millis(1));
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "deliveries stalled"
        );
    }
    let done = t0.elapsed();
    assert_eq!(count.load(Ordering::Relaxed), N);
    println!(
        "outbox: {N} events queued durably (batches of 100, one filesystem sync each) in {} ({:.0} events/s); then delivered from the full queue to a local receiver in {} ({:.0} events/s)",
        ms(queued),
        N as f64 / queued.as_secs_f64(),
        ms(done),
        N as f64 / done.as_secs_f64()
    );
    cancel.cancel();
}

/// A reconciler on `dir` with 200 sessions held by a cap; with a notify target on `port`.
fn reconciler(rt: &tokio::runtime::Runtime, port: Option<u16>) -> (Reconciler, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("desired");
    std::fs::create_dir_all(&src).expect("mkdir");
    let mut all = String::from("kind: Plan\nname: web\ncommand: [x]\nports: {ide: 8080}\n");
    for i in 0..200 {
        all.push_str(&format!(
            "---\nkind: Session\nname: s{i:03}\nplan: web\nexpires: 2099-01-01T00:00:00Z\n"
        ));
    }
    std::fs::write(src.join("all.yaml"), all).expect("tree");
    let mut config = Config::embedded_default(&src);
    config.state_dir = dir.path().join("state");
    config.limits.max_running = Some(0);
    let providers = vessel::providers::Providers::new(&config.providers, &config.provider_env())
        .expect("providers");
    let state = StateDir::open(&config.state_dir).expect("state");
    let mut rec = Reconciler::new(config.clone(), providers, state);
    if let Some(port) = port {
        let t = target(dir.path(), "hook", port);
        let (n, deliveries) = Notifier::open(
            &config.state_dir,
            &[t],
            "bench",
            vessel::notify::MAX_BACKOFF,
        )
        .expect("notifier");
        let _g = rt.enter();
        for d in deliveries {
            rt.spawn(d.run(tokio_util::sync::CancellationToken::new()));
        }
        rec.set_notifier(n, None);
    }
    (rec, dir)
}

fn pass_time(rt: &tokio::runtime::Runtime) {
    let (up_port, count) = receiver(rt);
    let refused = free_port();
    // Accepts connections (the kernel's backlog) and never answers.
    let hanging = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let hanging_port = hanging.local_addr().expect("addr").port();
    let cancel = tokio_util::sync::CancellationToken::new();
    let mut cases = vec![
        ("no notify", reconciler(rt, None), Vec::new()),
        (
            "target down (refused)",
            reconciler(rt, Some(refused)),
            Vec::new(),
        ),
        (
            "target down (hanging)",
            reconciler(rt, Some(hanging_port)),
            Vec::new(),
        ),
        ("target up", reconciler(rt, Some(up_port)), Vec::new()),
    ];
    // The first pass tells 200 held events to each target; then 100 no-op passes each,
    // interleaved.
    for (_, (rec, _), _) in &mut cases {
        rt.block_on(rec.pass(Trigger::Startup, &cancel, |_| {}));
    }
    for _ in 0..100 {
        for (_, (rec, _), times) in &mut cases {
            let t = Instant::now();
            let (r, _, _) = rt.block_on(rec.pass(Trigger::Resync, &cancel, |_| {}));
            times.push(t.elapsed());
            assert!(r.converged, "a no-op pass");
        }
    }
    println!(
        "no-op pass, 200 sessions held by a cap (100 passes each, interleaved; wall time of the pass):"
    );
    for (label, _, times) in &mut cases {
        println!(
            "  {label:<24} p50 {}, p95 {}",
            ms(percentile(times, 0.5)),
            ms(percentile(times, 0.95))
        );
    }
    println!(
        "  (the target that was up received {} events; the down ones keep theirs queued)",
        count.load(Ordering::Relaxed)
    );
    drop(hanging);
}

fn main() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    throughput(&rt);
    pass_time(&rt);
}
