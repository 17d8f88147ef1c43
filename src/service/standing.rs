//! Standing orders: a target's steady rounds, run by its module's own timer thread.
//!
//! A round through the call queue ([`super::lanes`]) wakes three threads: the async worker on
//! its timer, a module thread for the call, the worker again for the result. Once a target
//! seeds steadily, its loop hands the module a *standing order* instead: at each due instant
//! the module's timer thread takes the bytes, seeds and books the injection itself (audit,
//! metrics), one wake-up per injection. The order comes back to the loop only when a round is
//! anything but a plain success (no bytes in the pool, an error, a hang, a panic), when the
//! loop has work of its own after a round (signing the ledger's head: [`Order::until`]), or
//! the target stops; the loop handles that round as it handles any (see `target_loop`).
//!
//! A call can hang. Before each call the timer thread arms an alarm, a timerfd read by the
//! module's watchdog thread, unless the alarm is already set within the call's window (it may go
//! off a little late: see `alarm_window`); a call that returns leaves it set while the next
//! round is due before it goes off. No wake-up while calls return in time, and about one system
//! call per window instead of two per call. When the alarm goes off, the watchdog gives the
//! other orders a timer thread of their own once a call has run [`STALL`] (so one hung token
//! never holds up another), and tells the order's loop that the call hung once it has run the
//! target's timeout. The call is left on its thread; when it returns, a success is booked like
//! any (its bytes are in the token) and the target goes back to its loop.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::hsm::{HsmError, Target};
use crate::telemetry::{self, ledger};

pub use super::lanes::STALL;

/// How late a timer thread usually wakes for a due round, on a loaded machine.
const WAKE_LATENESS: Duration = Duration::from_millis(5);

/// A call's state, shared with the caller's [`super::worker::Worker`].
pub const RUNNING: u8 = 0;
pub const HUNG: u8 = 1;
pub const DONE: u8 = 2;

/// One round of a standing order, on the timer thread: take the bytes, seed, book.
pub type Round = Arc<dyn Fn(&mut Target) -> Step + Send + Sync>;

/// What one round did.
#[derive(Debug)]
pub enum Step {
    /// Seeded and booked: the order goes on.
    Seeded,
    /// The pool had no bytes at hand: the loop takes this round (it can wait for a purchase).
    NoBytes,
    /// The round failed (its bytes, if taken, are wiped).
    Failed(HsmError),
}

/// Why a standing order came back to its loop. `at` is the due instant of the round it ended
/// on, so that the loop keeps the target's schedule.
#[derive(Debug)]
pub enum Ended {
    /// The round due at `at` is the loop's to run: the pool had no bytes at hand, or the
    /// loop has work of its own after that round ([`Order::until`]).
    Due {
        at: Instant,
    },
    Failed {
        at: Instant,
        error: HsmError,
    },
    /// The call has not returned after the target's timeout; the target comes back when it
    /// does.
    Hung {
        at: Instant,
        waited: Duration,
    },
    Panicked {
        at: Instant,
    },
    /// Cancelled by the loop (nobody listens for this one).
    Cancelled,
}

/// One target's standing order.
pub struct Order {
    /// When its first round is due.
    pub first: Instant,
    pub period: Duration,
    pub timeout: Duration,
    /// The first round due at or after this instant is handed back to the loop, not run: the
    /// loop has work of its own after it (signing the ledger's head with the target's token).
    pub until: Option<Instant>,
    pub target: Target,
    pub round: Round,
    /// Told once, when the order ends (or its call hangs). While a round runs, the sender is
    /// with the call ([`Calling`]), where the watchdog can reach it.
    pub tell: Option<oneshot::Sender<Ended>>,
    /// The target, handed back when the order ends.
    pub give_back: oneshot::Sender<Target>,
    /// RUNNING until the target is handed back (HUNG while its call is counted hung).
    pub state: Arc<AtomicU8>,
}

/// An order whose round is inside the module now.
struct Calling {
    /// The timer thread making the call.
    thread: u64,
    due: Instant,
    since: Instant,
    timeout: Duration,
    /// Taken by the watchdog when it tells the loop that the call hung.
    tell: Option<oneshot::Sender<Ended>>,
    cancelled: bool,
    state: Arc<AtomicU8>,
}

/// The orders whose rounds are inside the module now, by id: one per timer thread, and a module
/// has more than one timer thread only while calls hang. A list that keeps its room: a round
/// moves its order in and out with no hashing and no allocation.
#[derive(Default)]
struct Calls(Vec<(u64, Calling)>);

impl Calls {
    fn insert(&mut self, id: u64, calling: Calling) {
        debug_assert!(
            self.get_mut(id).is_none(),
            "order {id} called twice at once"
        );
        self.0.push((id, calling));
    }

    fn get_mut(&mut self, id: u64) -> Option<&mut Calling> {
        self.0.iter_mut().find(|(i, _)| *i == id).map(|(_, c)| c)
    }

    fn remove(&mut self, id: u64) -> Option<Calling> {
        let at = self.0.iter().position(|(i, _)| *i == id)?;
        Some(self.0.swap_remove(at).1)
    }

    fn values(&self) -> impl Iterator<Item = &Calling> {
        self.0.iter().map(|(_, c)| c)
    }

    fn values_mut(&mut self) -> impl Iterator<Item = &mut Calling> {
        self.0.iter_mut().map(|(_, c)| c)
    }
}

#[derive(Default)]
struct Orders {
    /// By due instant, then id. Boxed: an order moves out and back in at every round, and
    /// the map's nodes shift their entries (an order is about 460 bytes).
    waiting: BTreeMap<(Instant, u64), Box<Order>>,
    calling: Calls,
    /// The timer thread serving the waiting orders now, if any.
    serving: Option<u64>,
    /// When the alarm goes off, as last set (`None`: disarmed or gone off).
    armed: Option<Instant>,
    next_thread: u64,
    next_id: u64,
}

/// A module's standing orders and the threads that run them.
pub struct Scheduler {
    orders: Mutex<Orders>,
    /// The serving timer thread waits here for the next due order.
    wake: Condvar,
    /// Calls hung now, counted with the module's other hung calls (see `worker`).
    hung: Arc<AtomicUsize>,
    /// The watchdog's alarm, made when the first order comes; `None` inside if it cannot be
    /// (then there are no standing orders: loops use the call queue).
    alarm: OnceLock<Option<Alarm>>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler").finish_non_exhaustive()
    }
}

/// Where an order is, for [`Scheduler::cancel`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrderId(u64);

impl Scheduler {
    pub fn new(hung: Arc<AtomicUsize>) -> Self {
        Self {
            orders: Mutex::new(Orders::default()),
            wake: Condvar::new(),
            hung,
            alarm: OnceLock::new(),
        }
    }

    fn orders(&self) -> MutexGuard<'_, Orders> {
        self.orders.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether standing orders can be placed here (the watchdog's alarm exists).
    pub fn available(&'static self) -> bool {
        self.alarm().is_some()
    }

    fn alarm(&'static self) -> Option<&'static Alarm> {
        self.alarm
            .get_or_init(|| {
                let alarm = Alarm::new()
                    .inspect_err(|e| {
                        tracing::debug!("no timerfd for the PKCS#11 watchdog ({e}); rounds go through the call queue")
                    })
                    .ok()?;
                let started = std::thread::Builder::new()
                    .name("qseed-p11-watch".into())
                    .spawn(move || self.watch());
                started.ok().map(|_| alarm)
            })
            .as_ref()
    }

    /// Places `order`; its first round is due at `order.first`. `Err` gives it back when
    /// orders cannot be placed (see [`Scheduler::available`]).
    pub fn place(&'static self, order: Order) -> Result<OrderId, Box<Order>> {
        if self.alarm().is_none() {
            return Err(Box::new(order));
        }
        let mut orders = self.orders();
        let id = orders.next_id;
        orders.next_id += 1;
        orders.waiting.insert((order.first, id), Box::new(order));
        let earliest = orders.waiting.keys().next().map(|k| k.1) == Some(id);
        if orders.serving.is_none() {
            self.serve(&mut orders);
        } else if earliest {
            self.wake.notify_all();
        }
        // A new order while the serving thread is in a call: its call may now hold this one up.
        self.arm(&mut orders);
        Ok(OrderId(id))
    }

    /// Ends an order: at once if it waits (its target is handed back now), else when its call
    /// returns.
    pub fn cancel(&self, id: OrderId) {
        let mut orders = self.orders();
        if let Some(calling) = orders.calling.get_mut(id.0) {
            calling.cancelled = true;
            return;
        }
        let key = orders.waiting.keys().find(|k| k.1 == id.0).copied();
        if let Some(waiting) = key.and_then(|key| orders.waiting.remove(&key)) {
            drop(orders);
            self.hand_back(
                waiting.target,
                waiting.give_back,
                &waiting.state,
                waiting.tell,
                Ended::Cancelled,
            );
        }
    }

    /// Starts a timer thread to serve the waiting orders (the one serving before, if any, ends
    /// after its call).
    fn serve(&'static self, orders: &mut Orders) {
        let thread = orders.next_thread;
        orders.next_thread += 1;
        orders.serving = Some(thread);
        let started = std::thread::Builder::new()
            .name("qseed-p11-timer".into())
            .spawn(move || self.run(thread));
        if let Err(e) = started {
            // Orders wait until a later place() or the watchdog starts one.
            tracing::warn!("cannot start a PKCS#11 timer thread: {e}");
            orders.serving = None;
        }
        self.wake.notify_all();
    }

    /// A timer thread: runs the due rounds, one after another, until no order waits or another
    /// thread serves.
    fn run(&'static self, thread: u64) {
        // Audit records and routine log lines wait for this thread's flush, made before a
        // sleep that would keep them past the ledger's delay (see `ledger::OWN_RECORDS_DELAY`).
        telemetry::hold_this_threads_output();
        struct FlushOnExit;
        impl Drop for FlushOnExit {
            fn drop(&mut self) {
                telemetry::flush_held();
            }
        }
        let _flush = FlushOnExit;
        // When this thread's oldest unwritten audit record was booked.
        let mut unwritten_since: Option<Instant> = None;
        let mut orders = self.orders();
        loop {
            if orders.serving != Some(thread) {
                return;
            }
            let Some((&(due, id), _)) = orders.waiting.first_key_value() else {
                orders.serving = None;
                return;
            };
            let now = Instant::now();
            // Records and lines are written before a sleep that would keep them waiting past
            // the ledger's delay: with targets staggered over the period, one write a second
            // carries every record of that second, instead of each injection its own.
            let overdue = unwritten_since.is_some_and(|since| {
                due.saturating_duration_since(since) >= ledger::OWN_RECORDS_DELAY
            });
            if due > now && overdue {
                drop(orders);
                telemetry::flush_held();
                unwritten_since = None;
                orders = self.orders();
                continue;
            }
            if due > now {
                orders = self
                    .wake
                    .wait_timeout(orders, due - now)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
                continue;
            }
            let Some(mut order) = orders.waiting.remove(&(due, id)) else {
                continue;
            };
            if order.until.is_some_and(|until| due >= until) {
                drop(orders);
                let tell = order.tell.take();
                self.hand_back(
                    order.target,
                    order.give_back,
                    &order.state,
                    tell,
                    Ended::Due { at: due },
                );
                orders = self.orders();
                continue;
            }
            orders.calling.insert(
                id,
                Calling {
                    thread,
                    due,
                    since: now,
                    timeout: order.timeout,
                    tell: order.tell.take(),
                    cancelled: false,
                    state: order.state.clone(),
                },
            );
            self.arm(&mut orders);
            drop(orders);
            let round = order.round.clone();
            let step = std::panic::catch_unwind(AssertUnwindSafe(|| round(&mut order.target)));
            unwritten_since.get_or_insert(now);
            orders = self.orders();
            let Some(calling) = orders.calling.remove(id) else {
                continue;
            };
            let told_hung = calling.tell.is_none();
            if told_hung {
                late(&order.target, &step, calling.since.elapsed());
            }
            match (calling.tell, calling.cancelled, step) {
                (Some(tell), false, Ok(Step::Seeded)) => {
                    order.tell = Some(tell);
                    let mut next = due + order.period;
                    // After a stall (a slow HSM, a suspended machine), the missed rounds are
                    // skipped, as the loop does.
                    let now = Instant::now();
                    if next < now {
                        next = now + order.period;
                    }
                    orders.waiting.insert((next, id), order);
                    // Once the order waits again: its next round may keep the alarm as it is.
                    self.arm(&mut orders);
                    match orders.serving {
                        // This thread serves on (the usual case: no wake-up needed).
                        Some(serving) if serving == thread => {}
                        // Another thread took over while this call ran long: it may sleep
                        // past this order's next round.
                        Some(_) => self.wake.notify_all(),
                        // The other thread found nothing to wait for and left.
                        None => orders.serving = Some(thread),
                    }
                }
                (tell, cancelled, step) => {
                    self.arm(&mut orders);
                    drop(orders);
                    // The loop was told already if its call hung (`tell` is gone).
                    let ended = match step {
                        _ if cancelled => Ended::Cancelled,
                        Ok(Step::NoBytes) => Ended::Due { at: due },
                        Ok(Step::Failed(error)) => Ended::Failed { at: due, error },
                        Ok(Step::Seeded) => Ended::Cancelled,
                        Err(_) => Ended::Panicked { at: due },
                    };
                    self.hand_back(order.target, order.give_back, &order.state, tell, ended);
                    orders = self.orders();
                }
            }
        }
    }

    /// Ends an order: the loop is told why (unless it was told already), the hung count is
    /// settled, and the target goes back.
    fn hand_back(
        &self,
        target: Target,
        give_back: oneshot::Sender<Target>,
        state: &AtomicU8,
        tell: Option<oneshot::Sender<Ended>>,
        ended: Ended,
    ) {
        if state.swap(DONE, Ordering::SeqCst) == HUNG {
            self.hung.fetch_sub(1, Ordering::SeqCst);
        }
        if let Some(tell) = tell {
            let _ = tell.send(ended);
        }
        // A loop that is gone drops the target here, on this thread: its session is closed
        // inside the module's gate (see `Target`'s Drop).
        let _ = give_back.send(target);
    }

    /// The watchdog: wakes only when the alarm goes off (a call ran long).
    fn watch(&'static self) {
        let Some(Some(alarm)) = self.alarm.get() else {
            return;
        };
        loop {
            if alarm.wait().is_err() {
                // Read errors on a timerfd are not expected; do not spin on one.
                std::thread::sleep(STALL);
            }
            // Audit records and lines of a burst whose timer thread is stuck in a call now.
            telemetry::flush_held();
            let mut orders = self.orders();
            // Gone off: `arm` below sets it again if a call still needs it.
            orders.armed = None;
            let now = Instant::now();
            let serving = orders.serving;
            let mut stalled = false;
            for calling in orders.calling.values_mut() {
                let ran = now.saturating_duration_since(calling.since);
                if calling.tell.is_some() && ran >= calling.timeout {
                    if calling
                        .state
                        .compare_exchange(RUNNING, HUNG, Ordering::SeqCst, Ordering::SeqCst)
                        .is_ok()
                    {
                        self.hung.fetch_add(1, Ordering::SeqCst);
                    }
                    if let Some(tell) = calling.tell.take() {
                        let _ = tell.send(Ended::Hung {
                            at: calling.due,
                            waited: ran,
                        });
                    }
                }
                stalled |= Some(calling.thread) == serving && ran >= STALL;
            }
            if stalled && !orders.waiting.is_empty() {
                self.serve(&mut orders);
            }
            self.arm(&mut orders);
        }
    }

    /// Sets the alarm for the watchdog's next task: the first call to outlive its timeout, or
    /// the serving thread's call holding up waiting orders. The alarm may go off late by a
    /// share of what it waits for ([`alarm_window`]); an alarm already set within that window
    /// is left as it is, so while rounds come closer together than the window, a call that
    /// returns in time costs no system call at all.
    fn arm(&self, orders: &mut Orders) {
        let Some(Some(alarm)) = self.alarm.get() else {
            return;
        };
        let others_wait = !orders.waiting.is_empty();
        let window = orders
            .calling
            .values()
            .flat_map(|c| {
                let timeout = c.tell.is_some().then(|| alarm_window(c.since, c.timeout));
                let stall = (others_wait && Some(c.thread) == orders.serving)
                    .then(|| alarm_window(c.since, STALL));
                [timeout, stall]
            })
            .flatten()
            .reduce(|(a, b), (c, d)| (a.min(c), b.min(d)));
        let next_round = orders.waiting.first_key_value().map(|(&(due, _), _)| due);
        if let Some(at) = alarm_change(window, orders.armed, next_round) {
            orders.armed = at;
            alarm.set(at);
        }
    }
}

/// What to do with the alarm, set for `armed`, given the window of the watchdog's next task
/// (when it is due, the latest the alarm may go off for it) and the next round waiting:
/// `None` leaves it as it is, `Some(at)` sets it for `at` (`Some(None)` disarms it).
fn alarm_change(
    window: Option<(Instant, Instant)>,
    armed: Option<Instant>,
    next_round: Option<Instant>,
) -> Option<Option<Instant>> {
    let at = match (window, armed) {
        // Goes off no earlier than the first task is due (no wake-up for nothing), and no
        // later than any task allows.
        (Some((due, latest)), Some(armed)) if due <= armed && armed <= latest => return None,
        (Some((_, latest)), _) => Some(latest),
        // The alarm of a call that returned would only wake the watchdog for nothing, and the
        // next round arms it before that: left as it is while that round is due before it goes
        // off. A round woken later than that costs the watchdog one wake-up with nothing to do.
        (None, Some(armed)) if next_round.is_some_and(|next| next + WAKE_LATENESS < armed) => {
            return None
        }
        (None, _) => None,
    };
    (at != armed).then_some(at)
}

/// When the watchdog's alarm may go off for a task due `wait` after `since`: from then until
/// an eighth of `wait` later for a call's timeout (30 s: up to 3.75 s late), up to `STALL`
/// later for a stall (the other orders get a thread of their own after 50 to 100 ms).
fn alarm_window(since: Instant, wait: Duration) -> (Instant, Instant) {
    let due = since + wait;
    let slack = if wait <= STALL { wait } else { wait / 8 };
    (due, due + slack)
}

/// Logs a call the loop was told had hung, now that it returned.
fn late(target: &Target, step: &std::thread::Result<Step>, after: Duration) {
    let name = &target.config().name;
    let after = after.as_secs();
    match step {
        Ok(Step::Seeded) => tracing::warn!(
            target_name = %name,
            "{name}: the C_SeedRandom given up on returned after {after}s and succeeded: its \
             bytes are in the token"
        ),
        Ok(Step::Failed(e)) => tracing::warn!(
            target_name = %name,
            "{name}: the C_SeedRandom given up on returned after {after}s: {e}; its bytes \
             were wiped"
        ),
        Ok(Step::NoBytes) | Err(_) => tracing::warn!(
            target_name = %name,
            "{name}: the call given up on returned after {after}s"
        ),
    }
}

/// A one-shot monotonic timer whose owner can set and clear it without waking the thread that
/// waits on it (a timerfd).
struct Alarm {
    fd: OwnedFd,
}

impl Alarm {
    fn new() -> std::io::Result<Self> {
        use rustix::time::{timerfd_create, TimerfdClockId, TimerfdFlags};
        let fd = timerfd_create(TimerfdClockId::Monotonic, TimerfdFlags::CLOEXEC)?;
        Ok(Self { fd })
    }

    /// Goes off at `at`, or never (`None`).
    fn set(&self, at: Option<Instant>) {
        use rustix::time::{timerfd_settime, Itimerspec, TimerfdTimerFlags, Timespec};
        let value = match at {
            // Zero disarms; an instant already past goes off at once.
            Some(at) => at
                .saturating_duration_since(Instant::now())
                .max(Duration::from_nanos(1)),
            None => Duration::ZERO,
        };
        let spec = Itimerspec {
            it_interval: Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: Timespec {
                tv_sec: value.as_secs().try_into().unwrap_or(i64::MAX),
                tv_nsec: value.subsec_nanos().into(),
            },
        };
        if let Err(e) = timerfd_settime(&self.fd, TimerfdTimerFlags::empty(), &spec) {
            tracing::debug!("cannot set the PKCS#11 watchdog's alarm: {e}");
        }
    }

    /// Blocks until the alarm goes off.
    fn wait(&self) -> std::io::Result<()> {
        let mut expirations = [0u8; 8];
        rustix::io::read(&self.fd, &mut expirations)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn an_alarm_within_the_window_is_left_as_it_is() {
        let t = Instant::now();
        let window = Some(alarm_window(t, STALL));
        assert_eq!(window, Some((t + STALL, t + 2 * STALL)));
        // Set by a call 15 ms earlier (its latest), it goes off in time for this one too.
        let armed = Some(t - 15 * MS + 2 * STALL);
        assert_eq!(alarm_change(window, armed, None), None);
    }

    #[test]
    fn an_alarm_outside_the_window_is_set_to_its_latest() {
        let t = Instant::now();
        let window = Some(alarm_window(t, STALL));
        // Too late: this call would be held up past its stall.
        let late = Some(t + 3 * STALL);
        assert_eq!(alarm_change(window, late, None), Some(Some(t + 2 * STALL)));
        // Too early: the watchdog would wake for nothing.
        let early = Some(t + STALL - MS);
        assert_eq!(alarm_change(window, early, None), Some(Some(t + 2 * STALL)));
        // Not set.
        assert_eq!(alarm_change(window, None, None), Some(Some(t + 2 * STALL)));
    }

    #[test]
    fn a_timeout_may_go_off_an_eighth_late() {
        let t = Instant::now();
        let timeout = Duration::from_secs(30);
        let (due, latest) = alarm_window(t, timeout);
        assert_eq!((due, latest), (t + timeout, t + timeout + timeout / 8));
        // Rounds a second apart share one alarm for three rounds.
        let armed = Some(latest);
        for round in 1..=3 {
            let window = Some(alarm_window(t + round * 1000 * MS, timeout));
            assert_eq!(alarm_change(window, armed, None), None, "round {round}");
        }
        let window = Some(alarm_window(t + 4000 * MS, timeout));
        assert!(alarm_change(window, armed, None).is_some());
    }

    #[test]
    fn with_no_call_the_alarm_stays_only_for_a_round_due_before_it() {
        let t = Instant::now();
        let armed = Some(t + 100 * MS);
        assert_eq!(alarm_change(None, armed, Some(t + 15 * MS)), None);
        // The next round comes after it would go off (or none waits): disarmed.
        assert_eq!(alarm_change(None, armed, Some(t + 99 * MS)), Some(None));
        assert_eq!(alarm_change(None, armed, None), Some(None));
        // Disarmed already: nothing to do.
        assert_eq!(alarm_change(None, None, None), None);
    }
}
