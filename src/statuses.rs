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
//! - with several nodes (Redis) a tenant gets at most one event per spacing (below) cluster-wide: a settle
//!   takes every dirty user of the tenant, also those other nodes marked, and one that comes too soon
//!   after any node's last event waits ([`Outcome::Wait`]); a node saying goodbye publishes at once.
//!
//! Every event reaches each online user of the tenant, and one delivery (a write on that user's own
//! connection) costs far more than the few bytes a change adds to it. So a tenant is also settled at most
//! every `audience / --status-deliveries-per-sec` (the settle returns the audience: users its room was
//! told are online), within [`MAX_STATUS_SPACING`]: its statuses cost a node a bounded number of
//! deliveries per second, and a storm of N users connecting costs deliveries linear in its length (the
//! N²/2 changes themselves are packed in the events' two id strings, a few bytes each).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::bus::BusError;
use crate::presence::SYSTEM_PUBLISHER;
use crate::proto::v1::{event::Payload, Event, PresenceDiff};
use crate::rooms::Room;

/// Default `--status-window-ms`.
pub const DEFAULT_STATUS_WINDOW_MS: u64 = 250;
/// Changes in one `PresenceDiff` event at most; a settle with more publishes several events.
pub const MAX_CHANGES_PER_EVENT: usize = 4096;
/// After a failed settle (the bus is down), the next try waits at least this long.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// Separates the ids of a `PresenceDiff` list (the room grammar keeps it out of ids).
pub const ID_SEPARATOR: char = '\n';
/// Event type of a status diff.
pub const STATUS_EVENT_TYPE: &str = "user.status";

/// Default `--status-deliveries-per-sec`.
pub const DEFAULT_STATUS_DELIVERIES_PER_SEC: u32 = 2_500;
/// The longest a tenant's status events are spaced, whatever its size.
pub const MAX_STATUS_SPACING: Duration = Duration::from_secs(5);

/// Whether and how statuses are published.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusSettings {
    /// Off: presence is still counted (`GetPresence`), but no status event is ever published.
    pub enabled: bool,
    /// How long a node gathers a tenant's changes before publishing them.
    pub window: Duration,
    /// Deliveries per second a tenant's status events may cost this node: a tenant whose room was told
    /// of `n` online users is settled at most every `n / deliveries_per_sec` (within
    /// [`MAX_STATUS_SPACING`]), never more often than every `window`. 0: every window.
    pub deliveries_per_sec: u32,
}

impl Default for StatusSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            window: Duration::from_millis(DEFAULT_STATUS_WINDOW_MS),
            deliveries_per_sec: DEFAULT_STATUS_DELIVERIES_PER_SEC,
        }
    }
}

impl StatusSettings {
    /// How long after settling a tenant whose room was told of `audience` online users it may be
    /// settled again. Every status event reaches each of them: one event per window costs a big tenant
    /// O(users) deliveries per window, and a connect storm of N users N/window events of up to N
    /// deliveries each. Spacing the events by the audience keeps a tenant's deliveries per second
    /// bounded, so the storm costs deliveries linear in its duration (the changes themselves are still
    /// N²/2, packed a few bytes each in the events).
    fn spacing(&self, audience: usize) -> Duration {
        if self.deliveries_per_sec == 0 {
            return self.window;
        }
        let by_audience =
            Duration::from_secs_f64(audience as f64 / f64::from(self.deliveries_per_sec));
        by_audience.min(MAX_STATUS_SPACING).max(self.window)
    }
}

/// What settling a tenant did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Settled; `audience`: the users its room has now been told are online.
    Settled { audience: usize },
    /// Another node published the tenant's last event too recently (the spacing holds cluster-wide on
    /// Redis): nothing was taken; settle again after this long.
    Wait(Duration),
}

/// Publishes the settled changes of one tenant (see the module docs). Implemented by each bus.
#[async_trait]
pub(crate) trait Settle: Send + Sync + 'static {
    /// Publishes the difference between the tenant's dirty users' states and what its room was told.
    /// Not `spaced` (a node saying goodbye): whatever the tenant's spacing, never [`Outcome::Wait`].
    async fn settle(&self, tenant: &str, spaced: bool) -> Result<Outcome, BusError>;
}

/// The tenants this node made dirty since their last settle (at most the tenants with connections on
/// this node, or reaped by it, each held once), and when each may be settled next.
pub(crate) struct StatusWindow {
    settings: StatusSettings,
    state: Mutex<WindowState>,
    wake: Notify,
}

#[derive(Default)]
struct WindowState {
    dirty: HashSet<String>,
    /// Tenants settled recently, until they may be settled again; entries past are dropped at each
    /// settle, so it holds at most the tenants settled in the last [`MAX_STATUS_SPACING`].
    not_before: HashMap<String, Instant>,
}

impl StatusWindow {
    pub(crate) fn new(settings: StatusSettings) -> Arc<Self> {
        Arc::new(Self {
            settings,
            state: Mutex::new(WindowState::default()),
            wake: Notify::new(),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, WindowState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether statuses are published at all.
    pub(crate) fn enabled(&self) -> bool {
        self.settings.enabled
    }

    /// A transition of a user of `tenant` was decided: settle the tenant at the end of the window (or
    /// when its spacing allows, if later).
    pub(crate) fn mark(&self, tenant: &str) {
        if !self.settings.enabled {
            return;
        }
        let newly = {
            let mut state = self.state();
            !state.dirty.contains(tenant) && state.dirty.insert(tenant.to_owned())
        };
        if newly {
            self.wake.notify_one();
        }
    }

    /// Settles every tenant marked so far, now, whatever its spacing (a node shutting down says what
    /// it decided). Returns whether a settle failed (those tenants stay marked).
    pub(crate) async fn flush(&self, settle: &dyn Settle) -> bool {
        self.settle_due(settle, None).await.0
    }

    /// Settles the marked tenants whose spacing allows it at `now` (all if `None`). A tenant whose
    /// settle failed stays marked (retried after the next window, at least [`RETRY_AFTER`] later).
    /// Returns whether one failed, and when the earliest tenant left marked may be settled.
    async fn settle_due(
        &self,
        settle: &dyn Settle,
        now: Option<Instant>,
    ) -> (bool, Option<Instant>) {
        let tenants: Vec<String> = {
            let mut state = self.state();
            let WindowState { dirty, not_before } = &mut *state;
            if let Some(now) = now {
                not_before.retain(|_, at| *at > now);
            }
            let due: Vec<String> = dirty
                .iter()
                .filter(|t| now.is_none() || !not_before.contains_key(*t))
                .cloned()
                .collect();
            for tenant in &due {
                dirty.remove(tenant);
            }
            due
        };
        let mut failed = false;
        for tenant in tenants {
            match settle.settle(&tenant, now.is_some()).await {
                Ok(Outcome::Settled { audience }) => {
                    let next = Instant::now() + self.settings.spacing(audience);
                    self.state().not_before.insert(tenant, next);
                }
                Ok(Outcome::Wait(wait)) => {
                    let next = Instant::now() + wait;
                    let mut state = self.state();
                    state.dirty.insert(tenant.clone());
                    state.not_before.insert(tenant, next);
                }
                Err(e) => {
                    tracing::warn!(tenant = %tenant, error = %e, "publishing user statuses failed; retrying");
                    self.state().dirty.insert(tenant);
                    failed = true;
                }
            }
        }
        if failed {
            self.wake.notify_one();
        }
        let state = self.state();
        let next = state
            .dirty
            .iter()
            .filter_map(|t| state.not_before.get(t))
            .min()
            .copied();
        (failed, next)
    }

    /// Until `cancel`: one window after a tenant is marked, settles every marked tenant its spacing
    /// allows, and the others when it does. Holds `settle` weakly, so it ends when the bus is dropped. A
    /// node shutting down calls [`Self::flush`] itself.
    pub(crate) async fn run<S: Settle>(
        self: Arc<Self>,
        settle: std::sync::Weak<S>,
        cancel: CancellationToken,
    ) {
        let mut deferred: Option<Instant> = None;
        loop {
            let marked = async {
                match deferred {
                    Some(at) => tokio::select! {
                        _ = self.wake.notified() => true,
                        _ = tokio::time::sleep_until(at) => false,
                    },
                    None => {
                        self.wake.notified().await;
                        true
                    }
                }
            };
            let marked = tokio::select! {
                marked = marked => marked,
                _ = cancel.cancelled() => return,
            };
            if marked {
                tokio::select! {
                    _ = tokio::time::sleep(self.settings.window) => {}
                    _ = cancel.cancelled() => return,
                }
            }
            let Some(settle) = settle.upgrade() else {
                return;
            };
            let (failed, next) = self.settle_due(&*settle, Some(Instant::now())).await;
            drop(settle);
            deferred = next;
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
    let mut diff = PresenceDiff::default();
    for (user, online) in changes {
        let list = if *online {
            &mut diff.online
        } else {
            &mut diff.offline
        };
        if !list.is_empty() {
            list.push(ID_SEPARATOR);
        }
        list.push_str(user);
    }
    Event {
        room: Room::tenant_room(tenant),
        r#type: STATUS_EVENT_TYPE.to_owned(),
        time: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
        publisher_id: SYSTEM_PUBLISHER.to_owned(),
        payload: Some(Payload::PresenceDiff(diff)),
        ..Default::default()
    }
}

/// The (user, online) changes a diff carries: its ONLINE users, then its OFFLINE ones.
pub fn diff_changes(diff: &PresenceDiff) -> impl Iterator<Item = (&str, bool)> {
    split_ids(&diff.online)
        .map(|user| (user, true))
        .chain(split_ids(&diff.offline).map(|user| (user, false)))
}

/// The ids of one packed list (`""` is none).
fn split_ids(list: &str) -> impl Iterator<Item = &str> {
    list.split(ID_SEPARATOR).filter(|id| !id.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Counts settles; answers an audience of `.2` users.
    struct Count(AtomicUsize, Mutex<Vec<String>>, usize);

    #[async_trait]
    impl Settle for Count {
        async fn settle(&self, tenant: &str, _spaced: bool) -> Result<Outcome, BusError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            self.1.lock().unwrap().push(tenant.to_owned());
            Ok(Outcome::Settled { audience: self.2 })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn one_settle_per_tenant_per_window() {
        let window = StatusWindow::new(StatusSettings::default());
        let count = Arc::new(Count(AtomicUsize::new(0), Mutex::new(Vec::new()), 10));
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

    #[tokio::test(start_paused = true)]
    async fn a_big_tenant_is_settled_at_most_every_audience_over_rate() {
        // 10,000 deliveries/s and an audience of 5,000 users: at most every 500 ms.
        let window = StatusWindow::new(StatusSettings {
            deliveries_per_sec: 10_000,
            ..Default::default()
        });
        let count = Arc::new(Count(AtomicUsize::new(0), Mutex::new(Vec::new()), 5_000));
        let cancel = CancellationToken::new();
        tokio::spawn(window.clone().run(Arc::downgrade(&count), cancel.clone()));
        let settles = || count.0.load(Ordering::SeqCst);
        window.mark("t1");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(settles(), 1, "settled one window after the mark (250 ms)");
        window.mark("t1");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(settles(), 1, "t = 600 ms: not before 750 ms");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            settles(),
            2,
            "t = 800 ms: settled at 750 ms, without a new mark"
        );
        window.mark("t1");
        window.mark("t2");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            settles(),
            3,
            "t = 1100 ms: t2 one window after its mark, t1 held"
        );
        assert_eq!(
            count.1.lock().unwrap().last().map(String::as_str),
            Some("t2")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(settles(), 3, "t = 1200 ms: t1 not yet");
        tokio::time::sleep(Duration::from_millis(150)).await;
        // At 1250 ms, or at 1300 ms: t2's mark during the window woke the loop once more.
        assert_eq!(settles(), 4, "t = 1350 ms: t1 settled");
        cancel.cancel();
    }

    #[test]
    fn spacing_grows_with_the_audience_within_bounds() {
        let settings = StatusSettings {
            deliveries_per_sec: 10_000,
            ..Default::default()
        };
        assert_eq!(settings.spacing(0), settings.window);
        assert_eq!(
            settings.spacing(1_000),
            settings.window,
            "100 ms < the window"
        );
        assert_eq!(settings.spacing(20_000), Duration::from_secs(2));
        assert_eq!(settings.spacing(usize::MAX), MAX_STATUS_SPACING);
        let unspaced = StatusSettings {
            deliveries_per_sec: 0,
            ..settings
        };
        assert_eq!(unspaced.spacing(1_000_000), settings.window);
    }

    #[test]
    fn disabled_marks_nothing() {
        let window = StatusWindow::new(StatusSettings {
            enabled: false,
            ..Default::default()
        });
        window.mark("t1");
        assert!(window.state().dirty.is_empty());
    }
}
