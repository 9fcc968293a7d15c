//! The JSON shape of events that `lamplight subscribe` prints, and the payload JSON `lamplight publish`
//! reads. The shape is part of the CLI's contract (documented in the README); keys only get added.
//!
//! An event is one object: `id`, `room`, `type`, `time` (RFC 3339, UTC), `publisher_id`, and one key named
//! after the payload (`task`, `bug`, `feature`, `message`, `notification`, `typing`, `user_status`,
//! `presence_diff`, `custom`) holding the payload's fields by their proto names, all present even when
//! empty. `custom.data` is base64 (standard alphabet, padded), `user_status.status` and each
//! `presence_diff.changes[].status` the enum name (`ONLINE`, `OFFLINE`).
//!
//! ```json
//! {"id":"m3x1-7","room":"tenant:t1:project:p1","type":"task.created","time":"2026-11-05T10:00:00.5Z",
//!  "publisher_id":"billing","task":{"id":"42","project_id":"p1","tenant_id":"t1","title":"Ship",
//!  "status":"","priority":"","created_by_id":""}}
//! ```

use std::collections::BTreeMap;

use base64::Engine as _;
use serde_json::{json, Map, Value};

use crate::proto::v1::{
    event::Payload, user_status, Bug, Event, Feature, Message, Notification, Task,
};

/// `event` as the CLI prints it (see the module docs).
pub fn event_to_json(event: &Event) -> Value {
    let mut object = Map::new();
    object.insert("id".into(), json!(event.id));
    object.insert("room".into(), json!(event.room));
    object.insert("type".into(), json!(event.r#type));
    object.insert(
        "time".into(),
        event
            .time
            .as_ref()
            .map_or(Value::Null, |t| json!(t.to_string())),
    );
    object.insert("publisher_id".into(), json!(event.publisher_id));
    if let Some(payload) = &event.payload {
        let (key, value) = payload_to_json(payload);
        object.insert(key.into(), value);
    }
    Value::Object(object)
}

/// The payload's key and fields.
pub fn payload_to_json(payload: &Payload) -> (&'static str, Value) {
    match payload {
        Payload::Task(t) => (
            "task",
            json!({"id": t.id, "project_id": t.project_id, "tenant_id": t.tenant_id, "title": t.title,
                   "status": t.status, "priority": t.priority, "created_by_id": t.created_by_id}),
        ),
        Payload::Bug(b) => (
            "bug",
            json!({"id": b.id, "project_id": b.project_id, "tenant_id": b.tenant_id, "title": b.title,
                   "status": b.status, "severity": b.severity, "reported_by_id": b.reported_by_id}),
        ),
        Payload::Feature(f) => (
            "feature",
            json!({"id": f.id, "project_id": f.project_id, "tenant_id": f.tenant_id, "title": f.title,
                   "status": f.status}),
        ),
        Payload::Message(m) => (
            "message",
            json!({"id": m.id, "channel_id": m.channel_id, "tenant_id": m.tenant_id,
                   "author_id": m.author_id, "body": m.body}),
        ),
        Payload::Notification(n) => (
            "notification",
            json!({"id": n.id, "user_id": n.user_id, "title": n.title, "body": n.body, "link": n.link}),
        ),
        Payload::Typing(t) => (
            "typing",
            json!({"channel_id": t.channel_id, "user_id": t.user_id, "is_typing": t.is_typing}),
        ),
        Payload::UserStatus(s) => (
            "user_status",
            json!({"user_id": s.user_id, "status": status_name(s.status)}),
        ),
        Payload::PresenceDiff(d) => (
            "presence_diff",
            // The packed lists unpacked, in the shape this JSON had before they were packed.
            json!({"changes": crate::statuses::diff_changes(d).map(|(user, online)| json!({
                "user_id": user,
                "status": if online { "ONLINE" } else { "OFFLINE" },
            })).collect::<Vec<_>>()}),
        ),
        Payload::Custom(c) => (
            "custom",
            json!({"content_type": c.content_type,
                   "data": base64::engine::general_purpose::STANDARD.encode(&c.data)}),
        ),
    }
}

/// `ONLINE` / `OFFLINE`, or the number of a status this build does not know.
fn status_name(status: i32) -> String {
    user_status::Status::try_from(status)
        .map_or_else(|_| status.to_string(), |v| v.as_str_name().to_owned())
}

/// Payloads that `lamplight publish` builds from a JSON object of string fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PayloadKind {
    /// [`Task`].
    Task,
    /// [`Bug`].
    Bug,
    /// [`Feature`].
    Feature,
    /// [`Message`].
    Message,
    /// [`Notification`].
    Notification,
}

impl PayloadKind {
    /// The payload's JSON key.
    pub fn name(self) -> &'static str {
        match self {
            PayloadKind::Task => "task",
            PayloadKind::Bug => "bug",
            PayloadKind::Feature => "feature",
            PayloadKind::Message => "message",
            PayloadKind::Notification => "notification",
        }
    }

    /// The fields the payload has (all strings).
    pub fn fields(self) -> &'static [&'static str] {
        match self {
            PayloadKind::Task => &[
                "id",
                "project_id",
                "tenant_id",
                "title",
                "status",
                "priority",
                "created_by_id",
            ],
            PayloadKind::Bug => &[
                "id",
                "project_id",
                "tenant_id",
                "title",
                "status",
                "severity",
                "reported_by_id",
            ],
            PayloadKind::Feature => &["id", "project_id", "tenant_id", "title", "status"],
            PayloadKind::Message => &["id", "channel_id", "tenant_id", "author_id", "body"],
            PayloadKind::Notification => &["id", "user_id", "title", "body", "link"],
        }
    }
}

/// A payload JSON that does not fit its message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {kind} JSON: {reason}")]
pub struct PayloadJsonError {
    /// Which payload.
    pub kind: &'static str,
    /// What is wrong.
    pub reason: String,
}

/// Builds a payload from a JSON object such as `{"id":"42","title":"Ship"}`. Missing fields are empty;
/// unknown fields and non-string values are refused, naming the fields there are.
pub fn payload_from_json(kind: PayloadKind, text: &str) -> Result<Payload, PayloadJsonError> {
    let error = |reason: String| PayloadJsonError {
        kind: kind.name(),
        reason,
    };
    let value: Value = serde_json::from_str(text).map_err(|e| error(e.to_string()))?;
    let Value::Object(object) = value else {
        return Err(error("expected a JSON object".into()));
    };
    let mut fields = BTreeMap::new();
    for (key, value) in object {
        if !kind.fields().contains(&key.as_str()) {
            return Err(error(format!(
                "unknown field {key:?}; {} has {}",
                kind.name(),
                kind.fields().join(", ")
            )));
        }
        let Value::String(text) = value else {
            return Err(error(format!("field {key:?} must be a string")));
        };
        fields.insert(key, text);
    }
    let mut take = |key: &str| fields.remove(key).unwrap_or_default();
    Ok(match kind {
        PayloadKind::Task => Payload::Task(Task {
            id: take("id"),
            project_id: take("project_id"),
            tenant_id: take("tenant_id"),
            title: take("title"),
            status: take("status"),
            priority: take("priority"),
            created_by_id: take("created_by_id"),
        }),
        PayloadKind::Bug => Payload::Bug(Bug {
            id: take("id"),
            project_id: take("project_id"),
            tenant_id: take("tenant_id"),
            title: take("title"),
            status: take("status"),
            severity: take("severity"),
            reported_by_id: take("reported_by_id"),
        }),
        PayloadKind::Feature => Payload::Feature(Feature {
            id: take("id"),
            project_id: take("project_id"),
            tenant_id: take("tenant_id"),
            title: take("title"),
            status: take("status"),
        }),
        PayloadKind::Message => Payload::Message(Message {
            id: take("id"),
            channel_id: take("channel_id"),
            tenant_id: take("tenant_id"),
            author_id: take("author_id"),
            body: take("body"),
        }),
        PayloadKind::Notification => Payload::Notification(Notification {
            id: take("id"),
            user_id: take("user_id"),
            title: take("title"),
            body: take("body"),
            link: take("link"),
        }),
    })
}

#[cfg(test)]
mod tests {
    use prost_types::Timestamp;

    use super::*;
    use crate::proto::v1::{Custom, UserStatus};

    #[test]
    fn events_print_with_every_field_and_an_rfc3339_time() {
        let event = Event {
            id: "abc-7".into(),
            room: "tenant:t1:project:p1".into(),
            r#type: "task.created".into(),
            time: Some(Timestamp {
                seconds: 1_700_000_000,
                nanos: 500_000_000,
            }),
            publisher_id: "svc".into(),
            payload: Some(Payload::Task(Task {
                id: "42".into(),
                title: "Ship".into(),
                ..Default::default()
            })),
        };
        assert_eq!(
            event_to_json(&event),
            json!({"id": "abc-7", "room": "tenant:t1:project:p1", "type": "task.created",
                   "time": "2023-11-14T22:13:20.500Z", "publisher_id": "svc",
                   "task": {"id": "42", "project_id": "", "tenant_id": "", "title": "Ship",
                            "status": "", "priority": "", "created_by_id": ""}})
        );
    }

    #[test]
    fn custom_data_is_base64_and_statuses_are_names() {
        let custom = Payload::Custom(Custom {
            content_type: "text/plain".into(),
            data: b"hi\xff".to_vec(),
        });
        assert_eq!(
            payload_to_json(&custom),
            (
                "custom",
                json!({"content_type": "text/plain", "data": "aGn/"})
            )
        );
        let online = Payload::UserStatus(UserStatus {
            user_id: "u1".into(),
            status: user_status::Status::Online as i32,
        });
        assert_eq!(payload_to_json(&online).1["status"], "ONLINE");
        let diff = crate::statuses::diff_event(
            "t1",
            &[
                ("u1".into(), true),
                ("u3".into(), true),
                ("u2".into(), false),
            ],
        )
        .payload
        .unwrap();
        assert_eq!(
            payload_to_json(&diff),
            (
                "presence_diff",
                json!({"changes": [{"user_id": "u1", "status": "ONLINE"},
                                   {"user_id": "u3", "status": "ONLINE"},
                                   {"user_id": "u2", "status": "OFFLINE"}]})
            )
        );
    }

    #[test]
    fn payloads_parse_from_json_objects_of_strings() {
        let task = payload_from_json(PayloadKind::Task, r#"{"id":"42","title":"Ship"}"#).unwrap();
        assert_eq!(
            task,
            Payload::Task(Task {
                id: "42".into(),
                title: "Ship".into(),
                ..Default::default()
            })
        );
        // Every kind round-trips through its own field list.
        for kind in [
            PayloadKind::Task,
            PayloadKind::Bug,
            PayloadKind::Feature,
            PayloadKind::Message,
            PayloadKind::Notification,
        ] {
            let input: Map<String, Value> = kind
                .fields()
                .iter()
                .map(|f| (f.to_string(), json!(format!("v-{f}"))))
                .collect();
            let payload = payload_from_json(kind, &Value::Object(input.clone()).to_string())
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                payload_to_json(&payload),
                (kind.name(), Value::Object(input))
            );
        }
    }

    #[test]
    fn bad_payload_json_is_explained() {
        let err = payload_from_json(PayloadKind::Task, r#"{"name":"x"}"#).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid task JSON: unknown field \"name\"; task has id, project_id, tenant_id, title, status, priority, created_by_id"
        );
        let err = payload_from_json(PayloadKind::Bug, r#"{"id":42}"#).unwrap_err();
        assert_eq!(err.reason, "field \"id\" must be a string");
        assert!(payload_from_json(PayloadKind::Message, "[1]").is_err());
        assert!(payload_from_json(PayloadKind::Message, "{").is_err());
    }
}
