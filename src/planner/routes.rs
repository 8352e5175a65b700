//! Phase 4: routes (for sessions that run or sleep, and are not held) and phase 5: the DNS
//! records of routes with `dns: true`, each against what the proxy and the DNS provider hold.

use std::collections::BTreeSet;

use crate::desired::{EffectiveRoute, RouteOrigin, effective_routes};
use crate::model::observed::{Observed, ProviderId};
use crate::model::{RunState, split_route_key};

use super::order::merge_join;
use super::{
    Action, Deferred, HoldReason, Object, Phase, Planner, Reason, RecordAction, RouteAction,
};

impl Planner<'_> {
    pub(super) fn routes(&mut self) {
        let (desired, observed, policy) = (self.desired, self.observed, self.policy);
        let routed = |s: &str| {
            self.wants
                .get(s)
                .is_some_and(|w| w.state != RunState::Stopped)
                && !self.held.sessions.contains(s)
        };
        // Sorted by key (host, then path prefix); where two claim one (validation prevents it)
        // the explicit route wins, then the first template in `RouteOrigin` order: a total
        // order, so deterministic.
        let mut routes: Vec<EffectiveRoute> =
            effective_routes(desired, &policy.templates, &policy.domain, routed);
        routes.sort_unstable_by(|a, b| (&a.key, a.origin).cmp(&(&b.key, b.origin)));
        routes.dedup_by(|later, first| later.key == first.key);
        let proxy_gap = self.unobserved(&ProviderId::Proxy);
        let joined = merge_join(
            routes.iter().map(|r| (r.key.as_str(), r)),
            observed.routes.iter().map(|(k, v)| (k.as_str(), v)),
        );
        for (key, want, have) in joined {
            let obj = || Object::Route(key.to_string());
            let (host, path) = split_route_key(key);
            if have.is_some_and(|o| !o.owned) {
                if want.is_some() {
                    self.hold_host(key, HoldReason::Foreign);
                }
                continue;
            }
            // A route of a held session, or one a file with errors names: as it is.
            let held = have.is_some_and(|o| {
                o.session.as_deref().is_some_and(|s| self.held.session(s))
                    || o.route
                        .as_deref()
                        .is_some_and(|r| self.held.quarantined_routes.contains(r))
            });
            if held {
                self.held.hosts.insert(host.to_string());
                continue;
            }
            if let Some(why) = &proxy_gap {
                self.hold_host(key, why.clone());
                continue;
            }
            match (want, have) {
                (Some(r), _) => {
                    let pending = self.address_pending.contains(r.session);
                    let upstream = observed
                        .sessions
                        .get(r.session)
                        .and_then(|s| s.endpoints.get(r.port_name))
                        .filter(|_| !pending);
                    // Only a session that runs once this plan ran has an address to read then
                    // (one made asleep is reached through the proxy's wake, not a route).
                    let made_now = self
                        .wants
                        .get(r.session)
                        .filter(|w| w.state == RunState::Running)
                        .map(|w| w.spec.compute);
                    let Some(upstream) = upstream else {
                        if let (true, None, Some(kind)) = (pending, have, made_now) {
                            // A new route to a session made or started in this plan: its
                            // address is read once those steps ran, in this same pass.
                            let route_name: Option<&str> = match r.origin {
                                RouteOrigin::Route(n) => Some(n),
                                RouteOrigin::Template(_) => None,
                            };
                            self.drafts.push(
                                Phase::UpsertRoute,
                                Action::Route(RouteAction::UpsertRoute {
                                    host: host.into(),
                                    path: path.map(str::to_string),
                                    strip_prefix: r.strip_prefix,
                                    upstream: String::new(),
                                    session: r.session.to_string(),
                                    port: r.port_name.to_string(),
                                    route: route_name.map(str::to_string),
                                    upstream_from: Some(kind),
                                }),
                                Reason::Missing,
                            );
                        } else if pending {
                            // The session is being created or started in this plan: the next
                            // pass has its address.
                            self.out.deferred.push(Deferred {
                                object: obj(),
                                after: Object::Session(r.session.to_string()),
                            });
                            if r.dns {
                                self.pending_route(host, key);
                            }
                        } else if have.is_none() {
                            // Asleep or stopped with no address: nothing to route to until it
                            // runs.
                            self.hold(obj(), HoldReason::NoAddress);
                            if r.dns {
                                self.pending_route(host, key);
                            }
                        }
                        continue;
                    };
                    let route_name: Option<&str> = match r.origin {
                        RouteOrigin::Route(n) => Some(n),
                        RouteOrigin::Template(_) => None,
                    };
                    let reason = match have {
                        None => Reason::Missing,
                        Some(o) if o.upstream != *upstream => Reason::Drifted {
                            changes: vec![format!("upstream {} -> {upstream}", o.upstream)],
                        },
                        Some(o) if o.strip_prefix != r.strip_prefix => Reason::Drifted {
                            changes: vec![format!(
                                "strip_prefix {} -> {}",
                                o.strip_prefix, r.strip_prefix
                            )],
                        },
                        Some(o)
                            if o.session.as_deref() != Some(r.session)
                                || o.route.as_deref() != route_name =>
                        {
                            Reason::Drifted {
                                changes: vec!["owner".into()],
                            }
                        }
                        Some(_) => continue,
                    };
                    self.drafts.push(
                        Phase::UpsertRoute,
                        Action::Route(RouteAction::UpsertRoute {
                            host: host.into(),
                            path: path.map(str::to_string),
                            strip_prefix: r.strip_prefix,
                            upstream: upstream.clone(),
                            session: r.session.to_string(),
                            port: r.port_name.to_string(),
                            route: route_name.map(str::to_string),
                            upstream_from: None,
                        }),
                        reason,
                    );
                }
                (None, Some(_)) if self.held.removals() => {}
                (None, Some(o)) => {
                    if let Some((file, until)) = self.settling(&obj(), o.session.as_deref()) {
                        self.wake_at(until);
                        self.hold_host(key, HoldReason::Settling { file, until });
                        continue;
                    }
                    self.drafts.push(
                        Phase::RemoveRoute,
                        Action::Route(RouteAction::RemoveRoute {
                            host: host.into(),
                            path: path.map(str::to_string),
                        }),
                        Reason::NotDesired,
                    )
                }
                (None, None) => {}
            }
        }
        self.routes = routes;
    }

    /// The route `key` on `host` waits (or has no address): the host's record waits for it.
    /// Only routes with `dns: true` are noted: only their hosts have records.
    fn pending_route(&mut self, host: &str, key: &str) {
        self.route_pending
            .entry(host.to_string())
            .or_insert_with(|| (key != host).then(|| key.to_string()));
    }

    pub(super) fn records(&mut self) {
        let Some((rtype, content)) = self.policy.dns.clone() else {
            return;
        };
        let (desired, observed) = (self.desired, self.observed);
        let dns_gap = self.unobserved(&ProviderId::Dns);
        let proxy_seen = self.unobserved(&ProviderId::Proxy).is_none();
        let routes = std::mem::take(&mut self.routes);
        let mut want: Vec<(String, &EffectiveRoute)> = routes
            .iter()
            .filter(|r| r.dns)
            .map(|r| (Observed::record_key(&r.host, rtype), r))
            .collect();
        // One record per host, however many routes (paths) it has.
        want.sort_by(|a, b| a.0.cmp(&b.0));
        want.dedup_by(|later, first| later.0 == first.0);
        let joined = merge_join(
            want.iter().map(|(k, v)| (k.as_str(), *v)),
            observed.records.iter().map(|(k, v)| (k.as_str(), v)),
        );
        // Names where a record vessel does not own stands, of any type: never shadowed.
        let foreign_names: BTreeSet<&str> = observed
            .records
            .values()
            .filter(|r| !r.owned)
            .map(|r| r.name.as_str())
            .collect();
        for (_, w, have) in joined {
            let (name, ty) = match (w, have) {
                (Some(r), _) => (r.host.clone(), rtype),
                (None, Some(o)) => (o.name.clone(), o.rtype),
                (None, None) => continue,
            };
            let obj = || Object::Record(format!("{name} {}", ty.as_str()));
            if have.is_some_and(|o| !o.owned)
                || (w.is_some() && foreign_names.contains(name.as_str()))
            {
                if w.is_some() {
                    self.hold(obj(), HoldReason::Foreign);
                }
                continue;
            }
            if self.held.hosts.contains(name.as_str())
                || have.is_some_and(|o| o.session.as_deref().is_some_and(|s| self.held.session(s)))
            {
                continue;
            }
            if let Some(why) = &dns_gap {
                self.hold(obj(), why.clone());
                continue;
            }
            match (w, have) {
                (Some(_), _) if self.route_pending.contains_key(name.as_str()) => {
                    let after = Object::Route(
                        self.route_pending
                            .get(name.as_str())
                            .cloned()
                            .flatten()
                            .unwrap_or_else(|| name.clone()),
                    );
                    self.out.deferred.push(Deferred {
                        object: obj(),
                        after,
                    });
                }
                (Some(r), None) => self.drafts.push(
                    Phase::UpsertRecord,
                    Action::Record(RecordAction::UpsertRecord {
                        name,
                        rtype: ty,
                        content: content.clone(),
                        session: r.session.to_string(),
                    }),
                    Reason::Missing,
                ),
                (Some(r), Some(o))
                    if o.content != content || o.session.as_deref() != Some(r.session) =>
                {
                    let change = if o.content != content {
                        format!("content {} -> {content}", o.content)
                    } else {
                        "owner".into()
                    };
                    self.drafts.push(
                        Phase::UpsertRecord,
                        Action::Record(RecordAction::UpsertRecord {
                            name,
                            rtype: ty,
                            content: content.clone(),
                            session: r.session.to_string(),
                        }),
                        Reason::Drifted {
                            changes: vec![change],
                        },
                    )
                }
                (Some(_), Some(_)) => {}
                // A record is removed only when it is surely not wanted: every file was read,
                // the proxy was seen, and the record says whose it is (or nothing is held).
                (None, Some(o)) => {
                    let attributable = o.session.is_some() || desired.quarantined.is_empty();
                    let route = Object::Route(name.clone());
                    if let Some((file, until)) = self.settling(&route, o.session.as_deref()) {
                        self.wake_at(until);
                        self.hold(obj(), HoldReason::Settling { file, until });
                    } else if !self.held.removals() && proxy_seen && attributable {
                        self.drafts.push(
                            Phase::RemoveRecord,
                            Action::Record(RecordAction::RemoveRecord { name, rtype: ty }),
                            Reason::NotDesired,
                        );
                    }
                }
                (None, None) => {}
            }
        }
        self.routes = routes;
    }
}
