//! A node started in-process on the in-memory engine with an injected clock: the seams the
//! simulator uses, and the way to test token expiry without waiting a day.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use palaver_node::{Bootstrap, Clock, Node, NodeConfig, NodeEnv, SharedRng, TcpDialer};
use palaver_proto::v1::chat_service_client::ChatServiceClient;
use palaver_proto::v1::{CreateRoomRequest, RoomRequest};
use palaver_shard::{MemEngine, ReplicaOptions};

use crate::harness::{authed, code, user};

#[derive(Debug)]
struct ManualClock(AtomicU64);

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_is_refused_and_a_fresh_login_works() {
    let clock = Arc::new(ManualClock(AtomicU64::new(1_700_000_000_000)));
    let env = NodeEnv { clock: clock.clone(), dialer: Arc::new(TcpDialer), rng: SharedRng::seeded(7) };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let config = NodeConfig {
        data_dir: std::env::temp_dir(),
        advertise_addr: addr.clone(),
        bootstrap: Bootstrap::InitCluster { shard_count: 2 },
        replica: ReplicaOptions::default(),
        p2p_listen: None,
        http: None,
        grpc_connections_per_address: palaver_node::connections::GRPC_CONNECTIONS_PER_ADDRESS_DEFAULT,
    };
    let node = Node::start(config, env, Arc::new(MemEngine::new()), listener).await.expect("start");
    let mut client = ChatServiceClient::connect(format!("http://{addr}")).await.expect("connect");
    let token = user(&mut client, "olga").await;
    client
        .create_room(authed(CreateRoomRequest { room: "clock".into(), ..Default::default() }, &token))
        .await
        .expect("fresh token works");

    clock.0.fetch_add(palaver_node::auth::TOKEN_TTL_MS, Ordering::SeqCst);
    let expired = client.get_room(authed(RoomRequest { room: "clock".into() }, &token)).await.expect_err("expired");
    assert_eq!(code(&expired), "unauthenticated");
    assert!(expired.message().contains("expired"), "{expired:?}");

    let fresh = crate::harness::login(&mut client, "olga").await;
    client.get_room(authed(RoomRequest { room: "clock".into() }, &fresh)).await.expect("new token works");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_of_another_key_layout_is_refused_before_anything_reads_it() {
    use palaver_shard::{Cf, KvEngine, StorageError, WriteBatch};
    // Data written before layouts were recorded (a room event, no layout record): layout 1.
    let engine = Arc::new(MemEngine::new());
    let mut batch = WriteBatch::new();
    batch.put(Cf::RoomEvents, vec![0, 0, 0, 1, 4, b'r', b'o', b'o', b'm'], vec![1]);
    engine.write(batch).expect("write");
    let env = NodeEnv::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let config = NodeConfig {
        data_dir: std::env::temp_dir(),
        advertise_addr: listener.local_addr().expect("addr").to_string(),
        bootstrap: Bootstrap::InitCluster { shard_count: 2 },
        replica: ReplicaOptions::default(),
        p2p_listen: None,
        http: None,
        grpc_connections_per_address: palaver_node::connections::GRPC_CONNECTIONS_PER_ADDRESS_DEFAULT,
    };
    let Err(refused) = Node::start(config, env, engine.clone(), listener).await else {
        panic!("a node started on data of key layout 1");
    };
    assert!(
        matches!(
            refused,
            palaver_node::NodeError::Storage(StorageError::Layout { found: 1, expected: palaver_shard::keys::LAYOUT })
        ),
        "{refused}"
    );
    assert!(refused.to_string().contains("key layout 1"), "{refused}");
    assert_eq!(engine.get(Cf::Node, palaver_shard::keys::LAYOUT_KEY).expect("get"), None, "nothing written");
}
