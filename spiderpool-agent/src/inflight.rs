//! Commands that finish whatever happens to their connection.
//!
//! The plugin gives up on an ADD after 60 s and the runtime then sends DEL. If the ADD's work
//! were tied to the HTTP connection, dropping it half-way would leave picks pending in the cache
//! and a queued block edit that is still written after the DEL has run: a record that leaks for
//! the pod's lifetime. So every ADD and DEL runs as its own task ([`InFlight::run`]) that ends
//! when the command ends, not when the client leaves, and the commands of one container are
//! serialized: a DEL waits for the container's in-flight ADD (its writes are then visible and
//! the DEL frees them). A DEL that cannot get its turn within [`InFlight::wait`] fails
//! retryably instead of succeeding without freeing. Shutdown waits for running commands
//! ([`InFlight::drain`]).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use spiderpool_core::api::{ApiError, ErrorKind};
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};
use tokio_util::task::TaskTracker;

/// The running commands of a node, serialized per container.
pub struct InFlight {
    containers: Mutex<HashMap<String, Weak<AsyncMutex<()>>>>,
    tasks: TaskTracker,
    /// When each running command started, by a number of its own.
    running: Arc<Mutex<HashMap<u64, (String, Instant)>>>,
    next: AtomicU64,
    /// How long a command waits for the container's earlier command before it gives up.
    pub wait: Duration,
}

impl Default for InFlight {
    fn default() -> Self {
        InFlight {
            containers: Mutex::new(HashMap::new()),
            tasks: TaskTracker::new(),
            running: Arc::default(),
            next: AtomicU64::new(0),
            // Below the plugin's 60 s, so the runtime sees a retryable error, not a timeout.
            wait: Duration::from_secs(50),
        }
    }
}

impl InFlight {
    fn slot(&self, container: &str) -> Arc<AsyncMutex<()>> {
        let mut map = self.containers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = map.get(container).and_then(Weak::upgrade) {
            return m;
        }
        if map.len() >= 1024 {
            map.retain(|_, w| w.strong_count() > 0);
        }
        let m = Arc::new(AsyncMutex::new(()));
        map.insert(container.to_string(), Arc::downgrade(&m));
        m
    }

    /// Waits for the container's turn (its earlier commands finished).
    async fn turn(&self, container: &str) -> Result<OwnedMutexGuard<()>, ApiError> {
        let slot = self.slot(container);
        tokio::time::timeout(self.wait, slot.lock_owned())
            .await
            .map_err(|_| {
                ApiError::new(
                    ErrorKind::Unavailable,
                    format!(
                        "an earlier command for container {container} is still running after {}s (a store write is slow); the runtime retries",
                        self.wait.as_secs()
                    ),
                )
            })
    }

    /// Runs `command` for `container` as a task of its own, after the container's earlier
    /// commands, and returns its answer. Dropping the returned future (the client left) does not
    /// stop the command: it ends as it would have, and the next command of the container waits
    /// for it.
    pub async fn run<T, F>(self: &Arc<Self>, container: &str, command: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, ApiError>> + Send + 'static,
    {
        let this = self.clone();
        let container = container.to_string();
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let running = Running::start(&self.running, id, &container);
        let task = self.tasks.spawn(async move {
            let _running = running;
            let _turn = this.turn(&container).await?;
            command.await
        });
        task.await.unwrap_or_else(|e| {
            Err(ApiError::new(
                ErrorKind::Internal,
                format!("the command failed unexpectedly: {e}"),
            ))
        })
    }

    /// The command running longest, and for how long (a command past every store deadline
    /// means something is wedged: the liveness probe reports it).
    pub fn oldest(&self) -> Option<(String, Duration)> {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        running
            .values()
            .min_by_key(|(_, t)| *t)
            .map(|(c, t)| (c.clone(), t.elapsed()))
    }

    /// Waits up to `limit` for the running commands to end (graceful shutdown); how many were
    /// still running when it gave up.
    pub async fn drain(&self, limit: Duration) -> usize {
        self.tasks.close();
        let _ = tokio::time::timeout(limit, self.tasks.wait()).await;
        self.tasks.len()
    }
}

/// A running command's entry, removed when the command ends (or is dropped).
struct Running {
    map: Arc<Mutex<HashMap<u64, (String, Instant)>>>,
    id: u64,
}

impl Running {
    fn start(map: &Arc<Mutex<HashMap<u64, (String, Instant)>>>, id: u64, container: &str) -> Self {
        map.lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, (container.to_string(), Instant::now()));
        Running {
            map: map.clone(),
            id,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[tokio::test]
    async fn a_dropped_command_still_finishes_and_the_next_one_waits_for_it() {
        let f = Arc::new(InFlight::default());
        let done = Arc::new(AtomicUsize::new(0));
        let d = done.clone();
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let first = f.run("c1", async move {
            let _ = started_tx.send(());
            tokio::time::sleep(Duration::from_millis(200)).await;
            d.store(1, Ordering::SeqCst);
            Ok::<_, ApiError>(())
        });
        // The client leaves once the command is running.
        tokio::select! {
            _ = first => panic!("the first command cannot have finished"),
            _ = started_rx => {}
        }
        let d = done.clone();
        let seen = f
            .run(
                "c1",
                async move { Ok::<_, ApiError>(d.load(Ordering::SeqCst)) },
            )
            .await
            .expect("second");
        assert_eq!(seen, 1, "the second command ran before the first ended");
        assert_eq!(f.drain(Duration::from_secs(1)).await, 0);
    }

    #[tokio::test]
    async fn other_containers_do_not_wait_and_a_stuck_one_fails_retryably() {
        let f = Arc::new(InFlight {
            wait: Duration::from_millis(100),
            ..InFlight::default()
        });
        let stuck = f.run("c1", async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok::<_, ApiError>(())
        });
        tokio::pin!(stuck);
        tokio::select! {
            _ = &mut stuck => panic!("cannot end"),
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
        let (who, age) = f.oldest().expect("one running");
        assert_eq!(who, "c1");
        assert!(age >= Duration::from_millis(20));
        let other = f.run("c2", async { Ok::<_, ApiError>(2) }).await;
        assert_eq!(other.expect("c2"), 2);
        let err = f
            .run("c1", async { Ok::<_, ApiError>(0) })
            .await
            .expect_err("waits past the limit");
        assert_eq!(err.kind, ErrorKind::Unavailable);
        assert!(err.message.contains("c1"), "{}", err.message);
        assert_eq!(f.drain(Duration::from_millis(10)).await, 1);
    }
}
