//! `vessel run`: the daemon. One instance per state directory (a lock). Passes are triggered
//! by file changes (debounced, bursts coalesced), a periodic full pass for drift, timers
//! (expiry, backoff) and provider events (a session exited); each trigger only pokes the loop,
//! and every pass plans from a fresh observation. SIGINT/SIGTERM: finish the steps in flight,
//! start no new ones, exit 0.
//!
//! At start the open-file limit is raised to its hard limit and divided (`listeners::fds`):
//! the listeners' connections get a share, and a reserve always stays for the loop, so a flood
//! of connections can never make a pass fail for want of a file descriptor.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::listeners::Limits;
use crate::listeners::fds::{self, FileBudget};
use crate::providers::{Providers, SetupError};
use crate::reconcile::{PassReport, Reconciler, Trigger};
use crate::state::{STATE_MARKER, StateDir, StateError};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Setup(#[from] SetupError),
    #[error("cannot listen on {addr} for the proxy")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Watch(#[from] crate::watch::WatchError),
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
    #[error("cannot listen on {addr} for the status endpoint")]
    StatusListen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the status endpoint's token")]
    Token(#[source] crate::config::SecretError),
    #[error("cannot start the webhook receiver on {addr}")]
    Webhook {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the webhook's secret")]
    WebhookSecret(#[source] crate::config::SecretError),
    #[error("the webhook's secret is shorter than 8 characters; anyone could sign a poke")]
    WebhookWeak,
    #[error(transparent)]
    Notify(#[from] crate::notify::NotifyError),
}

/// A running daemon's handles, for callers that embed it (tests, the status server).
pub struct Handle {
    pub published: crate::reconcile::Published,
    pub proxy_addr: Option<SocketAddr>,
    /// The wake-and-activity listener Caddy or Traefik forwards to (`wake_listen`).
    pub wake_addr: Option<SocketAddr>,
    pub status_addr: Option<SocketAddr>,
}

/// How long file events must be quiet before a pass (bursts coalesce), and the longest a
/// burst can delay one.
const DEBOUNCE: Duration = Duration::from_millis(100);
const DEBOUNCE_MAX: Duration = Duration::from_millis(500);
/// Passes in a row that may follow one another at once before waiting for a trigger.
const MAX_FOLLOWUPS: u32 = 10;

/// How the daemon reads its config file again: on SIGHUP, and when the file changes.
pub struct Reload {
    /// The config file (its directory is watched for changes to it).
    pub path: PathBuf,
    /// Read it again, with the command line's overrides applied; or why it cannot be used.
    pub read: Box<dyn Fn() -> Result<Config, Vec<crate::diag::Diagnostic>> + Send + Sync>,
}

/// Run until `cancel` (or SIGINT/SIGTERM when `signals`). `ready` is told the handles once the
/// proxy listens. With `reload`, SIGHUP and changes to the config file reload it.
pub async fn run(
    config: Config,
    allow_destroy: bool,
    cancel: CancellationToken,
    signals: bool,
    ready: Option<tokio::sync::oneshot::Sender<Handle>>,
    reload: Option<Reload>,
) -> Result<(), DaemonError> {
    let budget = file_budget(&config);
    let state = StateDir::open(&config.state_dir)?;
    let _lock = state.lock()?;
    let providers = Providers::new(&config.providers, &config.provider_env())?;

    if signals {
        let c = cancel.clone();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(DaemonError::Signals)?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
            .map_err(DaemonError::Signals)?;
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::info!(
                "signal received: finishing the steps in flight (a second signal exits at once)"
            );
            c.cancel();
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            // Sessions outlive vessel by design, and every step is idempotent: the next start
            // picks up where this one stopped.
            tracing::warn!("second signal: exiting without waiting for the steps in flight");
            std::process::exit(130);
        });
    }

    // vessel's own proxy: the embedded one, or the wake listener Caddy or Traefik forwards to.
    let mut served_addr = None;
    if let (Some(proxy), Some(listen)) =
        (&providers.embedded, config.providers.proxy.served_listen())
    {
        let listen_err = |source| DaemonError::Listen {
            addr: listen,
            source,
        };
        let listener = std::net::TcpListener::bind(listen).map_err(listen_err)?;
        served_addr = listener.local_addr().ok();
        // A thread per core, each with its own runtime and upstream pool (as nginx has a worker
        // per core): a request and its upstream connection never cross threads.
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        let mut limits = Limits::new(&config.listeners, budget.proxy);
        if config.providers.proxy.wake_listen().is_some() {
            // Every connection comes from the proxy in front: one client, the whole bound.
            limits.per_client = limits.max_connections;
        }
        let serving = crate::proxy::Serving {
            limits,
            upstream_header_timeout: crate::listeners::timeout(
                config.listeners.upstream_header_timeout,
            ),
            pool_idle: budget.pool_idle,
        };
        proxy
            .serve_threads(listener, threads, serving, cancel.clone())
            .map_err(listen_err)?;
        tracing::info!(listen = %served_addr.map(|a| a.to_string()).unwrap_or_default(), threads, "proxy listening");
    }
    let (proxy_addr, wake_addr) = match config.providers.proxy.wake_listen() {
        Some(_) => (None, served_addr),
        None => (served_addr, None),
    };

    let token = match &config.status.token {
        Some(t) => Some(t.resolve().map_err(DaemonError::Token)?),
        None => None,
    };
    let status_listener = std::net::TcpListener::bind(config.status.listen).map_err(|source| {
        DaemonError::StatusListen {
            addr: config.status.listen,
            source,
        }
    })?;
    let status_addr = status_listener.local_addr().ok();

    let (tx, mut rx) = mpsc::unbounded_channel::<Trigger>();
    forward_changes(&providers, &tx);
    if signals {
        // SIGHUP reloads the config; it never ends the daemon.
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .map_err(DaemonError::Signals)?;
        let tx = tx.clone();
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading the config");
                if tx.send(Trigger::Config).is_err() {
                    return;
                }
            }
        });
    }
    let _config_watcher = reload
        .as_ref()
        .and_then(|r| watch_config(&r.path, tx.clone()));

    let resync = config
        .policy
        .resync_interval
        .std()
        .max(Duration::from_millis(100));
    let ctx = crate::status::Context {
        proxy_port: proxy_addr.map(|a| a.port()),
        domain: config.domain.clone(),
        templates: config.routes.templates.clone(),
        git_mirror: matches!(config.source, crate::config::SourceConfig::Git(_))
            .then(|| config.state_dir.join("git")),
    };
    let source_dir = config.source_dir().map(Path::to_path_buf);
    // A git source is polled: every pass fetches, so passes come at least this often.
    let resync = match &config.source {
        crate::config::SourceConfig::Git(g) => {
            resync.min(g.poll_interval.std().max(Duration::from_millis(100)))
        }
        crate::config::SourceConfig::Dir(_) => resync,
    };
    let state_dir = config.state_dir.clone();
    // Sleep and wake: the proxy holds requests for sleeping sessions and pokes the lifecycle.
    let lifecycle = crate::lifecycle::Lifecycle::open(
        &state_dir,
        providers.compute.clone(),
        providers.embedded.clone(),
        providers.locks.clone(),
    );
    if let Some(proxy) = &providers.embedded {
        proxy.set_holding(crate::proxy::Holding {
            wake_timeout: config.lifecycle.wake_timeout.std(),
            max_held: config.lifecycle.max_held as usize,
            waking_page: config.lifecycle.waking_page,
        });
        proxy.set_waker(lifecycle.waker());
    }
    {
        let tx = tx.clone();
        lifecycle.on_change(Box::new(move || {
            let _ = tx.send(Trigger::Lifecycle);
        }));
    }
    tokio::spawn(
        lifecycle.clone().run(
            config
                .lifecycle
                .check_interval
                .std()
                .max(Duration::from_millis(10)),
            cancel.clone(),
        ),
    );
    let mut reconciler = Reconciler::new(config, providers, state);
    reconciler.set_lifecycle(lifecycle.clone());
    // Notifications: the outbox opened (what an earlier run left queued is sent first), one
    // delivery task per target.
    let mut notify_stats = None;
    if !reconciler.config.notify.is_empty() {
        let (n, deliveries) = crate::notify::Notifier::open(
            &state_dir,
            &reconciler.config.notify,
            &reconciler.config.domain,
            crate::notify::MAX_BACKOFF,
        )?;
        notify_stats = Some(n.stats());
        for d in deliveries {
            tracing::info!(target_name = d.name(), "notifications: delivering");
            tokio::spawn(d.run(cancel.clone()));
        }
        reconciler.set_notifier(n, proxy_addr.map(|a| a.port()));
    }
    reconciler.allow_destroy = allow_destroy;
    if let crate::config::SourceConfig::Git(g) = &reconciler.config.source
        && let Some(w) = &g.webhook
    {
        let secret = w.secret.resolve().map_err(DaemonError::WebhookSecret)?;
        if secret.expose().len() < 8 {
            return Err(DaemonError::WebhookWeak);
        }
        let err = |source| DaemonError::Webhook {
            addr: w.listen,
            source,
        };
        let listener = std::net::TcpListener::bind(w.listen).map_err(err)?;
        tracing::info!(listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "webhook receiver listening");
        let limits = Limits::new(&reconciler.config.listeners, budget.webhook);
        crate::webhook::serve_thread(listener, secret, tx.clone(), limits, cancel.clone())
            .map_err(err)?;
    }
    let mut source_watcher = match &source_dir {
        Some(dir) => Some(watch_source(
            dir,
            &state_dir,
            tx.clone(),
            reconciler.source_changes(),
        )?),
        None => None,
    };
    let _approvals = watch_approvals(&reconciler.state().approvals_dir(), tx.clone());
    // Every secret this process resolves is redacted from whatever the status endpoint serves.
    let mut secrets: Vec<String> = Vec::new();
    if let crate::config::DnsConfig::Powerdns { api_key, .. } = &reconciler.config.providers.dns
        && let Ok(v) = api_key.resolve()
    {
        secrets.push(v.expose().to_string());
    }
    let cloudflare = [
        match &reconciler.config.providers.dns {
            crate::config::DnsConfig::Cloudflare(c) => Some(&c.api_token),
            _ => None,
        },
        match &reconciler.config.providers.proxy {
            crate::config::ProxyConfig::CloudflareTunnel(c) => Some(&c.api_token),
            _ => None,
        },
    ];
    for token in cloudflare.into_iter().flatten() {
        if let Ok(v) = token.resolve() {
            secrets.push(v.expose().to_string());
        }
    }
    if let crate::config::SourceConfig::Git(g) = &reconciler.config.source {
        match &g.auth {
            Some(crate::config::GitAuth::Token { token: s, .. })
            | Some(crate::config::GitAuth::Basic { password: s, .. }) => {
                if let Ok(v) = s.resolve() {
                    secrets.push(v.expose().to_string());
                }
            }
            _ => {}
        }
        if let Some(w) = &g.webhook
            && let Ok(v) = w.secret.resolve()
        {
            secrets.push(v.expose().to_string());
        }
    }
    for t in &reconciler.config.notify {
        for r in [&t.url, &t.secret] {
            if let Ok(v) = r.resolve() {
                secrets.push(v.expose().to_string());
            }
        }
    }
    if let Some(d) = &reconciler.config.providers.compute.docker {
        for r in d.registries.values() {
            if let Ok(v) = r.password.resolve() {
                secrets.push(v.expose().to_string());
            }
        }
    }
    // Metrics count what each pass published.
    let metrics = Arc::new(crate::metrics::Metrics::default());
    metrics.providers(reconciler.provider_names());
    let m = metrics.clone();
    reconciler.on_pass(Box::new(move |snap| m.record(snap)));
    metrics.lifecycle(lifecycle.counters(), reconciler.providers.embedded.clone());
    let mut app =
        crate::status::AppState::new(reconciler.published(), metrics.clone(), ctx, token, secrets)
            .with_lifecycle(lifecycle, reconciler.providers.embedded.clone());
    if let Some(stats) = notify_stats {
        metrics.notifications(stats.clone());
        app = app.with_notifications(stats);
    }
    let limits = Limits::new(&reconciler.config.listeners, budget.status);
    crate::status::serve_thread(status_listener, Arc::new(app), limits, cancel.clone()).map_err(
        |source| DaemonError::StatusListen {
            addr: status_addr.unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0))),
            source,
        },
    )?;
    tracing::info!(listen = %status_addr.map(|a| a.to_string()).unwrap_or_default(), "status endpoint listening");
    if let Some(ready) = ready {
        let _ = ready.send(Handle {
            published: reconciler.published(),
            proxy_addr,
            wake_addr,
            status_addr,
        });
    }
    let mut trigger = Trigger::Startup;
    let mut followups = 0;
    let mut said = Said::default();
    loop {
        let (report, plan, _) = reconciler.pass(trigger, &cancel, |_| {}).await;
        let desired = reconciler.latest().desired.clone();
        log_pass(&report, &plan, desired.as_deref(), &mut said);
        if cancel.is_cancelled() {
            break;
        }
        if report.progressed && !report.converged && followups < MAX_FOLLOWUPS {
            followups += 1;
            trigger = Trigger::Followup;
            continue;
        }
        followups = 0;
        let due = report
            .next_due
            .map(|t| (t - chrono::Utc::now()).to_std().unwrap_or(Duration::ZERO))
            .unwrap_or(resync)
            .min(resync);
        let timer_is_resync = report
            .next_due
            .is_none_or(|t| (t - chrono::Utc::now()).to_std().unwrap_or(Duration::ZERO) >= resync);
        trigger = tokio::select! {
            _ = cancel.cancelled() => break,
            t = rx.recv() => match t {
                Some(t) => t,
                None => break,
            },
            _ = tokio::time::sleep(due) => if timer_is_resync { Trigger::Resync } else { Trigger::Timer },
        };
        let mut reload_now = trigger == Trigger::Config;
        // A file change seen but still settling (the watcher waits for a quiet moment): a pass
        // the timer or anything else asked for waits for it, at most the debounce's limit,
        // rather than loading part of a burst of files and leaving the rest until its steps
        // are done.
        if trigger != Trigger::Source {
            let settling =
                || reconciler.source_changes().count() > reconciler.latest().loaded_changes;
            let until = tokio::time::Instant::now() + DEBOUNCE_MAX + DEBOUNCE;
            while settling() {
                match tokio::time::timeout_at(until, rx.recv()).await {
                    Ok(Some(Trigger::Source)) | Err(_) | Ok(None) => break,
                    Ok(Some(t)) => reload_now |= t == Trigger::Config,
                }
            }
        }
        // Coalesce everything else that arrived meanwhile into this one pass (a config reload
        // among them is done first).
        while let Ok(t) = rx.try_recv() {
            reload_now |= t == Trigger::Config;
        }
        if reload_now && let Some(r) = &reload {
            let before = reconciler.config.source.clone();
            reload_config(&mut reconciler, r, &tx);
            if reconciler.config.source != before {
                source_watcher = match reconciler.config.source_dir() {
                    Some(dir) => {
                        match watch_source(dir, &state_dir, tx.clone(), reconciler.source_changes())
                        {
                            Ok(w) => Some(w),
                            Err(e) => {
                                tracing::warn!(
                                    "cannot watch the new source, it is read on every periodic pass: {}",
                                    crate::error_chain(&e)
                                );
                                None
                            }
                        }
                    }
                    None => None,
                };
                if source_watcher.is_none() {
                    reconciler.source_changes().set_watched(false);
                }
            }
        }
    }
    drop(source_watcher);
    for p in reconciler.providers.compute.values() {
        p.shutdown().await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// Raise the open-file limit to the hard one and divide it between the listeners and the
/// reserve, saying so.
fn file_budget(config: &Config) -> FileBudget {
    let limit = match fds::raise_nofile() {
        Ok(r) => {
            if r.limit > r.before {
                tracing::debug!(from = r.before, to = r.limit, "open-file limit raised");
            }
            r.limit
        }
        Err(e) => {
            let limit = fds::current_limit().unwrap_or(1024);
            tracing::warn!(error = %crate::error_chain(&e), limit, "the open-file limit stays as it is");
            limit
        }
    };
    let proxy = config.providers.proxy.served_listen().is_some();
    let webhook =
        matches!(&config.source, crate::config::SourceConfig::Git(g) if g.webhook.is_some());
    let b = FileBudget::split(limit, &config.listeners.max_connections, proxy, webhook);
    for (listener, configured, given) in &b.lowered {
        tracing::warn!(
            "listeners.max_connections.{listener} is {configured}, more than an open-file limit of {limit} leaves room for; using {given}"
        );
    }
    tracing::info!(
        limit = b.limit,
        reserve = b.reserve,
        proxy = b.proxy,
        pooled = b.pool_idle,
        status = b.status,
        webhook = b.webhook,
        "open files: {} kept for the loop; connections at most: proxy {}, status {}, webhook {}",
        b.reserve,
        b.proxy,
        b.status,
        b.webhook
    );
    b
}

/// Pass every compute provider's own change notices on to the loop.
fn forward_changes(providers: &Providers, tx: &mpsc::UnboundedSender<Trigger>) {
    for p in providers.compute.values() {
        if let Some(mut changes) = p.changes() {
            let tx = tx.clone();
            tokio::spawn(async move {
                while changes.changed().await.is_ok() {
                    if tx.send(Trigger::Provider).is_err() {
                        return;
                    }
                }
            });
        }
    }
}

/// Read the config again and take what can change while running: the source, domain, route
/// templates, source roots, policy, and the compute and DNS providers (rebuilt). What only a
/// restart changes (the state directory, listeners, the proxy provider, the status token, the
/// webhook) keeps its running value, with a warning. An invalid config changes nothing and
/// says why.
fn reload_config(rec: &mut Reconciler, reload: &Reload, tx: &mpsc::UnboundedSender<Trigger>) {
    let path = reload.path.display();
    let mut new = match (reload.read)() {
        Ok(c) => c,
        Err(diags) => {
            let why: Vec<String> = diags.iter().map(|d| d.render(false)).collect();
            tracing::warn!(
                "{path} was not reloaded; the running config stays: {}",
                why.join("\n")
            );
            return;
        }
    };
    let old = &rec.config;
    if new == *old {
        tracing::info!("{path} reloaded: nothing changed");
        return;
    }
    let mut kept: Vec<&str> = Vec::new();
    if new.state_dir != old.state_dir {
        new.state_dir = old.state_dir.clone();
        kept.push("state_dir");
    }
    if new.status != old.status {
        new.status = old.status.clone();
        kept.push("status");
    }
    if new.providers.proxy != old.providers.proxy {
        new.providers.proxy = old.providers.proxy.clone();
        kept.push("providers.proxy");
    }
    let webhook = |c: &Config| match &c.source {
        crate::config::SourceConfig::Git(g) => g.webhook.clone(),
        crate::config::SourceConfig::Dir(_) => None,
    };
    if webhook(&new) != webhook(old) {
        kept.push("source.git.webhook");
        if let crate::config::SourceConfig::Git(g) = &mut new.source {
            g.webhook = webhook(old);
        }
    }
    if !kept.is_empty() {
        tracing::warn!(
            "{path}: {} change only on restart; they keep their running values",
            kept.join(", ")
        );
    }
    let providers_changed =
        new.providers.compute != old.providers.compute || new.providers.dns != old.providers.dns;
    if providers_changed {
        match Providers::new(&new.providers, &new.provider_env()) {
            Ok(mut p) => {
                // The proxy stays the one that is serving.
                p.proxy = rec.providers.proxy.clone();
                p.embedded = rec.providers.embedded.clone();
                forward_changes(&p, tx);
                rec.providers = p;
            }
            Err(e) => {
                tracing::warn!(
                    "{path} was not reloaded; the running config stays: {}",
                    crate::error_chain(&e)
                );
                return;
            }
        }
    }
    rec.set_config(new);
    tracing::info!("{path} reloaded");
}

/// Watch the config file (through its directory, so a save that renames over it counts).
fn watch_config(path: &Path, tx: mpsc::UnboundedSender<Trigger>) -> Option<crate::watch::Watch> {
    let name = path.file_name()?.to_os_string();
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let (raw_tx, mut raw_rx) = mpsc::unbounded_channel::<()>();
    let w = crate::watch::watch(
        &dir,
        false,
        |_| false,
        move |p, _| {
            if p.file_name() == Some(name.as_os_str()) {
                let _ = raw_tx.send(());
            }
        },
    )
    .ok()?;
    tokio::spawn(async move {
        while raw_rx.recv().await.is_some() {
            // A save is often several events: wait for a quiet moment.
            while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, raw_rx.recv()).await {}
            if tx.send(Trigger::Config).is_err() {
                return;
            }
        }
    });
    Some(w)
}

/// What the log last said about held objects and files with errors: each is said again only
/// when it changes, not on every pass.
#[derive(Default)]
struct Said {
    held: Vec<String>,
    quarantined: Vec<String>,
    gaps: Vec<String>,
}

fn log_pass(
    r: &PassReport,
    plan: &crate::model::plan::Plan,
    desired: Option<&crate::desired::Desired>,
    said: &mut Said,
) {
    // The same span as the pass's own lines.
    let _span = tracing::info_span!("pass", n = r.pass, trigger = %r.trigger).entered();
    let outcomes: Vec<String> = r.outcomes.iter().map(|(k, v)| format!("{v} {k}")).collect();
    if let Some(e) = &r.error {
        tracing::error!("pass could not plan: {e}");
    } else if plan.steps.is_empty() && plan.deferred.is_empty() {
        tracing::debug!(duration_ms = r.duration_ms, "converged");
    } else {
        tracing::info!(
            duration_ms = r.duration_ms,
            "{} create, {} update, {} replace, {} destroy, {} deferred, {} held: {}",
            r.summary.create,
            r.summary.update,
            r.summary.replace,
            r.summary.destroy,
            r.summary.deferred,
            r.summary.held,
            outcomes.join(", ")
        );
    }
    let mut held: Vec<String> = plan
        .guards
        .iter()
        .map(|g| g.describe())
        .chain(
            plan.held
                .iter()
                .filter(|h| h.why != crate::model::plan::HoldReason::NoAddress)
                .map(|h| {
                    format!(
                        "{}: {}",
                        h.object,
                        crate::planner::render::hold_text(&h.why)
                    )
                }),
        )
        .collect();
    held.sort();
    if held != said.held {
        for h in held.iter().filter(|h| !said.held.contains(h)) {
            tracing::warn!("held: {h}");
        }
        if held.is_empty() {
            tracing::info!("nothing is held any more");
        }
        said.held = held;
    }
    // Files with errors: once per change, with their errors in words.
    let quarantined: Vec<String> = desired
        .map(|d| {
            d.quarantined
                .iter()
                .map(|(f, q)| {
                    let errors: Vec<String> = q
                        .errors
                        .iter()
                        .map(|e| format!("{}:{}: {}", e.line, e.column, e.message))
                        .collect();
                    format!("{}: {}", f.display(), errors.join("; "))
                })
                .collect()
        })
        .unwrap_or_default();
    if quarantined != said.quarantined {
        for q in quarantined.iter().filter(|q| !said.quarantined.contains(q)) {
            tracing::warn!("file with errors (its objects are held): {q}");
        }
        if quarantined.is_empty() {
            tracing::info!("no file has errors any more");
        }
        said.quarantined = quarantined;
    }
    let gaps: Vec<String> = r.gaps.iter().map(|(p, e)| format!("{p}: {e}")).collect();
    if gaps != said.gaps {
        for g in gaps.iter().filter(|g| !said.gaps.contains(g)) {
            tracing::warn!("could not observe {g}");
        }
        if gaps.is_empty() {
            tracing::info!("every provider is observed again");
        }
        said.gaps = gaps;
    }
}

/// Watch the state directory's approvals: a new one runs a pass at once (a missing watch
/// only means it is taken at the next pass).
fn watch_approvals(dir: &Path, tx: mpsc::UnboundedSender<Trigger>) -> Option<crate::watch::Watch> {
    std::fs::create_dir_all(dir).ok()?;
    // Taking an approval removes it: that is no news.
    crate::watch::watch(
        dir,
        false,
        |_| false,
        move |_, change| {
            if change.is_new_content() {
                let _ = tx.send(Trigger::Approval);
            }
        },
    )
    .ok()
}

/// Watch the source tree for changes (only changes: the loop's own reads of it wake nothing);
/// relevant ones are debounced into `Trigger::Source`.
fn watch_source(
    dir: &Path,
    state_dir: &Path,
    tx: mpsc::UnboundedSender<Trigger>,
    changes: Arc<crate::reconcile::SourceChanges>,
) -> Result<crate::watch::Watch, DaemonError> {
    let (raw_tx, mut raw_rx) = mpsc::unbounded_channel::<()>();
    let state = state_dir
        .canonicalize()
        .unwrap_or_else(|_| state_dir.to_path_buf());
    let in_state = {
        let state = state.clone();
        move |p: &Path| {
            p.starts_with(&state)
                || p.ancestors()
                    .any(|a| a.join(STATE_MARKER).exists() && p.starts_with(a))
        }
    };
    // A state directory inside the tree is not watched at all: its writes are vessel's own.
    let skip = {
        let state = state.clone();
        move |d: &Path| d.starts_with(&state) || d.join(STATE_MARKER).exists()
    };
    // Paths as the state directory's are compared: canonical.
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let seen = changes.clone();
    // Watched from now on, unless the watch cannot start or says it may miss changes.
    changes.set_watched(true);
    let unwatched = changes.clone();
    let watcher = crate::watch::watch(&dir, true, skip, move |p, change| {
        use crate::watch::Change;
        if matches!(change, Change::Overflow | Change::Lost) {
            // Anything may have changed: the next pass reads the tree.
            if change == Change::Lost {
                seen.set_watched(false);
            }
            seen.seen();
            let _ = raw_tx.send(());
            return;
        }
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let yamlish = name.ends_with(".yaml") || name.ends_with(".yml") || !name.contains('.');
        if !in_state(p) && yamlish && !name.starts_with('.') {
            // Status says a change is waiting from the moment it is seen.
            changes.seen();
            let _ = raw_tx.send(());
        }
    });
    if watcher.is_err() {
        unwatched.set_watched(false);
    }
    let watcher = watcher?;
    tokio::spawn(async move {
        while raw_rx.recv().await.is_some() {
            let start = tokio::time::Instant::now();
            // Wait for a quiet moment, but not forever.
            loop {
                let quiet = tokio::time::timeout(DEBOUNCE, raw_rx.recv()).await;
                match quiet {
                    Err(_) => break,
                    Ok(None) => return,
                    Ok(Some(())) if start.elapsed() >= DEBOUNCE_MAX => break,
                    Ok(Some(())) => {}
                }
            }
            if tx.send(Trigger::Source).is_err() {
                return;
            }
        }
    });
    Ok(watcher)
}
