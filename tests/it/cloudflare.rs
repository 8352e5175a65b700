//! The `cloudflare` DNS provider and the `cloudflare_tunnel` proxy against a contract double
//! of Cloudflare's v4 API (`cloudflare_double.rs`): Cloudflare cannot be reached from here.
//! Every test ends by type-checking what the double received and answered against the
//! official Cloudflare SDK's published types (`tsc --strict`); that check fails the test,
//! never skips it.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use vessel::config::Secret;
use vessel::http_client::Limits;
use vessel::model::observed::RecordType;
use vessel::model::plan::{RecordAction, RouteAction};
use vessel::providers::cloudflare::{Budget, Client};
use vessel::providers::dns::cloudflare::CloudflareDns;
use vessel::providers::proxy::cloudflare_tunnel::CloudflareTunnel;
use vessel::providers::{DnsProvider, ProxyProvider, chain};

use crate::cloudflare_double::{ACCOUNT, Double, Fault, TOKEN, TUNNEL, ZONE, ZONE_ID};
use crate::daemon_support::free_port;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn client(d: &Double, token: &str) -> Client {
    let limits = Limits {
        connect: Duration::from_secs(2),
        answer: Duration::from_secs(2),
        max_body: 64 << 20,
    };
    Client::with_limits(
        &d.url,
        Secret::new(token),
        Arc::new(Budget::new(1200)),
        None,
        limits,
    )
    .expect("client")
}

fn dns(d: &Double, token: &str) -> CloudflareDns {
    CloudflareDns::new(client(d, token), &[ZONE.into()], "dev", false, 200)
}

fn tunnel(d: &Double, state: &std::path::Path) -> CloudflareTunnel {
    CloudflareTunnel::new(client(d, TOKEN), ACCOUNT, TUNNEL, state)
}

fn upsert(name: &str, content: &str, session: &str) -> RecordAction {
    RecordAction::UpsertRecord {
        name: name.into(),
        rtype: if content.parse::<std::net::IpAddr>().is_ok() {
            RecordType::A
        } else {
            RecordType::CNAME
        },
        content: content.into(),
        session: session.into(),
    }
}

fn route(host: &str, upstream: &str, path: Option<&str>) -> RouteAction {
    RouteAction::UpsertRoute {
        host: host.into(),
        path: path.map(str::to_string),
        strip_prefix: false,
        upstream: upstream.into(),
        session: "alice".into(),
        port: "app".into(),
        route: None,
        upstream_from: None,
    }
}

fn errors<T>(results: Vec<Result<(), T>>) -> Vec<String>
where
    T: std::error::Error + 'static,
{
    results
        .into_iter()
        .filter_map(|r| r.err().map(|e| chain(&e)))
        .collect()
}

fn hostnames(ingress: &[Value]) -> Vec<String> {
    ingress
        .iter()
        .map(|r| {
            format!(
                "{} {} {}",
                r["hostname"].as_str().unwrap_or("-"),
                r["path"].as_str().unwrap_or("-"),
                r["service"].as_str().unwrap_or("-")
            )
        })
        .collect()
}

#[test]
fn contract_double_tunnel_rules_are_created_updated_removed_with_foreign_rules_and_catch_all_kept_exactly()
 {
    let rt = rt();
    let d = rt.block_on(Double::start(free_port()));
    let state = tempfile::tempdir().expect("tempdir");
    // Foreign rules, one for a hostname like vessel's, and the catch-all.
    let foreign = vec![
        json!({"hostname": "ssh.example.com", "service": "ssh://localhost:22"}),
        json!({"hostname": "app-alice-8080.example.com.evil.net", "service": "http://10.9.9.9:80"}),
        json!({"hostname": "wiki.example.com", "service": "http://10.0.0.9:80", "originRequest": {"connectTimeout": 10}}),
    ];
    let catch_all = json!({"hostname": "", "service": "http_status:404"});
    d.with(|w| {
        let mut ingress = foreign.clone();
        ingress.push(catch_all.clone());
        w.config = json!({"ingress": ingress, "originRequest": {"connectTimeout": 30}});
    });
    let t = tunnel(&d, state.path());
    let observed = rt.block_on(t.observe()).expect("observe");
    assert!(observed.iter().all(|r| !r.owned), "{observed:?}");
    assert_eq!(observed.len(), 3, "foreign rules are observed as foreign");

    // Create: two routes, one with a path prefix.
    let a = route("app-alice-8080.example.com", "10.0.0.5:8080", None);
    let b = route("app-alice-8080.example.com", "10.0.0.5:9090", Some("/api"));
    let r = rt.block_on(t.apply(&[&a, &b]));
    assert!(errors(r).is_empty());
    let ingress = d.with(|w| w.ingress());
    assert_eq!(
        hostnames(&ingress),
        vec![
            "ssh.example.com - ssh://localhost:22",
            "app-alice-8080.example.com.evil.net - http://10.9.9.9:80",
            "wiki.example.com - http://10.0.0.9:80",
            "app-alice-8080.example.com ^/api(/|$) http://10.0.0.5:9090",
            "app-alice-8080.example.com - http://10.0.0.5:8080",
            " - http_status:404",
        ],
        "vessel's rules before the catch-all, the path rule first"
    );
    assert_eq!(&ingress[..3], &foreign[..], "foreign rules kept exactly");
    assert_eq!(ingress.last(), Some(&catch_all), "catch-all kept last");
    assert_eq!(
        d.with(|w| w.config["originRequest"].clone()),
        json!({"connectTimeout": 30}),
        "the document's other fields are kept"
    );
    let observed = rt.block_on(t.observe()).expect("observe");
    let mine: Vec<_> = observed.iter().filter(|r| r.owned).collect();
    assert_eq!(mine.len(), 2);
    assert!(mine.iter().all(|r| r.session.as_deref() == Some("alice")));
    assert!(
        mine.iter()
            .any(|r| r.path.as_deref() == Some("/api") && r.upstream == "10.0.0.5:9090")
    );
    let evil = observed
        .iter()
        .find(|r| r.host == "app-alice-8080.example.com.evil.net")
        .expect("the similar foreign rule");
    assert!(
        !evil.owned,
        "a foreign rule for a similar hostname is never taken"
    );

    // A foreign rule with vessel's exact hostname, put in vessel's block by hand, is not
    // vessel's either: it differs in its service.
    // Update one, then remove both.
    let a2 = route("app-alice-8080.example.com", "10.0.0.6:8080", None);
    assert!(errors(rt.block_on(t.apply(&[&a2]))).is_empty());
    let ingress = d.with(|w| w.ingress());
    assert_eq!(ingress[4]["service"], "http://10.0.0.6:8080");
    assert_eq!(&ingress[..3], &foreign[..]);
    let rm_a = RouteAction::RemoveRoute {
        host: "app-alice-8080.example.com".into(),
        path: None,
    };
    let rm_b = RouteAction::RemoveRoute {
        host: "app-alice-8080.example.com".into(),
        path: Some("/api".into()),
    };
    assert!(errors(rt.block_on(t.apply(&[&rm_a, &rm_b]))).is_empty());
    let ingress = d.with(|w| w.ingress());
    let mut expected = foreign.clone();
    expected.push(catch_all.clone());
    assert_eq!(
        ingress, expected,
        "back to exactly the foreign rules and the catch-all"
    );
    // A removal of a foreign rule's hostname leaves it alone.
    let rm_evil = RouteAction::RemoveRoute {
        host: "wiki.example.com".into(),
        path: None,
    };
    let before = d.with(|w| w.version);
    assert!(errors(rt.block_on(t.apply(&[&rm_evil]))).is_empty());
    assert_eq!(d.with(|w| w.ingress()), expected);
    assert_eq!(
        d.with(|w| w.version),
        before,
        "nothing to write, nothing written"
    );
    // An upsert onto a foreign rule's hostname is refused.
    let onto = route("wiki.example.com", "10.0.0.5:8080", None);
    let e = errors(rt.block_on(t.apply(&[&onto])));
    assert!(e[0].contains("did not write"), "{e:?}");
    assert_eq!(d.with(|w| w.ingress()), expected);
    d.check_contract("tunnel_rules");
}

#[test]
fn contract_double_tunnel_a_concurrent_change_is_not_overwritten() {
    let rt = rt();
    let d = rt.block_on(Double::start(free_port()));
    let state = tempfile::tempdir().expect("tempdir");
    let t = tunnel(&d, state.path());
    rt.block_on(t.observe()).expect("observe");
    // Someone adds a rule after vessel's observation and before its write.
    let theirs = json!({"hostname": "theirs.example.com", "service": "http://10.1.1.1:80"});
    d.with(|w| w.concurrent_rule = Some(theirs.clone()));
    let a = route("app-alice-8080.example.com", "10.0.0.5:8080", None);
    assert!(errors(rt.block_on(t.apply(&[&a]))).is_empty());
    let ingress = d.with(|w| w.ingress());
    assert_eq!(ingress[0], theirs, "their rule is kept: {ingress:?}");
    assert_eq!(ingress[1]["hostname"], "app-alice-8080.example.com");
    assert_eq!(ingress.len(), 3);
    let gets = d.with(|w| w.calls.iter().filter(|(m, _)| m == "GET").count());
    assert_eq!(
        gets, 3,
        "observe, the read that saw the change, the re-read"
    );
    d.check_contract("tunnel_concurrent");
}

#[test]
fn contract_double_dns_records_created_updated_removed_in_chunked_batches_foreign_untouched() {
    let rt = rt();
    let d = rt.block_on(Double::start(free_port()));
    d.with(|w| {
        w.batch_limit = 3;
        w.add_record("mail.example.com", "A", "192.0.2.99", None);
        w.add_record(
            "web-bob-1.example.com",
            "A",
            "192.0.2.50",
            Some("vessel:other session=bob"),
        );
        w.add_record("taken.example.com", "A", "192.0.2.77", Some("someone's"));
    });
    let p = CloudflareDns::new(client(&d, TOKEN), &[ZONE.into()], "dev", false, 3);
    assert!(rt.block_on(p.observe()).expect("observe").is_empty());
    let mut creates: Vec<RecordAction> = (0..7)
        .map(|i| upsert(&format!("h{i}-alice.example.com"), "192.0.2.10", "alice"))
        .collect();
    creates.push(upsert("taken.example.com", "192.0.2.10", "alice"));
    creates.push(upsert("web-bob-1.example.com", "192.0.2.10", "alice"));
    let refs: Vec<&RecordAction> = creates.iter().collect();
    let batches_before = d.with(|w| w.calls.iter().filter(|(m, _)| m == "POST").count());
    let r = rt.block_on(p.apply(&refs));
    let e = errors(r);
    assert_eq!(e.len(), 2, "{e:?}");
    assert!(
        e.iter()
            .all(|e| e.contains("without vessel's ownership comment")),
        "{e:?}"
    );
    let batches = d.with(|w| w.calls.iter().filter(|(m, _)| m == "POST").count()) - batches_before;
    assert_eq!(batches, 3, "7 creates in batches of at most 3");
    let observed = rt.block_on(p.observe()).expect("observe");
    assert_eq!(observed.len(), 7);
    assert!(
        observed
            .iter()
            .all(|r| r.owned && r.session.as_deref() == Some("alice"))
    );
    let records = d.with(|w| w.zone_records());
    let by_name =
        |n: &str| -> Vec<Value> { records.iter().filter(|r| r["name"] == n).cloned().collect() };
    assert_eq!(
        by_name("taken.example.com").len(),
        1,
        "the foreign record of the same name stays alone"
    );
    assert_eq!(by_name("taken.example.com")[0]["content"], "192.0.2.77");
    assert_eq!(
        by_name("web-bob-1.example.com")[0]["comment"],
        "vessel:other session=bob",
        "another instance's record is foreign"
    );
    assert_eq!(
        by_name("h0-alice.example.com")[0]["comment"],
        "vessel:dev session=alice"
    );

    // Update two, remove one, in one batch; the foreign ones are as they were.
    let foreign_before: Vec<Value> = records
        .iter()
        .filter(|r| {
            !r["comment"]
                .as_str()
                .unwrap_or("")
                .starts_with("vessel:dev ")
        })
        .cloned()
        .collect();
    let changes = [
        upsert("h0-alice.example.com", "192.0.2.11", "alice"),
        upsert("h1-alice.example.com", "192.0.2.11", "alice"),
        RecordAction::RemoveRecord {
            name: "h2-alice.example.com".into(),
            rtype: RecordType::A,
        },
        RecordAction::RemoveRecord {
            name: "mail.example.com".into(),
            rtype: RecordType::A,
        },
    ];
    let refs: Vec<&RecordAction> = changes.iter().collect();
    assert!(errors(rt.block_on(p.apply(&refs))).is_empty());
    let observed = rt.block_on(p.observe()).expect("observe");
    assert_eq!(observed.len(), 6);
    assert_eq!(
        observed
            .iter()
            .filter(|r| r.content == "192.0.2.11")
            .count(),
        2
    );
    let records = d.with(|w| w.zone_records());
    let foreign_after: Vec<Value> = records
        .iter()
        .filter(|r| {
            !r["comment"]
                .as_str()
                .unwrap_or("")
                .starts_with("vessel:dev ")
        })
        .cloned()
        .collect();
    assert_eq!(
        foreign_before, foreign_after,
        "foreign records untouched, mail included"
    );
    // A no-op: one list.
    let calls = d.calls();
    rt.block_on(p.observe()).expect("observe");
    assert_eq!(
        d.calls() - calls,
        1,
        "a no-op observation is one list per zone"
    );
    d.check_contract("dns_batches");
}

#[test]
fn contract_double_dns_pagination_past_100_records() {
    let rt = rt();
    let d = rt.block_on(Double::start(free_port()));
    d.with(|w| {
        w.max_per_page = 100;
        for i in 0..250 {
            w.add_record(
                &format!("r{i}.example.com"),
                "A",
                "192.0.2.1",
                Some("vessel:dev session=s"),
            );
        }
        w.add_record("x.example.com", "A", "192.0.2.1", None);
    });
    let p = dns(&d, TOKEN);
    let observed = rt.block_on(p.observe()).expect("observe");
    assert_eq!(observed.len(), 250, "all three pages");
    let lists = d.with(|w| {
        w.calls
            .iter()
            .filter(|(_, p)| p.contains("/dns_records?"))
            .map(|(_, p)| p.clone())
            .collect::<Vec<_>>()
    });
    assert_eq!(lists.len(), 3, "{lists:?}");
    assert!(
        lists[0].contains("comment.startswith=vessel%3Adev%20"),
        "{}",
        lists[0]
    );
    assert!(lists[2].contains("page=3"));
    d.check_contract("dns_pages");
}

#[test]
fn contract_double_rate_limit_backs_off_with_retry_after_and_recovers_as_degraded() {
    let rt = rt();
    let d = rt.block_on(Double::start(free_port()));
    let p = dns(&d, TOKEN);
    rt.block_on(p.observe()).expect("observe");
    d.with(|w| w.faults.push_back(Fault::RateLimited { retry_after: 1 }));
    let e = rt.block_on(p.observe()).expect_err("429");
    assert!(vessel::providers::is_rate_limited(&e), "{}", chain(&e));
    let calls = d.calls();
    let e = rt.block_on(p.observe()).expect_err("still waiting");
    assert!(vessel::providers::is_rate_limited(&e), "{}", chain(&e));
    assert_eq!(
        d.calls(),
        calls,
        "no call is sent while the Retry-After lasts"
    );
    std::thread::sleep(Duration::from_millis(1100));
    rt.block_on(p.observe()).expect("recovered after the wait");

    // vessel's own budget: past it, calls are held back without reaching the API.
    let small = CloudflareDns::new(
        Client::new(&d.url, Secret::new(TOKEN), Arc::new(Budget::new(3)), None).expect("client"),
        &[ZONE_ID.into()],
        "dev",
        false,
        200,
    );
    let calls = d.calls();
    rt.block_on(small.observe()).expect("zone lookup and list");
    rt.block_on(small.observe()).expect("list");
    let e = rt.block_on(small.observe()).expect_err("over budget");
    assert!(vessel::providers::is_rate_limited(&e));
    assert_eq!(d.calls() - calls, 3, "never more than the budget");
    assert!(chain(&e).contains("rate-limited"), "{}", chain(&e));

    // Through the registry, a rate-limited provider is a gap that is degraded, not failed.
    let dir = tempfile::tempdir().expect("tempdir");
    let config: vessel::providers::ProvidersConfig = serde_json::from_value(json!({
        "dns": {"cloudflare": {"api_token": {"env": "VESSEL_TEST_CF_TOKEN_RL"}, "zones": [ZONE], "address": "192.0.2.10", "api": d.url}},
    }))
    .expect("config");
    // SAFETY: set before anything reads it; no other test uses this variable.
    unsafe { std::env::set_var("VESSEL_TEST_CF_TOKEN_RL", TOKEN) };
    let env = vessel::providers::Env {
        state_dir: dir.path().to_path_buf(),
        workspace_retention: Duration::from_secs(60),
    };
    let providers = vessel::providers::Providers::for_planning(&config, &env).expect("providers");
    d.with(|w| w.faults.push_back(Fault::RateLimited { retry_after: 30 }));
    let o = rt.block_on(providers.observe(&Default::default()));
    let dns_id = vessel::model::observed::ProviderId::Dns;
    assert!(
        o.gaps.contains_key(&dns_id),
        "still a gap: no creates, no deletes"
    );
    assert!(
        o.degraded.contains_key(&dns_id),
        "and degraded: {:?}",
        o.gaps
    );
    assert!(!o.gaps[&dns_id].contains(TOKEN));
    d.check_contract("rate_limits");
}

#[test]
fn contract_double_5xx_and_timeouts_fail_the_pass_and_the_next_pass_retries() {
    let rt = rt();
    let d = rt.block_on(Double::start(free_port()));
    let p = dns(&d, TOKEN);
    let state = tempfile::tempdir().expect("tempdir");
    let t = tunnel(&d, state.path());
    d.with(|w| w.faults.push_back(Fault::Status(502)));
    let e = rt.block_on(p.observe()).expect_err("502");
    assert!(chain(&e).contains("502"), "{}", chain(&e));
    assert!(!vessel::providers::is_rate_limited(&e));
    rt.block_on(p.observe()).expect("the next pass reads");
    // A batch that fails on 5xx changes nothing; the next one goes through.
    let a = upsert("a-alice.example.com", "192.0.2.10", "alice");
    let before = d.calls();
    d.with(|w| w.faults.push_back(Fault::Status(503)));
    let e = errors(rt.block_on(p.apply(&[&a])));
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(d.calls() > before);
    assert!(d.with(|w| w.zone_records()).is_empty());
    assert!(errors(rt.block_on(p.apply(&[&a]))).is_empty());
    assert_eq!(d.with(|w| w.zone_records()).len(), 1);
    // A timeout on the tunnel's configuration: the observation fails within the limit.
    d.with(|w| w.faults.push_back(Fault::Hang(Duration::from_secs(5))));
    let started = std::time::Instant::now();
    let e = rt.block_on(t.observe()).expect_err("timeout");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "bounded in time"
    );
    assert!(chain(&e).contains("did not answer"), "{}", chain(&e));
    rt.block_on(t.observe()).expect("the next pass reads");
    d.check_contract("faults");
}

#[test]
fn contract_double_an_invalid_token_is_a_gap_with_a_clear_message_and_never_shown() {
    let rt = rt();
    let d = rt.block_on(Double::start(free_port()));
    let bad = "cf-wrong-token-0f9e8d7c6b";
    let p = dns(&d, bad);
    let e = rt.block_on(p.observe()).expect_err("refused");
    let text = chain(&e);
    assert!(text.contains("refused the API token"), "{text}");
    assert!(!text.contains(bad) && !text.contains(TOKEN), "{text}");
    let state = tempfile::tempdir().expect("tempdir");
    let t = CloudflareTunnel::new(client(&d, bad), ACCOUNT, TUNNEL, state.path());
    let e = rt.block_on(t.observe()).expect_err("refused");
    assert!(chain(&e).contains("refused the API token"));
    assert!(!chain(&e).contains(bad));
    // Nothing is written with a refused token: the writes fail, the zone is as it was.
    let a = upsert("a-alice.example.com", "192.0.2.10", "alice");
    let e = errors(rt.block_on(p.apply(&[&a])));
    assert_eq!(e.len(), 1);
    assert!(!e[0].contains(bad));
    assert!(d.with(|w| w.zone_records()).is_empty());
    d.check_contract("bad_token");
}

#[test]
fn contract_double_check_rejects_what_cloudflare_s_types_do_not_allow() {
    let rt = rt();
    let d = rt.block_on(Double::start(free_port()));
    // A batch with a field the SDK does not know, and an answer missing a required field.
    d.with(|w| {
        w.exchanges.push(crate::cloudflare_double::Exchange {
            op: "dns.batch",
            request: Some(json!({"zone_id": ZONE_ID, "posts": [{"name": "a.example.com", "type": "A", "content": "192.0.2.1", "ttl": 1, "owner": "vessel"}]})),
            status: 200,
            response: json!({"success": true, "errors": [], "messages": [], "result": {"posts": [{"name": "a.example.com", "type": "A", "ttl": 1}]}}),
        })
    });
    let e = d.contract("rejects").expect_err("tsc refuses it");
    assert!(e.contains("'\"owner\"' does not exist"), "{e}");
    assert!(
        e.contains("is not assignable to type 'RecordResponse'"),
        "{e}"
    );
}

/// The position of the first exchange of `op` that `f` accepts.
fn position(d: &Double, op: &str, f: impl Fn(&Value) -> bool) -> Option<usize> {
    d.with(|w| {
        w.exchanges
            .iter()
            .position(|x| x.op == op && x.status == 200 && x.request.as_ref().is_some_and(&f))
    })
}

#[test]
fn contract_double_daemon_tunnel_cnames_follow_their_rule_and_go_before_it_token_never_shown() {
    use crate::daemon_support::{Daemon, session, wait_for};
    let rt = rt();
    let d = rt.block_on(Double::start(free_port()));
    d.with(|w| w.add_record("mail.example.com", "A", "192.0.2.99", None));
    let mut v = Daemon::new();
    // cloudflared, not vessel, serves a tunnel's routes: this listener only stands where the
    // test helper waits for a proxy.
    let stand_in = std::net::TcpListener::bind(("127.0.0.1", free_port())).expect("bind");
    let serving = stand_in.local_addr().expect("addr");
    v.use_proxy(
        &format!(
            "cloudflare_tunnel: {{account_id: '{ACCOUNT}', tunnel_id: '{TUNNEL}', api_token: {{env: VESSEL_TEST_CF_TOKEN}}, api: '{}'}}\n  dns:\n    cloudflare: {{api_token: {{env: VESSEL_TEST_CF_TOKEN}}, zones: [{ZONE}], instance: dev, api: '{}'}}",
            d.url, d.url
        ),
        serving,
    );
    v.write("keep.yaml", &session("keep"));
    v.write(
        "alice.yaml",
        &format!(
            "{}---\nkind: Route\nname: docs\nhost: docs-alice.example.com\nsession: alice\nport: app\ndns: true\n",
            session("alice")
        ),
    );
    v.start_with_env(Some(("VESSEL_TEST_CF_TOKEN", TOKEN)));
    let host = "docs-alice.example.com";
    let cname = format!("{TUNNEL}.cfargotunnel.com");
    let published = || {
        d.with(|w| {
            w.zone_records().iter().any(|r| {
                r["name"] == host
                    && r["type"] == "CNAME"
                    && r["content"] == cname.as_str()
                    && r["proxied"] == true
            })
        })
    };
    wait_for(Duration::from_secs(30), published)
        .unwrap_or_else(|| panic!("the CNAME to the tunnel is published: {}", v.log()));
    let has_rule = |req: &Value| {
        req["config"]["ingress"]
            .as_array()
            .is_some_and(|i| i.iter().any(|r| r["hostname"] == host))
    };
    let rule_at = position(&d, "tunnel.put", has_rule).expect("the rule was written");
    let record_at = position(&d, "dns.batch", |r| {
        r["posts"]
            .as_array()
            .is_some_and(|p| p.iter().any(|x| x["name"] == host))
    })
    .expect("the record was written");
    assert!(rule_at < record_at, "the ingress rule before its CNAME");
    let rule = d
        .with(|w| w.ingress().into_iter().find(|r| r["hostname"] == host))
        .expect("rule");
    assert!(
        rule["service"]
            .as_str()
            .is_some_and(|s| s.starts_with("http://127.0.0.1:")),
        "{rule}"
    );
    let (code, status) =
        crate::daemon_support::get(v.status, "status", "/status").expect("status answers");
    assert_eq!(code, 200);
    assert!(status.contains("\"state\": \"ok\""), "{status}");

    // Cloudflare rate-limits the token: both providers (one token, one budget) are degraded,
    // not failed, until the Retry-After is over, then fine again by themselves.
    let state = |s: &str| {
        crate::daemon_support::get(v.status, "status", "/status")
            .is_some_and(|(_, st)| st.contains(&format!("\"state\": \"{s}\"")))
    };
    d.with(|w| w.faults.push_back(Fault::RateLimited { retry_after: 3 }));
    wait_for(Duration::from_secs(15), || state("degraded"))
        .unwrap_or_else(|| panic!("status shows the provider degraded: {}", v.log()));
    assert!(!state("failed"), "rate-limited is degraded, not failed");
    wait_for(Duration::from_secs(15), || {
        !state("degraded") && state("ok")
    })
    .unwrap_or_else(|| panic!("it recovers after the wait: {}", v.log()));

    std::fs::remove_file(v.source().join("alice.yaml")).expect("rm");
    wait_for(Duration::from_secs(30), || {
        d.with(|w| w.ingress().iter().all(|r| r["hostname"] != host))
    })
    .unwrap_or_else(|| panic!("the rule goes: {}", v.log()));
    let (deleted_at, removed_at) = d.with(|w| {
        let deleted = w.exchanges.iter().rposition(|x| {
            x.op == "dns.batch" && x.request.as_ref().is_some_and(|r| r["deletes"].is_array())
        });
        let removed = w.exchanges.iter().rposition(|x| x.op == "tunnel.put");
        (deleted, removed)
    });
    assert!(
        deleted_at.expect("the record was deleted") < removed_at.expect("the rule was removed"),
        "the CNAME goes before its rule"
    );
    assert!(!published());
    assert!(
        d.with(|w| w
            .zone_records()
            .iter()
            .any(|r| r["name"] == "mail.example.com")),
        "the foreign record stays"
    );
    let (_, status) =
        crate::daemon_support::get(v.status, "status", "/status").expect("status answers");
    let (_, dns) = crate::daemon_support::get(v.status, "status", "/dns").expect("dns answers");
    for text in [v.log(), status, dns, v.events()] {
        assert!(!text.contains(TOKEN), "the token never shows");
    }
    d.check_contract("daemon");
}
