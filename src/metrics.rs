//! Prometheus metrics: passes, pass duration, steps by kind and outcome, sessions by state,
//! provider errors and drift repairs. Counted from each snapshot the reconciler publishes (the
//! daemon subscribes them); encoded by the status server. The reconciler knows nothing of it.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::exec::StepResult;
use crate::model::observed::SessionState;
use crate::model::plan::{Plan, Reason};
use crate::reconcile::Snapshot;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TriggerLabel {
    trigger: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabels {
    action: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderLabel {
    provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TargetLabel {
    target: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

/// Where the lifecycle's figures are read from at each scrape.
struct LifeSource {
    counters: std::sync::Arc<crate::lifecycle::LifeCounters>,
    proxy: Option<crate::proxy::Proxy>,
}

pub struct Metrics {
    registry: Registry,
    passes: Family<TriggerLabel, Counter>,
    quiet_passes: Counter,
    pass_seconds: Histogram,
    steps: Family<StepLabels, Counter>,
    sessions: Family<StateLabel, Gauge>,
    provider_errors: Family<ProviderLabel, Counter>,
    drift_repairs: Counter,
    converged: Gauge,
    quarantined: Gauge,
    wakes: Counter,
    wake_seconds: Histogram,
    sleeps: Family<ReasonLabel, Counter>,
    held_requests: Gauge,
    rejected: Family<ReasonLabel, Counter>,
    life: std::sync::Mutex<Option<LifeSource>>,
    notify_queued: Family<TargetLabel, Gauge>,
    notify_delivered: Family<TargetLabel, Counter>,
    notify_failed: Family<TargetLabel, Counter>,
    notify: std::sync::Mutex<Option<crate::notify::outbox::Stats>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            passes: Family::default(),
            quiet_passes: Counter::default(),
            pass_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            steps: Family::default(),
            sessions: Family::default(),
            provider_errors: Family::default(),
            drift_repairs: Counter::default(),
            converged: Gauge::default(),
            quarantined: Gauge::default(),
            wakes: Counter::default(),
            wake_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 18)),
            sleeps: Family::default(),
            held_requests: Gauge::default(),
            rejected: Family::default(),
            life: std::sync::Mutex::new(None),
            notify_queued: Family::default(),
            notify_delivered: Family::default(),
            notify_failed: Family::default(),
            notify: std::sync::Mutex::new(None),
            registry: Registry::default(),
        };
        registry.register(
            "vessel_notifications_queued",
            "Notifications waiting in the outbox, by target",
            m.notify_queued.clone(),
        );
        registry.register(
            "vessel_notifications_delivered",
            "Notifications delivered, by target",
            m.notify_delivered.clone(),
        );
        registry.register(
            "vessel_notifications_failed",
            "Notifications given up on after their retry time, by target",
            m.notify_failed.clone(),
        );
        for reason in ["idle", "cap"] {
            let _ = m.sleeps.get_or_create(&ReasonLabel {
                reason: reason.into(),
            });
        }
        for reason in ["wake_timeout", "held_full", "platform_full"] {
            let _ = m.rejected.get_or_create(&ReasonLabel {
                reason: reason.into(),
            });
        }
        registry.register(
            "vessel_wakes",
            "Sessions woken by a request",
            m.wakes.clone(),
        );
        registry.register(
            "vessel_wake_duration_seconds",
            "From a request arriving for a sleeping session to the session serving it",
            m.wake_seconds.clone(),
        );
        registry.register(
            "vessel_sleeps",
            "Sessions put to sleep, by reason (idle, cap)",
            m.sleeps.clone(),
        );
        registry.register(
            "vessel_held_requests",
            "Requests held now while their sessions wake",
            m.held_requests.clone(),
        );
        registry.register(
            "vessel_rejected_requests",
            "Requests for sleeping sessions answered 503, by reason (wake_timeout, held_full, platform_full)",
            m.rejected.clone(),
        );
        registry.register(
            "vessel_passes",
            "Reconcile passes, by what triggered them",
            m.passes.clone(),
        );
        registry.register(
            "vessel_quiet_passes",
            "Passes on the resync timer that found nothing changed since a pass that changed nothing, and so did nothing",
            m.quiet_passes.clone(),
        );
        registry.register(
            "vessel_pass_duration_seconds",
            "How long a pass took",
            m.pass_seconds.clone(),
        );
        registry.register(
            "vessel_steps",
            "Plan steps, by action and outcome",
            m.steps.clone(),
        );
        registry.register(
            "vessel_sessions",
            "Observed sessions, by state",
            m.sessions.clone(),
        );
        registry.register(
            "vessel_provider_errors",
            "Passes in which a provider could not be observed",
            m.provider_errors.clone(),
        );
        registry.register(
            "vessel_drift_repairs",
            "Steps that repaired drift (a changed route or record, a session that had stopped)",
            m.drift_repairs.clone(),
        );
        registry.register(
            "vessel_converged",
            "1 when the last pass found nothing to do",
            m.converged.clone(),
        );
        registry.register(
            "vessel_quarantined_files",
            "Desired-state files with errors",
            m.quarantined.clone(),
        );
        Metrics { registry, ..m }
    }
}

/// Bring a counter up to `now` (counters only ever go up by the difference).
fn raise(c: &Counter, now: u64) {
    let had = c.get();
    if now > had {
        c.inc_by(now - had);
    }
}

impl Metrics {
    /// Start each provider's error counter at 0, so every metric the README lists is served
    /// from the first scrape (a family with no series would not show at all).
    pub fn providers(&self, names: &[String]) {
        for p in names {
            let _ = self.provider_errors.get_or_create(&ProviderLabel {
                provider: p.clone(),
            });
        }
    }

    /// Count what one pass published.
    pub fn record(&self, snap: &Snapshot) {
        let Some(report) = &snap.last else { return };
        let empty = Plan::default();
        let plan = snap.plan.as_deref().unwrap_or(&empty);
        let observed = snap.observed.as_deref();
        let results: &[StepResult] = &snap.results;
        let trigger = serde_json::to_value(report.trigger)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        self.passes.get_or_create(&TriggerLabel { trigger }).inc();
        if report.quiet {
            self.quiet_passes.inc();
        }
        self.pass_seconds
            .observe(report.duration_ms as f64 / 1000.0);
        for r in results {
            let step = &plan.steps[r.step];
            self.steps
                .get_or_create(&StepLabels {
                    action: step.action.verb().into(),
                    outcome: r.outcome.label().into(),
                })
                .inc();
            if r.outcome.is_success()
                && matches!(step.reason, Reason::Drifted { .. } | Reason::Failed)
            {
                self.drift_repairs.inc();
            }
        }
        if let Some(o) = observed {
            for (state, label) in [
                (SessionState::Running, "running"),
                (SessionState::Stopped, "stopped"),
                (SessionState::Failed, "failed"),
            ] {
                let n = o
                    .sessions
                    .values()
                    .filter(|s| s.owned && s.state == state)
                    .count();
                self.sessions
                    .get_or_create(&StateLabel {
                        state: label.into(),
                    })
                    .set(n as i64);
            }
        }
        for p in report.gaps.keys() {
            self.provider_errors
                .get_or_create(&ProviderLabel {
                    provider: p.clone(),
                })
                .inc();
        }
        self.converged.set(i64::from(report.converged));
        self.quarantined.set(report.quarantined.len() as i64);
    }

    /// Serve the lifecycle's figures (and the requests `proxy` holds) from now on.
    pub fn lifecycle(
        &self,
        counters: std::sync::Arc<crate::lifecycle::LifeCounters>,
        proxy: Option<crate::proxy::Proxy>,
    ) {
        *crate::lock_or_reset(&self.life) = Some(LifeSource { counters, proxy });
    }

    /// Bring the lifecycle's figures up to date (counters only ever go up by the difference).
    fn sync_lifecycle(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let life = crate::lock_or_reset(&self.life);
        let Some(l) = life.as_ref() else { return };
        let up = raise;
        up(&self.wakes, l.counters.wakes.load(Relaxed));
        for s in l.counters.take_wake_seconds() {
            self.wake_seconds.observe(s);
        }
        let reason = |r: &str| ReasonLabel { reason: r.into() };
        up(
            &self.sleeps.get_or_create(&reason("idle")),
            l.counters.sleeps_idle.load(Relaxed),
        );
        up(
            &self.sleeps.get_or_create(&reason("cap")),
            l.counters.sleeps_cap.load(Relaxed),
        );
        if let Some(p) = &l.proxy {
            let h = p.hold_counters();
            self.held_requests.set(h.held as i64);
            up(
                &self.rejected.get_or_create(&reason("wake_timeout")),
                h.rejected_wake_timeout,
            );
            up(
                &self.rejected.get_or_create(&reason("held_full")),
                h.rejected_held_full,
            );
            up(
                &self.rejected.get_or_create(&reason("platform_full")),
                h.rejected_platform_full,
            );
        }
    }

    /// Serve each notification target's deliveries from now on.
    pub fn notifications(&self, stats: crate::notify::outbox::Stats) {
        for name in stats.keys() {
            let l = TargetLabel {
                target: name.clone(),
            };
            let _ = self.notify_queued.get_or_create(&l);
            let _ = self.notify_delivered.get_or_create(&l);
            let _ = self.notify_failed.get_or_create(&l);
        }
        *crate::lock_or_reset(&self.notify) = Some(stats);
    }

    fn sync_notifications(&self) {
        let notify = crate::lock_or_reset(&self.notify);
        let Some(stats) = notify.as_ref() else { return };
        let up = raise;
        for (name, s) in stats.iter() {
            let v = s.view();
            let l = TargetLabel {
                target: name.clone(),
            };
            self.notify_queued.get_or_create(&l).set(v.queued as i64);
            up(&self.notify_delivered.get_or_create(&l), v.delivered);
            up(&self.notify_failed.get_or_create(&l), v.failed);
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        self.sync_lifecycle();
        self.sync_notifications();
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
