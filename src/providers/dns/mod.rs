//! DNS providers: records for routes with `dns: true`. `hosts` (a managed block in a hosts
//! file), `powerdns` (its HTTP API), `cloudflare` (the v4 API). Record steps come in batches.

pub mod cloudflare;
mod config;
pub mod hosts;
pub mod powerdns;

pub use config::{CloudflareDnsConfig, DnsConfig};
pub(crate) use config::{default_budget, default_cf_api};

use crate::model::observed::ObservedRecord;
use crate::model::plan::RecordAction;

use super::{BoxFut, ProviderError};

pub trait DnsProvider: Send + Sync {
    fn observe(&self) -> BoxFut<'_, Result<Vec<ObservedRecord>, ProviderError>>;
    /// Nothing `observe` would report has changed since it last ran, as far as the provider
    /// knows for certain (false when it cannot tell; see `ComputeProvider::unchanged`).
    fn unchanged(&self) -> bool {
        false
    }
    fn apply<'a>(
        &'a self,
        actions: &'a [&'a RecordAction],
    ) -> BoxFut<'a, Vec<Result<(), ProviderError>>>;
}
