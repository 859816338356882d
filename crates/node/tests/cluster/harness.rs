//! `TestCluster`: real `palaver node` processes on loopback ports, each with its own data
//! directory, started, killed (SIGKILL) and restarted by the tests. Every wait is on a
//! condition with a deadline, never a bare sleep.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use palaver_proto::v1::admin_service_client::AdminServiceClient;
use palaver_proto::v1::chat_service_client::ChatServiceClient;
use palaver_proto::v1::{AckLevel, LoginRequest, PostRequest, RegisterRequest, StatusRequest, StatusResponse};
use tokio::process::{Child, Command};
use tonic::transport::Channel;

/// How long any condition may take to become true.
pub const WAIT_DEADLINE: Duration = Duration::from_secs(60);

/// One node process.
pub struct TestNode {
    pub addr: String,
    /// The HTTP address (web page, WebSocket at `/ws`, `/api/v1/`, `/metrics`).
    pub http: String,
    pub dir: PathBuf,
    child: Option<Child>,
}

/// A cluster of node processes.
pub struct TestCluster {
    _root: tempfile::TempDir,
    pub nodes: Vec<TestNode>,
    extra_args: Vec<String>,
}

/// A free loopback port below the kernel's ephemeral range (32768 and up), so that a port a
/// killed node released is not taken as the source port of some other connection before the
/// node restarts on it. Each call in this process gets a different port.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = 12_000 + (std::process::id() % 1_000) * 10;
    loop {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(base + offset % 10_000).expect("below 32768");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

fn spawn(node: &TestNode, bootstrap: &[String], extra: &[String]) -> Child {
    let log = std::fs::File::create(node.dir.with_extension("log")).expect("log file");
    Command::new(env!("CARGO_BIN_EXE_palaver"))
        .arg("node")
        .arg("--data-dir")
        .arg(&node.dir)
        .arg("--grpc-addr")
        .arg(&node.addr)
        .arg("--http-addr")
        .arg(&node.http)
        .args(bootstrap)
        .args(extra)
        .env("RUST_LOG", "info,openraft=warn")
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("spawn palaver node")
}

/// The next event of a subscription, or a failed test after [`WAIT_DEADLINE`] (never a hang).
pub async fn next_event(stream: &mut tonic::Streaming<palaver_proto::v1::RoomEvent>) -> palaver_proto::v1::RoomEvent {
    next_or_end(stream).await.expect("stream healthy").expect("stream open")
}

/// The next item of a subscription (an error or its end included), or a failed test after
/// [`WAIT_DEADLINE`].
pub async fn next_or_end(
    stream: &mut tonic::Streaming<palaver_proto::v1::RoomEvent>,
) -> Result<Option<palaver_proto::v1::RoomEvent>, tonic::Status> {
    tokio::time::timeout(WAIT_DEADLINE, stream.message()).await.expect("an event within the deadline")
}

/// Poll `check` until it returns `Some`, or panic with `what` after [`WAIT_DEADLINE`].
pub async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT_DEADLINE;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl TestCluster {
    /// Start `n` nodes with `shards` data shards and wait until every shard is led and fully
    /// replicated.
    pub async fn start(n: usize, shards: u32, extra_args: &[&str]) -> Self {
        let root = tempfile::tempdir().expect("tempdir");
        let extra_args: Vec<String> = extra_args.iter().map(|s| s.to_string()).collect();
        let mut cluster = TestCluster { nodes: Vec::new(), extra_args, _root: root };
        for i in 0..n {
            let node = TestNode {
                addr: format!("127.0.0.1:{}", free_port()),
                http: format!("127.0.0.1:{}", free_port()),
                dir: cluster._root.path().join(format!("node{}", i + 1)),
                child: None,
            };
            cluster.nodes.push(node);
            let bootstrap = if i == 0 {
                vec!["--init-cluster".into(), "--shards".into(), shards.to_string()]
            } else {
                vec!["--join".into(), cluster.nodes[0].addr.clone()]
            };
            let child = spawn(&cluster.nodes[i], &bootstrap, &cluster.extra_args);
            cluster.nodes[i].child = Some(child);
            if i == 0 {
                cluster.status_from(0).await;
            }
        }
        cluster.wait_replicated(n).await;
        cluster
    }

    /// Start one more node with `bootstrap` arguments (e.g. `--join ADDR`) and wait until it
    /// serves; returns its index.
    pub async fn add_node(&mut self, bootstrap: &[String]) -> usize {
        let i = self.nodes.len();
        let node = TestNode {
            addr: format!("127.0.0.1:{}", free_port()),
            http: format!("127.0.0.1:{}", free_port()),
            dir: self._root.path().join(format!("node{}", i + 1)),
            child: None,
        };
        self.nodes.push(node);
        let child = spawn(&self.nodes[i], bootstrap, &self.extra_args);
        self.nodes[i].child = Some(child);
        self.status_from(i).await;
        i
    }

    /// Index of the node with id `node_id` in `status`.
    pub fn index_of(&self, status: &StatusResponse, node_id: u64) -> usize {
        let addr = &status.nodes.iter().find(|n| n.node_id == node_id).expect("node in status").grpc_addr;
        self.nodes.iter().position(|n| n.addr == *addr).expect("node started by this cluster")
    }

    /// Wait until the cluster has `n` nodes and each shard a leader and min(3, n) voters, the
    /// ones placement names.
    pub async fn wait_replicated(&self, n: usize) {
        let deadline = tokio::time::Instant::now() + WAIT_DEADLINE;
        let mut last = String::from("no node answered");
        loop {
            if let Some(status) = self.status().await {
                // Voters as placement wants them: no replica move still under way.
                let placed = palaver_node::cluster::shard_placed;
                let waiting: Vec<String> = status
                    .shards
                    .iter()
                    .filter(|s| !(s.leader != 0 && s.voters.len() == n.min(3) && placed(s)))
                    .map(|s| {
                        format!(
                            "shard {} leader {} term {} voters {:?} learners {:?} placement {:?}",
                            s.shard, s.leader, s.term, s.voters, s.learners, s.placement
                        )
                    })
                    .collect();
                if status.nodes.len() == n && waiting.is_empty() {
                    return;
                }
                last = format!("{} nodes; not yet placed: {}", status.nodes.len(), waiting.join("; "));
            }
            // The shards still moving, so that a stall says where it is.
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for every shard led and replicated: {last}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Wait until every replica of `shard` (of every shard with `None`) reports its Raft timer
    /// stopped, every voter's among them: the group sleeps.
    pub async fn wait_asleep(&self, shard: Option<u32>) {
        wait_for("the groups to sleep", || async {
            let status = self.status().await?;
            let mut shards = status.shards.iter().filter(|s| shard.is_none_or(|shard| s.shard == shard)).peekable();
            shards.peek()?;
            shards.all(|s| s.replicas.len() >= s.voters.len() && s.replicas.iter().all(|r| r.asleep)).then_some(())
        })
        .await;
    }

    /// The status as any live node reports it.
    pub async fn status(&self) -> Option<StatusResponse> {
        for (i, node) in self.nodes.iter().enumerate() {
            if node.child.is_none() {
                continue;
            }
            if let Ok(Ok(status)) = tokio::time::timeout(Duration::from_secs(5), self.try_status(i)).await {
                return Some(status);
            }
        }
        None
    }

    async fn try_status(&self, i: usize) -> Result<StatusResponse, tonic::Status> {
        let channel = Channel::from_shared(format!("http://{}", self.nodes[i].addr))
            .map_err(|e| tonic::Status::internal(e.to_string()))?
            .connect()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        Ok(AdminServiceClient::new(channel).status(StatusRequest {}).await?.into_inner())
    }

    /// Wait until node `i` serves and return its status; on timeout, show the node's log.
    pub async fn status_from(&self, i: usize) -> StatusResponse {
        let deadline = tokio::time::Instant::now() + WAIT_DEADLINE;
        loop {
            let attempt = tokio::time::timeout(Duration::from_secs(5), self.try_status(i)).await;
            if let Ok(Ok(status)) = attempt {
                return status;
            }
            if tokio::time::Instant::now() >= deadline {
                let log = std::fs::read_to_string(self.nodes[i].dir.with_extension("log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect();
                panic!(
                    "timed out waiting for node {} ({}) to serve: {attempt:?}\n{}",
                    i + 1,
                    self.nodes[i].addr,
                    tail.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A chat client connected (lazily) to node `i`.
    pub fn chat(&self, i: usize) -> ChatServiceClient<Channel> {
        let channel =
            Channel::from_shared(format!("http://{}", self.nodes[i].addr)).expect("valid address").connect_lazy();
        ChatServiceClient::new(channel)
    }

    /// SIGKILL node `i` and reap it.
    pub async fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            child.start_kill().expect("kill");
            let _ = child.wait().await;
        }
    }

    /// SIGTERM node `i` and wait for it to exit.
    pub async fn stop(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            if let Some(pid) = child.id() {
                let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).status().await;
            }
            let _ = tokio::time::timeout(Duration::from_secs(20), child.wait()).await;
            let _ = child.kill().await;
        }
    }

    /// Start node `i` again on its data directory and address.
    pub async fn restart(&mut self, i: usize) {
        assert!(self.nodes[i].child.is_none(), "node {} is still running", i + 1);
        let child = spawn(&self.nodes[i], &[], &self.extra_args);
        self.nodes[i].child = Some(child);
        self.status_from(i).await;
    }

    /// Index of the node that leads `shard`.
    pub async fn leader_of(&self, shard: u32) -> usize {
        wait_for("a leader", || async {
            let status = self.status().await?;
            let leader = status.shards.iter().find(|s| s.shard == shard)?.leader;
            let addr = status.nodes.iter().find(|n| n.node_id == leader)?.grpc_addr.clone();
            self.nodes.iter().position(|n| n.addr == addr && n.child.is_some())
        })
        .await
    }
}

/// Register `user` (password `password-of-<user>`) through `client` and return a login token.
pub async fn user(client: &mut ChatServiceClient<Channel>, user: &str) -> String {
    let password = format!("password-of-{user}");
    client
        .register(RegisterRequest { user: user.into(), password: password.clone() })
        .await
        .unwrap_or_else(|e| panic!("register {user}: {e}"));
    login(client, user).await
}

/// Log `user` in.
pub async fn login(client: &mut ChatServiceClient<Channel>, user: &str) -> String {
    client
        .login(LoginRequest { user: user.into(), password: format!("password-of-{user}") })
        .await
        .unwrap_or_else(|e| panic!("login {user}: {e}"))
        .into_inner()
        .token
}

/// `message` with a bearer token.
pub fn authed<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("ascii token"));
    request
}

/// The stable error code of a failed call.
pub fn code(status: &tonic::Status) -> String {
    status.metadata().get("palaver-error").and_then(|v| v.to_str().ok()).unwrap_or("<none>").to_owned()
}

/// Post `body` to `room` (client message id `cid-<body>`) and return the message id.
pub async fn post(
    client: &mut ChatServiceClient<Channel>,
    token: &str,
    room: &str,
    body: &str,
    ack: AckLevel,
) -> Result<String, tonic::Status> {
    let request = PostRequest {
        room: room.into(),
        body: body.into(),
        client_message_id: format!("cid-{body}"),
        ack: ack as i32,
        seen: None,
    };
    Ok(client.post(authed(request, token)).await?.into_inner().message_id)
}
