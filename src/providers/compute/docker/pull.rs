//! Images: making sure a session's image is on its host before its container is made, by the
//! plan's `pull` policy (`missing`, `always`, `never`), with the configured registry's
//! credentials (resolved for each pull, sent to the engine in its `X-Registry-Auth` header
//! only, never logged). A pull's progress is published per session (`Inner::activity`, shown
//! in status) and logged when its phase changes; a pull that fails fails its step with the
//! registry's own message, and has changed nothing. A pull is bounded by `transfer_timeout`
//! as a whole (the engine's answer streams, so the client's own timeout only bounds its head).

use std::collections::BTreeMap;
use std::sync::Arc;

use bollard::auth::DockerCredentials;
use bollard::query_parameters::CreateImageOptions;
use futures_util::StreamExt;

use crate::model::PullPolicy;
use crate::providers::ProviderError;
use crate::secret::SecretError;

use super::{Inner, short, status_of};

/// Why an image is not on its host.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("the credentials for registry {registry}")]
    Credentials {
        registry: String,
        #[source]
        source: SecretError,
    },
    #[error("it is not on the host, and the plan says `pull: never`")]
    NotPresent,
    /// The engine's or the registry's own words.
    #[error("{0}")]
    Refused(String),
    #[error("the pull took longer than {0} s (transfer_timeout)")]
    TimedOut(u64),
    #[error("the engine reported no error, but has no such image afterwards")]
    Vanished,
}

/// An image reference split the way the Engine API's pull wants it.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct ImageRef {
    /// The registry it comes from (`docker.io` when the name has none).
    pub registry: String,
    /// The name without its tag (with its digest, if it has one).
    pub name: String,
    /// The tag to pull; none for a digest reference.
    pub tag: Option<String>,
}

/// Split `image` into registry, name and tag (`latest` when it has neither tag nor digest: an
/// empty tag would pull every tag of the repository).
pub(super) fn parse_image(image: &str) -> ImageRef {
    let first = image.split_once('/').map_or("", |(f, _)| f);
    let registry = if first.contains('.') || first.contains(':') || first == "localhost" {
        first.to_string()
    } else {
        "docker.io".to_string()
    };
    if image.contains('@') {
        return ImageRef {
            registry,
            name: image.to_string(),
            tag: None,
        };
    }
    let last_slash = image.rfind('/').map_or(0, |i| i + 1);
    match image[last_slash..].rfind(':') {
        Some(i) => ImageRef {
            registry,
            name: image[..last_slash + i].to_string(),
            tag: Some(image[last_slash + i + 1..].to_string()),
        },
        None => ImageRef {
            registry,
            name: image.to_string(),
            tag: Some("latest".into()),
        },
    }
}

/// One layer's progress, as the engine reports it.
#[derive(Default)]
struct Layer {
    done: bool,
    current: i64,
    total: i64,
}

/// What a pull has done so far, in words: `3 of 5 layers, 12.3 of 20.0 MB`.
fn summary(layers: &BTreeMap<String, Layer>) -> String {
    if layers.is_empty() {
        return "starting".into();
    }
    let done = layers.values().filter(|l| l.done).count();
    let (current, total) = layers
        .values()
        .fold((0i64, 0i64), |(c, t), l| (c + l.current, t + l.total));
    let mb = |b: i64| b as f64 / 1_000_000.0;
    if total > 0 {
        format!(
            "{done} of {} layers, {:.1} of {:.1} MB",
            layers.len(),
            mb(current),
            mb(total)
        )
    } else {
        format!("{done} of {} layers", layers.len())
    }
}

/// Fold one progress line of the engine's into the layers; Docker says one line per layer and
/// phase, Podman free-form lines ("Copying blob sha256:...", "Writing manifest").
fn track(layers: &mut BTreeMap<String, Layer>, info: &bollard::models::CreateImageInfo) {
    let status = info.status.as_deref().unwrap_or_default();
    let lower = status.to_ascii_lowercase();
    let finished = lower.contains("complete") || lower.contains("already exists");
    if let Some(id) = info.id.as_deref().filter(|id| !id.is_empty())
        && !status.starts_with("Pulling from")
        && status.split_whitespace().count() <= 3
    {
        let l = layers.entry(id.to_string()).or_default();
        if let Some(p) = &info.progress_detail {
            l.current = p.current.unwrap_or(l.current);
            l.total = p.total.unwrap_or(l.total);
        }
        if finished {
            l.done = true;
            l.current = l.total;
        }
    }
    if let Some(blob) = status.strip_prefix("Copying blob ") {
        let blob = blob.split_whitespace().next().unwrap_or_default();
        layers.entry(blob.to_string()).or_default().done = true;
    }
}

/// Clears what `session` is said to be doing when dropped.
struct Noted<'a> {
    inner: &'a Inner,
    session: &'a str,
}

impl Drop for Noted<'_> {
    fn drop(&mut self) {
        self.inner.note(self.session, None);
    }
}

impl Inner {
    /// Make sure `image` is on `host` by `policy`, for `session`'s create or replace.
    pub(super) async fn ensure_image(
        &self,
        host: usize,
        session: &str,
        image: &str,
        policy: PullPolicy,
    ) -> Result<(), ProviderError> {
        let object = format!("image {image} on docker host {}", self.hosts[host].name);
        let present = match policy {
            PullPolicy::Always => false,
            PullPolicy::Missing | PullPolicy::Never => self.has_image(host, image, &object).await?,
        };
        match (policy, present) {
            (_, true) => Ok(()),
            (PullPolicy::Never, false) => Err(ProviderError::caused(
                "find",
                object,
                Arc::new(PullError::NotPresent),
            )),
            _ => self.pull(host, session, image, &object).await,
        }
    }

    async fn has_image(
        &self,
        host: usize,
        image: &str,
        object: &str,
    ) -> Result<bool, ProviderError> {
        let d = self.client(host).await?;
        self.count();
        match d.inspect_image(image).await {
            Ok(_) => Ok(true),
            Err(e) if status_of(&e) == Some(404) => Ok(false),
            Err(e) => Err(ProviderError::failed("inspect", object, short(&e))),
        }
    }

    /// The credentials configured for `image`'s registry, resolved now (a rotated token is
    /// picked up); they go to the engine only.
    fn credentials(&self, r: &ImageRef) -> Result<Option<DockerCredentials>, PullError> {
        let Some(auth) = self.config.registries.get(&r.registry) else {
            return Ok(None);
        };
        let password = auth
            .password
            .resolve()
            .map_err(|source| PullError::Credentials {
                registry: r.registry.clone(),
                source,
            })?;
        Ok(Some(DockerCredentials {
            username: Some(auth.username.clone()),
            password: Some(password.expose().to_string()),
            serveraddress: Some(r.registry.clone()),
            ..Default::default()
        }))
    }

    /// Pull `image` onto `host`, publishing its progress for `session`.
    async fn pull(
        &self,
        host: usize,
        session: &str,
        image: &str,
        object: &str,
    ) -> Result<(), ProviderError> {
        let host_name = self.hosts[host].name.clone();
        let failed = |e: PullError| ProviderError::caused("pull", object, Arc::new(e));
        let r = parse_image(image);
        let credentials = self.credentials(&r).map_err(failed)?;
        let d = self.transfer_client(host).await?;
        let options = CreateImageOptions {
            from_image: Some(r.name.clone()),
            tag: r.tag.clone(),
            ..Default::default()
        };
        let label = format!("pulling {image} on {host_name}");
        self.note(session, Some(format!("{label}: starting")));
        // Cleared however the pull ends, even when the step's timeout drops it midway.
        let _noted = Noted {
            inner: self,
            session,
        };
        tracing::info!(%session, %image, host = %host_name, "pulling image");
        let started = std::time::Instant::now();
        self.count();
        let limit = self.config.transfer_timeout.std();
        let outcome = tokio::time::timeout(limit, async {
            let mut stream = d.create_image(Some(options), None, credentials);
            let mut layers: BTreeMap<String, Layer> = BTreeMap::new();
            let mut phase = String::new();
            while let Some(item) = stream.next().await {
                let info = match item {
                    Ok(info) => info,
                    Err(bollard::errors::Error::DockerStreamError { error }) => {
                        return Err(PullError::Refused(error));
                    }
                    Err(bollard::errors::Error::DockerResponseServerError { message, .. }) => {
                        return Err(PullError::Refused(message));
                    }
                    Err(e) => return Err(PullError::Refused(short(&e))),
                };
                if let Some(m) = info.error_detail.as_ref().and_then(|e| e.message.clone()) {
                    return Err(PullError::Refused(m));
                }
                track(&mut layers, &info);
                let status = info.status.as_deref().unwrap_or_default().trim();
                let now = if layers.is_empty() {
                    status.to_string()
                } else {
                    summary(&layers)
                };
                if !now.is_empty() {
                    self.note(session, Some(format!("{label}: {now}")));
                }
                let first = status.split_whitespace().next().unwrap_or_default();
                if !first.is_empty() && first != phase {
                    tracing::debug!(%session, %image, %status, "pull");
                    phase = first.to_string();
                }
            }
            Ok(())
        })
        .await
        .unwrap_or(Err(PullError::TimedOut(limit.as_secs())));
        if let Err(e) = outcome {
            tracing::warn!(%session, %image, host = %host_name, "pull failed: {e}");
            return Err(failed(e));
        }
        // Some engines end the stream without an error line when nothing was pulled: check.
        if !self.has_image(host, image, object).await? {
            return Err(failed(PullError::Vanished));
        }
        tracing::info!(
            %session, %image, host = %host_name,
            "pulled image in {:.1}s", started.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// Set (or clear) what is happening to `session` now, for status.
    pub(super) fn note(&self, session: &str, text: Option<String>) {
        self.activity.send_if_modified(|m| match text {
            Some(t) => m.insert(session.to_string(), t.clone()).as_ref() != Some(&t),
            None => m.remove(session).is_some(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_references() {
        let r = |registry: &str, name: &str, tag: Option<&str>| ImageRef {
            registry: registry.into(),
            name: name.into(),
            tag: tag.map(Into::into),
        };
        assert_eq!(
            parse_image("busybox"),
            r("docker.io", "busybox", Some("latest"))
        );
        assert_eq!(
            parse_image("library/busybox:1.36"),
            r("docker.io", "library/busybox", Some("1.36"))
        );
        assert_eq!(
            parse_image("127.0.0.1:5000/team/box"),
            r("127.0.0.1:5000", "127.0.0.1:5000/team/box", Some("latest"))
        );
        assert_eq!(
            parse_image("localhost/busybox:test"),
            r("localhost", "localhost/busybox", Some("test"))
        );
        assert_eq!(
            parse_image("ghcr.io/o/img@sha256:abcd"),
            r("ghcr.io", "ghcr.io/o/img@sha256:abcd", None)
        );
    }

    #[test]
    fn progress_in_words() {
        let mut layers = BTreeMap::new();
        assert_eq!(summary(&layers), "starting");
        let line =
            |id: &str, status: &str, current: i64, total: i64| bollard::models::CreateImageInfo {
                id: Some(id.into()),
                status: Some(status.into()),
                progress_detail: Some(bollard::models::ProgressDetail {
                    current: Some(current),
                    total: Some(total),
                }),
                ..Default::default()
            };
        track(&mut layers, &line("a", "Downloading", 1_000_000, 2_000_000));
        let complete = bollard::models::CreateImageInfo {
            id: Some("a".into()),
            status: Some("Pull complete".into()),
            ..Default::default()
        };
        track(&mut layers, &complete);
        track(&mut layers, &line("b", "Downloading", 500_000, 1_000_000));
        assert_eq!(summary(&layers), "1 of 2 layers, 2.5 of 3.0 MB");
        // Podman's free-form lines.
        let mut podman = BTreeMap::new();
        let copying = bollard::models::CreateImageInfo {
            status: Some("Copying blob sha256:0123 done".into()),
            ..Default::default()
        };
        track(&mut podman, &copying);
        assert_eq!(summary(&podman), "1 of 1 layers");
    }
}
