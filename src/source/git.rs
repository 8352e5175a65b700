//! Reading a desired-state tree out of a git commit (not a working tree someone could edit).

use std::path::{Path, PathBuf};

use git2::{ObjectType, Repository, TreeWalkMode, TreeWalkResult};

use crate::config::GitSourceConfig;
use crate::load::{Entry, ReadError, is_desired_name};

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("{path} is not inside a git repository")]
    NotARepo {
        path: PathBuf,
        #[source]
        source: git2::Error,
    },
    #[error("the repository at {0} has no working tree")]
    Bare(PathBuf),
    #[error("{path} is outside the repository's working tree {workdir}")]
    Outside { path: PathBuf, workdir: PathBuf },
    #[error("cannot resolve git revision `{rev}`")]
    Revision {
        rev: String,
        #[source]
        source: git2::Error,
    },
    #[error("cannot open the mirror at {path}")]
    Mirror {
        path: PathBuf,
        #[source]
        source: git2::Error,
    },
    #[error("cannot fetch {url}")]
    Fetch {
        url: String,
        #[source]
        source: git2::Error,
    },
    #[error("cannot read the tree of `{rev}`")]
    Tree {
        rev: String,
        #[source]
        source: git2::Error,
    },
}

/// A commit's identity, for plans, status and events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revision {
    pub id: String,
    pub summary: String,
}

/// A checkout's repository, for reading trees out of its commits (`plan --against-ref`).
pub struct Checkout(Repository);

impl Checkout {
    /// The repository that contains `dir`.
    pub fn discover(dir: &Path) -> Result<Checkout, GitError> {
        Repository::discover(dir)
            .map(Checkout)
            .map_err(|source| GitError::NotARepo {
                path: dir.to_path_buf(),
                source,
            })
    }

    /// The files of the desired-state tree at `dir` as of revision `rev`: read on demand, so a
    /// load reads only what its budget admits. A directory absent at `rev` gives no files.
    pub fn tree_at(&self, dir: &Path, rev: &str) -> Result<(Revision, Vec<Entry<'_>>), GitError> {
        let repo = &self.0;
        let workdir = repo
            .workdir()
            .ok_or_else(|| GitError::Bare(dir.to_path_buf()))?;
        let canon = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
        let (wd, d) = (canon(workdir), canon(dir));
        let rel = d
            .strip_prefix(&wd)
            .map_err(|_| GitError::Outside {
                path: d.clone(),
                workdir: wd.clone(),
            })?
            .to_path_buf();
        let commit = repo
            .revparse_single(rev)
            .and_then(|o| o.peel_to_commit())
            .map_err(|source| GitError::Revision {
                rev: rev.to_string(),
                source,
            })?;
        commit_files(repo, &commit, &rel)
    }
}

/// A commit's revision and the desired-state files under `rel` in its tree (none when `rel`
/// is not a directory there).
fn commit_files<'r>(
    repo: &'r Repository,
    commit: &git2::Commit<'_>,
    rel: &Path,
) -> Result<(Revision, Vec<Entry<'r>>), GitError> {
    let rev = commit.id().to_string();
    let revision = Revision {
        id: rev.clone(),
        summary: commit
            .summary()
            .ok()
            .flatten()
            .unwrap_or_default()
            .to_string(),
    };
    let tree_err = |source| GitError::Tree {
        rev: rev.clone(),
        source,
    };
    let tree = commit.tree().map_err(tree_err)?;
    let sub = if rel.as_os_str().is_empty() {
        Some(tree)
    } else {
        match tree.get_path(rel) {
            Ok(entry) if entry.kind() == Some(ObjectType::Tree) => Some(
                entry
                    .to_object(repo)
                    .and_then(|o| o.peel_to_tree())
                    .map_err(tree_err)?,
            ),
            _ => None,
        }
    };
    let files = match sub {
        Some(sub) => entries_of(repo, &sub, &rev)?,
        None => Vec::new(),
    };
    Ok((revision, files))
}

/// The desired-state files of `tree`, each with its size from the object's header (nothing is
/// inflated here) and a reader for its bytes.
fn entries_of<'r>(
    repo: &'r Repository,
    sub: &git2::Tree<'_>,
    rev: &str,
) -> Result<Vec<Entry<'r>>, GitError> {
    let mut blobs: Vec<(PathBuf, git2::Oid)> = Vec::new();
    sub.walk(TreeWalkMode::PreOrder, |root, entry| {
        let name = entry.name().unwrap_or("");
        let is_dir = entry.kind() == Some(ObjectType::Tree);
        if !is_desired_name(name, is_dir) {
            return if is_dir {
                TreeWalkResult::Skip
            } else {
                TreeWalkResult::Ok
            };
        }
        if !is_dir && entry.kind() == Some(ObjectType::Blob) {
            blobs.push((PathBuf::from(root).join(name), entry.id()));
        }
        TreeWalkResult::Ok
    })
    .map_err(|source| GitError::Tree {
        rev: rev.to_string(),
        source,
    })?;
    let odb = repo.odb().map_err(|source| GitError::Tree {
        rev: rev.to_string(),
        source,
    })?;
    let blob_error = |id: git2::Oid, e: git2::Error| ReadError::Source {
        what: format!("git blob {id}"),
        source: Box::new(e),
    };
    Ok(blobs
        .into_iter()
        .map(|(rel, id)| Entry {
            rel,
            id: Some(id.as_bytes().into()),
            size: odb
                .read_header(id)
                .map(|(size, _)| size as u64)
                .map_err(|e| blob_error(id, e)),
            read: Box::new(move || {
                repo.find_blob(id)
                    .map(|b| b.content().to_vec())
                    .map_err(|e| blob_error(id, e))
            }),
        })
        .collect())
}

/// Does the mirror at `dir` know `rev` (a commit, a branch or a tag) as `applied` itself or one
/// of its ancestors? False when either is unknown to it (not fetched yet).
pub fn contains(dir: &Path, applied: &str, rev: &str) -> bool {
    let Ok(repo) = Repository::open_bare(dir) else {
        return false;
    };
    let Ok(applied) = git2::Oid::from_str(applied) else {
        return false;
    };
    let candidates = [
        rev.to_string(),
        format!("refs/remotes/origin/{rev}"),
        format!("refs/tags/{rev}"),
    ];
    let Some(target) = candidates.iter().find_map(|c| {
        repo.revparse_single(c)
            .ok()
            .and_then(|o| o.peel_to_commit().ok())
            .map(|c| c.id())
    }) else {
        return false;
    };
    target == applied || repo.graph_descendant_of(applied, target).unwrap_or(false)
}

/// A bare mirror of the source repository in the state directory, fetched incrementally.
pub struct Mirror {
    repo: Repository,
    config: GitSourceConfig,
}

/// What a fetch is allowed to take before the pass goes on with the last fetched commit.
pub const FETCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

impl Mirror {
    /// Open (or create) the mirror at `dir` for `config`'s remote.
    pub fn open(dir: &Path, config: &GitSourceConfig) -> Result<Mirror, GitError> {
        let err = |source| GitError::Mirror {
            path: dir.to_path_buf(),
            source,
        };
        let repo = match Repository::open_bare(dir) {
            Ok(r) => r,
            Err(_) => {
                std::fs::create_dir_all(dir)
                    .map_err(|e| err(git2::Error::from_str(&e.to_string())))?;
                Repository::init_bare(dir).map_err(err)?
            }
        };
        let same = repo
            .find_remote("origin")
            .ok()
            .and_then(|r| r.url().ok().map(|u| u == config.url))
            .unwrap_or(false);
        if !same {
            let _ = repo.remote_delete("origin");
            repo.remote_with_fetch("origin", &config.url, "+refs/heads/*:refs/remotes/origin/*")
                .map_err(err)?;
        }
        Ok(Mirror {
            repo,
            config: config.clone(),
        })
    }

    /// Fetch branches and tags (forced: a force-push is applied like any other revision).
    pub fn fetch(&self) -> Result<(), GitError> {
        let mut remote = self
            .repo
            .find_remote("origin")
            .map_err(|source| GitError::Fetch {
                url: self.config.url.clone(),
                source,
            })?;
        let mut opts = git2::FetchOptions::new();
        opts.prune(git2::FetchPrune::On)
            .download_tags(git2::AutotagOption::All);
        super::transport::with_auth(self.auth()?, || {
            remote.fetch(
                &[
                    "+refs/heads/*:refs/remotes/origin/*",
                    "+refs/tags/*:refs/tags/*",
                ],
                Some(&mut opts),
                None,
            )
        })
        .map_err(|source| GitError::Fetch {
            url: self.config.url.clone(),
            source,
        })
    }

    /// The commit the configured ref names: a branch, a tag, or a commit id.
    fn commit(&self) -> Result<git2::Commit<'_>, GitError> {
        let r = &self.config.reference;
        let candidates = [
            format!("refs/remotes/origin/{r}"),
            format!("refs/tags/{r}"),
            r.clone(),
        ];
        let mut last = None;
        for c in candidates {
            match self
                .repo
                .revparse_single(&c)
                .and_then(|o| o.peel_to_commit())
            {
                Ok(commit) => return Ok(commit),
                Err(e) => last = Some(e),
            }
        }
        Err(GitError::Revision {
            rev: r.clone(),
            source: last.unwrap_or_else(|| git2::Error::from_str("not found")),
        })
    }
}

/// libgit2's own network timeouts, so a hung server ends a fetch instead of occupying the
/// mirror's one fetch slot for ever. Call at the start of `main`, before any thread exists.
pub fn init_network_timeouts() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: these set libgit2 globals without synchronisation; `cli::main` calls this
        // first thing, before any thread (tokio's included) is spawned, and `Once` makes it
        // the only call.
        unsafe {
            let _ = git2::opts::set_server_connect_timeout_in_milliseconds(10_000);
            let _ = git2::opts::set_server_timeout_in_milliseconds(15_000);
            if let Err(e) = super::transport::register() {
                eprintln!("warning: cannot register vessel's git transports: {e}");
            }
        }
    });
}

/// Why a fetch did not happen (the mirror keeps what it had).
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    #[error("the previous fetch has not finished")]
    StillRunning,
    #[error("fetching {url} took longer than {secs}s")]
    TimedOut { url: String, secs: u64 },
    #[error(transparent)]
    Failed(std::sync::Arc<GitError>),
}

/// Fetch with a time limit: a hung remote must never stall the loop. At most one fetch per
/// mirror runs at a time; a fetch still running from before counts as not done.
pub fn fetch_with_timeout(dir: &Path, config: &GitSourceConfig) -> Result<(), FetchError> {
    use std::sync::Mutex;
    use std::sync::mpsc;
    static RUNNING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    // The list is only ever pushed to and filtered: a panic while it was held leaves it whole.
    let running = || RUNNING.lock().unwrap_or_else(|p| p.into_inner());
    {
        let mut running = running();
        if running.iter().any(|p| p == dir) {
            return Err(FetchError::StillRunning);
        }
        running.push(dir.to_path_buf());
    }
    let (tx, rx) = mpsc::channel();
    let (d, c) = (dir.to_path_buf(), config.clone());
    std::thread::spawn(move || {
        let r = Mirror::open(&d, &c)
            .and_then(|m| m.fetch())
            .map_err(|e| FetchError::Failed(std::sync::Arc::new(e)));
        running().retain(|p| p != &d);
        let _ = tx.send(r);
    });
    match rx.recv_timeout(FETCH_TIMEOUT) {
        Ok(r) => r,
        Err(_) => Err(FetchError::TimedOut {
            url: config.url.clone(),
            secs: FETCH_TIMEOUT.as_secs(),
        }),
    }
}

/// Why a commit is not applied under signature verification.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("commit {0} is not signed")]
    NotSigned(String),
    #[error(
        "commit {0} has a GPG signature; vessel checks SSH signatures only (git config gpg.format ssh)"
    )]
    NotSsh(String),
    #[error("cannot prepare {path}")]
    Scratch {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot run ssh-keygen (install openssh-client)")]
    NoSshKeygen(#[source] std::io::Error),
    #[error("commit {0} is not signed by an allowed signer")]
    NotAllowed(String),
    #[error("commit {commit}'s signature does not verify: {why}")]
    BadSignature { commit: String, why: String },
}

/// The ref that remembers the last commit that passed verification.
const VERIFIED_REF: &str = "refs/vessel/verified";

impl Mirror {
    /// The ref's commit id.
    pub fn head(&self) -> Result<git2::Oid, GitError> {
        self.commit().map(|c| c.id())
    }

    /// The desired-state files at `id` (a commit of this mirror), read on demand.
    pub fn entries_at(&self, id: git2::Oid) -> Result<(Revision, Vec<Entry<'_>>), GitError> {
        let rev = id.to_string();
        let commit = self
            .repo
            .find_commit(id)
            .map_err(|source| GitError::Revision {
                rev: rev.clone(),
                source,
            })?;
        commit_files(&self.repo, &commit, &self.config.path)
    }

    /// The last commit that passed verification, if any.
    pub fn last_verified(&self) -> Option<git2::Oid> {
        self.repo.refname_to_id(VERIFIED_REF).ok()
    }

    fn mark_verified(&self, id: git2::Oid) {
        let _ = self
            .repo
            .reference(VERIFIED_REF, id, true, "vessel: verified");
    }

    /// Is `id` signed (SSH) by a key in `allowed_signers`? The signer on success, why not on
    /// failure. Remembers the commit when it passes.
    pub fn verify(
        &self,
        id: git2::Oid,
        allowed_signers: &Path,
        scratch: &Path,
    ) -> Result<String, VerifyError> {
        let (sig, data) = self
            .repo
            .extract_signature(&id, None)
            .map_err(|_| VerifyError::NotSigned(short(id)))?;
        let sig = sig.as_str().unwrap_or("").to_string();
        if !sig.starts_with("-----BEGIN SSH SIGNATURE-----") {
            return Err(VerifyError::NotSsh(short(id)));
        }
        let scratch_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| VerifyError::Scratch { path, source }
        };
        std::fs::create_dir_all(scratch).map_err(scratch_err(scratch))?;
        let sig_path = scratch.join(format!("{id}.sig"));
        std::fs::write(&sig_path, &sig).map_err(scratch_err(&sig_path))?;
        let result = (|| {
            // ssh-keygen's answer: its output, or its complaint when it refuses.
            enum Answer {
                Out(String),
                Refused(String),
            }
            impl Answer {
                fn or(self, f: impl FnOnce(String) -> VerifyError) -> Result<String, VerifyError> {
                    match self {
                        Answer::Out(s) => Ok(s),
                        Answer::Refused(why) => Err(f(why)),
                    }
                }
            }
            let run = |args: &[&str], stdin: Option<&[u8]>| -> Result<Answer, VerifyError> {
                use std::io::Write;
                let mut child = std::process::Command::new("ssh-keygen")
                    .args(args)
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .map_err(VerifyError::NoSshKeygen)?;
                if let (Some(mut w), Some(input)) = (child.stdin.take(), stdin) {
                    let _ = w.write_all(input);
                }
                let out = child.wait_with_output().map_err(VerifyError::NoSshKeygen)?;
                Ok(if out.status.success() {
                    Answer::Out(String::from_utf8_lossy(&out.stdout).into_owned())
                } else {
                    Answer::Refused(String::from_utf8_lossy(&out.stderr).trim().to_string())
                })
            };
            let signers = allowed_signers.display().to_string();
            let sig_arg = sig_path.display().to_string();
            let principals = run(
                &["-Y", "find-principals", "-s", &sig_arg, "-f", &signers],
                None,
            )?
            .or(|_| VerifyError::NotAllowed(short(id)))?;
            let principal = principals.lines().next().unwrap_or("").trim().to_string();
            run(
                &[
                    "-Y", "verify", "-f", &signers, "-I", &principal, "-n", "git", "-s", &sig_arg,
                ],
                Some(data.as_ref()),
            )?
            .or(|why| VerifyError::BadSignature {
                commit: short(id),
                why,
            })?;
            Ok(principal)
        })();
        let _ = std::fs::remove_file(&sig_path);
        if result.is_ok() {
            self.mark_verified(id);
        }
        result
    }
}

fn short(id: git2::Oid) -> String {
    id.to_string()[..12].to_string()
}

impl Mirror {
    /// The credentials for this fetch's transport (`transport.rs`), resolved now so a rotated
    /// token or password is picked up.
    fn auth(&self) -> Result<Option<super::transport::Auth>, GitError> {
        use super::transport::Auth;
        use crate::config::GitAuth;
        let Some(auth) = &self.config.auth else {
            return Ok(None);
        };
        Ok(Some(match auth {
            GitAuth::Token {
                token: secret,
                username,
            }
            | GitAuth::Basic {
                username,
                password: secret,
            } => Auth::Basic {
                username: username.clone(),
                secret: secret.resolve().map_err(|e| GitError::Fetch {
                    url: self.config.url.clone(),
                    source: git2::Error::from_str(&e.to_string()),
                })?,
            },
            GitAuth::Ssh {
                key,
                known_hosts,
                username,
            } => Auth::Ssh {
                key: key.clone(),
                known_hosts: known_hosts.clone(),
                username: username.clone(),
            },
        }))
    }
}
