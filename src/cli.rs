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
    /// Write the JSON Schemas of every document kind and the config file.
    Schema {
        /// Where to write them.
        #[arg(long, default_value = "schemas")]
        out: PathBuf,
    },
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
    let desired = load::load_tree(config.source_dir(), &config, chrono::Utc::now())?;
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
    let desired = load::load_tree(config.source_dir(), &config, now)?;
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
            let (revision, files) = crate::source::git::tree_at(config.source_dir(), rev)?;
            let before = load::load_entries(config.source_dir(), files, &config, now);
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
            anyhow::bail!(
                "say what to plan against: --observed FILE (a snapshot) or --against-ref REV (a git revision)"
            )
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
