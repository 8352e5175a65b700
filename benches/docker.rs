//! The docker provider against a real Podman engine, side by side in one run:
//!
//! 1. converging 20 and 100 sessions from empty (a busybox httpd each: create, start, wait
//!    until it answers, then its routes), against a sequential create+start loop over the
//!    same API (the engine's own floor);
//! 2. with 100 sessions: the no-op pass, and the repair of 10% (10 containers removed by
//!    hand), each with the number of Engine API calls vessel made.
//!
//! Targets (issue 7): from empty at most 0.8x the sequential loop; no-op under 100 ms; repair
//! of 10 under 1.5 s.
//!
//! Run: `cargo bench --bench docker` (as root, with podman, runc, catatonit and busybox-static
//! installed: `.ci/run` installs them). It starts its own `podman system service`. Prints the
//! figures; asserts nothing about time.

#[path = "../tests/it/podman_support.rs"]
#[allow(dead_code)]
mod podman_support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::models::{ContainerCreateBody, HostConfig, PortBinding};
use bollard::query_parameters::{CreateContainerOptions, StartContainerOptions};
use tokio_util::sync::CancellationToken;

use vessel::config::{Config, DockerConfig};
use vessel::model::ComputeKind;
use vessel::providers::compute::docker::DockerProvider;
use vessel::providers::{ComputeProvider, Providers};
use vessel::reconcile::{Reconciler, Trigger};
use vessel::state::StateDir;

use podman_support::{IMAGE, Podman, podman};

const PLAN: &str = "kind: Plan
name: web
compute: docker
image: localhost/busybox:test
command: [/bin/busybox, httpd, -f, -p, '{port.ide}', -h, /]
ports: {ide: 8080}
stop_timeout: 1s
";

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

fn remove_label(pod: &Podman, label: &str) {
    let ids = pod.ids_with_label(label);
    for chunk in ids.chunks(50) {
        let mut args = vec!["rm", "-f", "-v", "-t", "0"];
        args.extend(chunk.iter().map(String::as_str));
        let _ = pod.try_cli(&args);
    }
}

/// The engine's floor: create and start `n` containers one after another.
async fn sequential(docker: &Docker, n: usize, tag: &str) -> Duration {
    let t = Instant::now();
    for i in 0..n {
        let body = ContainerCreateBody {
            image: Some(IMAGE.into()),
            cmd: Some(vec![
                "/bin/busybox".into(),
                "httpd".into(),
                "-f".into(),
                "-p".into(),
                "8080".into(),
                "-h".into(),
                "/".into(),
            ]),
            labels: Some([("vessel-bench".to_string(), tag.to_string())].into()),
            exposed_ports: Some(vec!["8080/tcp".into()]),
            host_config: Some(HostConfig {
                init: Some(true),
                port_bindings: Some(
                    [(
                        "8080/tcp".to_string(),
                        Some(vec![PortBinding {
                            host_ip: Some("127.0.0.1".into()),
                            host_port: Some(String::new()),
                        }]),
                    )]
                    .into(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        };
        let name = format!("bench-{tag}-{i}");
        let id = docker
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(name),
                    ..Default::default()
                }),
                body,
            )
            .await
            .expect("create")
            .id;
        docker
            .start_container(&id, None::<StartContainerOptions>)
            .await
            .expect("start");
    }
    t.elapsed()
}

struct Setup {
    dir: tempfile::TempDir,
    provider: Arc<DockerProvider>,
    reconciler: Reconciler,
    instance: String,
}

fn setup(pod: &Podman, n: usize, instance: &str) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let desired = dir.path().join("desired");
    std::fs::create_dir_all(&desired).expect("mkdir");
    std::fs::write(desired.join("plan.yaml"), PLAN).expect("plan");
    for i in 0..n {
        std::fs::write(
            desired.join(format!("{instance}-{i}.yaml")),
            format!("kind: Session\nname: {instance}-{i}\nplan: web\n"),
        )
        .expect("session");
    }
    let yaml = format!(
        "source: {{dir: '{}'}}\nstate_dir: '{}'\nproviders:\n  compute:\n    docker:\n      hosts: [{{name: local, endpoint: '{}'}}]\n      instance: {instance}\n",
        desired.display(),
        dir.path().join("state").display(),
        pod.endpoint()
    );
    let config: Config = serde_saphyr::from_str(&yaml).expect("config");
    let docker_config: DockerConfig = config
        .providers
        .compute
        .docker
        .clone()
        .expect("docker config");
    let provider = Arc::new(
        DockerProvider::new(
            docker_config,
            dir.path().join("state/docker"),
            vessel::providers::compute::kept::Kept::new(
                dir.path().join("state/retained/docker"),
                vessel::model::ComputeKind::Docker,
                std::time::Duration::ZERO,
            ),
        )
        .expect("provider"),
    );
    let mut providers =
        Providers::for_planning(&config.providers, &config.provider_env()).expect("providers");
    let p: Arc<dyn ComputeProvider> = provider.clone();
    providers.compute = BTreeMap::from([(ComputeKind::Docker, p)]);
    // The embedded proxy as the daemon has it (its table lives in this process).
    let proxy = vessel::proxy::Proxy::default();
    providers.proxy = Arc::new(vessel::providers::proxy::embedded::EmbeddedProxy::new(
        proxy,
    ));
    let state = StateDir::open(&dir.path().join("state")).expect("state dir");
    let reconciler = Reconciler::new(config, providers, state);
    Setup {
        dir,
        provider,
        reconciler,
        instance: instance.to_string(),
    }
}

async fn converge(s: &mut Setup) -> (Duration, usize, u64) {
    let cancel = CancellationToken::new();
    let calls = s.provider.api_calls();
    let t = Instant::now();
    let mut steps: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
    let mut failures: Vec<String> = Vec::new();
    let reports = s
        .reconciler
        .converge(Trigger::Resync, 20, &cancel, |e| {
            let v = steps.entry(e.action.clone()).or_default();
            v.0 += 1;
            v.1 += e.duration_ms;
            v.2 = v.2.max(e.duration_ms);
            if let Some(f) = vessel::reconcile::failure_text(&e.outcome) {
                failures.push(format!("{} {}: {f}", e.action, e.object));
            }
        })
        .await;
    let took = t.elapsed();
    if std::env::var_os("VESSEL_BENCH_STEPS").is_some() {
        let passes: Vec<String> = reports
            .iter()
            .map(|r| format!("{} ms", r.duration_ms))
            .collect();
        eprintln!("    passes: {}", passes.join(", "));
        for (verb, (n, total, max)) in &steps {
            eprintln!(
                "    {verb}: {n} steps, mean {} ms, max {max} ms",
                total / n.max(&1)
            );
        }
    }
    for f in &failures {
        eprintln!("    failed: {f}");
    }
    let last = reports.last().expect("a pass");
    assert!(
        last.converged,
        "did not converge: {:?}",
        reports.iter().map(|r| &r.outcomes).collect::<Vec<_>>()
    );
    (took, reports.len(), s.provider.api_calls() - calls)
}

fn main() {
    let pod = podman();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let docker = Docker::connect_with_unix(
            pod.socket.to_str().expect("utf-8"),
            120,
            bollard::API_DEFAULT_VERSION,
        )
        .expect("connect")
        .negotiate_version()
        .await
        .expect("podman answers");
        let pid = std::process::id();
        println!("docker provider against Podman ({}), busybox httpd sessions", pod.endpoint());
        println!(
            "{:<28} {:>12} {:>12} {:>8} {:>8}",
            "", "sequential", "vessel", "ratio", "passes"
        );
        let mut hundred: Option<Setup> = None;
        let sizes: Vec<usize> = std::env::var("VESSEL_BENCH_SIZES")
            .unwrap_or_else(|_| "20,100".into())
            .split(',')
            .filter_map(|n| n.trim().parse().ok())
            .collect();
        for &n in &sizes {
            let tag = format!("b{pid}n{n}");
            let seq = sequential(&docker, n, &tag).await;
            remove_label(pod, &format!("vessel-bench={tag}"));
            let instance = format!("bench{pid}n{n}");
            let mut s = setup(pod, n, &instance);
            let (took, passes, calls) = converge(&mut s).await;
            println!(
                "{:<28} {:>12} {:>12} {:>7.2}x {:>8}   ({calls} API calls, {:.0} ms/session vs {:.0})",
                format!("converge {n} from empty"),
                ms(seq),
                ms(took),
                took.as_secs_f64() / seq.as_secs_f64(),
                passes,
                took.as_secs_f64() * 1e3 / n as f64,
                seq.as_secs_f64() * 1e3 / n as f64,
            );
            if n == 100 {
                hundred = Some(s);
            } else {
                remove_label(pod, &format!("vessel.managed-by={}", s.instance));
            }
        }
        let Some(mut s) = hundred else { return };
        // The no-op pass, a few times.
        let mut noop = Vec::new();
        let mut noop_calls = 0;
        for _ in 0..5 {
            let (took, _, calls) = converge(&mut s).await;
            noop.push(took);
            noop_calls = calls;
        }
        noop.sort();
        println!(
            "{:<28} {:>12} {:>12} {:>8} {:>8}   ({noop_calls} API calls; median of 5, best {})",
            "no-op pass, 100 sessions",
            "",
            ms(noop[2]),
            "",
            1,
            ms(noop[0])
        );
        // Drift: 10% removed by hand.
        for i in 0..10 {
            pod.cli(&["rm", "-f", "-v", "-t", "0", &format!("vessel-{}-{}", s.instance, i * 10)]);
        }
        let (took, passes, calls) = converge(&mut s).await;
        println!(
            "{:<28} {:>12} {:>12} {:>8} {:>8}   ({calls} API calls)",
            "repair 10 of 100 removed", "", ms(took), "", passes
        );
        remove_label(pod, &format!("vessel.managed-by={}", s.instance));
        drop(s.dir);
    });
}
