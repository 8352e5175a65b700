//! The status page at `/`: server-rendered HTML. Sessions with their state and links (and the
//! ones a file with errors holds, with their file; an image pull in progress), the last pass,
//! errors, the pending plan. A few lines of script ask for the page again every 2 s with the
//! version it shows (`If-None-Match`: 304 while nothing changed) and swap in its `<main>`, so
//! it updates itself without a reload and keeps the reader's scroll position; without script
//! it refreshes itself the old way (a `<noscript>` meta refresh). Plain requests, no open
//! stream: each counts against the listener's bounds like any other and ends at once.

use std::fmt::Write as _;

use crate::planner::render;
use crate::reconcile::{Activity, Snapshot};

use super::view::{self, Context};

/// Ask for the page every 2 s (with the credentials the browser already has) and swap in its
/// `<main>` when it changed: no reload, the scroll position kept.
const REFRESH_SCRIPT: &str = r#"<script>
(function () {
  const every = 2000;
  async function refresh() {
    try {
      const main = document.getElementById("content");
      const r = await fetch(location.pathname, {cache: "no-store", credentials: "same-origin",
        headers: {"If-None-Match": main ? main.dataset.etag : ""}});
      if (r.status === 200) {
        const next = new DOMParser().parseFromString(await r.text(), "text/html").getElementById("content");
        if (next && main) {
          const x = window.scrollX, y = window.scrollY;
          main.replaceWith(next);
          window.scrollTo(x, y);
          document.body.dataset.refreshed = String(Number(document.body.dataset.refreshed || 0) + 1);
        }
      }
    } catch (e) { /* the daemon is restarting: try again */ }
    setTimeout(refresh, every);
  }
  setTimeout(refresh, every);
})();
</script>"#;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The page for snapshot `s`, what is happening `now`, and its version `etag`.
pub fn render(
    s: &Snapshot,
    source_changed: bool,
    ctx: &Context,
    now: &Activity,
    etag: &str,
    life: &std::collections::BTreeMap<String, crate::lifecycle::SessionLife>,
    told: &std::collections::BTreeMap<String, crate::notify::outbox::TargetView>,
) -> String {
    let st = view::status(s, source_changed);
    let mut h = String::new();
    let badge = if st.converged {
        "<span class=ok>converged</span>"
    } else if st.ready {
        "<span class=busy>reconciling</span>"
    } else {
        "<span class=bad>starting</span>"
    };
    let _ = write!(
        h,
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8><noscript><meta http-equiv=refresh content=5></noscript>\
         <title>vessel status</title><style>\
         body{{font:15px system-ui,sans-serif;margin:2em auto;max-width:70em;color:#222;padding:0 1em}}\
         table{{border-collapse:collapse;width:100%}}td,th{{text-align:left;padding:.3em .6em;border-bottom:1px solid #ddd;vertical-align:top}}\
         .ok{{color:#176f2c}}.busy{{color:#8a5a00}}.bad{{color:#b00020}}pre{{background:#f6f6f6;padding:1em;overflow:auto}}\
         code{{background:#f3f3f3;padding:0 .2em}}</style></head><body>\
         <main id=content data-etag=\"{etag}\"><h1>vessel {badge}</h1>",
        etag = esc(etag)
    );
    let _ = write!(
        h,
        "<p>Revision <code>{}</code> &middot; {} passes",
        esc(st.revision.as_deref().unwrap_or("none yet")),
        st.passes
    );
    if let Some(l) = &st.last_pass {
        let _ = write!(
            h,
            " &middot; last pass {} ({}, {} ms): {} to create, {} to update, {} to replace, {} to destroy",
            l.started.format("%Y-%m-%d %H:%M:%S UTC"),
            l.trigger,
            l.duration_ms,
            l.summary.create,
            l.summary.update,
            l.summary.replace,
            l.summary.destroy
        );
        if let Some(e) = &l.error {
            let _ = write!(h, " &middot; <span class=bad>{}</span>", esc(e));
        }
    }
    h.push_str("</p>");
    h.push_str("<h2>Sessions</h2><table><tr><th>Session</th><th>Plan</th><th>Owner</th><th>Desired</th><th>Observed</th><th>Conditions</th><th>Links</th></tr>");
    for sv in view::sessions(s, ctx, now) {
        let conds: Vec<String> = sv
            .conditions
            .iter()
            .filter(|c| c.status)
            .map(|c| {
                let class = match c.kind.as_str() {
                    "Ready" => "ok",
                    "Stalled" => "bad",
                    _ => "busy",
                };
                format!(
                    "<span class={class}>{}</span> {}",
                    esc(&c.kind),
                    esc(&c.reason)
                )
            })
            .collect();
        let links: Vec<String> = sv
            .urls
            .iter()
            .map(|u| format!("<a href=\"{0}\">{0}</a>", esc(u)))
            .collect();
        let _ = write!(
            h,
            "<tr id=\"session-{n}\"><td><b>{n}</b></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}{}</td><td>{}</td></tr>",
            esc(sv.plan.as_deref().unwrap_or("")),
            esc(sv.owner.as_deref().unwrap_or("")),
            match (&sv.quarantined, &sv.desired_state) {
                (Some(file), _) => format!(
                    "<span class=bad>quarantined</span> in <code>{}</code> (held as it is)",
                    esc(file)
                ),
                (None, d) => esc(d.as_deref().unwrap_or("(removed)")),
            },
            esc(sv.observed_state.as_deref().unwrap_or("(absent)"))
                + &life
                    .get(&sv.name)
                    .filter(|l| l.state != "awake")
                    .map(|l| {
                        let since = l
                            .asleep_since
                            .map(|t| format!(" since {}", t.format("%H:%M:%S UTC")))
                            .unwrap_or_default();
                        let why = l
                            .sleep_reason
                            .map(|r| format!(" ({})", r.as_str()))
                            .unwrap_or_default();
                        let held = match l.held_requests {
                            0 => String::new(),
                            1 => ", 1 request waiting".to_string(),
                            n => format!(", {n} requests waiting"),
                        };
                        format!(
                            "<br><span class=busy>{}{why}{since}{held}</span>",
                            esc(&l.state)
                        )
                    })
                    .unwrap_or_default(),
            conds.join("<br>")
                + &sv
                    .activity
                    .as_deref()
                    .map(|a| format!("<br><span class=busy>{}</span>", esc(a)))
                    .unwrap_or_default(),
            sv.last_error
                .as_deref()
                .map(|e| format!("<br><span class=bad>{}</span>", esc(e)))
                .unwrap_or_default(),
            links.join("<br>"),
            n = esc(&sv.name),
        );
    }
    h.push_str("</table>");
    if !st.quarantined.is_empty() {
        h.push_str("<h2 class=bad>Files with errors (their objects are held)</h2>");
        for q in &st.quarantined {
            for e in &q.errors {
                let _ = write!(h, "<pre>{}</pre>", esc(&e.render(false)));
            }
        }
    }
    h.push_str("<h2>Providers</h2><ul>");
    for p in &st.providers {
        match &p.error {
            None => {
                let _ = write!(h, "<li><span class=ok>{}</span></li>", esc(&p.provider));
            }
            Some(e) => {
                let state = if p.state == "degraded" {
                    " degraded (rate-limited, waiting)"
                } else {
                    ""
                };
                let _ = write!(
                    h,
                    "<li><span class=bad>{}</span>{state}: {}</li>",
                    esc(&p.provider),
                    esc(e)
                );
            }
        }
    }
    h.push_str("</ul>");
    if let Some(p) = s.plan.as_ref().filter(|p| !p.upcoming.is_empty()) {
        h.push_str("<h2>Coming up</h2><ul>");
        for u in &p.upcoming {
            let _ = write!(h, "<li>{}</li>", esc(&render::upcoming_text(u)));
        }
        h.push_str("</ul>");
    }
    if !told.is_empty() {
        h.push_str("<h2>Notifications</h2><table><tr><th>Target</th><th>Queued</th><th>Delivered</th><th>Failed</th><th>Last error</th></tr>");
        for (name, t) in told {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td{}>{}</td><td>{}</td></tr>",
                esc(name),
                t.queued,
                t.delivered,
                if t.failed > 0 { " class=bad" } else { "" },
                t.failed,
                esc(t.last_error.as_deref().unwrap_or(""))
            );
        }
        h.push_str("</table>");
    }
    h.push_str("<h2>Pending plan</h2>");
    match (&s.plan, &s.observed) {
        (Some(p), Some(o)) => {
            let _ = write!(
                h,
                "<pre>{}</pre>",
                esc(&render::text(
                    &view::redact_plan(p),
                    &view::redact_observed(o),
                    false
                ))
            );
        }
        _ => h.push_str("<p>No pass has run yet.</p>"),
    }
    h.push_str("<p><small>JSON: <a href=/status>/status</a> <a href=/sessions>/sessions</a> <a href=/routes>/routes</a> <a href=/dns>/dns</a> <a href=/plan>/plan</a> <a href=/events>/events</a> <a href=/metrics>/metrics</a> <a href=/notifications>/notifications</a></small></p></main>");
    h.push_str(REFRESH_SCRIPT);
    h.push_str("</body></html>\n");
    h
}
