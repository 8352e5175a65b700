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
    /// Write the JSON Schemas of every document kind and the config file.
    Schema {
        /// Where to write them.
        #[arg(long, default_value = "schemas")]
        out: PathBuf,
    },
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
