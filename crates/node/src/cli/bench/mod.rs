//! `palaver bench`: load generators against a 3-node loopback cluster, which the bench starts
//! in a temporary directory (fsync on) unless `--addr` names the nodes of a running one.
//!
//! - `raft`: consensus writes (room joins and leaves), commits/s and latency.
//! - `posts`: CRDT-plane posts into many rooms while subscribers receive: posts/s, ack latency,
//!   delivery latency, and every acknowledged post checked off at every subscriber.
//! - `ws`: many WebSocket clients: memory per idle connection, delivery latency with them
//!   open, and a chat-shaped load (rooms of a few subscribers, all posting), every
//!   acknowledged post checked off at every subscriber.
//! - `idle`: a cluster nobody uses: CPU per node, and how many Raft replicas sleep.

mod idle;
mod posts;
mod raft;
mod ws;

use std::time::Duration;

use clap::{Args, Subcommand};
use palaver_proto::v1::chat_service_client::ChatServiceClient;
use palaver_proto::v1::{
    LoginRequest, PipelineReply, PipelineRequest, RegisterRequest, pipeline_reply, pipeline_request,
};
use tokio::sync::mpsc;
use tonic::transport::Channel;

use super::up::{self, NodeProcess};

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Consensus writes: membership changes through the shards' Raft groups.
    Raft(raft::RaftBenchArgs),
    /// CRDT writes: posts into many rooms, acknowledged at quorum, while subscribers receive.
    Posts(posts::PostsBenchArgs),
    /// WebSocket clients: idle connections' memory, delivery latency, a chat-shaped load.
    Ws(ws::WsBenchArgs),
    /// An idle cluster: CPU per node with no client, and how many Raft replicas sleep.
    Idle(idle::IdleBenchArgs),
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.command {
        BenchCommand::Raft(args) => raft::run(args).await,
        BenchCommand::Posts(args) => posts::run(args).await,
        BenchCommand::Ws(args) => ws::run(args).await,
        BenchCommand::Idle(args) => idle::run(args).await,
    }
}

/// Which cluster a bench drives.
#[derive(Debug, Args)]
struct ClusterArgs {
    /// Use the running cluster of the node at this address (repeat for each node) instead of
    /// starting one.
    #[arg(long)]
    addr: Vec<String>,
    /// Data shards of the cluster the bench starts.
    #[arg(long, default_value_t = 64)]
    shards: u32,
    /// Nodes of the cluster the bench starts.
    #[arg(long, default_value_t = 3)]
    nodes: u16,
}

/// The cluster under test: its nodes' addresses, and the processes if the bench started them.
struct Cluster {
    addrs: Vec<String>,
    /// Every node's HTTP address that serves one: of the started nodes, or with `--addr` as
    /// the cluster's status reports them.
    http_addrs: Vec<String>,
    processes: Vec<NodeProcess>,
    /// How the bench started the nodes, and their data, if it did.
    started: Option<(up::Layout, tempfile::TempDir)>,
}

impl Cluster {
    /// The running cluster named by `--addr`, or a fresh one (`--nodes`) on ports from
    /// `base_port`.
    async fn open(args: &ClusterArgs, base_port: u16) -> anyhow::Result<Self> {
        Self::open_with(args, base_port, None, Vec::new()).await
    }

    /// Like [`Cluster::open`]; a fresh cluster also serves HTTP on ports from `http_base_port`
    /// (if given) and its nodes get `extra_args`.
    async fn open_with(
        args: &ClusterArgs,
        base_port: u16,
        http_base_port: Option<u16>,
        extra_args: Vec<String>,
    ) -> anyhow::Result<Self> {
        if !args.addr.is_empty() {
            let http_addrs = reported_http_addrs(&args.addr).await;
            return Ok(Self { addrs: args.addr.clone(), http_addrs, processes: Vec::new(), started: None });
        }
        let dir = tempfile::tempdir()?;
        println!(
            "starting a {}-node cluster ({} shards, fsync on) in {}",
            args.nodes,
            args.shards,
            dir.path().display()
        );
        let layout = up::Layout { nodes: args.nodes, shards: args.shards, base_port, http_base_port, extra_args };
        let processes = up::start_cluster(dir.path(), &layout, true).await?;
        let addrs: Vec<String> = processes.iter().map(|p| p.addr.clone()).collect();
        up::wait_ready(&addrs[0], usize::from(args.nodes), true).await?;
        let http_addrs = processes.iter().filter_map(|p| p.http.clone()).collect();
        Ok(Self { addrs, http_addrs, processes, started: Some((layout, dir)) })
    }

    /// Stop the nodes the bench started and start them again on their data; nothing with
    /// `--addr`.
    async fn restart(&mut self) -> anyhow::Result<()> {
        let Some((layout, dir)) = &self.started else { return Ok(()) };
        up::stop_all(&mut self.processes).await;
        self.processes = up::start_cluster(dir.path(), layout, true).await?;
        up::wait_ready(&self.addrs[0], self.processes.len(), true).await
    }

    /// A lazily connected channel to each node.
    fn channels(&self) -> anyhow::Result<Vec<Channel>> {
        Ok(self
            .addrs
            .iter()
            .map(|a| Channel::from_shared(format!("http://{a}")).map(|e| e.connect_lazy()))
            .collect::<Result<_, _>>()?)
    }

    /// CPU time the nodes the bench started have used so far (user and system, every thread),
    /// in seconds; `None` with `--addr` or when `/proc` cannot tell.
    fn nodes_cpu_seconds(&self) -> Option<f64> {
        if self.processes.is_empty() {
            return None;
        }
        self.processes.iter().map(|p| cpu_seconds(&p.child.id()?.to_string())).sum()
    }

    async fn stop(mut self) {
        up::stop_all(&mut self.processes).await;
    }
}

fn authed<T>(message: T, token: &str) -> anyhow::Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse()?);
    Ok(request)
}

/// [`authed`], failing as a status (for [`setup_call`]).
fn authed_status<T>(message: T, token: &str) -> Result<tonic::Request<T>, tonic::Status> {
    authed(message, token).map_err(|e| tonic::Status::invalid_argument(e.to_string()))
}

/// Register `user` (if new) and log in: its token.
async fn login(client: &mut ChatServiceClient<Channel>, user: &str) -> anyhow::Result<String> {
    let password = "bench-password".to_string();
    let register = RegisterRequest { user: user.into(), password: password.clone() };
    // Registered already (a rerun on the same cluster) is fine.
    let _ = setup_call("register", || {
        let (mut client, request) = (client.clone(), register.clone());
        async move { client.register(request).await }
    })
    .await;
    let request = LoginRequest { user: user.into(), password };
    let reply = setup_call("login", || {
        let (mut client, request) = (client.clone(), request.clone());
        async move { client.login(request).await }
    })
    .await?;
    Ok(reply.into_inner().token)
}

/// Most attempts of one setup call.
pub const SETUP_ATTEMPTS: u32 = 8;

/// A setup call, tried again (after 100 ms, doubling up to 2 s) while the cluster answers that
/// it cannot serve it just now: `unavailable` (a shard between leaders, a lease lapsed under
/// load) or `resource_exhausted` (the password-hashing queue is full). Other errors end it.
async fn setup_call<T, F, Fut>(what: &str, call: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    retry_while_busy(what, Duration::from_millis(100), call).await
}

/// [`setup_call`] with the first wait given.
async fn retry_while_busy<T, F, Fut>(what: &str, first_wait: Duration, mut call: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let mut wait = first_wait;
    let mut attempt = 1;
    loop {
        match call().await {
            Ok(value) => return Ok(value),
            Err(status)
                if attempt < SETUP_ATTEMPTS
                    && matches!(status.code(), tonic::Code::Unavailable | tonic::Code::ResourceExhausted) =>
            {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
                attempt += 1;
            }
            Err(status) => anyhow::bail!("{what}: {} ({:?})", status.message(), status.code()),
        }
    }
}

/// CPU time process `pid` (or `self`) has used, user and system, every thread, in seconds.
fn cpu_seconds(pid: &str) -> Option<f64> {
    /// The unit of `/proc/*/stat` times (`USER_HZ`): 100 on every Linux ABI.
    const TICKS_PER_SECOND: f64 = 100.0;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces, inside parentheses): state is
    // the first, utime the 12th, stime the 13th.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some((user + system) as f64 / TICKS_PER_SECOND)
}

/// CPU time used from [`CpuMeter::start`] on, by the nodes the bench started and by the bench.
struct CpuMeter {
    nodes: Option<f64>,
    bench: Option<f64>,
}

impl CpuMeter {
    fn start(cluster: &Cluster) -> Self {
        Self { nodes: cluster.nodes_cpu_seconds(), bench: cpu_seconds("self") }
    }

    /// Microseconds of CPU per unit of `work` since the start, the nodes' then the bench's,
    /// as printed (`-` when unknown).
    fn per(&self, cluster: &Cluster, work: usize) -> [String; 2] {
        let per = |before: Option<f64>, after: Option<f64>| match (before, after) {
            (Some(before), Some(after)) if work > 0 => format!("{:.0}", (after - before) * 1e6 / work as f64),
            _ => "-".to_owned(),
        };
        [per(self.nodes, cluster.nodes_cpu_seconds()), per(self.bench, cpu_seconds("self"))]
    }
}

/// The WAL fsyncs of the cluster's nodes, from their `/metrics`, from [`WalMeter::start`] on:
/// how well the nodes' writes batched into fsyncs.
struct WalMeter {
    /// Fsyncs and the waiters they covered, summed over the nodes, at the start.
    start: Option<(f64, f64)>,
}

impl WalMeter {
    async fn start(cluster: &Cluster) -> Self {
        Self { start: cluster.wal_totals().await }
    }

    /// Fsyncs per unit of `work` and writes covered per fsync since the start, as printed
    /// (`-` when unknown: a node without HTTP, or one that did not answer).
    async fn per(&self, cluster: &Cluster, work: usize) -> [String; 2] {
        match (self.start, cluster.wal_totals().await) {
            (Some((fsyncs0, waiters0)), Some((fsyncs1, waiters1))) if work > 0 && fsyncs1 > fsyncs0 => {
                let fsyncs = fsyncs1 - fsyncs0;
                [format!("{:.2}", fsyncs / work as f64), format!("{:.1}", (waiters1 - waiters0) / fsyncs)]
            }
            _ => ["-".to_owned(), "-".to_owned()],
        }
    }
}

/// The HTTP addresses of a running cluster's nodes, from the status of the first of `addrs`
/// that answers; empty if none does (the bench then prints no WAL columns).
async fn reported_http_addrs(addrs: &[String]) -> Vec<String> {
    for addr in addrs {
        let status = tokio::time::timeout(Duration::from_secs(5), crate::cli::admin::fetch_status(addr)).await;
        if let Ok(Ok(status)) = status {
            return status.nodes.into_iter().map(|n| n.http_addr).filter(|a| !a.is_empty()).collect();
        }
    }
    Vec::new()
}

impl Cluster {
    /// WAL fsyncs and the waiters they covered so far, summed over the nodes' `/metrics`
    /// (`None` if no node serves HTTP, or if one's `/metrics` cannot be read).
    async fn wal_totals(&self) -> Option<(f64, f64)> {
        if self.http_addrs.is_empty() {
            return None;
        }
        let mut totals = (0.0, 0.0);
        for http in &self.http_addrs {
            let text = tokio::time::timeout(Duration::from_secs(2), get_metrics(http)).await.ok()??;
            totals.0 += metric_value(&text, "palaver_wal_fsyncs_total")?;
            totals.1 += metric_value(&text, "palaver_wal_fsync_waiters_total")?;
        }
        Some(totals)
    }
}

/// `GET /metrics` from the node at `addr`, as HTTP/1.0 (one request, a plain body, closed).
async fn get_metrics(addr: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.ok()?;
    let response = String::from_utf8(response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let ok = ["HTTP/1.0 200", "HTTP/1.1 200"].iter().any(|status| head.starts_with(status));
    ok.then(|| body.to_owned())
}

/// The value of the unlabelled sample `name` in a Prometheus text exposition.
fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The median of `values`; `None` if there are none.
fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

/// The `p` quantile (0..=1) of sorted durations, in milliseconds.
fn quantile_ms(sorted: &[Duration], p: f64) -> f64 {
    let index = ((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1));
    sorted.get(index).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// A client's `Pipeline` stream, used with one request in flight at a time.
struct Pipeline {
    requests: mpsc::Sender<PipelineRequest>,
    replies: tonic::Streaming<PipelineReply>,
    next_id: u64,
}

impl Pipeline {
    /// Open a stream on `client` for the user of `token`.
    async fn open(mut client: ChatServiceClient<Channel>, token: &str) -> anyhow::Result<Self> {
        let (requests, outgoing) = mpsc::channel(4);
        let stream = tokio_stream::wrappers::ReceiverStream::new(outgoing);
        let replies = client.pipeline(authed(stream, token)?).await?.into_inner();
        Ok(Self { requests, replies, next_id: 0 })
    }

    /// Send `op` and wait for its reply; a broken stream comes back as its text.
    async fn call(&mut self, op: pipeline_request::Op) -> Result<pipeline_reply::Result, String> {
        self.next_id += 1;
        self.requests
            .send(PipelineRequest { id: self.next_id, op: Some(op) })
            .await
            .map_err(|_| "pipeline closed".to_string())?;
        loop {
            let reply = self
                .replies
                .message()
                .await
                .map_err(|status| format!("{}: {}", status.code(), status.message()))?
                .ok_or("pipeline ended")?;
            if reply.id == self.next_id {
                return reply.result.ok_or_else(|| "empty reply".into());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlabelled_samples_are_read_by_their_exact_name() {
        let text = "# TYPE palaver_wal_fsyncs counter\npalaver_wal_fsyncs_total 154\n\
                    palaver_wal_fsyncs_total_x 9\npalaver_wal_fsync_waiters_total 394.5\n";
        assert_eq!(metric_value(text, "palaver_wal_fsyncs_total"), Some(154.0));
        assert_eq!(metric_value(text, "palaver_wal_fsync_waiters_total"), Some(394.5));
        assert_eq!(metric_value(text, "palaver_wal_fsync"), None);
        assert_eq!(metric_value("palaver_wal_fsyncs_total nan?\n", "palaver_wal_fsyncs_total"), None);
    }

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }

    /// Calls to a fake that answers `codes` in turn, then `Ok(())`.
    async fn calls_until_done(codes: &[tonic::Code]) -> (anyhow::Result<()>, usize) {
        let calls = std::sync::atomic::AtomicUsize::new(0);
        let result = retry_while_busy("call", Duration::from_millis(1), || {
            let n = calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let answer = codes.get(n).map_or(Ok(()), |code| Err(tonic::Status::new(*code, "no")));
            async move { answer }
        })
        .await;
        (result, calls.load(std::sync::atomic::Ordering::Relaxed))
    }

    #[tokio::test]
    async fn setup_calls_retry_only_while_the_cluster_is_busy() {
        use tonic::Code::{PermissionDenied, ResourceExhausted, Unavailable};
        let (result, calls) = calls_until_done(&[Unavailable, ResourceExhausted]).await;
        assert!(result.is_ok());
        assert_eq!(calls, 3);
        let (result, calls) = calls_until_done(&[PermissionDenied]).await;
        assert!(result.is_err(), "a refusal is not retried");
        assert_eq!(calls, 1);
        let (result, calls) = calls_until_done(&[Unavailable; 20]).await;
        assert!(result.is_err(), "it gives up");
        assert_eq!(calls, SETUP_ATTEMPTS as usize);
    }
}
