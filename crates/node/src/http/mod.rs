//! The HTTP surface of a node (`--http-addr`): the web page, the WebSocket gateway
//! ([`ws`]), the HTTP/JSON API under `/api/v1/` with its OpenAPI document ([`api`]),
//! `/healthz`, `/readyz` and `/metrics`. Like the gRPC services, every route is a thin adapter
//! over [`crate::dispatch`]: JSON ([`json`]) in, protobuf to dispatch, JSON out, errors as
//! [`json::ErrorBody`] with the same codes as gRPC's `palaver-error`.

pub mod api;
pub mod json;
pub mod ws;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::error::ApiError;
pub use crate::limits::{AddressSlot, PerAddress};
use crate::node::NodeInner;
use crate::ops::Ops;

/// Largest WebSocket frame or HTTP body a node reads as a request; larger ones get a
/// `too_large` error (a message body of 16 KiB fits even when every character is escaped).
pub const REQUEST_BYTES_MAX: usize = 128 * 1024;
/// Default for [`HttpOptions::connections_per_address`].
pub const CONNECTIONS_PER_ADDRESS_DEFAULT: usize = 1_024;

const INDEX_HTML: &str = include_str!("../../web/index.html");
const APP_JS: &str = include_str!("../../web/app.js");
const STYLE_CSS: &str = include_str!("../../web/style.css");

/// Settings of the HTTP surface.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// Where to listen (`host:port`; port 0 picks one).
    pub listen: String,
    /// Origins (`scheme://host:port`) besides the node's own whose pages may open a
    /// WebSocket; `*` allows any.
    pub allowed_origins: Vec<String>,
    /// Most WebSocket connections open at once from one IP address.
    pub connections_per_address: usize,
}

impl HttpOptions {
    /// Listen on `listen` with the default limits.
    pub fn new(listen: impl Into<String>) -> Self {
        Self {
            listen: listen.into(),
            allowed_origins: Vec::new(),
            connections_per_address: CONNECTIONS_PER_ADDRESS_DEFAULT,
        }
    }
}

/// What every route handler gets.
#[derive(Debug, Clone)]
pub struct Gateway {
    node: Arc<NodeInner>,
    ops: Ops,
    options: Arc<HttpOptions>,
    per_address: PerAddress,
    stopped: watch::Receiver<bool>,
}

impl Gateway {
    /// Take a connection slot for `ip`, or refuse past the limit.
    fn address_slot(&self, ip: IpAddr) -> Result<AddressSlot, ApiError> {
        self.per_address.take(ip)
    }

    /// Whether a page from `origin` may open a WebSocket on this node, reached as `host`: the
    /// node's own page, the page of any node of the cluster (a page moves to another node
    /// when its own dies), or an origin allowed with `--allow-origin`.
    fn origin_allowed(&self, origin: Option<&str>, host: Option<&str>) -> bool {
        let Some(origin) = origin else { return true }; // not a browser
        let cluster = crate::directory::http_addrs(&self.node).into_iter().map(|(_, addr)| addr);
        origin_allowed(origin, host, cluster, &self.options.allowed_origins)
    }
}

/// Whether a page from `origin` may open a WebSocket on a node reached as `host`, in a cluster
/// whose nodes serve pages at `cluster_http_addrs`, with `--allow-origin` values `allowed`
/// (`*`: any). An origin matches an address only exactly (`http://` or `https://`, then the
/// same `host:port`); anything else, `null` included, is refused.
fn origin_allowed(
    origin: &str,
    host: Option<&str>,
    cluster_http_addrs: impl IntoIterator<Item = String>,
    allowed: &[String],
) -> bool {
    if allowed.iter().any(|allowed| allowed == "*" || allowed == origin) {
        return true;
    }
    let Some(origin_host) = origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://")) else {
        return false;
    };
    host == Some(origin_host) || cluster_http_addrs.into_iter().any(|addr| addr == origin_host)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::json!({ "error": json::ErrorBody::from(&self) });
        let mut response = (status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        if let Ok(code) = HeaderValue::from_str(self.code()) {
            headers.insert(crate::error::ERROR_CODE_METADATA_KEY, code);
        }
        if let ApiError::RateLimited { retry_after_ms } = self {
            if let Ok(seconds) = HeaderValue::from_str(&retry_after_ms.div_ceil(1_000).max(1).to_string()) {
                headers.insert(header::RETRY_AFTER, seconds);
            }
            if let Ok(ms) = HeaderValue::from_str(&retry_after_ms.to_string()) {
                headers.insert(crate::error::RETRY_AFTER_METADATA_KEY, ms);
            }
        }
        response
    }
}

/// The routes of the HTTP surface.
pub fn router(gateway: Gateway) -> Router {
    Router::new()
        .route("/", get(|| async { static_asset("text/html; charset=utf-8", INDEX_HTML) }))
        .route("/app.js", get(|| async { static_asset("text/javascript; charset=utf-8", APP_JS) }))
        .route("/style.css", get(|| async { static_asset("text/css; charset=utf-8", STYLE_CSS) }))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/ws", get(ws::upgrade))
        .nest("/api/v1", api::routes())
        .fallback(|| async { ApiError::Malformed("no such route".into()).with_status(StatusCode::NOT_FOUND) })
        .layer(axum::extract::DefaultBodyLimit::max(REQUEST_BYTES_MAX))
        .with_state(gateway)
}

impl ApiError {
    /// This error's response with another HTTP status.
    fn with_status(self, status: StatusCode) -> Response {
        let mut response = self.into_response();
        *response.status_mut() = status;
        response
    }
}

fn static_asset(content_type: &'static str, body: &'static str) -> Response {
    let headers = [
        (header::CONTENT_TYPE, content_type),
        (header::CACHE_CONTROL, "no-cache"),
        // The page loads nothing from elsewhere and runs no inline script.
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; style-src 'self'; script-src 'self'",
        ),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    ];
    (headers, body).into_response()
}

async fn metrics(State(gateway): State<Gateway>) -> Response {
    let text = gateway.node.metrics.render(&gateway.node);
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text).into_response()
}

/// Ready: the node belongs to a cluster and every shard it holds a replica of has a leader.
async fn readyz(State(gateway): State<Gateway>) -> Response {
    let node = &gateway.node;
    let joined = node.view().info.is_some();
    let mut leaderless = Vec::new();
    for replica in node.replicas.all() {
        let leader = {
            let metrics = replica.raft.metrics();
            openraft::async_runtime::WatchReceiver::borrow_watched(&metrics).current_leader
        };
        if leader.is_none() {
            leaderless.push(replica.shard.0);
        }
    }
    let ready = joined && leaderless.is_empty();
    let body = serde_json::json!({
        "ready": ready,
        "node": node.id.0,
        "joined": joined,
        "shards_without_leader": leaderless,
    });
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, axum::Json(body)).into_response()
}

/// The `Host` header of a request.
fn host(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::HOST).and_then(|v| v.to_str().ok())
}

/// The bearer token of a request, if any.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
}

/// Serve the HTTP surface on `listener` until `stopped` turns true.
pub async fn serve(node: Arc<NodeInner>, listener: TcpListener, options: HttpOptions, stopped: watch::Receiver<bool>) {
    let gateway = Gateway {
        ops: Ops::new(node.clone()),
        node,
        per_address: PerAddress::new(options.connections_per_address),
        options: Arc::new(options),
        stopped: stopped.clone(),
    };
    let app = router(gateway).into_make_service_with_connect_info::<SocketAddr>();
    let mut stopping = stopped;
    // Without TCP_NODELAY a small frame written after another (an answer after an event) waits
    // for the client's delayed ACK, ~40 ms.
    let listener = axum::serve::ListenerExt::tap_io(listener, |socket: &mut tokio::net::TcpStream| {
        if let Err(e) = socket.set_nodelay(true) {
            tracing::warn!(error = %e, "could not set TCP_NODELAY");
        }
    });
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stopping.wait_for(|stop| *stop).await;
        })
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "HTTP server failed");
    }
}

#[cfg(test)]
mod tests {
    use super::origin_allowed;

    fn cluster() -> Vec<String> {
        vec!["127.0.0.1:8081".into(), "127.0.0.1:8082".into(), "chat.example:443".into()]
    }

    #[test]
    fn pages_of_the_node_and_of_its_cluster_may_connect() {
        let host = Some("127.0.0.1:8081");
        let cases = [
            ("http://127.0.0.1:8081", true, "the node's own page"),
            ("https://127.0.0.1:8081", true, "the node's own page over TLS"),
            ("http://127.0.0.1:8082", true, "another node's page (failover)"),
            ("https://chat.example:443", true, "another node's page under its advertised name"),
            ("http://127.0.0.1:8083", false, "a port no node serves"),
            ("http://127.0.0.1", false, "no port"),
            ("http://127.0.0.1:80812", false, "a longer port"),
            ("http://evil.example", false, "an unknown site"),
            ("http://127.0.0.1:8082.evil.example", false, "a node's address as a prefix"),
            ("ws://127.0.0.1:8082", false, "not a page's scheme"),
            ("null", false, "an opaque origin"),
            ("", false, "an empty origin"),
        ];
        for (origin, want, what) in cases {
            assert_eq!(origin_allowed(origin, host, cluster(), &[]), want, "{what}: {origin}");
        }
    }

    #[test]
    fn the_host_header_names_the_node_when_the_cluster_is_not_known_yet() {
        assert!(origin_allowed("http://localhost:9000", Some("localhost:9000"), Vec::new(), &[]));
        assert!(!origin_allowed("http://localhost:9000", Some("localhost:9001"), Vec::new(), &[]));
        assert!(!origin_allowed("http://localhost:9000", None, Vec::new(), &[]));
    }

    #[test]
    fn allow_origin_adds_origins_and_star_allows_any() {
        let allowed = vec!["https://app.example".to_owned()];
        assert!(origin_allowed("https://app.example", None, cluster(), &allowed));
        assert!(!origin_allowed("https://other.example", None, cluster(), &allowed));
        assert!(origin_allowed("https://other.example", None, cluster(), &["*".to_owned()]));
        assert!(origin_allowed("null", None, Vec::new(), &["*".to_owned()]));
    }
}
