//! Server reflection (both `grpc.reflection.v1` and `grpc.reflection.v1alpha`, with the generated tonic
//! clients) and `grpc.health.v1` on the service port, including health during shutdown.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use prost::Message as _;
use prost_types::FileDescriptorProto;
use support::*;
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

const EVENT_SERVICE: &str = "lamplight.v1.EventService";
const HEALTH_SERVICE: &str = "grpc.health.v1.Health";
const EVENTS_PROTO: &str = "lamplight/v1/events.proto";
const TIMESTAMP_PROTO: &str = "google/protobuf/timestamp.proto";

/// Every await on the network is bounded by this.
const WAIT: Duration = Duration::from_secs(10);

async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {WAIT:?}: {what}"))
}

/// A refused reflection request: (gRPC code, message). The protocol allows it as an `error_response`
/// inside the stream; tonic-reflection instead ends the stream with that status. Either is accepted.
type ReflectionError = (i32, String);

/// One open `ServerReflectionInfo` stream, whatever the protocol version.
trait Reflection: Sized {
    /// Which service this is, for messages.
    const SERVICE: &'static str;
    async fn open(channel: Channel) -> Self;
    async fn list_services(&mut self) -> Vec<String>;
    async fn file_containing_symbol(
        &mut self,
        symbol: &str,
    ) -> Result<Vec<FileDescriptorProto>, ReflectionError>;
    async fn file_by_filename(
        &mut self,
        name: &str,
    ) -> Result<Vec<FileDescriptorProto>, ReflectionError>;
}

/// A [`Reflection`] session over the generated client of one protocol version: requests go one at a time
/// on a single bidirectional stream, each answered before the next is sent (as grpcurl does).
macro_rules! reflection_session {
    ($version:ident, $service:literal) => {
        mod $version {
            use super::*;
            use tokio::sync::mpsc;
            use tokio_stream::wrappers::ReceiverStream;
            use tonic_reflection::pb::$version::server_reflection_client::ServerReflectionClient;
            use tonic_reflection::pb::$version::server_reflection_request::MessageRequest;
            use tonic_reflection::pb::$version::server_reflection_response::MessageResponse;
            use tonic_reflection::pb::$version::{
                ServerReflectionRequest, ServerReflectionResponse,
            };

            pub(crate) struct Session {
                requests: mpsc::Sender<ServerReflectionRequest>,
                responses: tonic::Streaming<ServerReflectionResponse>,
            }

            impl Session {
                /// Sends one request and reads its answer; `Err` when the stream ended with a status.
                async fn ask(
                    &mut self,
                    request: MessageRequest,
                ) -> Result<MessageResponse, tonic::Status> {
                    let request = ServerReflectionRequest {
                        host: String::new(),
                        message_request: Some(request),
                    };
                    self.requests
                        .send(request.clone())
                        .await
                        .expect("reflection stream open");
                    let response = within("reflection response", self.responses.message())
                        .await?
                        .expect("a response or a status to every request");
                    assert_eq!(
                        response.original_request.as_ref(),
                        Some(&request),
                        "the response echoes its request"
                    );
                    Ok(response.message_response.expect("a message_response"))
                }

                async fn files(
                    &mut self,
                    request: MessageRequest,
                ) -> Result<Vec<FileDescriptorProto>, ReflectionError> {
                    match self.ask(request).await {
                        Err(status) => Err((status.code() as i32, status.message().to_owned())),
                        Ok(MessageResponse::FileDescriptorResponse(r)) => Ok(r
                            .file_descriptor_proto
                            .iter()
                            .map(|bytes| {
                                FileDescriptorProto::decode(&bytes[..])
                                    .expect("a FileDescriptorProto")
                            })
                            .collect()),
                        Ok(MessageResponse::ErrorResponse(e)) => {
                            Err((e.error_code, e.error_message))
                        }
                        Ok(other) => panic!("expected file descriptors, got {other:?}"),
                    }
                }
            }

            impl Reflection for Session {
                const SERVICE: &'static str = $service;

                async fn open(channel: Channel) -> Self {
                    let (requests, rx) = mpsc::channel(1);
                    let mut client = ServerReflectionClient::new(channel);
                    let responses = within(
                        "open ServerReflectionInfo",
                        client.server_reflection_info(ReceiverStream::new(rx)),
                    )
                    .await
                    .expect("ServerReflectionInfo")
                    .into_inner();
                    Self {
                        requests,
                        responses,
                    }
                }

                async fn list_services(&mut self) -> Vec<String> {
                    match self.ask(MessageRequest::ListServices(String::new())).await {
                        Ok(MessageResponse::ListServicesResponse(list)) => {
                            list.service.into_iter().map(|s| s.name).collect()
                        }
                        other => panic!("expected a service list, got {other:?}"),
                    }
                }

                async fn file_containing_symbol(
                    &mut self,
                    symbol: &str,
                ) -> Result<Vec<FileDescriptorProto>, ReflectionError> {
                    self.files(MessageRequest::FileContainingSymbol(symbol.into()))
                        .await
                }

                async fn file_by_filename(
                    &mut self,
                    name: &str,
                ) -> Result<Vec<FileDescriptorProto>, ReflectionError> {
                    self.files(MessageRequest::FileByFilename(name.into()))
                        .await
                }
            }
        }
    };
}

reflection_session!(v1, "grpc.reflection.v1.ServerReflection");
reflection_session!(v1alpha, "grpc.reflection.v1alpha.ServerReflection");

/// What a client such as grpcurl needs from reflection, checked on one protocol version.
async fn check_reflection<R: Reflection>(server: &TestServer) {
    let which = R::SERVICE;
    let r = &mut R::open(server.channel().await).await;

    let services = r.list_services().await;
    for needed in [EVENT_SERVICE, HEALTH_SERVICE, R::SERVICE] {
        assert!(
            services.iter().any(|s| s == needed),
            "{which}: {needed} not listed in {services:?}"
        );
    }

    // The file that defines the service, with the service, its messages and its imports.
    let files = r
        .file_containing_symbol(EVENT_SERVICE)
        .await
        .unwrap_or_else(|e| panic!("{which}: file_containing_symbol: {e:?}"));
    let events = files
        .iter()
        .find(|f| f.name() == EVENTS_PROTO)
        .unwrap_or_else(|| panic!("{which}: {EVENTS_PROTO} not among {:?}", names(&files)));
    assert_eq!(events.package(), "lamplight.v1");
    let service = events
        .service
        .iter()
        .find(|s| s.name() == "EventService")
        .expect("EventService in its file");
    let methods: BTreeSet<&str> = service.method.iter().map(|m| m.name()).collect();
    assert_eq!(
        methods,
        BTreeSet::from(["GetPresence", "Publish", "SetTyping", "Subscribe"]),
        "{which}: methods"
    );
    let messages: BTreeSet<&str> = events.message_type.iter().map(|m| m.name()).collect();
    for needed in ["Event", "SubscribeRequest", "SubscribeResponse", "Task"] {
        assert!(
            messages.contains(needed),
            "{which}: no {needed} in {messages:?}"
        );
    }
    assert!(
        events.dependency.iter().any(|d| d == TIMESTAMP_PROTO),
        "{which}: events.proto imports {TIMESTAMP_PROTO}: {:?}",
        events.dependency
    );

    // A message symbol resolves to the same file.
    let by_message = r
        .file_containing_symbol("lamplight.v1.Event")
        .await
        .unwrap_or_else(|e| panic!("{which}: file_containing_symbol(Event): {e:?}"));
    assert!(by_message.iter().any(|f| f.name() == EVENTS_PROTO));

    // Every import resolves by file name, transitively, as a client walking the graph would do.
    let closure = resolve_imports(r, files).await;
    let timestamp = closure
        .get(TIMESTAMP_PROTO)
        .unwrap_or_else(|| panic!("{which}: {TIMESTAMP_PROTO} not served"));
    assert_eq!(timestamp.package(), "google.protobuf");
    assert!(timestamp
        .message_type
        .iter()
        .any(|m| m.name() == "Timestamp"));

    // Health is described too.
    let health = r
        .file_containing_symbol(HEALTH_SERVICE)
        .await
        .unwrap_or_else(|e| panic!("{which}: file_containing_symbol(Health): {e:?}"));
    assert!(health
        .iter()
        .any(|f| f.service.iter().any(|s| s.name() == "Health")));

    // Unknown names are NOT_FOUND (tonic-reflection ends the stream with it, hence a new stream each).
    let (code, message) = r
        .file_containing_symbol("lamplight.v1.NoSuchThing")
        .await
        .expect_err("unknown symbol");
    assert_eq!(code, Code::NotFound as i32, "{which}: unknown symbol");
    assert!(message.contains("lamplight.v1.NoSuchThing"), "{message}");
    let (code, _) = R::open(server.channel().await)
        .await
        .file_by_filename("no/such/file.proto")
        .await
        .expect_err("unknown file");
    assert_eq!(code, Code::NotFound as i32, "{which}: unknown file");
}

/// Fetches the imports of `files` by file name until every file of the graph is known.
async fn resolve_imports<R: Reflection>(
    r: &mut R,
    files: Vec<FileDescriptorProto>,
) -> BTreeMap<String, FileDescriptorProto> {
    let mut known: BTreeMap<String, FileDescriptorProto> = files
        .into_iter()
        .map(|f| (f.name().to_owned(), f))
        .collect();
    loop {
        let missing: Vec<String> = known
            .values()
            .flat_map(|f| f.dependency.iter())
            .filter(|d| !known.contains_key(*d))
            .cloned()
            .collect();
        if missing.is_empty() {
            return known;
        }
        for name in missing {
            let fetched = r
                .file_by_filename(&name)
                .await
                .unwrap_or_else(|e| panic!("{}: import {name} not served: {e:?}", R::SERVICE));
            assert!(
                fetched.iter().any(|f| f.name() == name),
                "asked for {name}, got {:?}",
                names(&fetched)
            );
            known.extend(fetched.into_iter().map(|f| (f.name().to_owned(), f)));
        }
    }
}

fn names(files: &[FileDescriptorProto]) -> Vec<&str> {
    files.iter().map(|f| f.name()).collect()
}

#[tokio::test]
async fn reflection_v1_describes_the_service() {
    let server = TestServer::start().await;
    check_reflection::<v1::Session>(&server).await;
}

#[tokio::test]
async fn reflection_v1alpha_describes_the_service() {
    let server = TestServer::start().await;
    check_reflection::<v1alpha::Session>(&server).await;
}

// ---------------------------------------------------------------------------------------------------
// Health.

fn check_request(service: &str) -> HealthCheckRequest {
    HealthCheckRequest {
        service: service.into(),
    }
}

fn status_of(response: HealthCheckResponse) -> ServingStatus {
    ServingStatus::try_from(response.status).expect("a known serving status")
}

#[tokio::test]
async fn health_check_reports_serving() {
    let server = TestServer::start().await;
    let mut health = HealthClient::new(server.channel().await);
    for service in ["", EVENT_SERVICE] {
        let response = within("Health/Check", health.check(check_request(service)))
            .await
            .unwrap_or_else(|s| panic!("Check({service:?}): {s:?}"))
            .into_inner();
        assert_eq!(status_of(response), ServingStatus::Serving, "{service:?}");
    }
    // Health needs no token, and names no service it does not know.
    let err = within(
        "Health/Check unknown",
        health.check(check_request("nope.Nope")),
    )
    .await
    .expect_err("unknown service");
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn health_watch_turns_not_serving_on_shutdown() {
    let server = TestServer::start().await;
    let mut health = HealthClient::new(server.channel().await);

    // Watches opened while serving: each starts with the current status.
    let mut watches = Vec::new();
    for service in ["", EVENT_SERVICE] {
        let mut stream = within("Health/Watch", health.watch(check_request(service)))
            .await
            .unwrap_or_else(|s| panic!("Watch({service:?}): {s:?}"))
            .into_inner();
        let first = within("first Watch message", stream.message())
            .await
            .unwrap()
            .expect("a first status");
        assert_eq!(status_of(first), ServingStatus::Serving, "{service:?}");
        watches.push((service, stream));
    }

    server.shutdown.cancel();

    // Both the overall status ("") and the service's turn NOT_SERVING, so load balancers and probes
    // that watch either stop sending new calls while streams drain.
    for (service, stream) in &mut watches {
        let next = within("Watch after shutdown", stream.message())
            .await
            .unwrap_or_else(|s| panic!("Watch({service:?}) after shutdown: {s:?}"))
            .expect("a status change, not the end of the stream");
        assert_eq!(status_of(next), ServingStatus::NotServing, "{service:?}");
    }

    // Once the watchers leave, the server stops cleanly.
    drop(watches);
    drop(health);
    within("serve() to return", server.stop())
        .await
        .expect("serve returns Ok after shutdown");
}
