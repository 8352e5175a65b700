//! The command line: parses arguments, calls the library, prints, and picks the exit code.
//! The only place `anyhow` and process exit codes appear.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;

use crate::config::Config;
use crate::desired::Desired;
use crate::diag::Diagnostic;
use crate::load;
use crate::observed::Observed;
use crate::planner::simulate::converge;
use crate::planner::{Plan, Policy, render};

#[derive(Parser, Debug)]
#[command(
    name = "vessel",
    version,
    about = "A declarative GitOps reconciler for developer sessions"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Check a desired-state tree: exit 0 if valid, 1 if not.
    Validate {
        /// A desired-state directory (run with the embedded default config) or a config file.
        #[arg(default_value = ".")]
        target: PathBuf,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Show what vessel would change. Exit 0: no changes; 2: changes; 1: error (including a
    /// desired tree with errors).
    Plan {
        /// A desired-state directory (with the embedded default config) or a config file.
        #[arg(default_value = ".")]
        target: PathBuf,
        /// Plan against an observed snapshot (JSON; the daemon keeps one in its state dir).
        #[arg(long, conflicts_with = "against_ref")]
        observed: Option<PathBuf>,
        /// Plan against the world another git revision of the same tree would have made: what
        /// this change will do, with no infrastructure (for CI).
        #[arg(long, value_name = "REV")]
        against_ref: Option<String>,
        #[arg(long, value_enum, default_value_t = PlanFormat::Text)]
        format: PlanFormat,
        /// Allow destroys past the destroy budget.
        #[arg(long)]
        allow_destroy: bool,
    },
    /// One pass (observe, plan, show the plan, apply, wait for health), repeated while it
    /// makes progress, then exit: 0 when the world matches, 1 when it does not.
    Apply {
        /// A desired-state directory (with the embedded default config) or a config file.
        #[arg(default_value = ".")]
        target: PathBuf,
        /// Allow destroys past the destroy budget.
        #[arg(long)]
        allow_destroy: bool,
        #[command(flatten)]
        overrides: Overrides,
    },
    /// The daemon: watch the source, reconcile forever, serve the embedded proxy.
    Run {
        /// A desired-state directory (with the embedded default config) or a config file.
        #[arg(default_value = ".")]
        target: PathBuf,
        /// Allow destroys past the destroy budget.
        #[arg(long)]
        allow_destroy: bool,
        #[command(flatten)]
        overrides: Overrides,
    },
    /// A small HTTP server for process sessions: serves a directory's files, `/healthz`, and a
    /// WebSocket echo on `/ws`. The quickstart's plan runs it.
    Devserver {
        /// Where to listen (repeatable).
        #[arg(long, required = true)]
        listen: Vec<std::net::SocketAddr>,
        /// The directory to serve.
        #[arg(long, default_value = ".")]
        root: PathBuf,
        /// The session's name, shown on its page.
        #[arg(long, env = "VESSEL_SESSION", default_value = "session")]
        name: String,
    },
    /// Print a running daemon's status. With `--wait-converged`, exit 0 once it has loaded the
    /// current source and converged, 1 on timeout. The token, if the endpoint needs one, is
    /// read from `VESSEL_STATUS_TOKEN`.
    Status {
        /// The status endpoint.
        #[arg(long, default_value = "http://127.0.0.1:9090")]
        url: String,
        /// Wait until the daemon has applied the current source and converged.
        #[arg(long)]
        wait_converged: bool,
        /// How long to wait.
        #[arg(long, default_value = "60s")]
        timeout: crate::model::Duration,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write the JSON Schemas of every document kind and the config file.
    Schema {
        /// Where to write them.
        #[arg(long, default_value = "schemas")]
        out: PathBuf,
    },
}

/// Settings that override the config file's, for one run.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct Overrides {
    /// Where the embedded proxy listens (overrides `providers.proxy.embedded.listen`).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<std::net::SocketAddr>,
    /// The state directory (overrides `state_dir`).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// The periodic full pass (overrides `policy.resync_interval`), such as `5s`.
    #[arg(long, value_name = "DURATION")]
    pub resync: Option<crate::model::Duration>,
    /// Where the status endpoint listens (overrides `status.listen`).
    #[arg(long, value_name = "ADDR")]
    pub status_listen: Option<std::net::SocketAddr>,
}

impl Overrides {
    pub fn apply(&self, c: &mut Config) {
        if let (Some(l), crate::config::ProxyConfig::Embedded { listen }) =
            (self.listen, &mut c.providers.proxy)
        {
            *listen = l;
        }
        if let Some(d) = &self.state_dir {
            c.state_dir = d.clone();
        }
        if let Some(r) = self.resync {
            c.policy.resync_interval = r;
        }
        if let Some(l) = self.status_listen {
            c.status.listen = l;
        }
    }
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlanFormat {
    Text,
    Json,
    Markdown,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

pub fn main() -> ExitCode {
    crate::source::git::init_network_timeouts();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn color_stderr() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Validate { target, format } => validate(&target, format),
        Command::Plan {
            target,
            observed,
            against_ref,
            format,
            allow_destroy,
        } => plan_cmd(
            &target,
            observed.as_deref(),
            against_ref.as_deref(),
            format,
            allow_destroy,
        ),
        Command::Apply {
            target,
            allow_destroy,
            overrides,
        } => apply_cmd(&target, allow_destroy, &overrides),
        Command::Run {
            target,
            allow_destroy,
            overrides,
        } => run_cmd(&target, allow_destroy, &overrides),
        Command::Status {
            url,
            wait_converged,
            timeout,
            json,
        } => status_cmd(&url, wait_converged, timeout.std(), json),
        Command::Devserver { listen, root, name } => {
            runtime()?.block_on(crate::devserver::run(listen, root, name))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Schema { out } => {
            std::fs::create_dir_all(&out)?;
            for (name, text) in crate::schema::all() {
                let path = out.join(name);
                std::fs::write(&path, text)
                    .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
                println!("wrote {}", path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// What a `[CONFIG|DIR]` argument resolves to.
pub fn resolve_target(target: &Path) -> Result<Config, Vec<Diagnostic>> {
    if target.is_dir() {
        Ok(Config::embedded_default(target))
    } else {
        load::load_config(target)
    }
}

fn print_diagnostics(diags: &[Diagnostic]) {
    let color = color_stderr();
    for d in diags {
        eprintln!("{}", d.render(color));
    }
}

fn validate(target: &Path, format: Format) -> anyhow::Result<ExitCode> {
    let config = match resolve_target(target) {
        Ok(c) => c,
        Err(diags) => {
            match format {
                Format::Text => print_diagnostics(&diags),
                Format::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({"valid": false, "config_errors": diags}))?
                ),
            }
            return Ok(ExitCode::from(1));
        }
    };
    let desired = crate::source::load(&config, chrono::Utc::now())?;
    match format {
        Format::Text => {
            let errors: Vec<Diagnostic> = desired.errors().cloned().collect();
            print_diagnostics(&errors);
            print_diagnostics(&desired.warnings);
            eprintln!("{}", summary(&desired));
        }
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&validation_json(&desired))?
        ),
    }
    Ok(if desired.is_valid() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn summary(d: &Desired) -> String {
    let objects = format!(
        "{}, {}, {}",
        plural(d.plans.len(), "plan", "plans"),
        plural(d.sessions.len(), "session", "sessions"),
        plural(d.routes.len(), "route", "routes"),
    );
    let good = d.files.len() - d.quarantined.len();
    if d.is_valid() {
        format!(
            "valid: {objects} in {}",
            plural(d.files.len(), "file", "files")
        )
    } else {
        let n = d.errors().count();
        format!(
            "invalid: {} in {} (quarantined); {objects} in {} valid",
            plural(n, "error", "errors"),
            plural(d.quarantined.len(), "file", "files"),
            plural(good, "other file", "other files"),
        )
    }
}

/// The JSON form of a validation result (schema: `schemas/validate.schema.json` is not
/// published yet; the shape is documented in the README).
pub fn validation_json(d: &Desired) -> serde_json::Value {
    json!({
        "valid": d.is_valid(),
        "files": d.files,
        "objects": {
            "plans": d.plans.keys().collect::<Vec<_>>(),
            "sessions": d.sessions.keys().collect::<Vec<_>>(),
            "routes": d.routes.keys().collect::<Vec<_>>(),
        },
        "quarantined": d.quarantined,
        "errors": d.errors().collect::<Vec<_>>(),
        "warnings": d.warnings,
    })
}

/// Exit code for a plan: 0 nothing to do, 2 changes (or destroys held by a guard).
pub fn plan_exit(plan: &Plan) -> ExitCode {
    if plan.has_changes() || !plan.guards.is_empty() {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    }
}

fn plan_cmd(
    target: &Path,
    observed: Option<&Path>,
    against: Option<&str>,
    format: PlanFormat,
    allow_destroy: bool,
) -> anyhow::Result<ExitCode> {
    let config = match resolve_target(target) {
        Ok(c) => c,
        Err(diags) => {
            print_diagnostics(&diags);
            return Ok(ExitCode::from(1));
        }
    };
    let now = chrono::Utc::now();
    let mut policy = Policy::from_config(&config, now);
    policy.allow_destroy = allow_destroy;
    let desired = crate::source::load(&config, now)?;
    let observed: Observed = match (observed, against) {
        (Some(path), _) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                anyhow::anyhow!("cannot read observed snapshot {}: {e}", path.display())
            })?;
            serde_json::from_str(&text).map_err(|e| {
                anyhow::anyhow!(
                    "{}:{}:{}: not an observed snapshot: {e}",
                    path.display(),
                    e.line(),
                    e.column()
                )
            })?
        }
        (None, Some(rev)) => {
            let dir = config.source_dir().ok_or_else(|| {
                anyhow::anyhow!("--against-ref compares a checkout's tree: use a directory source")
            })?;
            let checkout = crate::source::git::Checkout::discover(dir)?;
            let (revision, files) = checkout.tree_at(dir, rev)?;
            let before = load::load_entries(dir, files, &config, now);
            let mut world = policy.clone();
            world.allow_destroy = true;
            world.allow_empty_source = true;
            let (o, _) = converge(&before, &Observed::default(), &world, 6);
            eprintln!(
                "planning against {rev} ({}: {})",
                &revision.id[..revision.id.len().min(12)],
                revision.summary
            );
            o
        }
        (None, None) => {
            // The live providers. The embedded proxy's table lives in the daemon: a gap here.
            let providers = crate::providers::Providers::for_planning(&config)?;
            let needed = desired.plans.values().map(|p| p.spec.compute).collect();
            runtime()?.block_on(providers.observe(&needed))
        }
    };
    let p = crate::planner::plan(&desired, &observed, &policy);
    let out = match format {
        PlanFormat::Text => render::text(
            &p,
            &observed,
            std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
        ),
        PlanFormat::Json => render::json(&p),
        PlanFormat::Markdown => render::markdown(&p, &observed),
    };
    print!("{out}");
    let errors: Vec<Diagnostic> = desired.errors().cloned().collect();
    if !errors.is_empty() {
        print_diagnostics(&errors);
        eprintln!(
            "error: {} file(s) have errors; their objects are held as they are",
            desired.quarantined.len()
        );
        return Ok(ExitCode::from(1));
    }
    Ok(plan_exit(&p))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VESSEL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

fn config_for(target: &Path, overrides: &Overrides) -> Result<Config, ExitCode> {
    match resolve_target(target) {
        Ok(mut c) => {
            overrides.apply(&mut c);
            Ok(c)
        }
        Err(diags) => {
            print_diagnostics(&diags);
            Err(ExitCode::from(1))
        }
    }
}

fn run_cmd(target: &Path, allow_destroy: bool, overrides: &Overrides) -> anyhow::Result<ExitCode> {
    init_logging();
    let config = match config_for(target, overrides) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    tracing::info!(source = %config.source_display(), state = %config.state_dir.display(), "vessel starting");
    let cancel = tokio_util::sync::CancellationToken::new();
    runtime()?.block_on(crate::daemon::run(
        config,
        allow_destroy,
        cancel,
        true,
        None,
    ))?;
    Ok(ExitCode::SUCCESS)
}

fn apply_cmd(
    target: &Path,
    allow_destroy: bool,
    overrides: &Overrides,
) -> anyhow::Result<ExitCode> {
    use crate::reconcile::{Reconciler, Trigger};
    let config = match config_for(target, overrides) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let color = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let rt = runtime()?;
    rt.block_on(async move {
        let state = crate::state::StateDir::open(&config.state_dir)?;
        let _lock = state.lock()?;
        let providers = crate::providers::Providers::from_config(&config)?;
        if providers.embedded.is_some() {
            eprintln!("note: the embedded proxy serves routes only while vessel runs; `vessel run` keeps them up");
        }
        // Show the plan first.
        let now = chrono::Utc::now();
        let desired = crate::source::load(&config, now)?;
        print_diagnostics(&desired.errors().cloned().collect::<Vec<_>>());
        let needed = desired.plans.values().map(|p| p.spec.compute).collect();
        let observed = providers.observe(&needed).await;
        let mut policy = Policy::from_config(&config, now);
        policy.allow_destroy = allow_destroy;
        let first = crate::planner::plan(&desired, &observed, &policy);
        print!("{}", render::text(&first, &observed, color));
        if first.is_empty() {
            return Ok(if desired.is_valid() { ExitCode::SUCCESS } else { ExitCode::from(1) });
        }
        let cancel = tokio_util::sync::CancellationToken::new();
        let c = cancel.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("interrupted: finishing the steps in flight");
                c.cancel();
            }
        });
        let mut rec = Reconciler::new(config, providers, state);
        rec.allow_destroy = allow_destroy;
        let started = std::time::Instant::now();
        println!("\nApplying:");
        let reports = rec
            .converge(Trigger::Apply, 10, &cancel, |e| {
                let (mark, extra) = match &e.outcome {
                    crate::exec::Outcome::Succeeded => ("ok", String::new()),
                    other => (other.label(), crate::reconcile::failure_text(other).map(|t| format!(": {t}")).unwrap_or_default()),
                };
                println!("  [pass {}] {:<12} {} {} ({} ms){extra}", e.pass, e.action, e.object, mark, e.duration_ms);
            })
            .await;
        let last = reports.last();
        let failed: usize = reports
            .iter()
            .map(|r| r.outcomes.get("failed").copied().unwrap_or(0) + r.outcomes.get("timed_out").copied().unwrap_or(0))
            .sum();
        let converged = last.is_some_and(|r| r.converged);
        println!(
            "\n{} after {} pass(es) in {:.1}s{}.",
            if converged { "Applied: the world matches the desired state" } else { "Not converged" },
            reports.len(),
            started.elapsed().as_secs_f64(),
            if failed > 0 { format!("; {failed} step(s) failed") } else { String::new() }
        );
        for p in rec.providers.compute.values() {
            p.shutdown().await;
        }
        Ok::<_, anyhow::Error>(if converged && desired.is_valid() { ExitCode::SUCCESS } else { ExitCode::from(1) })
    })
}

/// GET `path` from an `http://host:port` base; the body, or why not.
fn http_get(base: &str, path: &str, token: Option<&str>) -> Result<(u16, String), String> {
    use std::io::{Read, Write};
    let hostport = base
        .strip_prefix("http://")
        .ok_or_else(|| format!("`{base}` is not an http:// URL"))?
        .trim_end_matches('/');
    let addr = std::net::ToSocketAddrs::to_socket_addrs(hostport)
        .map_err(|e| format!("cannot resolve {hostport}: {e}"))?
        .next()
        .ok_or_else(|| format!("cannot resolve {hostport}"))?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2))
        .map_err(|e| format!("cannot connect to {hostport}: {e}"))?;
    let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(5)));
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {hostport}\r\n{auth}\r\n")
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&buf);
    let code = text
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .ok_or("not an HTTP answer")?;
    Ok((
        code,
        text.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default(),
    ))
}

fn status_cmd(
    url: &str,
    wait: bool,
    timeout: std::time::Duration,
    raw: bool,
) -> anyhow::Result<ExitCode> {
    let token = std::env::var("VESSEL_STATUS_TOKEN").ok();
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let got = http_get(url, "/status", token.as_deref());
        let status: Option<serde_json::Value> = match &got {
            Ok((200, body)) => serde_json::from_str(body).ok(),
            _ => None,
        };
        let done = status.as_ref().is_some_and(|v| v["converged"] == true);
        if let Some(v) = &status
            && (!wait || done)
        {
            if raw {
                println!("{}", serde_json::to_string_pretty(v)?);
            } else {
                print!("{}", status_summary(url, v));
            }
            return Ok(ExitCode::SUCCESS);
        }
        if !wait {
            let why = match got {
                Ok((code, body)) => format!("{url} answered {code}: {}", body.trim()),
                Err(e) => e,
            };
            eprintln!("error: {why}");
            return Ok(ExitCode::from(1));
        }
        if std::time::Instant::now() >= deadline {
            let why = match (&got, &status) {
                (_, Some(v)) => format!("not converged: {}", status_summary(url, v).trim_end()),
                (Ok((code, body)), None) => format!("{url} answered {code}: {}", body.trim()),
                (Err(e), None) => e.clone(),
            };
            eprintln!("error: timed out after {}s; {why}", timeout.as_secs());
            return Ok(ExitCode::from(1));
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

fn status_summary(url: &str, v: &serde_json::Value) -> String {
    let state = if v["converged"] == true {
        "converged"
    } else if v["ready"] == true {
        "reconciling"
    } else {
        "starting"
    };
    let c = &v["counts"];
    let mut out = format!(
        "vessel at {url}: {state} (revision {}, {} passes)\nsessions: {} desired, {} running, {} stopped, {} failed; {} routes, {} DNS records; {} pending steps, {} held\n",
        v["revision"].as_str().unwrap_or("none"),
        v["passes"],
        c["sessions_desired"],
        c["sessions_running"],
        c["sessions_stopped"],
        c["sessions_failed"],
        c["routes"],
        c["records"],
        c["pending_steps"],
        c["held"],
    );
    if let Some(e) = v["last_pass"]["source_error"].as_str() {
        out.push_str(&format!("source: {e}\n"));
    }
    if let Some(q) = v["quarantined"].as_array().filter(|q| !q.is_empty()) {
        let files: Vec<&str> = q.iter().filter_map(|f| f["file"].as_str()).collect();
        out.push_str(&format!("files with errors (held): {}\n", files.join(", ")));
    }
    for p in v["providers"].as_array().into_iter().flatten() {
        if p["observed"] != true {
            out.push_str(&format!(
                "could not observe {}: {}\n",
                p["provider"].as_str().unwrap_or("?"),
                p["error"].as_str().unwrap_or("")
            ));
        }
    }
    out
}
