//! JSON Schemas for every document kind, the config file and vessel's JSON outputs, generated
//! from the Rust types. `vessel schema` writes them to `schemas/`; a test keeps them current.

use schemars::{JsonSchema, schema_for};
use serde_json::json;

use crate::config::Config;
use crate::model::{PlanSpec, RouteSpec, SessionSpec};

/// Every schema vessel publishes, as (file name, pretty JSON with a trailing newline).
pub fn all() -> Vec<(&'static str, String)> {
    let mut out = vec![
        ("plan.schema.json", render::<PlanSpec>("Plan")),
        ("session.schema.json", render::<SessionSpec>("Session")),
        ("route.schema.json", render::<RouteSpec>("Route")),
        ("config.schema.json", render::<Config>("config")),
        (
            "plan-output.schema.json",
            render::<crate::model::plan::Plan>("plan-output"),
        ),
        (
            "observed.schema.json",
            render::<crate::model::observed::Observed>("observed"),
        ),
        (
            "status.schema.json",
            render::<crate::status::view::StatusView>("status"),
        ),
        (
            "status-sessions.schema.json",
            render::<Vec<crate::status::view::SessionView>>("status-sessions"),
        ),
        (
            "status-session.schema.json",
            render::<crate::status::view::SessionDetail>("status-session"),
        ),
        (
            "status-routes.schema.json",
            render::<Vec<crate::status::view::RouteView>>("status-routes"),
        ),
        (
            "status-dns.schema.json",
            render::<Vec<crate::status::view::RecordView>>("status-dns"),
        ),
        (
            "status-events.schema.json",
            render::<Vec<crate::state::Event>>("status-events"),
        ),
        (
            "notification.schema.json",
            render::<crate::notify::CloudEvent>("notification"),
        ),
    ];
    let any = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://vessel.dev/schemas/vessel.schema.json",
        "title": "vessel desired-state document",
        "description": "Any document of a desired-state tree, chosen by its `kind`.",
        "oneOf": [
            {"$ref": "plan.schema.json"},
            {"$ref": "session.schema.json"},
            {"$ref": "route.schema.json"},
        ],
    });
    out.push(("vessel.schema.json", pretty(&any)));
    out
}

fn render<T: JsonSchema>(name: &str) -> String {
    let mut s = serde_json::to_value(schema_for!(T)).unwrap_or_default();
    if let Some(obj) = s.as_object_mut() {
        obj.insert(
            "$id".into(),
            json!(format!(
                "https://vessel.dev/schemas/{}.schema.json",
                name.to_lowercase()
            )),
        );
    }
    pretty(&s)
}

fn pretty(v: &serde_json::Value) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_default();
    s.push('\n');
    s
}
