//! Fewer wake-ups in a paced run: the runtime's thread sleeps to the engine's send grid
//! before it parks, so the responses that arrived meanwhile are read in one wake-up.
//!
//! In a paced run the scheduler sends on a grid ([`EngineConfig::send_quantum`], 100 ms),
//! but each response still woke the process the moment it arrived: at 100 requests/s, about
//! a hundred wake-ups a second on top of the twenty that send, each costing a context
//! switch and cold caches (measured on the paced benchmark: about one voluntary context
//! switch per response). A [`WakeGrid`] installed as the runtime's park hook
//! ([`WakeGrid::park_hook`], for `tokio::runtime::Builder::on_thread_park`) makes the
//! thread, when it has nothing left to run, sleep until the next point of that grid before
//! it waits for I/O; the kernel keeps the responses that arrive meanwhile, and the next
//! wake-up reads all of them, commits them and sends what is due.
//!
//! It is on only while holding a response back costs nothing: the engine turns it on
//! while a rate limit, not the supply of requests or the concurrency, is what holds
//! requests back, and requests go out faster than about [`MIN_PER_STEP`] per step (at a
//! slow pace, sleeping to the grid first would add a wake-up instead of saving one); off,
//! the hook returns at once. A response is then read at most one step (plus
//! [`TIMER_SLACK`]) after it arrived; sends are not delayed, they are on the grid anyway.
//!
//! [`EngineConfig::send_quantum`]: crate::EngineConfig::send_quantum

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Requests sent per step of the grid (on average) below which holding responses back to
/// the grid is not worth it. Each request makes two events, its send (on the grid) and its
/// response (anywhere); with the grid on, the process wakes once per step, and a step with
/// neither costs one wake-up more (it sleeps to the grid, finds nothing, then waits). At
/// 0.83 sends per step (the unknown-limits benchmark, 500 RPM at 100 ms) the grid took
/// its voluntary context switches from 3,263 to 1,331; at one request a second it would
/// about double them.
pub const MIN_PER_STEP: f64 = 0.7;

/// How far past a grid point the thread sleeps: tokio's timers fire on whole
/// milliseconds, rounded up, so the scheduler's timer for that grid point is due by then
/// and the wake-up does not need a second one.
pub const TIMER_SLACK: Duration = Duration::from_micros(1100);

/// Whether, and on which grid, the runtime's thread sleeps before it parks. Cheap to
/// clone; the clones share their state. One per runtime: when several engines of one
/// runtime share it, the last one to decide wins.
#[derive(Clone, Default)]
pub struct WakeGrid {
    inner: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    active: AtomicBool,
    /// The grid's step in nanoseconds; 0: no grid yet.
    step_nanos: AtomicU64,
    /// The grid's origin.
    origin: Mutex<Option<Instant>>,
    /// Sleeps taken by the hook (for tests and the curious).
    sleeps: AtomicU64,
}

impl std::fmt::Debug for WakeGrid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WakeGrid")
            .field("active", &self.is_active())
            .field("step_nanos", &self.inner.step_nanos.load(Ordering::Relaxed))
            .field("sleeps", &self.sleeps())
            .finish()
    }
}

impl WakeGrid {
    /// A grid, inactive until an engine given it (see
    /// [`EngineConfigBuilder::wake_grid`](crate::EngineConfigBuilder::wake_grid)) turns it on.
    pub fn new() -> Self {
        WakeGrid::default()
    }

    /// The hook for `tokio::runtime::Builder::on_thread_park`: while the grid is active,
    /// sleeps until [`TIMER_SLACK`] past the grid's next point; otherwise returns at once.
    pub fn park_hook(&self) -> impl Fn() + Send + Sync + 'static {
        let grid = self.clone();
        move || grid.before_park()
    }

    /// Sets the grid: its origin and step (zero: no grid, the hook never sleeps).
    pub fn set_grid(&self, origin: Instant, step: Duration) {
        *self.inner.origin.lock().unwrap_or_else(|e| e.into_inner()) = Some(origin);
        let step = u64::try_from(step.as_nanos()).unwrap_or(u64::MAX);
        self.inner.step_nanos.store(step, Ordering::Relaxed);
    }

    /// Turns the sleeping on or off.
    pub fn set_active(&self, active: bool) {
        self.inner.active.store(active, Ordering::Relaxed);
    }

    /// Whether the hook sleeps.
    pub fn is_active(&self) -> bool {
        self.inner.active.load(Ordering::Relaxed)
    }

    /// How many times the hook has slept.
    pub fn sleeps(&self) -> u64 {
        self.inner.sleeps.load(Ordering::Relaxed)
    }

    /// The instant the hook sleeps until when called at `now`, if it sleeps.
    pub fn wake_at(&self, now: Instant) -> Option<Instant> {
        let shared = &self.inner;
        if !shared.active.load(Ordering::Relaxed) {
            return None;
        }
        let step = u128::from(shared.step_nanos.load(Ordering::Relaxed));
        let origin = (*shared.origin.lock().unwrap_or_else(|e| e.into_inner()))?;
        if step == 0 {
            return None;
        }
        let since = now.saturating_duration_since(origin).as_nanos();
        let next = (since / step + 1) * step;
        let next = u64::try_from(next).ok()?;
        Some(origin + Duration::from_nanos(next) + TIMER_SLACK)
    }

    fn before_park(&self) {
        let now = Instant::now();
        if let Some(at) = self.wake_at(now) {
            self.inner.sleeps.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(at.saturating_duration_since(now));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inactive_grid_does_not_sleep() {
        let grid = WakeGrid::new();
        let hook = grid.park_hook();
        let t0 = Instant::now();
        grid.set_grid(t0, Duration::from_secs(3600));
        hook();
        assert_eq!(grid.sleeps(), 0);
        assert!(
            t0.elapsed() < Duration::from_secs(3000),
            "slept to the grid"
        );
        assert_eq!(grid.wake_at(t0), None);
    }

    #[test]
    fn active_grid_sleeps_to_just_past_its_next_point() {
        let grid = WakeGrid::new();
        let origin = Instant::now();
        let step = Duration::from_millis(40);
        grid.set_grid(origin, step);
        assert_eq!(grid.wake_at(origin), None, "inactive until turned on");
        grid.set_active(true);
        let at = grid.wake_at(origin + Duration::from_millis(95)).unwrap();
        assert_eq!(at, origin + Duration::from_millis(120) + TIMER_SLACK);
        let at = grid.wake_at(origin + Duration::from_millis(120)).unwrap();
        assert_eq!(at, origin + Duration::from_millis(160) + TIMER_SLACK);
        let hook = grid.park_hook();
        hook();
        assert!(
            origin.elapsed() >= step + TIMER_SLACK,
            "woke before the grid point"
        );
        hook();
        assert!(origin.elapsed() >= 2 * step + TIMER_SLACK);
        assert_eq!(grid.sleeps(), 2);
        grid.set_active(false);
        hook();
        assert_eq!(grid.sleeps(), 2);
        assert!(!grid.is_active());
    }
}
