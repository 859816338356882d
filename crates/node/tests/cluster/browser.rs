//! The web page (`crates/node/web/`) in a real headless Chromium, driven over the Chrome
//! DevTools Protocol (CDP) by a small client here: two pages are two users, on two nodes of a
//! 3-node cluster. They register through the form, create and join a room, chat, see each
//! other's presence and typing; a hostile body stays text; and when the node one page is
//! connected to is killed, that page says so, moves to another node and shows what it missed,
//! each message once.
//!
//! Chromium is Debian's `chromium` (`scripts/test` installs it; `PALAVER_CHROMIUM` may name
//! another binary). Without it the test fails: it never passes by skipping.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use base64::Engine;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

use palaver_proto::v1::chat_service_client::ChatServiceClient;
use palaver_proto::v1::{AckLevel, RoomRequest};
use tonic::transport::Channel;

use crate::harness::{TestCluster, WAIT_DEADLINE, authed, code, post, user, wait_for};

/// Messages the page shows of a room before "load older" (`HISTORY_PAGE_MESSAGES` in app.js).
const HISTORY_PAGE_MESSAGES: usize = 50;
/// How long one DevTools command may take.
const CDP_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long Chromium may take to open its DevTools port.
const BROWSER_START_DEADLINE: Duration = Duration::from_secs(30);
/// How often a page condition is evaluated while waiting for it.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// The viewport of every page (a laptop screen).
const VIEWPORT: (u32, u32) = (1280, 800);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_chat_in_a_browser_and_a_page_survives_its_node() {
    // The browser first: without one the test fails at once, not after starting a cluster.
    let browser = Browser::launch().await;
    let mut cluster = TestCluster::start(3, 4, &[]).await;
    every_node_names_every_node(&cluster).await;
    let ada = browser.open("ada", &cluster.nodes[0].http).await;
    let bob = browser.open("bob", &cluster.nodes[1].http).await;

    // ---- register and log in through the form, errors shown by code ----
    ada.wait_visible("login-view").await;
    ada.fill_login("ada", "password-of-ada").await;
    ada.click("register-submit").await;
    ada.wait_visible("chat-view").await;
    bob.wait_visible("login-view").await;
    bob.fill_login("bob", "short").await;
    bob.click("register-submit").await;
    bob.wait("the short password refused as invalid_input", "q('login-error').dataset.code === 'invalid_input'").await;
    bob.fill_login("ada", "password-of-bob").await;
    bob.click("register-submit").await;
    bob.wait("a taken name refused as user_exists", "q('login-error').dataset.code === 'user_exists'").await;
    bob.fill_login("bob", "password-of-bob").await;
    bob.click("register-submit").await;
    bob.wait_visible("chat-view").await;
    // Log out and in again with the login button (a wrong password first).
    bob.click("logout").await;
    bob.wait_visible("login-view").await;
    bob.fill_login("bob", "not-bobs-password").await;
    bob.click("login-submit").await;
    bob.wait("a wrong password refused as unauthenticated", "q('login-error').dataset.code === 'unauthenticated'")
        .await;
    bob.fill_login("bob", "password-of-bob").await;
    bob.click("login-submit").await;
    bob.wait_visible("chat-view").await;
    // The header renders on the next tick after the view switches: wait for it.
    bob.wait("the header to name bob", "q('whoami').textContent === 'bob'").await;

    // ---- ada creates a room, bob joins it by id ----
    ada.type_into("create-room-id", "lounge").await;
    ada.type_into("create-room-title", "The Lounge").await;
    ada.click("create-room-submit").await;
    ada.wait("ada views the lounge", "q('room-title').textContent.includes('lounge') && !!room('lounge')").await;
    bob.type_into("join-room-id", "lounge").await;
    bob.click("join-room-submit").await;
    bob.wait("bob views the lounge", "q('room-title').textContent.includes('lounge') && !!room('lounge')").await;
    for (page, other) in [(&ada, "bob"), (&bob, "ada")] {
        page.wait(
            &format!("{other} listed online in {}'s member list", page.name),
            &format!("member({other:?})?.dataset.presence === 'online'"),
        )
        .await;
    }
    ada.wait(
        "ada listed as owner",
        "member('ada')?.dataset.role === 'owner' && member('bob')?.dataset.role === 'member'",
    )
    .await;
    // Only the owner is offered the admin actions.
    assert_eq!(ada.eval("!!member('bob').querySelector('[data-action=kick]')").await, json!(true));
    assert_eq!(bob.eval("!!member('ada').querySelector('[data-action]')").await, json!(false));

    // ---- they chat; each sees the other typing ----
    ada.send("hello bob").await;
    bob.wait_message("hello bob", "ada").await;
    bob.type_into("composer-input", "hi ada, how").await;
    ada.wait("bob's typing shown to ada", "q('typing-indicator').textContent === 'bob is typing…'").await;
    let screenshot = artifact("browser-chat.png");
    ada.screenshot(&screenshot).await;
    println!("screenshot of the chat view: {}", screenshot.display());
    bob.type_into("composer-input", " are you?").await;
    bob.click("composer-send").await;
    ada.wait_message("hi ada, how are you?", "bob").await;
    ada.wait("bob's typing gone once he sent", "q('typing-indicator').textContent === ''").await;
    ada.type_into("composer-input", "fine").await;
    bob.wait("ada's typing shown to bob", "q('typing-indicator').textContent === 'ada is typing…'").await;
    ada.click("composer-send").await;
    bob.wait_message("fine", "ada").await;
    bob.wait("ada's typing gone once she sent", "q('typing-indicator').textContent === ''").await;

    // ---- a reaction, an edit and a redaction show on the other page ----
    let hello_id = ada.message_id("hello bob").await;
    bob.eval(&format!("msg({hello_id:?}).querySelector('[data-action=picker]').click()")).await;
    bob.wait("the reaction picker", &format!("!!msg({hello_id:?}).querySelector('[data-testid=reaction-picker]')"))
        .await;
    bob.eval(&format!("msg({hello_id:?}).querySelector('[data-reaction=\"👍\"]').click()")).await;
    ada.wait(
        "bob's reaction counted",
        &format!("msg({hello_id:?})?.querySelector('[data-testid=reaction]')?.textContent === '👍 1'"),
    )
    .await;
    let fine_id = ada.message_id("fine").await;
    ada.eval(&format!("msg({fine_id:?}).querySelector('[data-action=edit]').click()")).await;
    ada.wait("the editor", &format!("!!msg({fine_id:?}).querySelector('[data-testid=edit-input]')")).await;
    ada.eval(&format!(
        "(() => {{ const input = msg({fine_id:?}).querySelector('[data-testid=edit-input]'); input.value = 'fine, thanks'; \
         msg({fine_id:?}).querySelector('[data-action=save-edit]').click(); }})()"
    ))
    .await;
    bob.wait(
        "ada's edit shown as edited",
        &format!(
            "body({fine_id:?}) === 'fine, thanks' && !!msg({fine_id:?}).querySelector('[data-testid=message-edited]')"
        ),
    )
    .await;
    bob.send("oops").await;
    let oops_id = bob.message_id("oops").await;
    bob.eval(&format!("msg({oops_id:?}).querySelector('[data-action=confirm-redact]').click()")).await;
    bob.wait("the delete confirmation", &format!("!!msg({oops_id:?}).querySelector('[data-action=redact]')")).await;
    bob.eval(&format!("msg({oops_id:?}).querySelector('[data-action=redact]').click()")).await;
    ada.wait("bob's redaction shown", &format!("body({oops_id:?}) === 'message deleted'")).await;

    // ---- a hostile body is text: no element, no script ----
    let hostile = "<img src=x onerror=alert(1)>";
    bob.send(hostile).await;
    for page in [&ada, &bob] {
        page.wait_message(hostile, "bob").await;
        let images = page.eval("q('message-list').querySelectorAll('img').length").await;
        assert_eq!(images, json!(0), "{}: the body made no element", page.name);
        let body_children = page
            .eval(&format!(
                "msg({:?}).querySelector('[data-testid=message-body]').children.length",
                page.message_id(hostile).await
            ))
            .await;
        assert_eq!(body_children, json!(0), "{}: the body is one text node", page.name);
    }

    // ---- unread counts: kept live for rooms not on view, reset on view ----
    ada.type_into("create-room-id", "side").await;
    ada.click("create-room-submit").await;
    ada.wait("ada views the side room", "q('room-title').textContent.includes('side')").await;
    bob.type_into("join-room-id", "side").await;
    bob.click("join-room-submit").await;
    bob.wait("bob views the side room", "q('room-title').textContent.includes('side') && !!member('ada')").await;
    bob.eval("room('lounge').click()").await;
    bob.wait("bob back in the lounge", "q('room-title').textContent.includes('lounge')").await;
    ada.send("psst").await;
    bob.wait("one unread message in the side room", "room('side').dataset.unread === '1'").await;
    bob.eval("room('side').click()").await;
    bob.wait_message("psst", "ada").await;
    bob.wait(
        "the side room read",
        "room('side').dataset.unread === '0' && !room('side').querySelector('[data-testid=unread-count]')",
    )
    .await;
    bob.eval("room('lounge').click()").await;
    bob.wait("bob back in the lounge", "q('room-title').textContent.includes('lounge')").await;

    // ---- scroll-back: a room with more than a page shows the newest, older ones on demand ----
    let mut carl_client = cluster.chat(2);
    let carl = user(&mut carl_client, "carl").await;
    carl_client.join(authed(RoomRequest { room: "side".into() }, &carl)).await.expect("carl joins the side room");
    let older = 55;
    for i in 1..=older {
        post_retrying(&carl_client, &carl, "side", &format!("old {i}")).await;
    }
    bob.wait("every post of carl counted unread", &format!("room('side').dataset.unread === '{older}'")).await;
    // A fresh page (a reload resumes the session from sessionStorage) learns the count from
    // the node, and opens the room at its newest page.
    bob.reload().await;
    bob.wait("bob's session resumed after a reload", "q('connection-status').dataset.ready === 'true'").await;
    bob.wait("the node's unread count after the reload", &format!("room('side')?.dataset.unread === '{older}'")).await;
    bob.eval("room('side').click()").await;
    bob.wait(
        "the newest page of the side room",
        &format!("messages().length === {HISTORY_PAGE_MESSAGES} && visible('load-older')"),
    )
    .await;
    bob.wait_message(&format!("old {older}"), "carl").await;
    assert_eq!(bob.count_bodies("psst").await, 0, "the oldest message waits for scroll-back");
    bob.click("load-older").await;
    bob.wait(
        "the whole side room after loading older messages",
        &format!("messages().length === {} && visible('history-start') && !visible('load-older')", older + 1),
    )
    .await;
    let ids = bob.message_ids().await;
    assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), ids.len(), "a message shown twice after scroll-back");
    assert_eq!(bob.count_bodies("psst").await, 1, "the oldest message is back");

    // ---- admin actions: the owner makes bob an admin and kicks carl ----
    ada.wait("ada sees carl in the side room", "!!member('carl')").await;
    ada.eval(
        "(() => { const select = member('bob').querySelector('select[data-action=set-role]'); select.value = 'admin'; \
         select.dispatchEvent(new Event('change', { bubbles: true })); return true; })()",
    )
    .await;
    bob.wait("bob an admin in bob's member list", "member('bob')?.dataset.role === 'admin'").await;
    bob.wait("bob, an admin, may kick carl", "!!member('carl')?.querySelector('[data-action=kick]')").await;
    ada.eval("member('carl').querySelector('[data-action=kick]').click()").await;
    for page in [&ada, &bob] {
        page.wait("carl gone from the member list", "!member('carl') && !!member('ada')").await;
    }
    bob.eval("room('lounge').click()").await;
    bob.wait("bob back in the lounge", "q('room-title').textContent.includes('lounge')").await;
    ada.eval("room('lounge').click()").await;
    ada.wait("ada back in the lounge", "q('room-title').textContent.includes('lounge')").await;

    // ---- a reload resumes the session from sessionStorage ----
    ada.reload().await;
    ada.wait_visible("chat-view").await;
    ada.wait(
        "ada's session resumed after a reload",
        "q('connection-status').dataset.ready === 'true' && !!room('lounge')",
    )
    .await;
    ada.wait_message("hi ada, how are you?", "bob").await;

    // ---- failover: kill ada's node; bob posts meanwhile; ada moves and catches up ----
    for page in [&ada, &bob] {
        page.wait("the page to know all three nodes", "q('connection-status').dataset.nodes.split(',').length === 3")
            .await;
    }
    let lounge_before = ada.message_ids().await;
    let ada_node = ada.eval("q('connection-status').dataset.node").await;
    let ada_node = ada_node.as_str().expect("ada's node id").to_owned();
    ada.eval(
        "(framesSeen.push('mark: node killed'), window.bannerLog = [], new MutationObserver(() => bannerLog.push(q('connection-banner').textContent))\
         .observe(q('connection-banner'), { childList: true, characterData: true, subtree: true }), true)",
    )
    .await;
    cluster.kill(0).await;
    let missed: Vec<String> = (1..=3).map(|i| format!("while you were away {i}")).collect();
    for body in &missed {
        bob.send(body).await;
    }
    ada.wait(
        "ada's page to say its connection was lost",
        &format!("bannerLog.some((t) => t.startsWith('Connection to node {ada_node} lost — reconnecting to node'))"),
    )
    .await;
    ada.wait(
        "ada's page on another node",
        &format!(
            "q('connection-status').dataset.ready === 'true' && q('connection-status').dataset.node !== '{ada_node}' \
             && bannerLog.some((t) => t === 'Connected to node ' + q('connection-status').dataset.node)"
        ),
    )
    .await;
    for body in &missed {
        ada.wait_message(body, "bob").await;
    }
    let failover_shot = artifact("browser-failover.png");
    ada.screenshot(&failover_shot).await;
    println!("screenshot after the failover: {}", failover_shot.display());
    // Exactly once each, and the same messages as bob's page shows.
    let ada_ids = ada.message_ids().await;
    let unique: BTreeSet<&String> = ada_ids.iter().collect();
    assert_eq!(unique.len(), ada_ids.len(), "a message shown twice: {ada_ids:?}");
    for body in &missed {
        assert_eq!(ada.count_bodies(body).await, 1, "{body:?} shown once");
    }
    assert_eq!(ada_ids.len(), lounge_before.len() + missed.len(), "before: {lounge_before:?}, after: {ada_ids:?}");
    // On the wire too: after the kill the page subscribed to the lounge with its version vector,
    // and was sent each missed post once (not the room's whole history again).
    let resumed = ada
        .eval(
            "(() => { const after = framesSeen.slice(framesSeen.lastIndexOf('mark: node killed') + 1); \
             const sent = (f, ...parts) => f.startsWith('> ') && parts.every((p) => f.includes(p)); \
             return { vector: after.some((f) => sent(f, '\"op\":\"subscribe\"', '\"room\":\"lounge\"', '\"version_vector\":{\"')), \
             posted: after.filter((f) => f.startsWith('< ') && f.includes('\"change\":\"posted\"')).length }; })()",
        )
        .await;
    assert_eq!(resumed, json!({ "vector": true, "posted": missed.len() }), "ada's resubscription to the lounge");
    bob.wait_message(&missed[2], "bob").await;
    assert_eq!(bob.message_ids().await, ada_ids, "both pages show the same messages in the same order");
    // And ada still chats from her new node.
    ada.send("back again").await;
    bob.wait_message("back again", "ada").await;

    for page in [&ada, &bob] {
        page.assert_clean();
    }
    browser.close().await;
}

/// Wait until every node's `hello` frame names all three nodes' HTTP addresses: a page learns
/// where to move from it, and a node accepts pages of the nodes it knows.
async fn every_node_names_every_node(cluster: &TestCluster) {
    for node in &cluster.nodes {
        let url = format!("ws://{}/ws", node.http);
        wait_for(&format!("{url} to name every node"), || async {
            let (mut socket, _) = tokio_tungstenite::connect_async(url.as_str()).await.ok()?;
            let first = tokio::time::timeout(Duration::from_secs(5), socket.next()).await.ok()??.ok()?;
            let hello: Value = serde_json::from_str(first.to_text().ok()?).ok()?;
            let _ = socket.close(None).await;
            (hello["nodes"].as_array()?.len() == cluster.nodes.len()).then_some(())
        })
        .await;
    }
}

/// Post `body` over gRPC, again while the user's write rate is exceeded.
async fn post_retrying(client: &ChatServiceClient<Channel>, token: &str, room: &str, body: &str) {
    wait_for(&format!("the post {body:?} past the rate limit"), || async {
        match post(&mut client.clone(), token, room, body, AckLevel::Quorum).await {
            Ok(_) => Some(()),
            Err(status) if code(&status) == "rate_limited" => None,
            Err(status) => panic!("post {body:?}: {status}"),
        }
    })
    .await;
}

/// Where a test writes files for people to look at.
fn artifact(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("test-artifacts");
    std::fs::create_dir_all(&dir).expect("artifact directory");
    dir.join(name)
}

/// The Chromium binary, or a failed test that says how to get one.
fn chromium_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("PALAVER_CHROMIUM") {
        return PathBuf::from(path);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        for name in ["chromium", "chromium-browser", "google-chrome"] {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "the browser test needs Chromium, and none is on PATH: install Debian's `chromium` \
         (`apt-get install -y chromium`, as scripts/test does) or set PALAVER_CHROMIUM"
    );
}

/// A headless Chromium and one DevTools connection to it.
struct Browser {
    child: Child,
    profile: tempfile::TempDir,
    cdp: Arc<Cdp>,
}

impl Browser {
    async fn launch() -> Self {
        let binary = chromium_binary();
        let profile = tempfile::tempdir().expect("profile directory");
        let log = std::fs::File::create(profile.path().join("chromium.log")).expect("browser log");
        let child = Command::new(&binary)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-sync",
                "--disable-background-networking",
                "--disable-background-timer-throttling",
                "--disable-backgrounding-occluded-windows",
                "--disable-renderer-backgrounding",
                "--remote-debugging-port=0",
                &format!("--window-size={},{}", VIEWPORT.0, VIEWPORT.1),
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start Chromium ({}): {e}", binary.display()));
        let mut browser = Browser { child, cdp: Arc::new(Cdp::disconnected()), profile };
        let url = browser.devtools_url().await;
        let (socket, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .unwrap_or_else(|e| panic!("cannot open Chromium's DevTools at {url}: {e}"));
        browser.cdp = Arc::new(Cdp::start(socket));
        browser
    }

    /// Chromium writes its DevTools port and path to `DevToolsActivePort` once it listens.
    async fn devtools_url(&mut self) -> String {
        let file = self.profile.path().join("DevToolsActivePort");
        let deadline = tokio::time::Instant::now() + BROWSER_START_DEADLINE;
        loop {
            if let Ok(text) = std::fs::read_to_string(&file) {
                let mut lines = text.lines();
                if let (Some(port), Some(path)) = (lines.next(), lines.next()) {
                    return format!("ws://127.0.0.1:{port}{path}");
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("Chromium exited at start ({status}):\n{}", self.log_tail());
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "Chromium did not open its DevTools port within {BROWSER_START_DEADLINE:?}:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.profile.path().join("chromium.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// A new tab (its own window, so it counts as visible) showing the page `http_addr` serves.
    async fn open(&self, name: &'static str, http_addr: &str) -> Page {
        let target =
            self.cdp.call(None, "Target.createTarget", json!({ "url": "about:blank", "newWindow": true })).await;
        let target_id = target["targetId"].as_str().expect("a target id").to_owned();
        let attached =
            self.cdp.call(None, "Target.attachToTarget", json!({ "targetId": target_id, "flatten": true })).await;
        let session = attached["sessionId"].as_str().expect("a session id").to_owned();
        let page = Page { name, session, cdp: self.cdp.clone() };
        for domain in ["Page.enable", "Runtime.enable", "Log.enable"] {
            page.call(domain, json!({})).await;
        }
        page.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": VIEWPORT.0, "height": VIEWPORT.1, "deviceScaleFactor": 1, "mobile": false }),
        )
        .await;
        page.call("Emulation.setFocusEmulationEnabled", json!({ "enabled": true })).await;
        page.call("Page.addScriptToEvaluateOnNewDocument", json!({ "source": FRAME_RECORDER })).await;
        page.call("Page.navigate", json!({ "url": format!("http://{http_addr}/") })).await;
        page.wait_loaded().await;
        page
    }

    async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), self.cdp.try_call(None, "Browser.close", json!({}))).await;
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
    }
}

/// What a page reported on its own: console errors, uncaught exceptions, dialogs.
#[derive(Debug, Clone)]
struct PageReport {
    session: String,
    kind: &'static str,
    text: String,
}

/// A minimal DevTools client: commands answered by id; events kept as reports.
struct Cdp {
    commands: mpsc::UnboundedSender<String>,
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>,
    next_id: Arc<AtomicU64>,
    reports: Arc<Mutex<Vec<PageReport>>>,
}

impl Cdp {
    fn disconnected() -> Self {
        let (commands, _) = mpsc::unbounded_channel();
        Cdp { commands, pending: Arc::default(), next_id: Arc::new(AtomicU64::new(1)), reports: Arc::default() }
    }

    fn start<S>(socket: tokio_tungstenite::WebSocketStream<S>) -> Self
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sink, mut stream) = socket.split();
        let (commands, mut outbound) = mpsc::unbounded_channel::<String>();
        let cdp = Cdp { commands, ..Cdp::disconnected() };
        tokio::spawn(async move {
            while let Some(text) = outbound.recv().await {
                if sink.send(Message::text(text)).await.is_err() {
                    return;
                }
            }
        });
        let (pending, reports, next_id, commands) =
            (cdp.pending.clone(), cdp.reports.clone(), cdp.next_id.clone(), cdp.commands.clone());
        tokio::spawn(async move {
            while let Some(Ok(message)) = stream.next().await {
                let Ok(text) = message.to_text() else { continue };
                let Ok(value) = serde_json::from_str::<Value>(text) else { continue };
                if let Some(id) = value["id"].as_u64() {
                    if let Some(waiter) = lock(&pending).remove(&id) {
                        let _ = waiter.send(value);
                    }
                    continue;
                }
                let session = value["sessionId"].as_str().unwrap_or_default().to_owned();
                let params = &value["params"];
                let report = match value["method"].as_str().unwrap_or_default() {
                    "Runtime.exceptionThrown" => Some(("exception", params["exceptionDetails"].to_string())),
                    "Runtime.consoleAPICalled" if params["type"] == "error" => {
                        Some(("console error", params["args"].to_string()))
                    }
                    "Log.entryAdded" => Some(("log", params["entry"].to_string())),
                    "Page.javascriptDialogOpening" => {
                        // Dismiss it, or the page would hang; the test fails on the report.
                        let id = next_id.fetch_add(1, Ordering::Relaxed);
                        let close = json!({ "id": id, "sessionId": session, "method": "Page.handleJavaScriptDialog",
                                            "params": { "accept": false } });
                        let _ = commands.send(close.to_string());
                        Some(("dialog", params.to_string()))
                    }
                    _ => None,
                };
                if let Some((kind, text)) = report {
                    lock(&reports).push(PageReport { session, kind, text });
                }
            }
        });
        cdp
    }

    /// Run `method`; its `result`, or the error object.
    async fn try_call(&self, session: Option<&str>, method: &str, params: Value) -> Result<Value, Value> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut command = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = session {
            command["sessionId"] = json!(session);
        }
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        if self.commands.send(command.to_string()).is_err() {
            return Err(json!({ "message": "the DevTools connection is closed" }));
        }
        let answer = match tokio::time::timeout(CDP_COMMAND_TIMEOUT, rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => return Err(json!({ "message": "the DevTools connection closed" })),
            Err(_) => {
                lock(&self.pending).remove(&id);
                return Err(json!({ "message": format!("no answer to {method} within {CDP_COMMAND_TIMEOUT:?}") }));
            }
        };
        match answer.get("error") {
            Some(error) => Err(error.clone()),
            None => Ok(answer["result"].clone()),
        }
    }

    async fn call(&self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.try_call(session, method, params).await.unwrap_or_else(|e| panic!("DevTools {method}: {e}"))
    }
}

/// Keeps the page's last WebSocket frames (both ways, each cut to 400 characters) in
/// `window.framesSeen`, for assertions on the wire and to show when a wait fails; it only
/// watches.
const FRAME_RECORDER: &str = r#"
(() => {
  const seen = (window.framesSeen = []);
  const keep = (way, data) => {
    seen.push(`${way} ${String(data).slice(0, 400)}`);
    if (seen.length > 500) seen.shift();
  };
  const send = WebSocket.prototype.send;
  WebSocket.prototype.send = function (data) {
    keep(">", data);
    return send.call(this, data);
  };
  const Native = WebSocket;
  window.WebSocket = class extends Native {
    constructor(...args) {
      super(...args);
      keep("open", args[0]);
      this.addEventListener("message", (event) => keep("<", event.data));
      this.addEventListener("close", (event) => keep("close", event.code));
    }
  };
})();
"#;

/// Helpers every page condition can use, defined once per evaluation.
const PRELUDE: &str = r#"
const q = (id) => document.querySelector(`[data-testid="${id}"]`);
const room = (id) => document.querySelector(`[data-testid="room-entry"][data-room="${id}"]`);
const member = (user) => document.querySelector(`[data-testid="member"][data-user="${user}"]`);
const msg = (id) => document.querySelector(`[data-testid="message-list"] [data-message-id="${id}"]`);
const body = (id) => msg(id)?.querySelector('[data-testid="message-body"]')?.textContent;
const messages = () => [...document.querySelectorAll('[data-testid="message-list"] [data-testid="message"]')];
const visible = (id) => { const e = q(id); return !!e && !e.hidden && e.offsetParent !== null; };
"#;

/// One tab: one user.
struct Page {
    name: &'static str,
    session: String,
    cdp: Arc<Cdp>,
}

impl Page {
    async fn call(&self, method: &str, params: Value) -> Value {
        self.cdp
            .try_call(Some(&self.session), method, params)
            .await
            .unwrap_or_else(|e| panic!("{}: DevTools {method}: {e}", self.name))
    }

    /// Evaluate `expression` (with [`PRELUDE`]) in the page; its value, or the exception.
    async fn try_eval(&self, expression: &str) -> Result<Value, String> {
        let source = format!("(() => {{ {PRELUDE}\n return ({expression}); }})()");
        let params = json!({ "expression": source, "returnByValue": true, "awaitPromise": true });
        let result =
            self.cdp.try_call(Some(&self.session), "Runtime.evaluate", params).await.map_err(|e| e.to_string())?;
        if let Some(exception) = result.get("exceptionDetails") {
            return Err(exception.to_string());
        }
        Ok(result["result"]["value"].clone())
    }

    async fn eval(&self, expression: &str) -> Value {
        self.try_eval(expression).await.unwrap_or_else(|e| panic!("{}: {expression}: {e}", self.name))
    }

    /// Poll `condition` until it is true, or fail after [`WAIT_DEADLINE`] showing the page.
    async fn wait(&self, what: &str, condition: &str) {
        let deadline = tokio::time::Instant::now() + WAIT_DEADLINE;
        loop {
            let last = match self.try_eval(condition).await {
                Ok(Value::Bool(true)) => return,
                other => other,
            };
            if tokio::time::Instant::now() >= deadline {
                let text = self.try_eval("document.body.innerText").await.unwrap_or_default();
                let frames = self.try_eval("window.framesSeen.slice(-40).join('\\n')").await.unwrap_or_default();
                panic!(
                    "{}: timed out waiting for {what} ({condition}); last: {last:?}\npage text:\n{}\n\
                     reports:\n{:#?}\nlast frames:\n{}",
                    self.name,
                    text.as_str().unwrap_or_default(),
                    self.reports(),
                    frames.as_str().unwrap_or_default(),
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    async fn wait_loaded(&self) {
        self.wait("the page to load", "document.readyState === 'complete' && !!q('connection-status')").await;
    }

    async fn wait_visible(&self, id: &str) {
        self.wait(&format!("{id} to show"), &format!("visible({id:?})")).await;
    }

    async fn reload(&self) {
        self.eval("(window.beforeReload = true)").await;
        self.call("Page.reload", json!({})).await;
        self.wait(
            "the reloaded page",
            "!window.beforeReload && document.readyState === 'complete' && !!q('connection-status')",
        )
        .await;
    }

    /// Focus the element with `data-testid` `id` and type `text` as a keyboard would.
    async fn type_into(&self, id: &str, text: &str) {
        self.eval(&format!("(q({id:?}).focus(), document.activeElement === q({id:?}))")).await;
        self.call("Input.insertText", json!({ "text": text })).await;
    }

    async fn clear(&self, id: &str) {
        self.eval(&format!("(q({id:?}).value = '', true)")).await;
    }

    async fn fill_login(&self, user: &str, password: &str) {
        self.clear("login-user").await;
        self.clear("login-password").await;
        self.type_into("login-user", user).await;
        self.type_into("login-password", password).await;
    }

    async fn click(&self, id: &str) {
        let found = self.eval(&format!("(q({id:?})?.click(), !!q({id:?}))")).await;
        assert_eq!(found, json!(true), "{}: no element {id} to click", self.name);
    }

    /// Type `body` into the composer and send it; wait until it shows as a message.
    async fn send(&self, body: &str) {
        self.type_into("composer-input", body).await;
        self.click("composer-send").await;
        self.wait_message(body, self.name).await;
    }

    /// Wait until a message of `author` with `body` shows.
    async fn wait_message(&self, body: &str, author: &str) {
        self.wait(
            &format!("{author}'s message {body:?}"),
            &format!(
                "messages().some((m) => m.dataset.author === {author:?} && \
                 m.querySelector('[data-testid=message-body]').textContent === {})",
                js_string(body)
            ),
        )
        .await;
    }

    /// The id of the (first) message showing `body`.
    async fn message_id(&self, body: &str) -> String {
        let id = self
            .eval(&format!(
                "messages().find((m) => m.querySelector('[data-testid=message-body]').textContent === {})?.dataset.messageId",
                js_string(body)
            ))
            .await;
        id.as_str().unwrap_or_else(|| panic!("{}: no message {body:?}", self.name)).to_owned()
    }

    async fn count_bodies(&self, body: &str) -> u64 {
        let n = self
            .eval(&format!(
                "messages().filter((m) => m.querySelector('[data-testid=message-body]').textContent === {}).length",
                js_string(body)
            ))
            .await;
        n.as_u64().expect("a count")
    }

    /// The ids of the messages shown, in order.
    async fn message_ids(&self) -> Vec<String> {
        let ids = self.eval("messages().map((m) => m.dataset.messageId)").await;
        serde_json::from_value(ids).expect("a list of ids")
    }

    async fn screenshot(&self, path: &Path) {
        let shot = self.call("Page.captureScreenshot", json!({ "format": "png" })).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("screenshot data"))
            .expect("base64 screenshot");
        std::fs::write(path, png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }

    fn reports(&self) -> Vec<PageReport> {
        lock(&self.cdp.reports).iter().filter(|r| r.session == self.session).cloned().collect()
    }

    /// No uncaught exception, no dialog (a script that ran), no Content-Security-Policy
    /// violation (an inline script or style, an outside asset).
    fn assert_clean(&self) {
        let bad: Vec<PageReport> = self
            .reports()
            .into_iter()
            .filter(|r| r.kind == "exception" || r.kind == "dialog" || r.text.contains("Content Security Policy"))
            .collect();
        assert!(bad.is_empty(), "{}: the page reported {bad:#?}", self.name);
    }
}

/// `text` as a JavaScript string literal.
fn js_string(text: &str) -> String {
    serde_json::to_string(text).expect("a string encodes")
}

/// A lock, also after a panic elsewhere (the data is test bookkeeping).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
