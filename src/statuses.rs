//! Coalesced user statuses: a tenant's ONLINE/OFFLINE changes are published as one `PresenceDiff` event
//! per window instead of one event per transition.
//!
//! Why: every member of a tenant watches `tenant:{tid}`, so announcing each of N connecting users on its
//! own costs N²/2 deliveries (a deploy that reconnects a big tenant at once). Gathered over
//! `--status-window-ms`, a burst costs a handful of events, each carrying many changes.
//!
//! What is *not* coalesced: deciding a transition. The bus still decides ONLINE/OFFLINE atomically with
//! the connection count (on Redis, in the connect/disconnect scripts) and marks the user *dirty* in their
//! tenant at the same moment. This module only remembers which tenants this node made dirty and, one
//! window after the first, asks the bus to *settle* each: atomically compare every dirty user's state now
//! with what the tenant room was last told, publish the differences as one event, and remember them as
//! told. So
//! - a user who came and went within a window is not announced at all (the net change, or none);
//! - whatever the order in which nodes settle, what the tenant room was told ends equal to the truth:
//!   the last transition marked the user dirty, and the settle after it compares against the truth;
//! - with several nodes a tenant gets at most one event per window per node (a settle takes every dirty
//!   user of the tenant, also those other nodes marked, so often fewer).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::bus::BusError;
use crate::presence::SYSTEM_PUBLISHER;
use crate::proto::v1::{event::Payload, user_status, Event, PresenceDiff, UserStatus};
use crate::rooms::Room;

/// Default `--status-window-ms`.
pub const DEFAULT_STATUS_WINDOW_MS: u64 = 250;
/// Changes in one `PresenceDiff` event at most; a settle with more publishes several events.
pub const MAX_CHANGES_PER_EVENT: usize = 1000;
/// After a failed settle (the bus is down), the next try waits at least this long.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// Event type of a status diff.
pub const STATUS_EVENT_TYPE: &str = "user.status";

/// Whether and how statuses are published.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusSettings {
    /// Off: presence is still counted (`GetPresence`), but no status event is ever published.
    pub enabled: bool,
    /// How long a node gathers a tenant's changes before publishing them.
    pub window: Duration,
}

impl Default for StatusSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            window: Duration::from_millis(DEFAULT_STATUS_WINDOW_MS),
        }
    }
}

/// Publishes the settled changes of one tenant (see the module docs). Implemented by each bus.
#[async_trait]
pub(crate) trait Settle: Send + Sync + 'static {
    /// Publishes the difference between the tenant's dirty users' states and what its room was told.
    async fn settle(&self, tenant: &str) -> Result<(), BusError>;
}

/// The tenants this node made dirty since its last settle: at most the tenants with connections on this
/// node (or reaped by it), each held once.
pub(crate) struct StatusWindow {
    settings: StatusSettings,
    dirty: Mutex<HashSet<String>>,
    wake: Notify,
}

impl StatusWindow {
    pub(crate) fn new(settings: StatusSettings) -> Arc<Self> {
        Arc::new(Self {
            settings,
            dirty: Mutex::new(HashSet::new()),
            wake: Notify::new(),
        })
    }

    /// Whether statuses are published at all.
    pub(crate) fn enabled(&self) -> bool {
        self.settings.enabled
    }

    /// A transition of a user of `tenant` was decided: settle the tenant at the end of the window.
    pub(crate) fn mark(&self, tenant: &str) {
        if !self.settings.enabled {
            return;
        }
        let newly = {
            let mut dirty = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
            !dirty.contains(tenant) && dirty.insert(tenant.to_owned())
        };
        if newly {
            self.wake.notify_one();
        }
    }

    /// Settles every tenant marked so far, now. A tenant whose settle failed stays marked (retried after
    /// the next window, at least [`RETRY_AFTER`] later); returns whether one did.
    pub(crate) async fn flush(&self, settle: &dyn Settle) -> bool {
        let tenants: Vec<String> = {
            let mut dirty = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
            dirty.drain().collect()
        };
        let mut failed = false;
        for tenant in tenants {
            if let Err(e) = settle.settle(&tenant).await {
                tracing::warn!(tenant = %tenant, error = %e, "publishing user statuses failed; retrying");
                self.dirty
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(tenant);
                failed = true;
            }
        }
        if failed {
            self.wake.notify_one();
        }
        failed
    }

    /// Until `cancel`: one window after a tenant is marked, settles every marked tenant. Holds `settle`
    /// weakly, so it ends when the bus is dropped. A node shutting down calls [`Self::flush`] itself.
    pub(crate) async fn run<S: Settle>(
        self: Arc<Self>,
        settle: std::sync::Weak<S>,
        cancel: CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = cancel.cancelled() => return,
            }
            tokio::select! {
                _ = tokio::time::sleep(self.settings.window) => {}
                _ = cancel.cancelled() => return,
            }
            let Some(settle) = settle.upgrade() else {
                return;
            };
            let failed = self.flush(&*settle).await;
            drop(settle);
            if failed {
                tokio::select! {
                    _ = tokio::time::sleep(RETRY_AFTER) => {}
                    _ = cancel.cancelled() => return,
                }
            }
        }
    }
}

/// Counts one published status event of `changes` changes.
pub(crate) fn count_published(changes: usize) {
    metrics::counter!(crate::metrics::STATUS_EVENTS).increment(1);
    metrics::counter!(crate::metrics::STATUS_CHANGES).increment(changes as u64);
}

/// The status diff event for `tenant` carrying `changes` (user, online), without id.
pub fn diff_event(tenant: &str, changes: &[(String, bool)]) -> Event {
    Event {
        room: Room::tenant_room(tenant),
        r#type: STATUS_EVENT_TYPE.to_owned(),
        time: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
        publisher_id: SYSTEM_PUBLISHER.to_owned(),
        payload: Some(Payload::PresenceDiff(PresenceDiff {
            changes: changes
                .iter()
                .map(|(user, online)| change(user, *online))
                .collect(),
        })),
        ..Default::default()
    }
}

/// One entry of a diff.
pub fn change(user: &str, online: bool) -> UserStatus {
    UserStatus {
        user_id: user.to_owned(),
        status: if online {
            user_status::Status::Online
        } else {
            user_status::Status::Offline
        } as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Count(AtomicUsize, Mutex<Vec<String>>);

    #[async_trait]
    impl Settle for Count {
        async fn settle(&self, tenant: &str) -> Result<(), BusError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            self.1.lock().unwrap().push(tenant.to_owned());
            Ok(())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn one_settle_per_tenant_per_window() {
        let window = StatusWindow::new(StatusSettings::default());
        let count = Arc::new(Count(AtomicUsize::new(0), Mutex::new(Vec::new())));
        let cancel = CancellationToken::new();
        tokio::spawn(window.clone().run(Arc::downgrade(&count), cancel.clone()));
        for _ in 0..100 {
            window.mark("t1");
            window.mark("t2");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            count.0.load(Ordering::SeqCst),
            0,
            "not before the window ends"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(count.0.load(Ordering::SeqCst), 2);
        window.mark("t1");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(count.0.load(Ordering::SeqCst), 3);
        window.mark("t2");
        cancel.cancel();
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(count.0.load(Ordering::SeqCst), 3, "run returns on cancel");
        window.flush(&*count).await;
        assert_eq!(
            count.1.lock().unwrap().last().map(String::as_str),
            Some("t2")
        );
    }

    #[test]
    fn disabled_marks_nothing() {
        let window = StatusWindow::new(StatusSettings {
            enabled: false,
            ..Default::default()
        });
        window.mark("t1");
        assert!(window.dirty.lock().unwrap().is_empty());
    }
}
