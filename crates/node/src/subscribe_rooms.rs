//! `ChatService.SubscribeRooms`: a client's subscriptions to many rooms on one stream.
//!
//! A chat client follows every room it is in. With one `Subscribe` stream per room, every
//! event crossed as its own HTTP/2 message on its own stream, woke a task of hyper's for that
//! stream, and was written to the socket on its own. Here the client starts and stops
//! subscriptions on one stream, each named by an id it picks. Each runs exactly as a
//! `Subscribe` of its own ([`Ops::subscribe_into`]: on a replica, or through the node's feed of
//! the room), but delivers into the stream's one queue, and the stream sends as many events to
//! a reply as were ready together ([`serve`]).
//!
//! A subscription ends on its own (one `end` with the error its `Subscribe` stream would have
//! ended with); the others go on. A start is refused the same way: an invalid or expired
//! token, a room the user is not in, more than [`SUBSCRIBE_ROOMS_PER_STREAM_MAX`] running.
//! Starting an id that is running replaces it; a stop is not acknowledged (events the stopped
//! subscription already queued still go out), so a client resumes under a new id and drops
//! the stopped id's late events. A client that stops reading fills the queue,
//! and then every subscription on the stream waits (pulling nothing from its room's log), as
//! one slow `Subscribe` stream does.

use palaver_proto::v1 as pb;
use palaver_proto::v1::room_subscription_event::Body;
use tokio::sync::{mpsc, watch};
use tonic::Status;

use crate::convert;
use crate::error::{ApiError, ERROR_CODE_METADATA_KEY, RETRY_AFTER_METADATA_KEY};
use crate::ops::Ops;
use crate::subscribe::{EventSink, Running, TaggedSink};

/// Most subscriptions running on one stream.
pub const SUBSCRIBE_ROOMS_PER_STREAM_MAX: usize = 1_024;
/// Events queued on one stream before its subscriptions wait for the client.
pub const SUBSCRIBE_ROOMS_QUEUE_EVENTS: usize = 1_024;
/// Most events in one reply.
pub const SUBSCRIBE_ROOMS_EVENTS_PER_REPLY_MAX: usize = 256;

/// What a failed subscription tells its client: the error its own `Subscribe` stream would
/// have ended with.
pub fn end_of(status: &Status) -> pb::PipelineError {
    let metadata = |key: &str| status.metadata().get(key).and_then(|value| value.to_str().ok());
    pb::PipelineError {
        code: metadata(ERROR_CODE_METADATA_KEY).map_or_else(|| format!("grpc_{}", status.code() as i32), str::to_owned),
        grpc_code: status.code() as i32,
        message: status.message().to_owned(),
        retry_after_ms: metadata(RETRY_AFTER_METADATA_KEY).and_then(|ms| ms.parse().ok()).unwrap_or(0),
    }
}

fn ended(id: u64, status: &Status) -> pb::RoomSubscriptionEvent {
    pb::RoomSubscriptionEvent { id, body: Some(Body::End(end_of(status))) }
}

/// A subscription's event (or its end) on the stream.
fn tagged(id: u64, event: Result<pb::RoomEvent, Status>) -> pb::RoomSubscriptionEvent {
    match event {
        Ok(event) => pb::RoomSubscriptionEvent { id, body: Some(Body::Event(event)) },
        Err(status) => ended(id, &status),
    }
}

/// Serve one `SubscribeRooms` stream of the user holding `token`: run the subscriptions
/// `incoming` starts until it stops them, the client goes away or `stopped` turns true; the
/// returned stream carries their events.
pub fn serve(
    ops: Ops,
    token: String,
    mut incoming: tonic::Streaming<pb::SubscribeRoomsRequest>,
    mut stopped: watch::Receiver<bool>,
) -> impl futures::Stream<Item = Result<pb::SubscribeRoomsReply, Status>> + Send + 'static {
    let (events, outgoing) = mpsc::channel::<pb::RoomSubscriptionEvent>(SUBSCRIBE_ROOMS_QUEUE_EVENTS);
    let (failed, failure) = tokio::sync::oneshot::channel::<Status>();
    tokio::spawn(async move {
        let mut running = Running::default();
        loop {
            let request = tokio::select! {
                request = incoming.message() => request,
                () = events.closed() => break,
                _ = stopped.wait_for(|stop| *stop) => break,
            };
            let request = match request {
                Ok(Some(request)) => request,
                Ok(None) => {
                    // The client closed its side: the subscriptions run until it goes away.
                    tokio::select! {
                        () = events.closed() => {}
                        _ = stopped.wait_for(|stop| *stop) => {}
                    }
                    break;
                }
                Err(status) => {
                    // A malformed message ends the stream with its status; the node goes on.
                    let _ = failed.send(status);
                    break;
                }
            };
            running.prune();
            for id in request.stop {
                running.stop(id);
            }
            for start in request.start {
                running.stop(start.id);
                let refused = if running.held() >= SUBSCRIBE_ROOMS_PER_STREAM_MAX {
                    Some(ApiError::LimitReached {
                        what: "subscriptions on one SubscribeRooms stream".into(),
                        limit: SUBSCRIBE_ROOMS_PER_STREAM_MAX,
                    })
                } else {
                    match ops.authenticate(Some(&token)) {
                        Ok(user) => {
                            let ops = ops.clone();
                            let sink = TaggedSink { id: start.id, events: events.clone(), tag: tagged };
                            let have = convert::version_vector_from_pb(start.version_vector.as_ref());
                            running.spawn(start.id, async move {
                                match ops.subscribe_into(&user, &start.room, have, sink.clone()).await {
                                    Ok(subscription) => subscription.await,
                                    Err(error) => {
                                        let _ = sink.deliver(Err(error.into())).await;
                                    }
                                }
                            });
                            None
                        }
                        Err(error) => Some(error),
                    }
                };
                if let Some(error) = refused
                    && events.send(ended(start.id, &error.into())).await.is_err()
                {
                    break;
                }
            }
        }
    });
    futures::stream::unfold((outgoing, Some(failure)), |(mut outgoing, mut failure)| async move {
        if let Some(events) = crate::peer::next_batch(&mut outgoing, SUBSCRIBE_ROOMS_EVENTS_PER_REPLY_MAX).await {
            return Some((Ok(pb::SubscribeRoomsReply { events }), (outgoing, failure)));
        }
        // Every subscription is gone: end with the client's malformed message, if that was why.
        let status = failure.take()?.await.ok()?;
        Some((Err(status), (outgoing, None)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_end_carries_the_code_and_wait_its_subscribe_status_had() {
        let end = end_of(&ApiError::RateLimited { retry_after_ms: 250 }.into());
        assert_eq!((end.code.as_str(), end.retry_after_ms), ("rate_limited", 250));
        assert_eq!(end.grpc_code, tonic::Code::ResourceExhausted as i32);
        let end = end_of(&Status::internal("disk on fire"));
        assert_eq!((end.code.as_str(), end.message.as_str()), ("grpc_13", "disk on fire"));
    }
}
