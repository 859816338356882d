//! `palaver chat` against real node processes: line mode through pipes, and the full-screen
//! client through a pseudo-terminal whose output a terminal emulator (`vt100`) reads back.
//! Every wait is on a condition (a line printed, text on the screen, a message in a room's
//! history) with a deadline.

use std::io::{Read, Write};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use palaver_proto::v1::chat_service_client::ChatServiceClient;
use palaver_proto::v1::{AckLevel, CreateRoomRequest, HistoryRequest, ListRoomsRequest, Message};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tonic::transport::Channel;

use crate::harness::{TestCluster, WAIT_DEADLINE, authed, post, user, wait_for};

/// One `palaver chat --plain` process: its input, and every line it printed so far.
struct PlainClient {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: tokio::io::Lines<BufReader<ChildStdout>>,
    printed: Vec<String>,
}

impl PlainClient {
    /// Start `palaver chat --plain` for `user` in `room` on `addr`; the password goes through
    /// `PALAVER_PASSWORD`.
    fn spawn(addr: &str, user: &str, room: &str, extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_palaver"))
            .args(["chat", "--plain", "--addr", addr, "--user", user, "--room", room])
            .args(extra)
            .env("PALAVER_PASSWORD", format!("password-of-{user}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn palaver chat --plain");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        Self { child, stdin, stdout, printed: Vec::new() }
    }

    async fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(format!("{line}\n").as_bytes()).await.expect("write a line");
        stdin.flush().await.expect("flush");
    }

    /// Read printed lines until `done` holds for all of them.
    async fn read_until(&mut self, what: &str, done: impl Fn(&[String]) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT_DEADLINE;
        while !done(&self.printed) {
            match tokio::time::timeout_at(deadline, self.stdout.next_line()).await {
                Ok(Ok(Some(line))) => self.printed.push(line),
                Ok(_) => panic!("output ended before {what}; printed: {:#?}", self.printed),
                Err(_) => panic!("timed out waiting for {what}; printed: {:#?}", self.printed),
            }
        }
    }

    /// Close standard input, read the rest of the output, and return the exit status.
    async fn finish(&mut self) -> std::process::ExitStatus {
        drop(self.stdin.take());
        let deadline = tokio::time::Instant::now() + WAIT_DEADLINE;
        loop {
            match tokio::time::timeout_at(deadline, self.stdout.next_line()).await {
                Ok(Ok(Some(line))) => self.printed.push(line),
                Ok(_) => break,
                Err(_) => panic!("timed out waiting for the end of the output: {:#?}", self.printed),
            }
        }
        tokio::time::timeout_at(deadline, self.child.wait()).await.expect("exit within the deadline").expect("wait")
    }

    /// The posts by `author` printed, in order.
    fn posts_by(&self, room: &str, author: &str) -> Vec<String> {
        let prefix = format!("{room} {author}: ");
        self.printed.iter().filter_map(|line| line.strip_prefix(&prefix)).map(str::to_owned).collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_clients_on_two_nodes_see_each_others_posts_once_in_order() {
    let cluster = TestCluster::start(3, 2, &[]).await;
    let mut admin = cluster.chat(0);
    let ada = user(&mut admin, "ada").await;
    admin
        .create_room(authed(CreateRoomRequest { room: "plaza".into(), ..Default::default() }, &ada))
        .await
        .expect("create plaza");
    // bob exists already; olga registers through the client.
    user(&mut cluster.chat(1), "bob").await;

    let mut olga = PlainClient::spawn(&cluster.nodes[0].addr, "olga", "plaza", &["--register"]);
    let mut bob = PlainClient::spawn(&cluster.nodes[1].addr, "bob", "plaza", &[]);
    let olga_says = ["o1 hello", "o2 from node one", "o3 a back\\slash"];
    let bob_says = ["b1 hi", "b2 from node two", "b3 bye"];
    for (o, b) in olga_says.iter().zip(bob_says) {
        olga.send(o).await;
        bob.send(b).await;
    }
    let all_six = |room: &'static str| {
        move |printed: &[String]| {
            let count = |author: &str| printed.iter().filter(|l| l.starts_with(&format!("{room} {author}: "))).count();
            count("olga") >= 3 && count("bob") >= 3
        }
    };
    olga.read_until("olga to see all six posts", all_six("plaza")).await;
    bob.read_until("bob to see all six posts", all_six("plaza")).await;
    assert!(olga.finish().await.success(), "olga exits 0 once her posts came back");
    assert!(bob.finish().await.success(), "bob exits 0 once his posts came back");
    // A backslash is printed doubled: the format escapes bodies to one line.
    let olga_printed = ["o1 hello", "o2 from node one", "o3 a back\\\\slash"];
    for client in [&olga, &bob] {
        assert_eq!(
            client.posts_by("plaza", "olga"),
            olga_printed,
            "olga's posts once each, in order: {:#?}",
            client.printed
        );
        assert_eq!(client.posts_by("plaza", "bob"), bob_says, "bob's posts once each, in order: {:#?}", client.printed);
    }

    // A wrong password: a clear message and a non-zero exit.
    let output = Command::new(env!("CARGO_BIN_EXE_palaver"))
        .args(["chat", "--plain", "--addr", &cluster.nodes[2].addr, "--user", "olga", "--room", "plaza"])
        .args(["--password", "not her password"])
        .stdin(Stdio::null())
        .output();
    let output = tokio::time::timeout(WAIT_DEADLINE, output).await.expect("exit within the deadline").expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("login as olga failed: unauthenticated"), "{stderr}");
}

/// Room "relay" owned by ada, and user bob: ada's client (on node 1) and token.
async fn relay_with_bob(cluster: &TestCluster) -> (ChatServiceClient<Channel>, String) {
    let mut admin = cluster.chat(0);
    let ada = user(&mut admin, "ada").await;
    admin
        .create_room(authed(CreateRoomRequest { room: "relay".into(), ..Default::default() }, &ada))
        .await
        .expect("create relay");
    user(&mut cluster.chat(0), "bob").await;
    (admin, ada)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_client_resubscribes_after_its_node_restarts_and_misses_nothing() {
    let mut cluster = TestCluster::start(3, 2, &[]).await;
    let (mut admin, ada) = relay_with_bob(&cluster).await;
    let mut bob = PlainClient::spawn(&cluster.nodes[2].addr, "bob", "relay", &[]);
    post(&mut admin, &ada, "relay", "before", AckLevel::Quorum).await.expect("post");
    bob.read_until("the first post", |printed| printed.iter().any(|l| l == "relay ada: before")).await;

    // bob's node goes away; posts go on elsewhere; the node comes back.
    cluster.kill(2).await;
    for body in ["during-1", "during-2"] {
        post(&mut admin, &ada, "relay", body, AckLevel::Quorum).await.expect("post while bob's node is down");
    }
    cluster.restart(2).await;
    post(&mut admin, &ada, "relay", "after", AckLevel::Quorum).await.expect("post");
    bob.read_until("every post", |printed| printed.iter().any(|l| l == "relay ada: after")).await;
    assert!(bob.finish().await.success());
    assert_eq!(bob.posts_by("relay", "ada"), ["before", "during-1", "during-2", "after"], "{:#?}", bob.printed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_client_given_two_nodes_moves_to_the_other_when_its_node_dies() {
    let mut cluster = TestCluster::start(3, 2, &[]).await;
    let (mut admin, ada) = relay_with_bob(&cluster).await;
    let addrs = format!("{},{}", cluster.nodes[2].addr, cluster.nodes[1].addr);
    let mut bob = PlainClient::spawn(&addrs, "bob", "relay", &[]);
    post(&mut admin, &ada, "relay", "before", AckLevel::Quorum).await.expect("post");
    bob.read_until("the first post", |printed| printed.iter().any(|l| l == "relay ada: before")).await;

    // One of bob's nodes dies for good; the posts reach him through the other.
    cluster.kill(2).await;
    for body in ["during-1", "during-2", "after"] {
        post(&mut admin, &ada, "relay", body, AckLevel::Quorum).await.expect("post while a node is down");
    }
    bob.read_until("every post", |printed| printed.iter().any(|l| l == "relay ada: after")).await;
    assert!(bob.finish().await.success());
    assert_eq!(bob.posts_by("relay", "ada"), ["before", "during-1", "during-2", "after"], "{:#?}", bob.printed);
}

/// `palaver chat` in a pseudo-terminal, its screen kept by a terminal emulator.
struct Terminal {
    screen: Arc<Mutex<vt100::Parser>>,
    writer: Box<dyn Write + Send>,
    child: Box<dyn portable_pty::Child + Send + Sync>,
}

impl Terminal {
    const ROWS: u16 = 30;
    const COLUMNS: u16 = 100;

    fn spawn(args: &[&str]) -> Self {
        let size = portable_pty::PtySize { rows: Self::ROWS, cols: Self::COLUMNS, pixel_width: 0, pixel_height: 0 };
        let pair = portable_pty::native_pty_system().openpty(size).expect("open a pty");
        let mut command = portable_pty::CommandBuilder::new(env!("CARGO_BIN_EXE_palaver"));
        command.args(args);
        command.env("TERM", "xterm-256color");
        command.env_remove("PALAVER_PASSWORD");
        let child = pair.slave.spawn_command(command).expect("spawn palaver chat in the pty");
        drop(pair.slave);
        let rows = std::num::NonZeroU16::new(Self::ROWS).expect("rows");
        let columns = std::num::NonZeroU16::new(Self::COLUMNS).expect("columns");
        let screen = Arc::new(Mutex::new(vt100::Parser::new(rows, columns, 0)));
        let mut reader = pair.master.try_clone_reader().expect("pty reader");
        let parser = screen.clone();
        // Feeds the emulator until the pty closes (the child exited).
        std::thread::spawn(move || {
            let mut buffer = [0u8; 4096];
            while let Ok(read) = reader.read(&mut buffer) {
                if read == 0 {
                    break;
                }
                parser.lock().expect("screen lock").process(&buffer[..read]);
            }
        });
        let writer = pair.master.take_writer().expect("pty writer");
        // The master stays open as long as the writer and reader do.
        drop(pair.master);
        Self { screen, writer, child }
    }

    fn contents(&self) -> String {
        self.screen.lock().expect("screen lock").screen().contents()
    }

    /// Wait until the screen shows every one of `texts`.
    async fn wait_for_screen(&self, texts: &[&str]) {
        let deadline = tokio::time::Instant::now() + WAIT_DEADLINE;
        loop {
            let contents = self.contents();
            if texts.iter().all(|text| contents.contains(text)) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {texts:?} on the screen:\n{contents}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Type `line` and Enter.
    fn type_line(&mut self, line: &str) {
        self.type_keys(line);
        self.type_keys("\r");
    }

    /// Send raw key bytes.
    fn type_keys(&mut self, keys: &str) {
        self.writer.write_all(keys.as_bytes()).expect("type");
        self.writer.flush().expect("flush");
    }

    /// Wait for the process to exit; its exit code.
    async fn exit_code(&mut self) -> u32 {
        let child = &mut self.child;
        wait_for("palaver chat to exit", || {
            let exited = child.try_wait().expect("try_wait");
            async move { exited.map(|status| status.exit_code()) }
        })
        .await
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
    }
}

/// The room's messages, oldest first, as node `i` answers.
async fn history(cluster: &TestCluster, i: usize, token: &str, room: &str) -> Vec<Message> {
    let request = HistoryRequest { room: room.into(), limit: 100, oldest_first: true, ..Default::default() };
    match cluster.chat(i).history(authed(request, token)).await {
        Ok(page) => page.into_inner().messages,
        Err(_) => Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_full_screen_client_joins_posts_reacts_edits_and_shows_what_others_post() {
    let cluster = TestCluster::start(3, 2, &[]).await;
    let mut admin = cluster.chat(1);
    let ada = user(&mut admin, "ada").await;
    for room in ["lounge", "side"] {
        admin
            .create_room(authed(CreateRoomRequest { room: room.into(), ..Default::default() }, &ada))
            .await
            .expect("create room");
    }
    let tara = user(&mut cluster.chat(0), "tara").await;

    let addr = cluster.nodes[0].addr.clone();
    let mut term = Terminal::spawn(&["chat", "--addr", &addr, "--user", "tara", "--password", "password-of-tara"]);
    term.wait_for_screen(&["Rooms", "tara@", "not joined:", "lounge", "side"]).await;

    // Joining a room that does not exist says so in the status line.
    term.type_line("/join nowhere");
    term.wait_for_screen(&["join nowhere: room_not_found"]).await;

    term.type_line("/join lounge");
    term.wait_for_screen(&["joined lounge", " lounge — tara@"]).await;
    term.type_line("hello from tara");
    let arrived = wait_for("tara's post in ada's history", || async {
        let messages = history(&cluster, 2, &ada, "lounge").await;
        messages.into_iter().find(|m| m.author == "tara" && m.body == "hello from tara")
    })
    .await;
    term.wait_for_screen(&["[1] ", "tara: hello from tara"]).await;

    // Another user's post appears, numbered 2; tara reacts to it and edits her own.
    post(&mut cluster.chat(1), &ada, "lounge", "hi tara, ada here", AckLevel::Quorum).await.expect("ada posts");
    term.wait_for_screen(&["[2] ", "ada: hi tara, ada here"]).await;
    term.type_line("/react 2 +1");
    term.type_line("/edit 1 hello again");
    wait_for("the reaction and the edit in ada's history", || async {
        let messages = history(&cluster, 2, &ada, "lounge").await;
        let reacted = messages
            .iter()
            .any(|m| m.author == "ada" && m.reactions.iter().any(|r| r.reaction == "+1" && r.users == ["tara"]));
        let edited = messages.iter().any(|m| m.message_id == arrived.message_id && m.body == "hello again" && m.edited);
        (reacted && edited).then_some(())
    })
    .await;
    term.wait_for_screen(&["+1 tara", "tara: hello again (edited)"]).await;

    // The subscription sent the whole room: no older page to load. /help lists the commands.
    term.type_line("/history");
    term.wait_for_screen(&["no older messages in lounge"]).await;
    term.type_line("/help");
    term.wait_for_screen(&["Commands (Esc closes):", "/react N EMOJI"]).await;
    term.type_keys("\u{1b}");

    // A message in a room not shown counts as unread there; viewing the room reads it.
    term.type_line("/join side");
    term.wait_for_screen(&["joined side"]).await;
    term.type_line("/room lounge");
    term.wait_for_screen(&["> lounge"]).await;
    post(&mut cluster.chat(2), &ada, "side", "over here", AckLevel::Quorum).await.expect("ada posts in side");
    term.wait_for_screen(&["side (1)"]).await;
    term.type_line("/room side");
    term.wait_for_screen(&["ada: over here"]).await;
    wait_for("side marked read", || async {
        let rooms = cluster.chat(0).list_rooms(authed(ListRoomsRequest {}, &tara)).await.ok()?.into_inner().rooms;
        rooms.iter().any(|r| r.room == "side" && r.my_role != 0 && r.unread_count == 0).then_some(())
    })
    .await;

    term.type_line("/quit");
    assert_eq!(term.exit_code().await, 0, "/quit exits cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_login_form_masks_the_password_and_says_why_a_login_failed() {
    let cluster = TestCluster::start(3, 2, &[]).await;
    let mut admin = cluster.chat(0);
    let tara = user(&mut admin, "tara").await;
    admin
        .create_room(authed(CreateRoomRequest { room: "den".into(), ..Default::default() }, &tara))
        .await
        .expect("create den");

    let mut term = Terminal::spawn(&["chat", "--addr", &cluster.nodes[1].addr, "--user", "tara"]);
    term.wait_for_screen(&["log in to", "User:     tara", "Password: "]).await;
    term.type_line("wrong-password");
    term.wait_for_screen(&["login as tara failed: unauthenticated", "Password: **************"]).await;
    assert!(!term.contents().contains("wrong-password"), "the password is masked");
    // Erase it (Backspace is DEL in a terminal) and type the right one.
    term.type_keys(&"\u{7f}".repeat("wrong-password".len()));
    term.type_line("password-of-tara");
    term.wait_for_screen(&["> den", "tara@"]).await;
    term.type_keys("\u{3}");
    assert_eq!(term.exit_code().await, 0, "Ctrl-C exits cleanly");
}
