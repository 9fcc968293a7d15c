//! `lamplight subscribe | publish | presence | admin`: small clients of a running server, for scripts and
//! demos.
//!
//! Results go to standard output (JSON lines, an id, a JSON object); progress and errors go to standard
//! error, errors as one line starting with `lamplight:`. The exit status says what went wrong, so scripts
//! can react (see [`exit`]).

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde_json::json;
use tokio::time::Instant;
use tonic::Code;

use super::{
    AdminAction, AdminArgs, Command, ConnectArgs, PresenceArgs, PublishArgs, SubscribeArgs,
};
use crate::client::json::{event_to_json, payload_from_json, PayloadKind};
use crate::client::{
    token_fn, Client, ClientConfig, ClientError, PublishError, StaticToken, SubscriptionEvent,
    TokenError, TokenSource,
};
use crate::proto::v1::{event::Payload, Custom, Event};

/// Exit statuses of the client subcommands.
pub mod exit {
    /// Done.
    pub const OK: u8 = 0;
    /// Anything not listed below (e.g. the server failed internally).
    pub const FAILURE: u8 = 1;
    /// Bad command line: unknown flag, invalid payload JSON, unreadable file, no secret to mint a token.
    pub const USAGE: u8 = 2;
    /// The server refused the request as invalid (`INVALID_ARGUMENT`, `NOT_FOUND`, `FAILED_PRECONDITION`,
    /// `OUT_OF_RANGE`): bad room name, event type, size, `since`...
    pub const INVALID_ARGUMENT: u8 = 3;
    /// The token was refused (`UNAUTHENTICATED`): missing, expired, wrong secret, issuer or audience.
    pub const UNAUTHENTICATED: u8 = 4;
    /// The token may not do this (`PERMISSION_DENIED`): room not in its claims, publishing without role
    /// `publisher`. Also `subscribe` ended by an administrator: disconnected (`AdminService.Disconnect`),
    /// or every room removed (`AdminService.Unsubscribe`).
    pub const PERMISSION_DENIED: u8 = 5;
    /// The server could not be reached in time (`UNAVAILABLE`, `DEADLINE_EXCEEDED`, connection errors).
    pub const UNAVAILABLE: u8 = 6;
    /// A limit was hit (`RESOURCE_EXHAUSTED`).
    pub const RESOURCE_EXHAUSTED: u8 = 7;
}

/// Why a client subcommand failed: the message to print and the exit status.
#[derive(Debug)]
pub struct CommandError {
    /// The exit status (see [`exit`]).
    pub status: u8,
    /// One line for standard error.
    pub message: String,
}

impl CommandError {
    fn usage(message: impl Into<String>) -> Self {
        Self {
            status: exit::USAGE,
            message: message.into(),
        }
    }
}

/// The exit status for a gRPC code.
pub fn exit_status(code: Code) -> u8 {
    match code {
        Code::Ok => exit::OK,
        Code::InvalidArgument | Code::NotFound | Code::FailedPrecondition | Code::OutOfRange => {
            exit::INVALID_ARGUMENT
        }
        Code::Unauthenticated => exit::UNAUTHENTICATED,
        Code::PermissionDenied => exit::PERMISSION_DENIED,
        Code::Unavailable | Code::DeadlineExceeded => exit::UNAVAILABLE,
        Code::ResourceExhausted => exit::RESOURCE_EXHAUSTED,
        _ => exit::FAILURE,
    }
}

/// A hint for the codes a user can act on.
fn hint(code: Code) -> &'static str {
    match code {
        Code::Unauthenticated => {
            " (check --token / LAMPLIGHT_TOKEN, or that --jwt-secret matches the server's)"
        }
        Code::PermissionDenied => " (the token's claims do not allow this; see --sub, --tid, --projects, --channels, --roles)",
        _ => "",
    }
}

fn from_status(code: Code, what: String, addr: &str) -> CommandError {
    let status = exit_status(code);
    let message = if status == exit::UNAVAILABLE {
        format!("cannot reach the server at {addr}: {what}")
    } else {
        format!("{what}{}", hint(code))
    };
    CommandError { status, message }
}

fn client_error(e: ClientError, addr: &str) -> CommandError {
    match e {
        ClientError::Disconnected(status) => CommandError {
            status: exit::PERMISSION_DENIED,
            message: format!(
                "{} (an administrator ended the subscription: not reconnecting)",
                crate::client::describe(&status)
            ),
        },
        ClientError::InvalidEndpoint { .. } => CommandError::usage(e.to_string()),
        ClientError::Token(_) => CommandError::usage(e.to_string()),
        ClientError::Status(status) => {
            // A broken connection surfaces as UNKNOWN/INTERNAL with a transport cause.
            let code = match status.code() {
                Code::Unknown | Code::Internal if std::error::Error::source(&status).is_some() => {
                    Code::Unavailable
                }
                code => code,
            };
            from_status(code, crate::client::describe(&status), addr)
        }
    }
}

fn publish_error(e: PublishError, addr: &str) -> CommandError {
    match e {
        PublishError::Rejected(status) | PublishError::Unavailable(status) => {
            client_error(ClientError::Status(status), addr)
        }
        PublishError::Token(e) => CommandError::usage(format!("cannot get a token: {e}")),
        other => CommandError {
            status: exit::FAILURE,
            message: other.to_string(),
        },
    }
}

/// Runs a client subcommand to the end and returns the process's exit status (see [`exit`]); stdout is
/// flushed. `Serve` and `Token` are not
/// client subcommands: they return [`exit::USAGE`].
pub fn run(command: Command) -> u8 {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .try_init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("lamplight: cannot start the tokio runtime: {e}");
            return exit::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match command {
            Command::Subscribe(args) => subscribe(args).await,
            Command::Publish(args) => publish(args).await,
            Command::Presence(args) => presence(args).await,
            Command::Admin(args) => admin(args).await,
            Command::Serve(_) | Command::Token(_) | Command::Bench(_) => Err(CommandError::usage(
                "not a client subcommand: use subscribe, publish, presence or admin",
            )),
        }
    });
    // Do not wait for the client's background tasks.
    runtime.shutdown_background();
    let _ = std::io::stdout().flush();
    match result {
        Ok(()) => exit::OK,
        Err(e) => {
            eprintln!("lamplight: {}", e.message);
            e.status
        }
    }
}

/// The token source: `--token` as is, or tokens minted (again on every refresh) from the secret.
fn tokens(args: &ConnectArgs) -> Result<Arc<dyn TokenSource>, CommandError> {
    if let Some(token) = &args.token {
        return Ok(Arc::new(StaticToken(token.clone())));
    }
    let mint = args.mint_args();
    mint.mint()
        .map_err(|e| CommandError::usage(format!("cannot mint a token: {e}")))?;
    Ok(Arc::new(token_fn(move || {
        let token = mint.mint().map_err(|e| TokenError::new(e.to_string()));
        async move { token }
    })))
}

async fn connect(args: &ConnectArgs, mut config: ClientConfig) -> Result<Client, CommandError> {
    let tokens = tokens(args)?;
    if let Some(path) = &args.ca_file {
        let pem = std::fs::read_to_string(path).map_err(|e| {
            CommandError::usage(format!("cannot read --ca-file {}: {e}", path.display()))
        })?;
        config.ca_certificate_pem = Some(pem);
    }
    Client::with_config(args.addr.clone(), tokens, config)
        .await
        .map_err(|e| client_error(e, &args.addr))
}

async fn subscribe(args: SubscribeArgs) -> Result<(), CommandError> {
    let addr = args.connect.addr.clone();
    let config = ClientConfig {
        heartbeat_timeout: Duration::from_secs(args.heartbeat_secs).mul_f64(2.5),
        ..ClientConfig::default()
    };
    let client = connect(&args.connect, config).await?;
    let since = args.since.into_iter().collect();
    // Rooms still carried; when an administrator removed them all, the command fails (see `exit`).
    let mut carried: Vec<String> = args.rooms.clone();
    let mut last_removal = None;
    let mut subscription = client.subscribe_since(args.rooms, since);
    let started = Instant::now();
    let connect_timeout = Duration::from_secs(args.connect_timeout_secs);
    let mut connected = false;
    let mut printed = 0u64;
    let mut out = std::io::stdout();
    if args.count == Some(0) {
        return Ok(());
    }
    // Ctrl-C ends the command normally, with the resume hint.
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    loop {
        let item = tokio::select! {
            item = subscription.next() => item,
            _ = &mut interrupted => break,
        };
        let Some(item) = item else { break };
        let line = match item.map_err(|e| client_error(e, &addr))? {
            SubscriptionEvent::Connected { rooms } => {
                connected = true;
                let rooms: Vec<String> = rooms
                    .iter()
                    .map(|r| match (r.recovered, r.last_event_id.is_empty()) {
                        (true, _) => format!("{} (replaying)", r.room),
                        (false, true) => r.room.clone(),
                        (false, false) => format!("{} (at {})", r.room, r.last_event_id),
                    })
                    .collect();
                eprintln!("lamplight: connected to {addr}: {}", rooms.join(", "));
                continue;
            }
            SubscriptionEvent::Disconnected { error, retry_in } => {
                if !connected && !connect_timeout.is_zero() && started.elapsed() >= connect_timeout
                {
                    return Err(client_error(ClientError::Status(error), &addr));
                }
                eprintln!(
                    "lamplight: disconnected ({}); reconnecting in {:.1} s",
                    crate::client::describe(&error),
                    retry_in.as_secs_f64()
                );
                continue;
            }
            SubscriptionEvent::Reset { room, reason } => {
                json!({"reset": {"room": room, "reason": reason}})
            }
            SubscriptionEvent::Removed { room, reason } => {
                carried.retain(|r| r != &room);
                let line = json!({"removed": {"room": room, "reason": reason}});
                last_removal = Some((room, reason));
                line
            }
            SubscriptionEvent::Event(event) => {
                printed += 1;
                event_to_json(&event)
            }
        };
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            // The reader went away (e.g. `| head -1`): nothing left to do.
            return Ok(());
        }
        if args.count.is_some_and(|count| printed >= count) {
            break;
        }
    }
    if carried.is_empty() {
        let (room, reason) = last_removal.unwrap_or_default();
        return Err(CommandError {
            status: exit::PERMISSION_DENIED,
            message: format!(
                "every room was removed by an administrator (the last, {room}: {})",
                if reason.is_empty() {
                    "no reason given"
                } else {
                    &reason
                }
            ),
        });
    }
    let resume: Vec<String> = subscription
        .since()
        .iter()
        .map(|(room, id)| format!("--since {room}={id}"))
        .collect();
    if !resume.is_empty() {
        eprintln!("lamplight: to resume: {}", resume.join(" "));
    }
    Ok(())
}

fn payload(args: &PublishArgs) -> Result<Payload, CommandError> {
    let p = &args.payload;
    let json = [
        (PayloadKind::Task, &p.task_json),
        (PayloadKind::Bug, &p.bug_json),
        (PayloadKind::Feature, &p.feature_json),
        (PayloadKind::Message, &p.message_json),
        (PayloadKind::Notification, &p.notification_json),
    ];
    for (kind, text) in json {
        if let Some(text) = text {
            return payload_from_json(kind, text)
                .map_err(|e| CommandError::usage(format!("--{}-json: {e}", kind.name())));
        }
    }
    let Some(path) = &p.custom_file else {
        return Err(CommandError::usage(
            "give a payload: --task-json, --bug-json, --feature-json, --message-json, --notification-json or --custom-file",
        ));
    };
    let data = if path.as_os_str() == "-" {
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut data)
            .map_err(|e| CommandError::usage(format!("cannot read standard input: {e}")))?;
        data
    } else {
        std::fs::read(path).map_err(|e| {
            CommandError::usage(format!("cannot read --custom-file {}: {e}", path.display()))
        })?
    };
    Ok(Payload::Custom(Custom {
        content_type: args.content_type.clone(),
        data,
    }))
}

async fn publish(args: PublishArgs) -> Result<(), CommandError> {
    let addr = args.connect.addr.clone();
    let event = Event {
        room: args.room.clone(),
        r#type: args.event_type.clone(),
        payload: Some(payload(&args)?),
        ..Default::default()
    };
    let wait = Duration::from_secs(args.timeout_secs);
    let config = ClientConfig {
        publish_retry_for: Some(wait),
        request_timeout: wait.clamp(Duration::from_secs(1), Duration::from_secs(10)),
        ..ClientConfig::default()
    };
    let client = connect(&args.connect, config).await?;
    let receipt = match &args.idempotency_key {
        Some(key) => client.publish_with_key(event, key.clone()),
        None => client.publish(event),
    }
    .map_err(|e| publish_error(e, &addr))?;
    let id = receipt.await.map_err(|e| publish_error(e, &addr))?;
    println!("{id}");
    Ok(())
}

async fn presence(args: PresenceArgs) -> Result<(), CommandError> {
    let addr = args.connect.addr.clone();
    let client = connect(&args.connect, ClientConfig::default()).await?;
    let presence = client
        .presence_page(&args.room, args.limit, &args.page_token)
        .await
        .map_err(|e| client_error(e, &addr))?;
    println!(
        "{}",
        json!({"room": args.room, "user_count": presence.user_count,
               "connection_count": presence.connection_count, "user_ids": presence.user_ids,
               "next_page_token": presence.next_page_token})
    );
    Ok(())
}

async fn admin(args: AdminArgs) -> Result<(), CommandError> {
    let (target, done) = match &args.action {
        AdminAction::Unsubscribe { target, room, .. } => (target, format!("removed {room} from")),
        AdminAction::Disconnect { target, .. } => (target, "disconnected".to_owned()),
        AdminAction::Revoke { target, .. } => (target, "revoked the tokens of".to_owned()),
    };
    let addr = target.connect.addr.clone();
    let client = connect(&target.connect, ClientConfig::default()).await?;
    let user = target.user_ref();
    let who = if user.tenant_id.is_empty() {
        user.user_id.clone()
    } else {
        format!("{} of tenant {}", user.user_id, user.tenant_id)
    };
    let result = match &args.action {
        AdminAction::Unsubscribe { room, reason, .. } => {
            client.unsubscribe_user(user, room, reason).await
        }
        AdminAction::Disconnect { reason, .. } => client.disconnect_user(user, reason).await,
        AdminAction::Revoke {
            issued_before,
            reason,
            ..
        } => client.revoke_tokens(user, *issued_before, reason).await,
    };
    result.map_err(|e| client_error(e, &addr))?;
    eprintln!("lamplight: {done} {who}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_codes_map_to_distinct_exit_statuses() {
        let statuses = [
            exit_status(Code::InvalidArgument),
            exit_status(Code::Unauthenticated),
            exit_status(Code::PermissionDenied),
            exit_status(Code::Unavailable),
            exit_status(Code::ResourceExhausted),
            exit_status(Code::Internal),
        ];
        assert_eq!(statuses, [3, 4, 5, 6, 7, 1]);
        assert_eq!(exit_status(Code::DeadlineExceeded), exit::UNAVAILABLE);
        let broken = tonic::Status::from_error(Box::new(std::io::Error::other("reset")));
        assert_eq!(
            client_error(ClientError::Status(broken), "x").status,
            exit::UNAVAILABLE
        );
        let disconnected = client_error(
            ClientError::Disconnected(tonic::Status::permission_denied(
                "disconnected by an administrator: left the team",
            )),
            "x",
        );
        assert_eq!(disconnected.status, exit::PERMISSION_DENIED);
        assert!(disconnected.message.contains("left the team"));
        assert!(
            !disconnected.message.contains("--roles"),
            "no claims hint: the token was fine"
        );
    }
}
