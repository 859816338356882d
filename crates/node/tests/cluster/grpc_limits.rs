//! Limits of the gRPC surface: connections per client address and subscriptions per
//! connection, each refused with the typed `limit_reached`.

use palaver_node::connections::GRPC_SUBSCRIPTIONS_PER_CONNECTION_MAX;
use palaver_proto::v1::chat_service_client::ChatServiceClient;
use palaver_proto::v1::{CreateRoomRequest, LoginRequest, SubscribeRequest};
use tonic::transport::Channel;

use crate::harness::{TestCluster, authed, code, user, wait_for};

/// A new TCP connection to `addr` (a channel of its own).
async fn connection(addr: &str) -> ChatServiceClient<Channel> {
    let channel = Channel::from_shared(format!("http://{addr}")).expect("address").connect().await.expect("connect");
    ChatServiceClient::new(channel)
}

/// What a call on `client` answers: a login of a user that does not exist, cheap for the node.
async fn answer(client: &mut ChatServiceClient<Channel>) -> String {
    let request = LoginRequest { user: "nobody".into(), password: "not-a-password".into() };
    match client.login(request).await {
        Ok(_) => "ok".into(),
        Err(status) => code(&status),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_per_address_limit_are_refused_with_limit_reached() {
    const LIMIT: usize = 6;
    let cluster = TestCluster::start(1, 2, &["--grpc-connections-per-address", "6"]).await;
    let addr = cluster.nodes[0].addr.clone();
    // Open connections until the node refuses one; the harness and the node itself may hold
    // some of the address's slots, so the first refusal comes at LIMIT or before.
    let mut open = Vec::new();
    let refused = loop {
        let mut client = connection(&addr).await;
        let answer = answer(&mut client).await;
        if answer != "unauthenticated" {
            break answer;
        }
        open.push(client);
        assert!(open.len() <= LIMIT, "{} connections were served; the limit is {LIMIT}", open.len());
    };
    assert_eq!(refused, "limit_reached");
    // The connections served before still are.
    assert_eq!(answer(&mut open[0]).await, "unauthenticated");
    // Closing one gives its place back.
    open.pop();
    wait_for("a slot to free", || {
        let addr = addr.clone();
        async move {
            let mut client = connection(&addr).await;
            (answer(&mut client).await == "unauthenticated").then_some(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_past_the_per_connection_limit_are_refused_with_limit_reached() {
    let cluster = TestCluster::start(1, 2, &[]).await;
    let mut client = cluster.chat(0);
    let ada = user(&mut client, "ada").await;
    let room = CreateRoomRequest { room: "busy".into(), ..Default::default() };
    client.create_room(authed(room, &ada)).await.expect("create");
    let subscribe = || SubscribeRequest { room: "busy".into(), version_vector: None };
    let mut streams = Vec::new();
    for _ in 0..GRPC_SUBSCRIPTIONS_PER_CONNECTION_MAX {
        streams.push(client.subscribe(authed(subscribe(), &ada)).await.expect("within the limit").into_inner());
    }
    let refused = client.subscribe(authed(subscribe(), &ada)).await.expect_err("past the limit");
    assert_eq!(code(&refused), "limit_reached");
    // Another connection has its own count.
    let mut other = connection(&cluster.nodes[0].addr).await;
    other.subscribe(authed(subscribe(), &ada)).await.expect("another connection");
    // A subscription that ends gives its place back.
    streams.pop();
    wait_for("a subscription slot to free", || {
        let mut client = client.clone();
        let ada = ada.clone();
        async move { client.subscribe(authed(subscribe(), &ada)).await.ok().map(|_| ()) }
    })
    .await;
}
