//! The command line: parses arguments, calls the library, prints, and picks the exit code.
//! The only place `anyhow` and process exit codes appear.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;

use crate::config::{Config, TlsConfig};
use crate::desired::Desired;
use crate::diag::Diagnostic;
use crate::load;
use crate::model::observed::Observed;
use crate::model::plan::Plan;
use crate::planner::render;
use crate::planner::simulate::converge;

#[derive(Parser, Debug)]
#[command(
    name = "vessel",
    version,
    about = "A declarative GitOps reconciler for developer sessions"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// How `vessel run` and `vessel apply` write their log on stderr: lines for people, or one
    /// JSON object per event for a log collector.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

static LOG_FORMAT: std::sync::OnceLock<LogFormat> = std::sync::OnceLock::new();

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
    /// Let a running vessel apply, once, the destroys a guard holds in the plan whose
    /// approval hash `vessel plan` printed (`vessel approve HASH`). The approval is written
    /// into the state directory; the daemon takes it on its next pass if its plan is still
    /// exactly that one, and it expires unused after `--ttl`.
    Approve {
        /// The hash `vessel plan` printed under "Held".
        hash: String,
        /// A desired-state directory (with the embedded default config) or a config file: where
        /// the state directory is.
        #[arg(default_value = ".")]
        target: PathBuf,
        /// How long the approval stays valid.
        #[arg(long, default_value = "1h")]
        ttl: crate::model::Duration,
        /// The state directory (overrides the config's).
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
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
        /// A config file (or desired-state directory): its `status.listen` (and token) is the
        /// endpoint. Without one, `./vessel.yaml` if there is one, else the embedded default.
        target: Option<PathBuf>,
        /// The status endpoint (overrides the config's).
        #[arg(long)]
        url: Option<String>,
        /// Wait until the daemon has applied the current source and converged: nothing to do,
        /// nothing held, every provider observed, no file with errors.
        #[arg(long)]
        wait_converged: bool,
        /// With --wait-converged: also wait until this git revision (a commit, branch or tag)
        /// or a later one is applied (for a directory source: that content revision).
        #[arg(long, value_name = "REV", requires = "wait_converged")]
        revision: Option<String>,
        /// With --wait-converged: files with errors (and what they hold) do not count.
        #[arg(long, requires = "wait_converged")]
        allow_quarantined: bool,
        /// How long to wait.
        #[arg(long, default_value = "60s")]
        timeout: crate::model::Duration,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
        /// For an https:// endpoint: a PEM file of the CA certificates to trust instead of the
        /// system's.
        #[arg(long, value_name = "PATH")]
        ca_file: Option<PathBuf>,
        /// For an https:// endpoint: trust exactly the certificate with this SHA-256
        /// fingerprint (64 hex digits, `:` allowed), whoever signed it.
        #[arg(long, value_name = "HEX")]
        pin_sha256: Option<String>,
    },
    /// Write the JSON Schemas of every document kind and the config file.
    Schema {
        /// Where to write them.
        #[arg(long, default_value = "schemas")]
        out: PathBuf,
    },
    /// Start a new vessel directory: a commented config (`vessel.yaml`), one example session
    /// (`sessions/example.yaml`) and the JSON Schemas (`schemas/`). Never overwrites a file.
    Init {
        /// The directory (created if missing).
        #[arg(default_value = ".")]
        dir: PathBuf,
    },
    /// Print a shell completion script: `vessel completions bash > /etc/bash_completion.d/vessel`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff): `vessel man > /usr/local/share/man/man1/vessel.1`.
    Man,
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

/// Print to stdout, ignoring a closed pipe (`vessel apply | head` must not panic mid-apply).
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($t)*);
    }};
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
    if matches!(
        cli.command,
        Command::Validate { .. }
            | Command::Plan { .. }
            | Command::Status { .. }
            | Command::Schema { .. }
            | Command::Approve { .. }
            | Command::Completions { .. }
            | Command::Man
    ) {
        // A reader that goes away (`vessel plan | head`) ends these at once, as it ends any
        // filter, instead of a panic on the next write.
        // SAFETY: no other thread exists yet, and SIG_DFL is a valid disposition.
        let _ = unsafe {
            nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGPIPE,
                nix::sys::signal::SigHandler::SigDfl,
            )
        };
    }
    LOG_FORMAT.get_or_init(|| cli.log_format);
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
            target,
            url,
            wait_converged,
            revision,
            allow_quarantined,
            timeout,
            json,
            ca_file,
            pin_sha256,
        } => {
            let (url, token) = match status_endpoint(target.as_deref(), url) {
                Ok(e) => e,
                Err(code) => return Ok(code),
            };
            let wait = wait_converged.then_some(Wait {
                revision,
                allow_quarantined,
            });
            let tls = (ca_file.is_some() || pin_sha256.is_some()).then_some(TlsConfig {
                ca_file,
                pin_sha256,
            });
            let endpoint = match StatusClient::new(&url, tls.as_ref(), token.as_deref()) {
                Ok(e) => e,
                Err(e) => {
                    eprintln!("error: {}", crate::error_chain(&e));
                    return Ok(ExitCode::from(1));
                }
            };
            status_cmd(&endpoint, wait, timeout.std(), json)
        }
        Command::Approve {
            hash,
            target,
            ttl,
            state_dir,
        } => approve_cmd(&hash, &target, ttl, state_dir),
        Command::Devserver { listen, root, name } => {
            runtime()?.block_on(crate::devserver::run(listen, root, name))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Init { dir } => match crate::init::init(&dir) {
            Ok(written) => {
                for p in written {
                    println!("wrote {}", p.display());
                }
                println!(
                    "next: vessel validate {0}/vessel.yaml && vessel run {0}/vessel.yaml",
                    dir.display()
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("error: {}", crate::error_chain(&e));
                Ok(ExitCode::from(1))
            }
        },
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "vessel", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Man => {
            let cmd = <Cli as clap::CommandFactory>::command();
            let mut out = Vec::new();
            clap_mangen::Man::new(cmd).render(&mut out)?;
            // Each subcommand gets a section of the one page: what it does, its options.
            for sub in <Cli as clap::CommandFactory>::command().get_subcommands() {
                let name = format!("VESSEL {}", sub.get_name().to_uppercase());
                out.extend_from_slice(format!(".SH \"{name}\"\n").as_bytes());
                let man = clap_mangen::Man::new(sub.clone());
                man.render_description_section(&mut out)?;
                man.render_options_section(&mut out)?;
            }
            std::io::Write::write_all(&mut std::io::stdout(), &out)?;
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

/// Is `target` a file of desired-state documents (one has a `kind`) rather than a config?
fn is_desired_file(target: &Path) -> bool {
    use std::io::Read as _;
    let mut text = String::new();
    target.is_file()
        && std::fs::File::open(target)
            .and_then(|f| f.take(load::MAX_FILE_BYTES).read_to_string(&mut text))
            .is_ok()
        && load::yaml::scan(&text).is_ok_and(|docs| docs.iter().any(|d| d.kind.is_some()))
}

fn validate(target: &Path, format: Format) -> anyhow::Result<ExitCode> {
    if is_desired_file(target) {
        return validate_file(target, format);
    }
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

/// `vessel validate FILE.yaml`: the file in the context of its directory (the plans it names
/// may be in other files there), reporting on that file alone.
fn validate_file(target: &Path, format: Format) -> anyhow::Result<ExitCode> {
    let root = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let rel = PathBuf::from(target.file_name().unwrap_or_default());
    let config = Config::embedded_default(root);
    let mut d = crate::source::load(&config, chrono::Utc::now())?;
    let display = root.join(&rel);
    d.quarantined.retain(|f, _| *f == rel);
    d.warnings.retain(|w| w.file == display);
    d.plans.retain(|_, x| x.file == rel);
    d.sessions.retain(|_, x| x.file == rel);
    d.routes.retain(|_, x| x.file == rel);
    d.files.retain(|f| *f == rel);
    match format {
        Format::Text => {
            print_diagnostics(&d.errors().cloned().collect::<Vec<_>>());
            print_diagnostics(&d.warnings);
            eprintln!("{}", summary(&d));
        }
        Format::Json => println!("{}", serde_json::to_string_pretty(&validation_json(&d))?),
    }
    Ok(if d.is_valid() {
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

/// Exit code for a plan: 0 nothing to do, 2 changes (or something held back that differs
/// from what is declared: a guard, a missing source, an object in the way). What cannot be
/// observed from here (the embedded proxy lives in the daemon) is listed, not counted.
pub fn plan_exit(plan: &Plan) -> ExitCode {
    use crate::model::plan::HoldReason;
    let held = plan
        .held
        .iter()
        .any(|h| !matches!(h.why, HoldReason::NoAddress | HoldReason::Unobserved { .. }));
    if plan.has_changes() || !plan.guards.is_empty() || held {
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
    let mut policy = config.policy(now);
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
            let providers = crate::providers::Providers::for_planning(
                &config.providers,
                &config.provider_env(),
            )?;
            let needed = desired
                .plans
                .values()
                .flat_map(|p| p.spec.compute.kinds().iter().copied())
                .collect();
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
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match LOG_FORMAT.get().copied().unwrap_or(LogFormat::Text) {
        LogFormat::Json => fmt.json().flatten_event(true).try_init(),
        LogFormat::Text => fmt.with_ansi(std::io::stderr().is_terminal()).try_init(),
    };
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
    // A config file is read again on SIGHUP and when it changes; a directory's embedded
    // default has nothing to reload.
    let reload = (!target.is_dir()).then(|| {
        let (path, overrides) = (target.to_path_buf(), overrides.clone());
        crate::daemon::Reload {
            path: path.clone(),
            read: Box::new(move || {
                let mut c = load::load_config(&path)?;
                overrides.apply(&mut c);
                Ok(c)
            }),
        }
    });
    runtime()?.block_on(crate::daemon::run(
        config,
        allow_destroy,
        cancel,
        true,
        None,
        reload,
    ))?;
    Ok(ExitCode::SUCCESS)
}

fn apply_cmd(
    target: &Path,
    allow_destroy: bool,
    overrides: &Overrides,
) -> anyhow::Result<ExitCode> {
    use crate::reconcile::{Reconciler, Trigger};
    init_logging();
    let config = match config_for(target, overrides) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let color = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let rt = runtime()?;
    rt.block_on(async move {
        let state = crate::state::StateDir::open(&config.state_dir)?;
        let _lock = state.lock()?;
        let providers = crate::providers::Providers::new(&config.providers, &config.provider_env())?;
        if config.providers.proxy.wake_listen().is_some() {
            eprintln!("note: the routes go through vessel's wake listener, which serves only while vessel runs; `vessel run` keeps it up");
        } else if providers.embedded.is_some() {
            eprintln!("note: the embedded proxy serves routes only while vessel runs; `vessel run` keeps them up");
        }
        // Show the plan first.
        let now = chrono::Utc::now();
        let desired = crate::source::load(&config, now)?;
        print_diagnostics(&desired.errors().cloned().collect::<Vec<_>>());
        let needed = desired
                .plans
                .values()
                .flat_map(|p| p.spec.compute.kinds().iter().copied())
                .collect();
        let observed = providers.observe(&needed).await;
        let mut policy = config.policy(now);
        policy.allow_destroy = allow_destroy;
        let first = crate::planner::plan(&desired, &observed, &policy);
        say!("{}", render::text(&first, &observed, color));
        if first.is_empty() {
            let held = crate::status::view::not_converged(Some(&first), Some(&observed), Some(&desired));
            return Ok(apply_exit(&held, 0));
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
        // Progress: one line redrawn in place on a terminal, plain lines otherwise.
        let tty = std::io::stdout().is_terminal();
        let (progress_tx, progress_rx) = tokio::sync::watch::channel(crate::exec::Progress::default());
        rec.exec.progress = Some(progress_tx);
        let stop_progress = tokio_util::sync::CancellationToken::new();
        let shown = tokio::spawn(crate::progress::show(progress_rx, tty, stop_progress.clone()));
        let started = std::time::Instant::now();
        say!("\nApplying:\n");
        let reports = rec
            .converge(Trigger::Apply, 10, &cancel, |e| {
                let (mark, extra) = match &e.outcome {
                    crate::exec::Outcome::Succeeded => ("ok", String::new()),
                    other => (other.label(), crate::reconcile::failure_text(other).map(|t| format!(": {t}")).unwrap_or_default()),
                };
                say!("{}  [pass {}] {:<12} {} {} ({} ms){extra}\n", crate::progress::clear_line(tty), e.pass, e.action, e.object, mark, e.duration_ms);
            })
            .await;
        stop_progress.cancel();
        let _ = shown.await;
        let last = reports.last();
        let failed: usize = reports
            .iter()
            .map(|r| r.outcomes.get("failed").copied().unwrap_or(0) + r.outcomes.get("timed_out").copied().unwrap_or(0))
            .sum();
        let snap = rec.latest();
        let held = crate::status::view::not_converged(
            snap.plan.as_deref(),
            snap.observed.as_deref(),
            snap.desired.as_deref(),
        );
        let converged = last.is_some_and(|r| r.converged && r.error.is_none()) && held.is_empty();
        say!(
            "\n{} after {} pass(es) in {:.1}s{}.\n",
            if converged { "Applied: the world matches the desired state" } else { "Not converged" },
            reports.len(),
            started.elapsed().as_secs_f64(),
            if failed > 0 { format!("; {failed} step(s) failed") } else { String::new() }
        );
        for p in rec.providers.compute.values() {
            p.shutdown().await;
        }
        let stuck = last.is_none_or(|r| !r.converged || r.error.is_some());
        Ok::<_, anyhow::Error>(apply_exit(&held, if failed > 0 || stuck { 1 } else { 0 }))
    })
}

fn approve_cmd(
    hash: &str,
    target: &Path,
    ttl: crate::model::Duration,
    state_dir: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    if hash.len() != 16 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        eprintln!(
            "error: `{hash}` is not an approval hash; `vessel plan` prints one (16 hex digits) under \"Held\""
        );
        return Ok(ExitCode::from(1));
    }
    let overrides = Overrides {
        state_dir,
        ..Overrides::default()
    };
    let config = match config_for(target, &overrides) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let state = crate::state::StateDir::open(&config.state_dir)?;
    let expires = chrono::Utc::now() + chrono::Duration::from_std(ttl.std())?;
    state.approve(&hash.to_ascii_lowercase(), expires)?;
    println!(
        "approved {hash} until {}: a running vessel applies the destroys it holds once, in its next pass, if its plan still holds exactly those",
        expires.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    );
    Ok(ExitCode::SUCCESS)
}

/// `vessel apply`'s exit code: 1 when something failed or was left undone (`failed`), else 3
/// when something was held back (printed), else 0.
fn apply_exit(held: &[(String, bool)], failed: u8) -> ExitCode {
    if failed != 0 {
        return ExitCode::from(failed);
    }
    if held.is_empty() {
        return ExitCode::SUCCESS;
    }
    eprintln!("held back (exit 3):");
    for (why, _) in held {
        eprintln!("  {why}");
    }
    ExitCode::from(APPLY_HELD)
}

/// `vessel apply`'s exit code when nothing failed but something was held back.
pub const APPLY_HELD: u8 = 3;

/// `vessel status`'s way to the status endpoint: the one HTTP client (`http_client`), on a
/// runtime of its own, with the token if there is one.
struct StatusClient {
    url: String,
    api: crate::http_client::Api,
    runtime: tokio::runtime::Runtime,
    /// `Bearer <token>`; sent as a sensitive header, never printed.
    authorization: Option<String>,
}

/// Why `vessel status` could not ask the endpoint.
#[derive(Debug, thiserror::Error)]
enum StatusClientError {
    #[error("cannot start an HTTP client")]
    Runtime(#[source] std::io::Error),
    #[error(transparent)]
    Http(#[from] crate::http_client::HttpError),
}

impl StatusClient {
    fn new(
        url: &str,
        tls: Option<&TlsConfig>,
        token: Option<&str>,
    ) -> Result<StatusClient, StatusClientError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(StatusClientError::Runtime)?;
        let limits = crate::http_client::Limits {
            connect: std::time::Duration::from_secs(2),
            answer: std::time::Duration::from_secs(5),
            max_body: 32 << 20,
        };
        // The client's connector needs the runtime it will run on.
        let api = {
            let _entered = runtime.enter();
            crate::http_client::Api::new(url, "status endpoint", tls, limits)?
        };
        Ok(StatusClient {
            url: url.to_string(),
            api,
            runtime,
            authorization: token.map(|t| format!("Bearer {t}")),
        })
    }

    /// GET `path`: the status code and the body.
    fn get(&self, path: &str) -> Result<(u16, String), crate::http_client::HttpError> {
        let headers: Vec<(&'static str, &str)> = self
            .authorization
            .as_deref()
            .map(|a| ("authorization", a))
            .into_iter()
            .collect();
        let reply =
            self.runtime
                .block_on(self.api.call(http::Method::GET, path, &headers, None))?;
        Ok((
            reply.status,
            String::from_utf8_lossy(&reply.body).into_owned(),
        ))
    }
}

/// What `vessel status --wait-converged` waits for.
struct Wait {
    revision: Option<String>,
    allow_quarantined: bool,
}

/// The status endpoint and its token: `--url`, else the config's `status.listen` (the config
/// named, or `./vessel.yaml`, or the embedded default); the token from `VESSEL_STATUS_TOKEN`,
/// else the config's reference.
fn status_endpoint(
    target: Option<&Path>,
    url: Option<String>,
) -> Result<(String, Option<String>), ExitCode> {
    let local = Path::new("vessel.yaml");
    let config = match target {
        Some(t) => Some(resolve_target(t).map_err(|d| {
            print_diagnostics(&d);
            ExitCode::from(1)
        })?),
        None if url.is_none() && local.is_file() => resolve_target(local).ok(),
        None => None,
    };
    let url = url.unwrap_or_else(|| {
        let listen = config
            .as_ref()
            .map(|c| c.status.listen)
            .unwrap_or_else(|| Config::embedded_default(Path::new(".")).status.listen);
        format!("http://{listen}")
    });
    let token = std::env::var("VESSEL_STATUS_TOKEN").ok().or_else(|| {
        let r = config.as_ref()?.status.token.as_ref()?;
        r.resolve().ok().map(|s| s.expose().to_string())
    });
    Ok((url, token))
}

/// Percent-encode a query value.
fn query_value(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn status_cmd(
    endpoint: &StatusClient,
    wait: Option<Wait>,
    timeout: std::time::Duration,
    raw: bool,
) -> anyhow::Result<ExitCode> {
    let url = endpoint.url.as_str();
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let got = endpoint.get("/status");
        let status: Option<serde_json::Value> = match &got {
            Ok((200, body)) => serde_json::from_str(body).ok(),
            _ => None,
        };
        let done = match (&wait, &status) {
            (Some(w), Some(v)) => {
                let key = if w.allow_quarantined {
                    "converged_allowing_quarantine"
                } else {
                    "converged"
                };
                let applied = match &w.revision {
                    None => true,
                    Some(rev) => {
                        let path = format!("/revision?contains={}", query_value(rev));
                        matches!(endpoint.get(&path), Ok((200, body))
                            if serde_json::from_str::<serde_json::Value>(&body)
                                .is_ok_and(|r| r["contains"] == true))
                    }
                };
                v[key] == true && applied
            }
            _ => false,
        };
        if let Some(v) = &status
            && (wait.is_none() || done)
        {
            if raw {
                println!("{}", serde_json::to_string_pretty(v)?);
            } else {
                print!("{}", status_summary(url, v));
            }
            return Ok(ExitCode::SUCCESS);
        }
        if wait.is_none() {
            let why = match got {
                Ok((code, body)) => format!("{url} answered {code}: {}", body.trim()),
                Err(e) => crate::error_chain(&e),
            };
            eprintln!("error: {why}");
            return Ok(ExitCode::from(1));
        }
        if std::time::Instant::now() >= deadline {
            let why = match (&got, &status) {
                (_, Some(v)) => {
                    let reasons: Vec<&str> = v["not_converged"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|r| r.as_str())
                        .collect();
                    let revision = match wait.as_ref().and_then(|w| w.revision.as_deref()) {
                        Some(rev) => format!(
                            "; waiting for revision {rev} (applied: {})",
                            v["revision"].as_str().unwrap_or("none")
                        ),
                        None => String::new(),
                    };
                    format!(
                        "not converged{revision}: {}\n{}",
                        reasons.join("; "),
                        status_summary(url, v).trim_end()
                    )
                }
                (Ok((code, body)), None) => format!("{url} answered {code}: {}", body.trim()),
                (Err(e), None) => crate::error_chain(e),
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
    for k in v["kept_workspaces"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "kept workspace of {} ({}): until {}\n",
            k["session"].as_str().unwrap_or("?"),
            k["provider"].as_str().unwrap_or("?"),
            k["until"].as_str().unwrap_or("?"),
        ));
    }
    for p in v["providers"].as_array().into_iter().flatten() {
        if p["observed"] != true {
            let name = p["provider"].as_str().unwrap_or("?");
            let what = if p["state"] == "degraded" {
                format!("{name} is degraded (rate-limited, waiting)")
            } else {
                format!("could not observe {name}")
            };
            out.push_str(&format!("{what}: {}\n", p["error"].as_str().unwrap_or("")));
        }
    }
    out
}
