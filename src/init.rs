//! `vessel init [DIR]`: a commented config (`vessel.yaml`), one example session
//! (`sessions/example.yaml`) and the JSON Schemas editors check them with (`schemas/`). It
//! never overwrites: if any of those files exists, nothing is written.

use std::path::{Path, PathBuf};

/// The config `vessel init` writes: the embedded default, its source set to `sessions/`.
pub const CONFIG: &str = include_str!("init/vessel.yaml");
/// The example session (with its plan) `vessel init` writes.
pub const EXAMPLE: &str = include_str!("init/example.yaml");

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("{} already exists; vessel init never overwrites (nothing was written)", .0.display())]
    Exists(PathBuf),
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The files `init` writes into `dir`, with their contents.
pub fn files(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut out = vec![
        (dir.join("vessel.yaml"), CONFIG.to_string()),
        (dir.join("sessions/example.yaml"), EXAMPLE.to_string()),
    ];
    for (name, text) in crate::schema::all() {
        out.push((dir.join("schemas").join(name), text));
    }
    out
}

/// Write the files into `dir` (created if missing), unless any of them exists already.
pub fn init(dir: &Path) -> Result<Vec<PathBuf>, InitError> {
    let files = files(dir);
    if let Some((path, _)) = files.iter().find(|(p, _)| p.symlink_metadata().is_ok()) {
        return Err(InitError::Exists(path.clone()));
    }
    let mut written = Vec::new();
    for (path, text) in files {
        let write = |path: &Path| -> std::io::Result<()> {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            // create_new: a file that appeared since the check is still not overwritten.
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)?;
            std::io::Write::write_all(&mut f, text.as_bytes())
        };
        write(&path).map_err(|source| InitError::Write {
            path: path.clone(),
            source,
        })?;
        written.push(path);
    }
    Ok(written)
}
