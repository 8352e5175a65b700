//! vessel's one integration-test binary. Each module covers one capability; helpers live in
//! `support`.

mod daemon_support;
mod dns_hosts;
mod dns_powerdns;
mod docker;
mod git_source;
mod hostile;
mod hostile_http;
mod hygiene;
mod plan_cli;
mod planner_cases;
mod planner_props;
mod podman_support;
mod proxy;
mod proxy_caddy;
mod proxy_traefik;
mod reconciler;
mod servers;
mod status;
mod support;
mod validate;
