#!/usr/bin/env bash
# vessel's plan comment on a pull request (the composite action in ../action.yml runs this).
#
# Runs `vessel plan TARGET --against-ref BASE --format markdown`, then creates or updates ONE
# comment on the pull request, found again by a hidden marker, through GitHub's REST API for
# issue comments (list GET /repos/{owner}/{repo}/issues/{n}/comments, following the Link
# header's rel="next"; create POST to the same path; update PATCH
# /repos/{owner}/{repo}/issues/comments/{id}). Exits 0 when vessel's plan exits 0 (no changes)
# or 2 (changes), 1 otherwise (an error, or a desired tree with errors): the check's result.
#
# Environment: VESSEL (the binary; default `vessel` on PATH), TARGET (a desired-state directory
# or config; default .), BASE_REF (the pull request's base commit), PR_NUMBER, GITHUB_TOKEN,
# GITHUB_REPOSITORY (owner/repo), GITHUB_API_URL (default https://api.github.com), COMMENT
# (false: no comment, only the check). Needs bash, curl and jq.
set -euo pipefail

vessel="${VESSEL:-vessel}"
target="${TARGET:-.}"
api="${GITHUB_API_URL:-https://api.github.com}"
: "${BASE_REF:?BASE_REF: the base commit of the pull request}"
marker="<!-- vessel-plan: ${target} -->"
max_body=65000   # GitHub refuses comment bodies over 65,536 characters

# 1. The plan. Its exit code is the check's: 0 no changes, 2 changes, 1 error.
err="$(mktemp)"
trap 'rm -f "$err"' EXIT
set +e
plan="$("$vessel" plan "$target" --against-ref "$BASE_REF" --format markdown 2>"$err")"
code=$?
set -e
case "$code" in
  0) verdict="no changes" ; result=0 ;;
  2) verdict="changes (they pass the check; review them)" ; result=0 ;;
  *) verdict="**error** (exit $code): the check fails" ; result=1 ;;
esac
body="${marker}
${plan}"
if [ "$code" != 0 ] && [ "$code" != 2 ] && [ -s "$err" ]; then
  body="${body}

<details><summary>vessel plan said</summary>

\`\`\`text
$(head -c 20000 "$err")
\`\`\`
</details>"
fi
body="${body}

<sub>\`vessel plan ${target} --against-ref ${BASE_REF:0:12}\`: ${verdict}</sub>"
if [ "${#body}" -gt "$max_body" ]; then
  body="${body:0:$max_body}

… (cut: the whole plan is in the job's log and summary)"
fi
printf '%s\n' "$plan"
[ -s "$err" ] && cat "$err" >&2
if [ -n "${GITHUB_STEP_SUMMARY:-}" ]; then printf '%s\n' "$plan" >>"$GITHUB_STEP_SUMMARY"; fi
if [ -n "${GITHUB_OUTPUT:-}" ]; then echo "exit-code=$code" >>"$GITHUB_OUTPUT"; fi

if [ "${COMMENT:-true}" = false ]; then exit "$result"; fi
: "${PR_NUMBER:?PR_NUMBER: this runs on pull requests}"
: "${GITHUB_TOKEN:?GITHUB_TOKEN}"
: "${GITHUB_REPOSITORY:?GITHUB_REPOSITORY}"

# One request to GitHub: method, URL, optional JSON body file. Prints the response body; the
# response headers go to $headers.
headers="$(mktemp)"
trap 'rm -f "$err" "$headers"' EXIT
gh() {
  local method="$1" url="$2" data="${3:-}"
  local args=(--silent --show-error --fail-with-body --location --max-time 30 --retry 2
    -X "$method" -D "$headers"
    -H "Accept: application/vnd.github+json"
    -H "Authorization: Bearer ${GITHUB_TOKEN}"
    -H "X-GitHub-Api-Version: 2022-11-28"
    -H "User-Agent: vessel-plan-action")
  if [ -n "$data" ]; then args+=(-H "Content-Type: application/json" --data-binary "@$data"); fi
  curl "${args[@]}" "$url"
}

# 2. Find our comment: every page of the pull request's comments, by the marker.
url="${api}/repos/${GITHUB_REPOSITORY}/issues/${PR_NUMBER}/comments?per_page=100"
id=""
while [ -n "$url" ]; do
  page="$(gh GET "$url")"
  id="$(jq -r --arg m "$marker" '[.[] | select(.body != null and (.body | startswith($m)))][0].id // empty' <<<"$page")"
  [ -n "$id" ] && break
  # The next page, from the Link header (GitHub's pagination).
  url="$(tr -d '\r' <"$headers" | awk 'tolower($1) == "link:" { sub(/^[^:]*: */, ""); print }' \
    | tr ',' '\n' | awk -F'[<>]' '/rel="next"/ { print $2 }')"
done

# 3. Create it, or update it in place.
payload="$(mktemp)"
trap 'rm -f "$err" "$headers" "$payload"' EXIT
jq -n --arg body "$body" '{body: $body}' >"$payload"
if [ -n "$id" ]; then
  gh PATCH "${api}/repos/${GITHUB_REPOSITORY}/issues/comments/${id}" "$payload" >/dev/null
  echo "vessel: updated the plan comment ${id}" >&2
else
  gh POST "${api}/repos/${GITHUB_REPOSITORY}/issues/${PR_NUMBER}/comments" "$payload" >/dev/null
  echo "vessel: created the plan comment" >&2
fi
exit "$result"
