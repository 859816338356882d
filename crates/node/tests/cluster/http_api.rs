//! The HTTP/JSON API against its own OpenAPI document, and `/metrics` after traffic on every
//! surface: real node processes, real HTTP.

use std::collections::{BTreeMap, BTreeSet};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::harness::{TestCluster, authed, user, wait_for};

/// Resolve `#/components/schemas/X` references.
fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(reference) => {
            let name = reference.rsplit('/').next().expect("a name");
            resolve(doc, &doc["components"]["schemas"][name])
        }
        None => schema,
    }
}

/// Check `value` against `schema` (the subset utoipa emits: types, required properties, enums,
/// items, oneOf, nullable forms); returns what does not match.
fn mismatches(doc: &Value, schema: &Value, value: &Value, at: &str, found: &mut Vec<String>) {
    let schema = resolve(doc, schema);
    if let Some(options) = schema.get("oneOf").or_else(|| schema.get("anyOf")).and_then(Value::as_array) {
        let fits = options.iter().any(|option| {
            let mut inner = Vec::new();
            mismatches(doc, option, value, at, &mut inner);
            inner.is_empty()
        });
        if !fits {
            found.push(format!("{at}: {value} fits none of {options:?}"));
        }
        return;
    }
    if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
        for part in all {
            mismatches(doc, part, value, at, found);
        }
        return;
    }
    let types: Vec<&str> = match schema.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    let fits_type = |t: &str| match t {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        _ => true,
    };
    if !types.is_empty() && !types.iter().any(|t| fits_type(t)) {
        found.push(format!("{at}: {value} is not {types:?}"));
        return;
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !value.is_null()
        && !allowed.contains(value)
    {
        found.push(format!("{at}: {value} not in {allowed:?}"));
    }
    if let Some(object) = value.as_object() {
        let properties = schema.get("properties").and_then(Value::as_object);
        for required in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
            let name = required.as_str().unwrap_or_default();
            if !object.contains_key(name) {
                found.push(format!("{at}: required {name} missing"));
            }
        }
        for (name, field) in object {
            match properties.and_then(|p| p.get(name)) {
                Some(field_schema) => mismatches(doc, field_schema, field, &format!("{at}.{name}"), found),
                None => {
                    if let Some(extra) = schema.get("additionalProperties").filter(|a| a.is_object()) {
                        mismatches(doc, extra, field, &format!("{at}.{name}"), found);
                    } else if properties.is_some() {
                        found.push(format!("{at}: {name} is not documented"));
                    }
                }
            }
        }
    }
    if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
        for (i, item) in array.iter().enumerate() {
            mismatches(doc, items, item, &format!("{at}[{i}]"), found);
        }
    }
}

/// A client that checks every answer against the OpenAPI document and records which
/// documented operations it exercised.
struct Api {
    http: reqwest::Client,
    base: String,
    doc: Value,
    covered: BTreeSet<(String, String)>,
}

impl Api {
    /// Call `method path` (a concrete path; `template` is the documented one) and check the
    /// status is documented for it and the body fits the documented schema.
    async fn call(
        &mut self,
        method: Method,
        template: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = self.http.request(method.clone(), format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("HTTP answer");
        self.check(method, template, response).await
    }

    async fn check(&mut self, method: Method, template: &str, response: reqwest::Response) -> (StatusCode, Value) {
        let status = response.status();
        let content_type = response.headers().get("content-type").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let body: Value = response.json().await.unwrap_or(Value::Null);
        let verb = method.as_str().to_lowercase();
        let operation = &self.doc["paths"][template][&verb];
        assert!(operation.is_object(), "{verb} {template} is not in the OpenAPI document");
        self.covered.insert((verb.clone(), template.to_owned()));
        let documented = &operation["responses"][status.as_str()];
        assert!(documented.is_object(), "{verb} {template} answered {status}, which it does not document: {body}");
        assert_eq!(content_type.as_deref(), Some("application/json"), "{verb} {template}");
        let schema = &documented["content"]["application/json"]["schema"];
        let mut found = Vec::new();
        mismatches(&self.doc, schema, &body, "body", &mut found);
        assert!(found.is_empty(), "{verb} {template} {status}: {found:?}\n{body}");
        (status, body)
    }
}

async fn token_of(api: &mut Api, name: &str) -> String {
    let (status, _) = api
        .call(
            Method::POST,
            "/api/v1/register",
            "/api/v1/register",
            None,
            Some(json!({"user": name, "password": "long enough pw"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, body) = api
        .call(
            Method::POST,
            "/api/v1/login",
            "/api/v1/login",
            None,
            Some(json!({"user": name, "password": "long enough pw"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["user"], name);
    body["token"].as_str().expect("a token").to_owned()
}

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_answers_as_its_openapi_document_says() {
    let cluster = TestCluster::start(3, 2, &[]).await;
    // A fresh connection per request: the node closes a connection whose request body it
    // refused unread (too large, malformed), and a pooled client can race that close with its
    // next request on the same connection.
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).build().expect("HTTP client");
    let doc: Value = http
        .get(format!("http://{}/api/v1/openapi.json", cluster.nodes[1].http))
        .send()
        .await
        .expect("openapi.json")
        .json()
        .await
        .expect("JSON");
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")), "an OpenAPI 3 document");
    let mut api = Api { http, base: format!("http://{}", cluster.nodes[1].http), doc, covered: BTreeSet::new() };
    use Method as M;

    let ada = token_of(&mut api, "ada").await;
    let bob = token_of(&mut api, "bob").await;
    let cy = token_of(&mut api, "cy").await;
    let (status, body) = api
        .call(
            M::POST,
            "/api/v1/register",
            "/api/v1/register",
            None,
            Some(json!({"user": "ada", "password": "long enough pw"})),
        )
        .await;
    assert_eq!((status, code(&body)), (StatusCode::CONFLICT, "user_exists"));
    let (status, body) = api
        .call(
            M::POST,
            "/api/v1/register",
            "/api/v1/register",
            None,
            Some(json!({"user": "no spaces", "password": "long enough pw"})),
        )
        .await;
    assert_eq!((status, code(&body)), (StatusCode::BAD_REQUEST, "invalid_input"));
    let (status, body) = api
        .call(
            M::POST,
            "/api/v1/register",
            "/api/v1/register",
            None,
            Some(json!({"user": "x", "password": "long enough pw", "admin": true})),
        )
        .await;
    assert_eq!((status, code(&body)), (StatusCode::BAD_REQUEST, "malformed"), "unknown fields are refused");
    let (status, body) = api
        .call(
            M::POST,
            "/api/v1/login",
            "/api/v1/login",
            None,
            Some(json!({"user": "ada", "password": "not hers at all"})),
        )
        .await;
    assert_eq!((status, code(&body)), (StatusCode::UNAUTHORIZED, "unauthenticated"));

    let (status, body) = api
        .call(
            M::POST,
            "/api/v1/rooms",
            "/api/v1/rooms",
            Some(&ada),
            Some(json!({"room": "lab", "title": "Lab", "visibility": "public"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["members"][0]["role"], "owner");
    let (status, body) =
        api.call(M::POST, "/api/v1/rooms", "/api/v1/rooms", Some(&ada), Some(json!({"room": "lab"}))).await;
    assert_eq!((status, code(&body)), (StatusCode::CONFLICT, "room_exists"));
    let (status, body) = api.call(M::POST, "/api/v1/rooms", "/api/v1/rooms", None, Some(json!({"room": "nope"}))).await;
    assert_eq!((status, code(&body)), (StatusCode::UNAUTHORIZED, "unauthenticated"));
    let (status, body) = api
        .call(M::POST, "/api/v1/rooms", "/api/v1/rooms", Some("v1.forged.token.x"), Some(json!({"room": "nope"})))
        .await;
    assert_eq!((status, code(&body)), (StatusCode::UNAUTHORIZED, "unauthenticated"));

    let room = "/api/v1/rooms/{room}";
    let (status, body) = api
        .call(M::PUT, room, "/api/v1/rooms/lab", Some(&ada), Some(json!({"title": "The lab", "topic": "experiments"})))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["topic"], "experiments");
    let (status, body) = api.call(M::GET, room, "/api/v1/rooms/nowhere", Some(&ada), None).await;
    assert_eq!((status, code(&body)), (StatusCode::NOT_FOUND, "room_not_found"));

    let join = "/api/v1/rooms/{room}/join";
    assert_eq!(api.call(M::POST, join, "/api/v1/rooms/lab/join", Some(&bob), None).await.0, StatusCode::OK);
    let (status, _) = api.call(M::POST, join, "/api/v1/rooms/lab/join", Some(&bob), None).await;
    assert_eq!(status, StatusCode::OK, "joining again changes nothing and is no error");
    let (status, body) = api.call(M::PUT, room, "/api/v1/rooms/lab", Some(&bob), Some(json!({"title": "mine"}))).await;
    assert_eq!((status, code(&body)), (StatusCode::FORBIDDEN, "permission_denied"));

    let role = "/api/v1/rooms/{room}/role";
    let (status, body) = api
        .call(M::POST, role, "/api/v1/rooms/lab/role", Some(&ada), Some(json!({"user": "bob", "role": "admin"})))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = api
        .call(M::POST, role, "/api/v1/rooms/lab/role", Some(&ada), Some(json!({"user": "bob", "role": "emperor"})))
        .await;
    assert_eq!((status, code(&body)), (StatusCode::BAD_REQUEST, "malformed"));
    for (action, template) in [("invite", "/api/v1/rooms/{room}/invite"), ("kick", "/api/v1/rooms/{room}/kick")] {
        let path = format!("/api/v1/rooms/lab/{action}");
        let (status, body) = api.call(M::POST, template, &path, Some(&bob), Some(json!({"user": "cy"}))).await;
        let want = if action == "invite" { StatusCode::OK } else { StatusCode::CONFLICT };
        assert_eq!(status, want, "{action}: {body}");
    }
    let ban = "/api/v1/rooms/{room}/ban";
    let (status, body) = api
        .call(M::POST, ban, "/api/v1/rooms/lab/ban", Some(&bob), Some(json!({"user": "cy", "reason": "test"})))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let unban = "/api/v1/rooms/{room}/unban";
    assert_eq!(
        api.call(M::POST, unban, "/api/v1/rooms/lab/unban", Some(&bob), Some(json!({"user": "cy"}))).await.0,
        StatusCode::OK
    );
    let (status, body) =
        api.call(M::POST, unban, "/api/v1/rooms/lab/unban", Some(&bob), Some(json!({"user": "cy"}))).await;
    assert_eq!((status, code(&body)), (StatusCode::CONFLICT, "not_banned"));
    let (status, body) =
        api.call(M::POST, ban, "/api/v1/rooms/lab/ban", Some(&bob), Some(json!({"user": "ghost"}))).await;
    assert_eq!((status, code(&body)), (StatusCode::NOT_FOUND, "user_not_found"));

    let messages = "/api/v1/rooms/{room}/messages";
    let mut positions = Vec::new();
    for i in 0..3 {
        let (status, body) = api
            .call(
                M::POST,
                messages,
                "/api/v1/rooms/lab/messages",
                Some(&bob),
                Some(json!({"body": format!("note {i}"), "client_message_id": format!("b-{i}")})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!(body["ack"], "quorum");
        let p = &body["position"];
        positions.push(format!("{}.{}.{}.{}", p["wall_ms"], p["logical"], p["replica"], p["counter"]));
    }
    let (status, body) = api
        .call(
            M::POST,
            messages,
            "/api/v1/rooms/lab/messages",
            Some(&bob),
            Some(json!({"body": "", "client_message_id": "e"})),
        )
        .await;
    assert_eq!((status, code(&body)), (StatusCode::BAD_REQUEST, "invalid_input"));
    let (status, body) = api
        .call(
            M::POST,
            messages,
            "/api/v1/rooms/lab/messages",
            Some(&cy),
            Some(json!({"body": "hi", "client_message_id": "c"})),
        )
        .await;
    assert_eq!((status, code(&body)), (StatusCode::CONFLICT, "not_member"));
    let (status, body) = api.call(M::GET, messages, "/api/v1/rooms/lab/messages?limit=2", Some(&ada), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["messages"].as_array().map(Vec::len), Some(2));
    assert_eq!(body["more"], true);
    assert_eq!(body["messages"][0]["body"], "note 2", "newest first");
    let older = format!("/api/v1/rooms/lab/messages?before={}", positions[1]);
    let (status, body) = api.call(M::GET, messages, &older, Some(&ada), None).await;
    assert_eq!(status, StatusCode::OK);
    let bodies: Vec<&str> =
        body["messages"].as_array().expect("messages").iter().filter_map(|m| m["body"].as_str()).collect();
    assert_eq!(bodies, vec!["note 0"]);
    let (status, body) = api.call(M::GET, messages, "/api/v1/rooms/lab/messages?before=1.2.3", Some(&ada), None).await;
    assert_eq!((status, code(&body)), (StatusCode::BAD_REQUEST, "invalid_input"));
    let (status, body) = api.call(M::GET, messages, "/api/v1/rooms/lab/messages?limit=lots", Some(&ada), None).await;
    assert_eq!((status, code(&body)), (StatusCode::BAD_REQUEST, "malformed"));

    let (status, body) = api.call(M::GET, "/api/v1/rooms", "/api/v1/rooms", Some(&bob), None).await;
    assert_eq!(status, StatusCode::OK);
    let lab = body["rooms"].as_array().and_then(|r| r.iter().find(|r| r["room"] == "lab")).expect("lab listed").clone();
    assert_eq!(lab["my_role"], "admin");
    let (status, body) = api.call(M::GET, room, "/api/v1/rooms/lab", Some(&ada), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["members"].as_array().map(Vec::len), Some(2));

    // Malformed and over-size bodies, straight through reqwest (not JSON at all).
    let response = api
        .http
        .post(format!("{}/api/v1/rooms", api.base))
        .bearer_auth(&ada)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .expect("answer");
    let (status, body) = api.check(M::POST, "/api/v1/rooms", response).await;
    assert_eq!((status, code(&body)), (StatusCode::BAD_REQUEST, "malformed"));
    let huge = json!({"body": "x".repeat(300 * 1024), "client_message_id": "big"});
    let response = api
        .http
        .post(format!("{}/api/v1/rooms/lab/messages", api.base))
        .bearer_auth(&bob)
        .json(&huge)
        .send()
        .await
        .expect("answer");
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: Value = response.json().await.expect("JSON error");
    assert_eq!(code(&body), "too_large");

    let leave = "/api/v1/rooms/{room}/leave";
    let (status, body) = api.call(M::POST, leave, "/api/v1/rooms/lab/leave", Some(&ada), None).await;
    assert_eq!((status, code(&body)), (StatusCode::CONFLICT, "last_owner"));
    assert_eq!(api.call(M::POST, leave, "/api/v1/rooms/lab/leave", Some(&bob), None).await.0, StatusCode::OK);
    let (status, body) = api.call(M::DELETE, room, "/api/v1/rooms/lab", Some(&ada), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = api.call(M::GET, room, "/api/v1/rooms/lab", Some(&ada), None).await;
    assert_eq!((status, code(&body)), (StatusCode::NOT_FOUND, "room_not_found"));

    // Every documented operation was exercised.
    let documented: BTreeSet<(String, String)> = api.doc["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object().into_iter().flatten().map(move |(verb, _)| (verb.clone(), path.clone()))
        })
        .filter(|(verb, _)| ["get", "post", "put", "delete", "patch"].contains(&verb.as_str()))
        .collect();
    let missed: Vec<_> = documented.difference(&api.covered).collect();
    assert!(missed.is_empty(), "documented but not tested: {missed:?}");

    // The node still serves, and probes answer.
    let health = api.http.get(format!("http://{}/healthz", cluster.nodes[0].http)).send().await.expect("healthz");
    assert_eq!(health.status(), StatusCode::OK);
    let ready: Value = api
        .http
        .get(format!("http://{}/readyz", cluster.nodes[2].http))
        .send()
        .await
        .expect("readyz")
        .json()
        .await
        .expect("JSON");
    assert_eq!(ready["ready"], true, "{ready}");
    let missing = api.http.get(format!("http://{}/api/v1/nothing", cluster.nodes[0].http)).send().await.expect("404");
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
}

/// One sample of a Prometheus text exposition.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parse the OpenMetrics/Prometheus text format strictly enough to refuse garbage: every
/// sample belongs to a family declared by `# TYPE`, labels are `name="value"` pairs, values are
/// numbers, and the exposition ends with `# EOF`.
fn parse_metrics(text: &str) -> Vec<Sample> {
    let mut families: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last().copied(), Some("# EOF"), "ends with # EOF");
    for line in &lines[..lines.len() - 1] {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            assert!(["counter", "gauge", "histogram", "info", "unknown"].contains(&kind), "{line}");
            families.insert(name.to_owned(), kind.to_owned());
            continue;
        }
        if line.starts_with("# HELP ") || line.starts_with("# UNIT ") {
            continue;
        }
        assert!(!line.starts_with('#'), "unknown comment {line}");
        let (series, value) = line.rsplit_once(' ').expect("series value");
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("not a number: {line}"));
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let inner = rest.strip_suffix('}').unwrap_or_else(|| panic!("unclosed labels: {line}"));
                let mut labels = BTreeMap::new();
                for pair in inner.split("\",").filter(|p| !p.is_empty()) {
                    let (key, value) = pair.split_once("=\"").unwrap_or_else(|| panic!("bad label {pair} in {line}"));
                    labels.insert(key.to_owned(), value.trim_end_matches('"').to_owned());
                }
                (name.to_owned(), labels)
            }
            None => (series.to_owned(), BTreeMap::new()),
        };
        let family = ["_total", "_bucket", "_sum", "_count", "_created", "_info"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix).filter(|base| families.contains_key(*base)))
            .unwrap_or(&name);
        assert!(families.contains_key(family), "sample {name} of no declared family");
        samples.push(Sample { name, labels, value });
    }
    samples
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
        .map(|s| s.value)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_move_with_traffic() {
    use palaver_proto::v1::{CreateRoomRequest, PostRequest};
    let cluster = TestCluster::start(3, 2, &[]).await;
    let http = reqwest::Client::new();
    let scrape = |i: usize| {
        let http = http.clone();
        let url = format!("http://{}/metrics", cluster.nodes[i].http);
        async move {
            let response = http.get(url).send().await.expect("metrics");
            assert_eq!(response.status(), StatusCode::OK);
            let content_type = response.headers()["content-type"].to_str().expect("ascii").to_owned();
            assert!(content_type.starts_with("application/openmetrics-text"), "{content_type}");
            parse_metrics(&response.text().await.expect("text"))
        }
    };
    let before = scrape(0).await;
    // gRPC traffic on node 1.
    let mut client = cluster.chat(0);
    let token = user(&mut client, "mo").await;
    client
        .create_room(authed(CreateRoomRequest { room: "m".into(), ..Default::default() }, &token))
        .await
        .expect("create");
    for i in 0..5 {
        client
            .post(authed(
                PostRequest {
                    room: "m".into(),
                    body: format!("m{i}"),
                    client_message_id: format!("m{i}"),
                    ..Default::default()
                },
                &token,
            ))
            .await
            .expect("post");
    }
    let refused = client
        .create_room(authed(CreateRoomRequest { room: "m".into(), ..Default::default() }, &token))
        .await
        .expect_err("exists");
    assert_eq!(refused.code(), tonic::Code::AlreadyExists);
    // HTTP traffic on node 1.
    let listed = http
        .get(format!("http://{}/api/v1/rooms", cluster.nodes[0].http))
        .bearer_auth(&token)
        .send()
        .await
        .expect("rooms");
    assert_eq!(listed.status(), StatusCode::OK);

    let after = scrape(0).await;
    let grpc_posts =
        |s: &[Sample]| value(s, "palaver_requests_total", &[("surface", "grpc"), ("op", "post"), ("code", "ok")]);
    assert_eq!(grpc_posts(&after) - grpc_posts(&before), 5.0, "five gRPC posts counted");
    assert_eq!(
        value(&after, "palaver_requests_total", &[("surface", "grpc"), ("op", "create_room"), ("code", "room_exists")]),
        1.0
    );
    assert!(
        value(&after, "palaver_requests_total", &[("surface", "http"), ("op", "list_rooms"), ("code", "ok")]) >= 1.0
    );
    assert!(
        value(&after, "palaver_request_duration_seconds_count", &[("surface", "grpc"), ("op", "post")]) >= 5.0,
        "latency observed"
    );
    // Per shard Raft state: every shard this node holds has a term and a leader.
    let terms: Vec<&Sample> = after.iter().filter(|s| s.name == "palaver_shard_term").collect();
    assert_eq!(terms.len(), 3, "meta + 2 data shards on every node of three");
    assert!(terms.iter().all(|s| s.value >= 1.0));
    let leaders = after.iter().filter(|s| s.name == "palaver_shard_leader").filter(|s| s.value >= 1.0).count();
    assert_eq!(leaders, 3);
    assert!(after.iter().any(|s| s.name == "palaver_route_cache_hits_total"));
    assert!(after.iter().any(|s| s.name == "palaver_subscribers"));
    // The WAL's group commit: every acknowledged post was fsynced here, so fsyncs moved, each
    // covered at least one waiter, and the duration histogram counts every fsync once.
    let fsyncs = |s: &[Sample]| value(s, "palaver_wal_fsyncs_total", &[]);
    assert!(fsyncs(&after) - fsyncs(&before) >= 1.0, "posts were fsynced");
    assert!(value(&after, "palaver_wal_fsync_waiters_total", &[]) >= fsyncs(&after));
    assert_eq!(value(&after, "palaver_wal_fsync_failures_total", &[]), 0.0);
    let fsync_count = value(&after, "palaver_wal_fsync_seconds_count", &[]);
    assert_eq!(value(&after, "palaver_wal_fsync_seconds_bucket", &[("le", "+Inf")]), fsync_count);
    assert!(fsync_count >= 1.0);
    assert!(value(&after, "palaver_wal_fsync_seconds_sum", &[]) > 0.0);
    // The posts reached the other replicas: node 2 counts them as received from a peer.
    let received = wait_for("node 2 to count the posts it received", || async {
        let samples = scrape(1).await;
        (value(&samples, "palaver_crdt_events_received_new_total", &[]) >= 5.0).then_some(samples)
    })
    .await;
    assert!(received.iter().any(|s| s.name == "palaver_crdt_events_received_duplicate_total"));
    // Node 1 sent them through its couriers (one per peer node), each post at least once: a
    // quorum ack needs a second replica to hold it, and only couriers carry a node's own posts
    // at once. (Not necessarily to both peers: one that missed a push gets the post relayed by
    // the other replica or by anti-entropy, which these counters do not count.)
    let sent = wait_for("node 1's couriers to count the posts they sent", || async {
        let samples = scrape(0).await;
        (value(&samples, "palaver_crdt_courier_events_total", &[]) >= 5.0).then_some(samples)
    })
    .await;
    let calls = value(&sent, "palaver_crdt_courier_calls_total", &[]);
    assert!(calls >= 1.0, "a courier call at least, got {calls}");
    assert!(value(&sent, "palaver_crdt_courier_rooms_total", &[]) >= 1.0);
    // The cluster's status names where each node serves these pages, so that a tool given
    // only gRPC addresses (`bench posts --addr`) can scrape them.
    let status = cluster.status_from(2).await;
    let reported: BTreeMap<u64, String> = status.nodes.iter().map(|n| (n.node_id, n.http_addr.clone())).collect();
    let served: BTreeSet<String> = cluster.nodes.iter().map(|n| n.http.clone()).collect();
    assert_eq!(reported.len(), 3, "{reported:?}");
    assert_eq!(reported.values().cloned().collect::<BTreeSet<_>>(), served, "{reported:?}");
}
