//! The GitHub Action (`action.yml`, `action/plan-comment.sh`), run for real: bash, curl, jq and
//! the vessel binary, on a real git repository of example trees, against a stand-in for
//! GitHub's REST API that checks every request against GitHub's documented endpoints for
//! issue comments:
//!
//! - list: `GET /repos/{owner}/{repo}/issues/{issue_number}/comments` (query `per_page` at most
//!   100, `page`, `since`; pages linked by the `Link` header's `rel="next"`);
//! - create: `POST /repos/{owner}/{repo}/issues/{issue_number}/comments`, JSON `{"body"}`, 201;
//! - update: `PATCH /repos/{owner}/{repo}/issues/comments/{comment_id}`, JSON `{"body"}`, 200;
//!
//! with `Authorization: Bearer`, `Accept: application/vnd.github+json`,
//! `X-GitHub-Api-Version: 2022-11-28` and a `User-Agent` (GitHub refuses requests without one).
//! Anything else is a 404 and a recorded violation, which fails the test.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

use crate::support::{git, root, text};

const OWNER_REPO: &str = "acme/sessions";
const PR: u64 = 7;
const TOKEN: &str = "ghs_test-token-value";

#[derive(Default)]
struct Api {
    /// Comments on the pull request, in order: (id, body, login).
    comments: Vec<(u64, String, String)>,
    next_id: u64,
    /// Every request: method and path with query.
    log: Vec<(String, String)>,
    violations: Vec<String>,
}

struct GitHub {
    base: String,
    api: Arc<Mutex<Api>>,
}

impl GitHub {
    fn start(existing: usize) -> GitHub {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let mut api = Api {
            next_id: 1000,
            ..Api::default()
        };
        // Other people's comments, enough to need a second page at 100 a page.
        for i in 0..existing {
            api.next_id += 1;
            api.comments
                .push((api.next_id, format!("comment {i}"), "someone".into()));
        }
        let api = Arc::new(Mutex::new(api));
        let (a, b) = (api.clone(), base.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (a, b) = (a.clone(), b.clone());
                std::thread::spawn(move || serve(stream, &a, &b));
            }
        });
        GitHub { base, api }
    }

    fn ours(&self) -> Vec<(u64, String)> {
        let api = self.api.lock().expect("api");
        api.comments
            .iter()
            .filter(|(_, body, _)| body.starts_with("<!-- vessel-plan:"))
            .map(|(id, body, _)| (*id, body.clone()))
            .collect()
    }

    fn take_log(&self) -> Vec<(String, String)> {
        std::mem::take(&mut self.api.lock().expect("api").log)
    }
}

fn comment_json(base: &str, id: u64, body: &str, login: &str) -> Value {
    json!({
        "id": id,
        "node_id": format!("IC_{id}"),
        "url": format!("{base}/repos/{OWNER_REPO}/issues/comments/{id}"),
        "html_url": format!("https://github.com/{OWNER_REPO}/pull/{PR}#issuecomment-{id}"),
        "issue_url": format!("{base}/repos/{OWNER_REPO}/issues/{PR}"),
        "body": body,
        "user": {"login": login, "id": 1, "type": if login == "github-actions[bot]" { "Bot" } else { "User" }},
        "created_at": "2026-11-30T12:00:00Z",
        "updated_at": "2026-11-30T12:00:00Z",
        "author_association": "MEMBER",
    })
}

fn serve(stream: std::net::TcpStream, api: &Mutex<Api>, base: &str) {
    let mut r = BufReader::new(match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    });
    let mut line = String::new();
    if r.read_line(&mut line).is_err() {
        return;
    }
    let mut parts = line.split_whitespace();
    let (method, target) = (
        parts.next().unwrap_or_default().to_string(),
        parts.next().unwrap_or_default().to_string(),
    );
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).is_err() || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let mut body = Vec::new();
    if let Some(n) = headers.get("content-length").and_then(|n| n.parse().ok()) {
        body.resize(n, 0);
        if r.read_exact(&mut body).is_err() {
            return;
        }
    }
    let (status, extra, payload) = answer(api, base, &method, &target, &headers, &body);
    let payload = payload.to_string();
    let mut out = stream;
    let _ = write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Type: application/json; charset=utf-8\r\nX-GitHub-Media-Type: github.v3; format=json\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{payload}",
        payload.len()
    );
}

/// GitHub's answer to one request, and any violation of its documented contract recorded.
fn answer(
    api: &Mutex<Api>,
    base: &str,
    method: &str,
    target: &str,
    headers: &BTreeMap<String, String>,
    body: &[u8],
) -> (&'static str, String, Value) {
    let mut api = api.lock().expect("api");
    api.log.push((method.to_string(), target.to_string()));
    let violate = |api: &mut Api, m: String| api.violations.push(format!("{method} {target}: {m}"));
    let not_found = json!({"message": "Not Found", "documentation_url": "https://docs.github.com/rest", "status": "404"});
    // Headers every request needs.
    if headers.get("authorization").map(String::as_str) != Some(&format!("Bearer {TOKEN}")) {
        violate(&mut api, "no `Authorization: Bearer <token>`".into());
        return (
            "401 Unauthorized",
            String::new(),
            json!({"message": "Requires authentication"}),
        );
    }
    if !headers.contains_key("user-agent") {
        violate(&mut api, "no User-Agent (GitHub refuses these)".into());
        return (
            "403 Forbidden",
            String::new(),
            json!({"message": "Request forbidden by administrative rules. Please make sure your request has a User-Agent header"}),
        );
    }
    if headers.get("accept").map(String::as_str) != Some("application/vnd.github+json") {
        violate(
            &mut api,
            format!(
                "Accept is {:?}, not application/vnd.github+json",
                headers.get("accept")
            ),
        );
    }
    if headers.get("x-github-api-version").map(String::as_str) != Some("2022-11-28") {
        violate(&mut api, "no X-GitHub-Api-Version: 2022-11-28".into());
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let list = format!("/repos/{OWNER_REPO}/issues/{PR}/comments");
    let json_body = |api: &mut Api| -> Option<String> {
        if !headers
            .get("content-type")
            .is_some_and(|c| c.starts_with("application/json"))
        {
            violate(api, "a body without Content-Type: application/json".into());
        }
        let v: Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => {
                violate(api, format!("the body is not JSON: {e}"));
                return None;
            }
        };
        let obj = v.as_object()?;
        if obj.keys().any(|k| k != "body") {
            violate(api, format!("unknown parameters in {v}"));
        }
        match obj.get("body").and_then(Value::as_str) {
            Some(b) if b.chars().count() <= 65536 => Some(b.to_string()),
            Some(_) => {
                violate(api, "body is longer than 65,536 characters".into());
                None
            }
            None => {
                violate(api, "`body` (a string) is required".into());
                None
            }
        }
    };
    match method {
        "GET" if path == list => {
            let mut per_page = 30usize;
            let mut page = 1usize;
            for kv in query.split('&').filter(|s| !s.is_empty()) {
                match kv.split_once('=') {
                    Some(("per_page", v)) => match v.parse::<usize>() {
                        Ok(n) if (1..=100).contains(&n) => per_page = n,
                        _ => violate(&mut api, format!("per_page={v} (1 to 100)")),
                    },
                    Some(("page", v)) => match v.parse::<usize>() {
                        Ok(n) if n >= 1 => page = n,
                        _ => violate(&mut api, format!("page={v}")),
                    },
                    Some(("since", _)) => {}
                    _ => violate(&mut api, format!("unknown query parameter {kv}")),
                }
            }
            let pages = api.comments.len().div_ceil(per_page).max(1);
            let items: Vec<Value> = api
                .comments
                .iter()
                .skip((page - 1) * per_page)
                .take(per_page)
                .map(|(id, b, u)| comment_json(base, *id, b, u))
                .collect();
            let link = |p: usize| format!("<{base}{list}?per_page={per_page}&page={p}>");
            let mut rels = Vec::new();
            if page > 1 {
                rels.push(format!("{}; rel=\"prev\"", link(page - 1)));
                rels.push(format!("{}; rel=\"first\"", link(1)));
            }
            if page < pages {
                rels.push(format!("{}; rel=\"next\"", link(page + 1)));
                rels.push(format!("{}; rel=\"last\"", link(pages)));
            }
            let extra = if rels.is_empty() {
                String::new()
            } else {
                format!("Link: {}\r\n", rels.join(", "))
            };
            ("200 OK", extra, Value::Array(items))
        }
        "POST" if path == list && query.is_empty() => match json_body(&mut api) {
            Some(b) => {
                api.next_id += 1;
                let id = api.next_id;
                api.comments
                    .push((id, b.clone(), "github-actions[bot]".into()));
                (
                    "201 Created",
                    format!("Location: {base}/repos/{OWNER_REPO}/issues/comments/{id}\r\n"),
                    comment_json(base, id, &b, "github-actions[bot]"),
                )
            }
            None => (
                "422 Unprocessable Entity",
                String::new(),
                json!({"message": "Validation Failed"}),
            ),
        },
        "PATCH" => {
            let id = path
                .strip_prefix(&format!("/repos/{OWNER_REPO}/issues/comments/"))
                .and_then(|id| id.parse::<u64>().ok());
            let Some(id) = id.filter(|_| query.is_empty()) else {
                violate(&mut api, "not an endpoint for issue comments".into());
                return ("404 Not Found", String::new(), not_found);
            };
            let Some(b) = json_body(&mut api) else {
                return (
                    "422 Unprocessable Entity",
                    String::new(),
                    json!({"message": "Validation Failed"}),
                );
            };
            match api.comments.iter_mut().find(|(i, _, _)| *i == id) {
                Some(c) => {
                    c.1 = b.clone();
                    let login = c.2.clone();
                    ("200 OK", String::new(), comment_json(base, id, &b, &login))
                }
                None => {
                    violate(&mut api, format!("comment {id} does not exist"));
                    ("404 Not Found", String::new(), not_found)
                }
            }
        }
        _ => {
            violate(&mut api, "not an endpoint for issue comments".into());
            ("404 Not Found", String::new(), not_found)
        }
    }
}

/// Run the action's script in `repo` (a checkout of the pull request) as the composite action
/// does, with the pull request's base commit.
fn run_action(repo: &Path, gh: &GitHub, base: &str) -> (i32, String) {
    let summary = repo.join("../summary.md");
    let output = repo.join("../output");
    let out = Command::new("bash")
        .arg(root().join("action/plan-comment.sh"))
        .current_dir(repo)
        .env("VESSEL", env!("CARGO_BIN_EXE_vessel"))
        .env("TARGET", "sessions")
        .env("BASE_REF", base)
        .env("PR_NUMBER", PR.to_string())
        .env("GITHUB_TOKEN", TOKEN)
        .env("GITHUB_REPOSITORY", OWNER_REPO)
        .env("GITHUB_API_URL", &gh.base)
        .env("GITHUB_STEP_SUMMARY", &summary)
        .env("GITHUB_OUTPUT", &output)
        .env("NO_COLOR", "1")
        .output()
        .expect("bash runs");
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        !said.contains(TOKEN),
        "the token never shows in the log: {said}"
    );
    (out.status.code().unwrap_or(-1), said)
}

fn head(repo: &Path) -> String {
    let out = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(repo)
        .output()
        .expect("git");
    text(&out.stdout).trim().to_string()
}

const PLAN: &str = "kind: Plan\nname: web\ncompute: process\ncommand: ['{vessel}', devserver, --listen, '127.0.0.1:{port.ide}', --root, '{workspace}']\nports: {ide: 8080}\n";

fn write(repo: &Path, name: &str, body: &str) {
    std::fs::write(repo.join("sessions").join(name), body).expect("write");
}

fn session(name: &str) -> String {
    format!("kind: Session\nname: {name}\nplan: web\nowner: {name}@example.com\n")
}

#[test]
fn the_action_keeps_one_sticky_plan_comment_and_sets_the_check_from_the_exit_code() {
    // The action's definition: a composite action that runs this script.
    let action = std::fs::read_to_string(root().join("action.yml")).expect("action.yml");
    assert!(action.contains("using: composite"), "a composite action");
    assert!(
        action.contains("action/plan-comment.sh"),
        "it runs the tested script"
    );
    assert!(
        action.contains("github.event.pull_request.base.sha"),
        "against the base"
    );

    let tmp = tempfile::tempdir().expect("tempdir");
    let repo = tmp.path().join("checkout");
    std::fs::create_dir_all(repo.join("sessions")).expect("mkdir");
    git(&repo, &["init", "-q", "-b", "main"]);
    write(&repo, "plan.yaml", PLAN);
    write(&repo, "alice.yaml", &session("alice"));
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-qm", "base"]);
    let base = head(&repo);
    git(&repo, &["checkout", "-q", "-b", "pr"]);
    write(&repo, "bob.yaml", &session("bob"));
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-qm", "add bob"]);

    // 130 earlier comments: ours is never on the first page of 100.
    let gh = GitHub::start(130);

    // First run: changes (plan exit 2) pass the check, and one comment is created.
    let (code, said) = run_action(&repo, &gh, &base);
    assert_eq!(code, 0, "changes are not a failure: {said}");
    let log = gh.take_log();
    let methods: Vec<&str> = log.iter().map(|(m, _)| m.as_str()).collect();
    assert_eq!(methods, ["GET", "GET", "POST"], "{log:?}");
    assert!(
        log[1].1.contains("page=2"),
        "followed the Link header: {log:?}"
    );
    let ours = gh.ours();
    assert_eq!(ours.len(), 1, "one comment");
    let (id, body) = &ours[0];
    assert!(
        body.starts_with("<!-- vessel-plan: sessions -->\n"),
        "{body}"
    );
    assert!(body.contains("session `bob`"), "{body}");
    // bob and his two routes (served in the pass that makes him).
    assert!(body.contains("3 to create"), "{body}");
    assert!(
        !body.contains("session `alice`"),
        "alice is unchanged: {body}"
    );
    let output = std::fs::read_to_string(tmp.path().join("output")).expect("GITHUB_OUTPUT");
    assert!(output.contains("exit-code=2"), "{output}");
    let summary = std::fs::read_to_string(tmp.path().join("summary.md")).expect("summary");
    assert!(summary.contains("session `bob`"), "{summary}");
    println!("the comment for the first run:\n{body}");

    // Second run, after another push: the same comment is updated, nothing new is posted.
    write(&repo, "carol.yaml", &session("carol"));
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-qm", "add carol"]);
    let (code, said) = run_action(&repo, &gh, &base);
    assert_eq!(code, 0, "{said}");
    let log = gh.take_log();
    let methods: Vec<&str> = log.iter().map(|(m, _)| m.as_str()).collect();
    assert_eq!(methods, ["GET", "GET", "PATCH"], "{log:?}");
    assert_eq!(
        log[2].1,
        format!("/repos/{OWNER_REPO}/issues/comments/{id}"),
        "{log:?}"
    );
    let ours = gh.ours();
    assert_eq!(ours.len(), 1, "still one comment");
    assert_eq!(ours[0].0, *id, "the same comment");
    assert!(ours[0].1.contains("session `carol`"), "{}", ours[0].1);
    // bob and carol, with two routes each, against the same base.
    assert!(ours[0].1.contains("6 to create"), "{}", ours[0].1);

    // A file with errors fails the check, and the comment says why.
    write(
        &repo,
        "dave.yaml",
        "kind: Session\nname: dave\nplan: web\nbogus: 1\n",
    );
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-qm", "broken dave"]);
    let (code, said) = run_action(&repo, &gh, &base);
    assert_eq!(code, 1, "errors fail the check: {said}");
    let ours = gh.ours();
    assert_eq!(ours.len(), 1, "still one comment");
    assert!(ours[0].1.contains("dave.yaml"), "{}", ours[0].1);
    assert!(ours[0].1.contains("the check fails"), "{}", ours[0].1);

    // No change at all against the base: exit 0, and the comment says so.
    let (code, said) = run_action(&repo, &gh, &head(&repo));
    assert_eq!(code, 1, "dave's file is still broken at HEAD: {said}");
    std::fs::remove_file(repo.join("sessions/dave.yaml")).expect("rm");
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-qm", "drop dave"]);
    let (code, said) = run_action(&repo, &gh, &head(&repo));
    assert_eq!(code, 0, "{said}");
    assert!(gh.ours()[0].1.contains("no changes"), "{}", gh.ours()[0].1);

    let violations = std::mem::take(&mut gh.api.lock().expect("api").violations);
    assert!(
        violations.is_empty(),
        "requests GitHub would refuse: {violations:#?}"
    );
}

#[test]
fn the_stand_in_refuses_what_github_would() {
    // The stand-in itself: a request GitHub would refuse is recorded, so the test above
    // cannot pass against a script that sends one.
    let gh = GitHub::start(0);
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST"])
        .args(["-H", &format!("Authorization: Bearer {TOKEN}")])
        .args(["-H", "Accept: application/json"])
        .args(["--data", "{\"text\": \"hi\"}"])
        .arg(format!(
            "{}/repos/{OWNER_REPO}/issues/{PR}/comments",
            gh.base
        ))
        .output()
        .expect("curl runs");
    assert_eq!(text(&out.stdout), "422");
    let violations = gh.api.lock().expect("api").violations.clone();
    assert!(
        violations.iter().any(|v| v.contains("Accept")),
        "{violations:?}"
    );
    assert!(
        violations
            .iter()
            .any(|v| v.contains("X-GitHub-Api-Version")),
        "{violations:?}"
    );
    assert!(
        violations.iter().any(|v| v.contains("Content-Type")),
        "{violations:?}"
    );
    assert!(
        violations.iter().any(|v| v.contains("unknown parameters")),
        "{violations:?}"
    );
}
