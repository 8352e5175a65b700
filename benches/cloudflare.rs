//! The `cloudflare_tunnel` proxy and the `cloudflare` DNS provider against the contract double
//! of Cloudflare's API (`tests/it/cloudflare_double.rs`; Cloudflare cannot be reached from
//! here), measured in API calls and wall time:
//!
//! 1. 1,000 tunnel routes with their CNAMEs from empty. Target: at most 10 DNS calls for the
//!    zone plus one configuration write.
//! 2. A no-op pass. Target: at most 2 calls (one list, one configuration read).
//! 3. 1% changed: 10 routes pointed elsewhere and 10 hosts renamed (their records with them).
//!
//! And never more calls than the rate budget allows (1,200 per five minutes per token, both
//! providers sharing one token here). A pass is what the reconciler does with the two
//! providers: observe both, work out the changes, apply the route batch, then the record
//! batch. The DNS zone is on the Free plan's batch limit (200 operations).
//!
//! Run: `cargo bench --bench cloudflare`. Prints the figures; asserts only that each pass did
//! what it should and stayed within the targets.

#[path = "../tests/it/cloudflare_double.rs"]
mod double;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use double::{ACCOUNT, Double, TOKEN, TUNNEL, ZONE};
use vessel::config::Secret;
use vessel::model::observed::RecordType;
use vessel::model::plan::{RecordAction, RouteAction};
use vessel::providers::cloudflare::{Budget, Client};
use vessel::providers::dns::cloudflare::CloudflareDns;
use vessel::providers::proxy::cloudflare_tunnel::CloudflareTunnel;
use vessel::providers::{DnsProvider, ProxyProvider};

const ROUTES: usize = 1000;

/// A port below 32768 that is free now (the benches' own range, apart from the tests').
fn free_port() -> u16 {
    (20000..21000)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port")
}

struct Pass {
    calls: usize,
    writes: usize,
    took: Duration,
}

/// One pass: observe both, apply what differs from `want` (host -> upstream).
async fn pass(
    d: &Double,
    tunnel: &CloudflareTunnel,
    dns: &CloudflareDns,
    want: &BTreeMap<String, String>,
) -> Pass {
    let calls = d.calls();
    let writes = d.with(|w| w.calls.iter().filter(|(m, _)| m != "GET").count());
    let started = Instant::now();
    let (routes, records) = tokio::join!(tunnel.observe(), dns.observe());
    let routes = routes.expect("observe the tunnel");
    let records = records.expect("observe the zone");
    let cname = format!("{TUNNEL}.cfargotunnel.com");
    let have: BTreeMap<String, String> = routes
        .into_iter()
        .filter(|r| r.owned)
        .map(|r| (r.host, r.upstream))
        .collect();
    let named: BTreeMap<String, String> = records
        .into_iter()
        .filter(|r| r.owned)
        .map(|r| (r.name, r.content))
        .collect();
    let mut route_steps = Vec::new();
    let (mut publish, mut unpublish) = (Vec::new(), Vec::new());
    for (host, upstream) in want {
        if have.get(host) != Some(upstream) {
            route_steps.push(RouteAction::UpsertRoute {
                host: host.clone(),
                path: None,
                strip_prefix: false,
                upstream: upstream.clone(),
                session: host.split('-').nth(1).unwrap_or("s").to_string(),
                port: "app".into(),
                route: None,
                upstream_from: None,
            });
        }
        if named.get(host) != Some(&cname) {
            publish.push(RecordAction::UpsertRecord {
                name: host.clone(),
                rtype: RecordType::CNAME,
                content: cname.clone(),
                session: "s".into(),
            });
        }
    }
    for host in named.keys().filter(|h| !want.contains_key(*h)) {
        unpublish.push(RecordAction::RemoveRecord {
            name: host.clone(),
            rtype: RecordType::CNAME,
        });
    }
    for host in have.keys().filter(|h| !want.contains_key(*h)) {
        route_steps.push(RouteAction::RemoveRoute {
            host: host.clone(),
            path: None,
        });
    }
    // Records go before the routes they point at are removed, and after new ones are in.
    let run_records = |steps: Vec<RecordAction>| async move {
        if !steps.is_empty() {
            let refs: Vec<&RecordAction> = steps.iter().collect();
            let failed = dns
                .apply(&refs)
                .await
                .into_iter()
                .filter(Result::is_err)
                .count();
            assert_eq!(failed, 0, "record steps fail");
        }
    };
    run_records(unpublish).await;
    if !route_steps.is_empty() {
        let refs: Vec<&RouteAction> = route_steps.iter().collect();
        let failed = tunnel
            .apply(&refs)
            .await
            .into_iter()
            .filter(Result::is_err)
            .count();
        assert_eq!(failed, 0, "route steps fail");
    }
    run_records(publish).await;
    Pass {
        calls: d.calls() - calls,
        writes: d.with(|w| w.calls.iter().filter(|(m, _)| m != "GET").count()) - writes,
        took: started.elapsed(),
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let d = Double::start(free_port()).await;
        d.with(|w| {
            w.record = false;
            w.add_record("mail.example.com", "A", "192.0.2.99", None);
        });
        let state = tempfile::tempdir().expect("tempdir");
        let budget = Arc::new(Budget::new(1200));
        let client =
            || Client::new(&d.url, Secret::new(TOKEN), budget.clone(), None).expect("client");
        let tunnel = CloudflareTunnel::new(client(), ACCOUNT, TUNNEL, state.path());
        let dns = CloudflareDns::new(client(), &[ZONE.into()], "bench", false, 200);
        let mut want: BTreeMap<String, String> = (0..ROUTES)
            .map(|i| {
                (
                    format!("app-u{i}-8080.example.com"),
                    format!("10.0.{}.{}:8080", i / 250, i % 250 + 1),
                )
            })
            .collect();

        let empty = pass(&d, &tunnel, &dns, &want).await;
        let rules = d.with(|w| w.ingress().len());
        assert_eq!(rules, ROUTES + 1, "every route a rule, and the catch-all");
        let records = d.with(|w| w.zone_records().len());
        assert_eq!(
            records,
            ROUTES + 1,
            "every route a CNAME, and the foreign record"
        );
        let noop = pass(&d, &tunnel, &dns, &want).await;
        for (i, (_, upstream)) in want.iter_mut().enumerate().take(10) {
            *upstream = format!("10.9.9.{}:9090", i + 1);
        }
        for i in 0..10 {
            want.remove(&format!("app-u{}-8080.example.com", 500 + i));
            want.insert(
                format!("app-n{i}-8080.example.com"),
                format!("10.8.8.{}:8080", i + 1),
            );
        }
        let changed = pass(&d, &tunnel, &dns, &want).await;
        let again = pass(&d, &tunnel, &dns, &want).await;

        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!("cloudflare (contract double), {ROUTES} tunnel routes with CNAMEs, one zone:");
        for (what, p) in [
            ("from empty", &empty),
            ("no-op", &noop),
            ("1% changed", &changed),
            ("no-op after", &again),
        ] {
            println!(
                "  {what:<12} {:>3} API calls ({} writes) {:>8.1} ms",
                p.calls,
                p.writes,
                ms(p.took)
            );
        }
        println!(
            "  calls in the last five minutes: {} of the budget's 1,200 (all {} calls: {})",
            budget.in_window(),
            budget.calls(),
            d.calls()
        );
        // From empty: tunnel read, re-read, one write; zone lookup, list, fresh list, 5 batches.
        let config_writes = d.with(|w| w.version) - 1;
        assert!(empty.calls - 3 <= 10, "from empty: at most 10 DNS calls");
        assert_eq!(
            noop.calls, 2,
            "a no-op pass: one list, one configuration read"
        );
        assert_eq!(noop.writes, 0);
        assert_eq!(again.calls, 2);
        assert!(budget.in_window() <= 1200);
        assert_eq!(
            config_writes, 2,
            "one configuration write from empty, one for the change"
        );
    });
}
