//! The WebSocket protocol (docs/websocket.md) against real nodes: every operation, the error
//! codes, malformed and over-size frames, floods that hit the rate limits, the origin check,
//! and resuming a subscription from a version vector.

use std::collections::{BTreeMap, VecDeque};

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::harness::{TestCluster, WAIT_DEADLINE};

/// A protocol client: sends frames with fresh ids, keeps events until asked for.
struct Ws {
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    events: VecDeque<Value>,
    /// Answers that arrived while another was awaited (frames run concurrently).
    answers: BTreeMap<u64, Value>,
    hello: Value,
}

impl Ws {
    async fn connect(http: &str) -> Ws {
        let (socket, _) = tokio_tungstenite::connect_async(format!("ws://{http}/ws")).await.expect("WebSocket upgrade");
        let mut ws = Ws { socket, next_id: 1, events: VecDeque::new(), answers: BTreeMap::new(), hello: Value::Null };
        ws.hello = ws.frame().await;
        assert_eq!(ws.hello["type"], "hello", "{}", ws.hello);
        ws
    }

    /// The next frame from the node, within the deadline.
    async fn frame(&mut self) -> Value {
        loop {
            let message = tokio::time::timeout(WAIT_DEADLINE, self.socket.next())
                .await
                .expect("a frame within the deadline")
                .expect("connection open")
                .expect("healthy connection");
            match message {
                Message::Text(text) => return serde_json::from_str(text.as_str()).expect("frames are JSON"),
                Message::Close(close) => panic!("closed: {close:?}"),
                _ => continue,
            }
        }
    }

    async fn send_raw(&mut self, message: Message) {
        self.socket.send(message).await.expect("send");
    }

    /// Send `op` with `args`; returns the frame's id.
    async fn send(&mut self, op: &str, args: Value) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.send_raw(Message::text(json!({"id": id, "op": op, "args": args}).to_string())).await;
        id
    }

    /// The answer to frame `id`: `Ok(result)` or `Err(error)`; events meanwhile are kept.
    async fn answer(&mut self, id: u64) -> Result<Value, Value> {
        loop {
            let frame = match self.answers.remove(&id) {
                Some(frame) => frame,
                None => self.frame().await,
            };
            match (frame["type"].as_str(), frame["id"].as_u64()) {
                (Some("reply"), Some(got)) if got == id => return Ok(frame["result"].clone()),
                (Some("error"), Some(got)) if got == id => return Err(frame["error"].clone()),
                (Some("reply" | "error"), Some(other)) => {
                    self.answers.insert(other, frame);
                }
                (Some("event" | "ended"), _) => self.events.push_back(frame),
                _ => {}
            }
        }
    }

    async fn call(&mut self, op: &str, args: Value) -> Result<Value, Value> {
        let id = self.send(op, args).await;
        self.answer(id).await
    }

    async fn ok(&mut self, op: &str, args: Value) -> Value {
        self.call(op, args.clone()).await.unwrap_or_else(|e| panic!("{op} {args}: {e}"))
    }

    async fn refused(&mut self, op: &str, args: Value) -> String {
        let error = self.call(op, args.clone()).await.expect_err(op);
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "{error}");
        error["code"].as_str().unwrap_or_default().to_owned()
    }

    /// The next event or end of subscription `sub` (others are kept).
    async fn event(&mut self, sub: u64) -> Value {
        if let Some(i) = self.events.iter().position(|f| f["sub"] == sub) {
            return self.events.remove(i).expect("present");
        }
        loop {
            let frame = self.frame().await;
            if frame["sub"] == sub {
                return frame;
            }
            if matches!(frame["type"].as_str(), Some("event" | "ended")) {
                self.events.push_back(frame);
            }
        }
    }

    /// Message events of `sub` until one whose message body is `body`; returns their bodies.
    async fn bodies_until(&mut self, sub: u64, body: &str) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            let frame = self.event(sub).await;
            assert_eq!(frame["type"], "event", "{frame}");
            if frame["event"]["kind"] == "message" && frame["event"]["change"] == "posted" {
                let text = frame["event"]["message"]["body"].as_str().unwrap_or_default().to_owned();
                seen.push(text.clone());
                if text == body {
                    return seen;
                }
            }
        }
    }

    async fn login(&mut self, user: &str) -> String {
        let password = format!("password-of-{user}");
        let _ = self.call("register", json!({"user": user, "password": password})).await;
        let reply = self.ok("login", json!({"user": user, "password": password})).await;
        assert_eq!(reply["user"], user);
        reply["token"].as_str().expect("token").to_owned()
    }
}

fn post(room: &str, body: &str) -> Value {
    json!({"room": room, "body": body, "client_message_id": body})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_and_error_over_websocket() {
    let cluster = TestCluster::start(3, 2, &[]).await;
    let mut ada = Ws::connect(&cluster.nodes[0].http).await;
    let mut bob = Ws::connect(&cluster.nodes[2].http).await;
    assert_eq!(ada.hello["protocol"], 1);
    assert!(ada.hello["user"].is_null());
    let listed = ada.hello["nodes"].as_array().expect("nodes").clone();
    assert!(listed.iter().any(|n| n["http_addr"] == cluster.nodes[0].http.as_str()), "{listed:?}");

    // Before logging in.
    assert_eq!(ada.refused("list_rooms", json!({})).await, "unauthenticated");
    assert_eq!(ada.refused("authenticate", json!({"token": "v1.x.y.z"})).await, "unauthenticated");
    assert_eq!(ada.refused("register", json!({"user": "", "password": "long enough"})).await, "invalid_input");
    let ada_token = ada.login("ada").await;
    assert_eq!(ada.refused("register", json!({"user": "ada", "password": "long enough"})).await, "user_exists");
    assert_eq!(ada.refused("login", json!({"user": "ada", "password": "not hers at all"})).await, "unauthenticated");
    bob.login("bob").await;
    let cy_token = {
        let mut cy = Ws::connect(&cluster.nodes[1].http).await;
        cy.login("cy").await
    };

    // Rooms.
    let room = ada.ok("create_room", json!({"room": "den", "title": "Den", "visibility": "public"})).await;
    assert_eq!(room["members"][0]["role"], "owner");
    assert_eq!(ada.refused("create_room", json!({"room": "den"})).await, "room_exists");
    assert_eq!(ada.refused("create_room", json!({"room": "Not Valid"})).await, "invalid_input");
    let got = bob.ok("get_room", json!({"room": "den"})).await;
    assert_eq!(got["title"], "Den");
    assert_eq!(bob.refused("get_room", json!({"room": "nowhere"})).await, "room_not_found");
    let updated = ada.ok("update_room", json!({"room": "den", "title": "The den", "topic": "t"})).await;
    assert_eq!(updated["title"], "The den");

    // Membership and roles.
    bob.ok("join", json!({"room": "den"})).await;
    assert_eq!(bob.refused("update_room", json!({"room": "den", "title": "x"})).await, "permission_denied");
    ada.ok("set_role", json!({"room": "den", "user": "bob", "role": "admin"})).await;
    assert_eq!(ada.refused("set_role", json!({"room": "den", "user": "bob", "role": "king"})).await, "malformed");
    bob.ok("invite", json!({"room": "den", "user": "cy"})).await;
    assert_eq!(bob.refused("kick", json!({"room": "den", "user": "cy"})).await, "not_member");
    bob.ok("ban", json!({"room": "den", "user": "cy", "reason": "testing"})).await;
    bob.ok("unban", json!({"room": "den", "user": "cy"})).await;
    assert_eq!(bob.refused("unban", json!({"room": "den", "user": "cy"})).await, "not_banned");
    assert_eq!(bob.refused("kick", json!({"room": "den", "user": "ada"})).await, "permission_denied");
    assert_eq!(bob.refused("kick", json!({"room": "den", "user": "ghost"})).await, "user_not_found");
    assert_eq!(bob.refused("kick", json!({"room": "den", "user": "bob"})).await, "self_target");
    assert_eq!(ada.refused("invite", json!({"room": "den", "user": "bob"})).await, "already_member");
    assert_eq!(ada.refused("leave", json!({"room": "den"})).await, "last_owner");
    ada.ok("create_room", json!({"room": "vault", "visibility": "invite_only"})).await;
    ada.ok("ban", json!({"room": "vault", "user": "cy"})).await;
    {
        let mut cy = Ws::connect(&cluster.nodes[1].http).await;
        cy.ok("authenticate", json!({"token": cy_token})).await;
        assert_eq!(cy.refused("join", json!({"room": "vault"})).await, "banned");
    }
    assert_eq!(bob.refused("join", json!({"room": "vault"})).await, "not_invited");
    let rooms = bob.ok("list_rooms", json!({})).await;
    let den = rooms["rooms"].as_array().and_then(|r| r.iter().find(|r| r["room"] == "den")).expect("den").clone();
    assert_eq!(den["my_role"], "admin");

    // Messages, live: ada subscribes on node 1, bob posts on node 3.
    let sub = ada.send("subscribe", json!({"room": "den"})).await;
    let subscribed = ada.answer(sub).await.expect("subscribed");
    assert_eq!(subscribed, json!({"sub": sub, "room": "den"}));
    let caught_up = loop {
        let frame = ada.event(sub).await;
        if frame["event"]["kind"] == "caught_up" {
            break frame;
        }
    };
    assert!(caught_up["event"]["version_vector"].is_object());
    let posted = bob.ok("post", post("den", "hello from bob")).await;
    assert_eq!(posted["ack"], "quorum");
    assert_eq!(posted["duplicate"], false);
    let again = bob.ok("post", post("den", "hello from bob")).await;
    assert_eq!((again["duplicate"].clone(), again["message_id"].clone()), (json!(true), posted["message_id"].clone()));
    assert_eq!(ada.bodies_until(sub, "hello from bob").await, vec!["hello from bob"]);
    let message_id = posted["message_id"].as_str().expect("id").to_owned();
    let edited = bob.ok("edit", json!({"room": "den", "message_id": message_id, "body": "hello, edited"})).await;
    assert!(edited["position"].is_object());
    assert_eq!(
        ada.refused("edit", json!({"room": "den", "message_id": message_id, "body": "mine now"})).await,
        "permission_denied"
    );
    ada.ok("react", json!({"room": "den", "message_id": message_id, "reaction": "👍"})).await;
    assert_eq!(
        ada.refused("react", json!({"room": "den", "message_id": "00000000000000000000000000000000", "reaction": "x"}))
            .await,
        "message_not_found"
    );
    // The subscription shows the edit and the reaction on the message.
    let shown = loop {
        let frame = ada.event(sub).await;
        if frame["event"]["change"] == "reacted" {
            break frame["event"]["message"].clone();
        }
    };
    assert_eq!(shown["body"], "hello, edited");
    assert_eq!(shown["edited"], true);
    assert_eq!(shown["reactions"], json!([{"reaction": "👍", "users": ["ada"]}]));
    let history = bob.ok("history", json!({"room": "den", "limit": 10})).await;
    assert_eq!(history["messages"][0]["body"], "hello, edited");
    let position = history["messages"][0]["position"].clone();
    let marked = ada.ok("mark_read", json!({"room": "den", "position": position})).await;
    assert_eq!(marked["position"], position);
    let typing = bob.ok("typing", json!({"room": "den", "typing": true})).await;
    assert!(typing["position"].is_null());
    // Presence: bob subscribes on his node, so "all my rooms" includes den.
    let bob_sub = bob.send("subscribe", json!({"room": "den"})).await;
    bob.answer(bob_sub).await.expect("bob subscribed");
    let presence = bob.ok("set_presence", json!({"status": "away"})).await;
    assert_eq!(presence["rooms"], json!(["den"]));
    let state = loop {
        let frame = ada.event(sub).await;
        if frame["event"]["kind"] == "state" && frame["event"]["presence"]["bob"] == "away" {
            break frame["event"].clone();
        }
    };
    assert!(state["read_markers"]["ada"].is_object(), "{state}");
    bob.ok("unsubscribe", json!({"sub": bob_sub})).await;
    assert_eq!(bob.refused("unsubscribe", json!({"sub": bob_sub})).await, "invalid_input");
    bob.ok("redact", json!({"room": "den", "message_id": message_id})).await;
    let redacted = loop {
        let frame = ada.event(sub).await;
        if frame["event"]["change"] == "redacted" {
            break frame["event"]["message"].clone();
        }
    };
    assert_eq!((redacted["redacted"].clone(), redacted["body"].clone()), (json!(true), json!("")));

    // An expired or foreign token does not carry over; authenticate switches user.
    let mut other = Ws::connect(&cluster.nodes[1].http).await;
    assert_eq!(other.ok("authenticate", json!({"token": cy_token})).await["user"], "cy");
    assert_eq!(other.refused("post", post("den", "not a member")).await, "not_member");
    other.ok("authenticate", json!({"token": ada_token})).await;
    other.ok("post", post("den", "ada on node 2")).await;
    ada.bodies_until(sub, "ada on node 2").await;

    // Kicked: the subscription gets the change, then ends with not_member.
    let mut cy = Ws::connect(&cluster.nodes[1].http).await;
    cy.ok("authenticate", json!({"token": cy_token})).await;
    cy.ok("join", json!({"room": "den"})).await;
    let cy_sub = cy.send("subscribe", json!({"room": "den"})).await;
    cy.answer(cy_sub).await.expect("subscribed");
    bob.ok("kick", json!({"room": "den", "user": "cy"})).await;
    let ended = loop {
        let frame = cy.event(cy_sub).await;
        if frame["type"] == "ended" {
            break frame;
        }
    };
    assert_eq!(ended["error"]["code"], "not_member", "{ended}");

    // Deleting the room ends ada's subscription too.
    assert_eq!(bob.refused("delete_room", json!({"room": "den"})).await, "permission_denied");
    ada.ok("delete_room", json!({"room": "den"})).await;
    let ended = loop {
        let frame = ada.event(sub).await;
        if frame["type"] == "ended" {
            break frame;
        }
    };
    assert!(ended["error"]["code"].is_string(), "{ended}");
    assert_eq!(ada.refused("get_room", json!({"room": "den"})).await, "room_not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_oversize_and_flooding_frames_get_typed_errors() {
    let cluster = TestCluster::start(3, 2, &[]).await;
    let mut ws = Ws::connect(&cluster.nodes[1].http).await;
    ws.login("flo").await;
    ws.ok("create_room", json!({"room": "flood"})).await;

    // Not JSON, not a frame, unknown op, wrong args, unknown fields, binary.
    let bad_frames = [
        "{not json",
        "[1, 2, 3]",
        r#"{"op": "post"}"#,
        r#"{"id": 5, "op": "post", "args": {"room": "flood"}}"#,
        r#"{"id": 6, "op": "post", "args": {"room": "flood", "body": "x", "client_message_id": "y", "sudo": true}}"#,
        r#"{"id": 7, "op": "fly", "args": {}}"#,
        r#"{"id": 8, "op": "post", "args": "everything"}"#,
        r#"{"id": 9, "op": "history", "args": {"room": "flood", "limit": -1}}"#,
    ];
    for text in bad_frames {
        ws.send_raw(Message::text(text)).await;
        let frame = ws.frame().await;
        assert_eq!(frame["type"], "error", "{text}: {frame}");
        assert_eq!(frame["error"]["code"], "malformed", "{text}: {frame}");
        let id = serde_json::from_str::<Value>(text).ok().and_then(|v| v.get("id").cloned()).unwrap_or(Value::Null);
        assert_eq!(frame["id"], id, "the error names the frame when it can");
    }
    ws.send_raw(Message::binary(vec![1u8, 2, 3])).await;
    assert_eq!(ws.frame().await["error"]["code"], "malformed");
    // A frame over the protocol's limit: an error, and the connection stays usable.
    let big = json!({"id": 77, "op": "post", "args": post("flood", &"x".repeat(200 * 1024))}).to_string();
    ws.send_raw(Message::text(big)).await;
    let frame = ws.frame().await;
    assert_eq!((frame["id"].clone(), frame["error"]["code"].clone()), (json!(77), json!("too_large")), "{frame}");
    // A body over the message limit but inside the frame limit is invalid input.
    assert_eq!(ws.refused("post", post("flood", &"y".repeat(17 * 1024))).await, "invalid_input");
    ws.ok("post", post("flood", "still here")).await;

    // A flood of posts hits the per-user write limit, with a retry-after.
    let ids: Vec<u64> = {
        let mut ids = Vec::new();
        for i in 0..60 {
            ids.push(ws.send("post", json!({"room": "flood", "body": format!("f{i}"), "client_message_id": format!("f{i}"), "ack": "one"})).await);
        }
        ids
    };
    let mut limited = Vec::new();
    for id in ids {
        if let Err(error) = ws.answer(id).await {
            assert_eq!(error["code"], "rate_limited", "{error}");
            assert_eq!(error["retryable"], true);
            limited.push(error["retry_after_ms"].as_u64().expect("retry_after_ms"));
        }
    }
    assert!(!limited.is_empty(), "60 posts at once exceed the burst of 40");
    assert!(limited.iter().all(|ms| *ms >= 1 && *ms <= 1_000), "{limited:?}");

    // A flood of frames of any kind hits the per-connection frame limit (a fresh connection:
    // its whole burst passes).
    let mut flooder = Ws::connect(&cluster.nodes[1].http).await;
    flooder.login("flo").await;
    let mut codes = BTreeMap::new();
    let ids: Vec<u64> = {
        let mut ids = Vec::new();
        for _ in 0..400 {
            ids.push(flooder.send("get_room", json!({"room": "flood"})).await);
        }
        ids
    };
    for id in ids {
        let code = match flooder.answer(id).await {
            Ok(_) => "ok".to_owned(),
            Err(error) => {
                if error["code"] == "rate_limited" {
                    assert!(error["retry_after_ms"].as_u64().is_some(), "{error}");
                }
                error["code"].as_str().unwrap_or_default().to_owned()
            }
        };
        *codes.entry(code).or_insert(0) += 1;
    }
    assert!(codes.get("rate_limited").copied().unwrap_or(0) > 0, "{codes:?}");
    assert!(codes.get("ok").copied().unwrap_or(0) >= 200, "the burst passes: {codes:?}");

    // Subscriptions per connection are limited.
    let mut fresh = Ws::connect(&cluster.nodes[0].http).await;
    fresh.login("flo").await;
    let mut refused = None;
    let mut opened = 0;
    // Rate-limited attempts (past the burst of 200 frames) are retried and do not count.
    while opened <= 300 {
        match fresh.call("subscribe", json!({"room": "flood"})).await {
            Ok(_) => opened += 1,
            Err(error) if error["code"] == "rate_limited" => {
                let wait = error["retry_after_ms"].as_u64().unwrap_or(10);
                tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
            }
            Err(error) => {
                refused = Some(error);
                break;
            }
        }
    }
    assert_eq!(refused.expect("a refusal")["code"], "limit_reached");
    assert_eq!(opened, palaver_node::http::ws::WS_SUBSCRIPTIONS_MAX, "refused exactly at the limit");

    // Past the hard limit the connection is closed with 1009.
    let huge = "z".repeat(2 * 1024 * 1024);
    let _ = ws.socket.send(Message::text(huge)).await;
    let closed = tokio::time::timeout(WAIT_DEADLINE, async {
        loop {
            match ws.socket.next().await {
                Some(Ok(Message::Close(Some(close)))) => return Some(u16::from(close.code)),
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    })
    .await
    .expect("closed within the deadline");
    assert_eq!(closed, Some(1009));

    // A page from a foreign origin may not connect; the node's own origin may.
    let mut request = format!("ws://{}/ws", cluster.nodes[0].http).into_client_request().expect("request");
    request.headers_mut().insert("origin", "http://evil.example".parse().expect("header"));
    match tokio_tungstenite::connect_async(request).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403);
            let body: Value = serde_json::from_slice(response.body().as_deref().unwrap_or_default()).expect("JSON");
            assert_eq!(body["error"]["code"], "forbidden_origin");
        }
        other => panic!("a foreign origin was let in: {other:?}"),
    }
    let mut request = format!("ws://{}/ws", cluster.nodes[0].http).into_client_request().expect("request");
    let own = format!("http://{}", cluster.nodes[0].http);
    request.headers_mut().insert("origin", own.parse().expect("header"));
    tokio_tungstenite::connect_async(request).await.expect("the node's own page may connect");

    // The node kept serving through all of it.
    let mut after = Ws::connect(&cluster.nodes[1].http).await;
    after.login("flo").await;
    after.ok("get_room", json!({"room": "flood"})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_resumes_from_its_version_vector() {
    let cluster = TestCluster::start(3, 2, &[]).await;
    let mut writer = Ws::connect(&cluster.nodes[0].http).await;
    writer.login("wes").await;
    writer.ok("create_room", json!({"room": "log"})).await;
    for i in 0..5 {
        writer.ok("post", post("log", &format!("early {i}"))).await;
    }
    // A reader takes everything so far, keeping its version vector.
    let mut reader = Ws::connect(&cluster.nodes[2].http).await;
    let token = reader.login("rae").await;
    reader.ok("join", json!({"room": "log"})).await;
    let sub = reader.send("subscribe", json!({"room": "log"})).await;
    reader.answer(sub).await.expect("subscribed");
    let mut vv: BTreeMap<String, u64> = BTreeMap::new();
    let mut seen = Vec::new();
    loop {
        let frame = reader.event(sub).await;
        let event = &frame["event"];
        if event["kind"] == "message" {
            let p = &event["position"];
            let replica = p["replica"].as_u64().expect("replica").to_string();
            let counter = p["counter"].as_u64().expect("counter");
            let held = vv.entry(replica).or_default();
            *held = (*held).max(counter);
            seen.push(event["message"]["body"].as_str().unwrap_or_default().to_owned());
        }
        if event["kind"] == "caught_up" {
            break;
        }
    }
    assert_eq!(seen, (0..5).map(|i| format!("early {i}")).collect::<Vec<_>>());
    // It goes away; more is posted; it comes back on another node with its vector.
    drop(reader);
    for i in 0..3 {
        writer.ok("post", post("log", &format!("late {i}"))).await;
    }
    let mut back = Ws::connect(&cluster.nodes[1].http).await;
    assert_eq!(back.ok("authenticate", json!({"token": token})).await["user"], "rae");
    let sub = back.send("subscribe", json!({"room": "log", "version_vector": vv})).await;
    back.answer(sub).await.expect("resubscribed");
    // Node 1 may be the replica that the quorum acks did not wait for: what it lacks still
    // comes, after `caught_up`, as live events.
    let mut resumed = Vec::new();
    while resumed.len() < 3 {
        let frame = back.event(sub).await;
        if frame["event"]["kind"] == "message" {
            resumed.push(frame["event"]["message"]["body"].as_str().unwrap_or_default().to_owned());
        }
    }
    assert_eq!(resumed, vec!["late 0", "late 1", "late 2"], "exactly what it missed");
    // A malformed vector is refused with a typed error.
    let bad = back.call("subscribe", json!({"room": "log", "version_vector": {"one": 1}})).await;
    assert_eq!(bad.expect_err("bad vector")["code"], "invalid_input");
}

/// A message event's (replica, counter) and body.
fn message_event(frame: &Value) -> Option<(String, u64, String)> {
    let event = &frame["event"];
    if frame["type"] != "event" || event["kind"] != "message" || event["change"] != "posted" {
        return None;
    }
    let replica = event["position"]["replica"].as_u64()?.to_string();
    let counter = event["position"]["counter"].as_u64()?;
    Some((replica, counter, event["message"]["body"].as_str()?.to_owned()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_disconnected_and_resumes_without_loss() {
    use palaver_proto::v1::{AckLevel, CreateRoomRequest, PostRequest, RoomRequest};

    let cluster = TestCluster::start(3, 2, &[]).await;
    let mut grpc = cluster.chat(1);
    let owner = crate::harness::user(&mut grpc, "own").await;
    grpc.create_room(crate::harness::authed(
        CreateRoomRequest { room: "firehose".into(), ..Default::default() },
        &owner,
    ))
    .await
    .expect("create");

    // The slow client: a small receive buffer, subscribed, then it stops reading.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("small buffer");
    let stream = socket.connect(cluster.nodes[0].http.parse().expect("address")).await.expect("connect");
    let (raw, _) =
        tokio_tungstenite::client_async(format!("ws://{}/ws", cluster.nodes[0].http), MaybeTlsStream::Plain(stream))
            .await
            .expect("upgrade");
    let mut slow =
        Ws { socket: raw, next_id: 1, events: VecDeque::new(), answers: BTreeMap::new(), hello: Value::Null };
    slow.hello = slow.frame().await;
    let token = slow.login("sloth").await;
    slow.ok("join", json!({"room": "firehose"})).await;
    let sub = slow.send("subscribe", json!({"room": "firehose"})).await;
    slow.answer(sub).await.expect("subscribed");

    // About 10 MiB of messages, more than the socket and the connection's 1 MiB queue hold.
    let body = "m".repeat(16 * 1024 - 16);
    let mut posters = Vec::new();
    for u in 0..16 {
        let name = format!("poster{u}");
        let token = crate::harness::user(&mut grpc, &name).await;
        grpc.join(crate::harness::authed(RoomRequest { room: "firehose".into() }, &token)).await.expect("join");
        posters.push((name, token));
    }
    let mut posted = std::collections::BTreeSet::new();
    for (name, token) in &posters {
        for i in 0..40 {
            let text = format!("{name}-{i}-{body}");
            grpc.post(crate::harness::authed(
                PostRequest {
                    room: "firehose".into(),
                    body: text.clone(),
                    client_message_id: format!("{name}-{i}"),
                    ack: AckLevel::One as i32,
                    ..Default::default()
                },
                token,
            ))
            .await
            .expect("post");
            posted.insert(text);
        }
    }

    // The node gives up on the client (10 s of a full queue) and says so in its metrics.
    let http = reqwest::Client::new();
    crate::harness::wait_for("the slow client to be disconnected", || async {
        let text =
            http.get(format!("http://{}/metrics", cluster.nodes[0].http)).send().await.ok()?.text().await.ok()?;
        let dropped = text
            .lines()
            .find(|l| l.starts_with("palaver_slow_subscribers_dropped_total{surface=\"ws\"}"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        (dropped >= 1.0).then_some(())
    })
    .await;

    // What reached the client before the end: events, then (if the socket drained in time) the
    // reason; then the connection is over.
    let mut vv: BTreeMap<String, u64> = BTreeMap::new();
    let mut got = Vec::new();
    let mut reason = None;
    loop {
        let next = tokio::time::timeout(WAIT_DEADLINE, slow.socket.next()).await.expect("the connection ends");
        let frame: Value = match next {
            Some(Ok(Message::Text(text))) => serde_json::from_str(text.as_str()).expect("JSON"),
            Some(Ok(Message::Close(close))) => {
                if let Some(close) = close {
                    assert_eq!(u16::from(close.code), 4008, "{close:?}");
                }
                break;
            }
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => break,
        };
        if frame["type"] == "closing" {
            reason = Some(frame["error"]["code"].clone());
        }
        if let Some((replica, counter, text)) = message_event(&frame) {
            let held = vv.entry(replica).or_default();
            *held = (*held).max(counter);
            got.push(text);
        }
    }
    if let Some(reason) = reason {
        assert_eq!(reason, "slow_consumer");
    }
    assert!(got.len() < posted.len(), "the client was cut off before the end ({} of {})", got.len(), posted.len());

    // It comes back with its version vector and gets exactly the rest.
    let mut back = Ws::connect(&cluster.nodes[0].http).await;
    back.ok("authenticate", json!({"token": token})).await;
    let sub = back.send("subscribe", json!({"room": "firehose", "version_vector": vv})).await;
    back.answer(sub).await.expect("resubscribed");
    loop {
        let frame = back.event(sub).await;
        if let Some((_, _, text)) = message_event(&frame) {
            got.push(text);
        }
        if frame["event"]["kind"] == "caught_up" {
            break;
        }
    }
    let unique: std::collections::BTreeSet<String> = got.iter().cloned().collect();
    assert_eq!(unique.len(), got.len(), "no message twice");
    assert_eq!(unique, posted, "no message missing");
}
