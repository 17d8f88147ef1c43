//! The queue that carries PKCS#11 calls to blocking threads, a few threads for many calls.
//!
//! Handing every call to a thread of its own wakes one thread per call, and waking a thread on
//! another CPU is the dearest part of a round (an inter-processor interrupt; in a virtual
//! machine an exit to the hypervisor). Here calls wait in one queue and a *drainer*, a blocking
//! thread, takes them one after another until the queue is empty: the 256 calls of a round
//! that falls on one instant wake a handful of threads, not 256.
//!
//! One drainer must never hold up the calls behind it, because a call can hang. Another
//! drainer starts when a call is queued and no drainer is free (every one is inside a call
//! that began more than [`STALL`] ago), and when the queue is longer than [`CALLS_PER_DRAINER`]
//! per free drainer (slow HSMs get calls in parallel). A waiting caller [`kick`]s the queue
//! every [`STALL`], so a call queued behind one that hangs later gets a drainer too.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// A drainer inside one call for longer than this no longer counts as free.
pub const STALL: Duration = Duration::from_millis(50);
/// Queued calls per free drainer before another starts.
const CALLS_PER_DRAINER: usize = 16;

/// One PKCS#11 call with what it reports back.
pub type Job = Box<dyn FnOnce() + Send + 'static>;

/// How a drainer thread is started: on the module's pooled threads, or on a thread of its own
/// once hung calls hold half of those (see `worker`).
pub type Spawn<'a> = &'a dyn Fn(Box<dyn FnOnce() + Send + 'static>);

/// A queue of calls and the drainers that serve it: each module has one (see `worker`).
pub struct Lanes {
    queue: Mutex<Queue>,
}

struct Queue {
    jobs: VecDeque<Job>,
    drainers: Vec<Drainer>,
    next_id: u64,
}

struct Drainer {
    id: u64,
    /// When its current call began; `None` between calls.
    in_call_since: Option<Instant>,
}

impl Queue {
    const fn new() -> Self {
        Self {
            jobs: VecDeque::new(),
            drainers: Vec::new(),
            next_id: 0,
        }
    }

    /// A drainer to start, if the queued calls need one.
    fn drainer_needed(&mut self, now: Instant) -> Option<u64> {
        if self.jobs.is_empty() {
            return None;
        }
        let free = self
            .drainers
            .iter()
            .filter(|d| {
                d.in_call_since
                    .is_none_or(|s| now.duration_since(s) < STALL)
            })
            .count();
        if free > 0 && self.jobs.len() <= free * CALLS_PER_DRAINER {
            return None;
        }
        let id = self.next_id;
        self.next_id += 1;
        self.drainers.push(Drainer {
            id,
            in_call_since: None,
        });
        Some(id)
    }

    /// The next call for drainer `id`, or `None` when the queue is empty; then the drainer is
    /// off the list in the same step, so a call queued right after starts a new drainer
    /// instead of waiting for a drainer that is leaving.
    fn next_job(&mut self, id: u64, now: Instant) -> Option<Job> {
        let next = self.jobs.pop_front();
        match &next {
            Some(_) => {
                if let Some(me) = self.drainers.iter_mut().find(|d| d.id == id) {
                    me.in_call_since = Some(now);
                }
            }
            None => self.drainers.retain(|d| d.id != id),
        }
        next
    }
}

impl Lanes {
    pub const fn new() -> Self {
        Self {
            queue: Mutex::new(Queue::new()),
        }
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `job`; starts a drainer with `spawn` if no free one will reach it soon.
    pub fn submit(&'static self, job: Job, spawn: Spawn<'_>) {
        let start = {
            let mut queue = self.queue();
            queue.jobs.push_back(job);
            queue.drainer_needed(Instant::now())
        };
        if let Some(id) = start {
            spawn(Box::new(move || self.drain(id)));
        }
    }

    /// Starts a drainer if the queued calls wait behind stalled ones.
    pub fn kick(&'static self, spawn: Spawn<'_>) {
        let start = self.queue().drainer_needed(Instant::now());
        if let Some(id) = start {
            spawn(Box::new(move || self.drain(id)));
        }
    }

    /// Takes calls until the queue is empty. A call that panics loses only its own answer (its
    /// caller sees the channel closed); the drainer goes on.
    fn drain(&self, id: u64) {
        // Leaves the list on every way out (`next_job` takes it off when the queue is empty),
        // so a drainer that is gone never counts as free or stalled.
        struct Leave<'a>(&'a Lanes, u64);
        impl Drop for Leave<'_> {
            fn drop(&mut self) {
                self.0.queue().drainers.retain(|d| d.id != self.1);
            }
        }
        let _leave = Leave(self, id);
        loop {
            let Some(job) = self.queue().next_job(id, Instant::now()) else {
                return;
            };
            let _ = std::panic::catch_unwind(AssertUnwindSafe(job));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn job() -> Job {
        Box::new(|| {})
    }

    #[test]
    fn a_drainer_that_finds_the_queue_empty_is_gone_for_the_next_call() {
        let now = Instant::now();
        let mut queue = Queue::new();
        queue.jobs.push_back(job());
        let id = queue
            .drainer_needed(now)
            .expect("the first call starts a drainer");
        assert!(queue.next_job(id, now).is_some());
        assert!(queue.next_job(id, now).is_none());
        // Were the leaving drainer still listed as free, this call would wait for it in vain
        // until its caller's next kick.
        queue.jobs.push_back(job());
        assert!(queue.drainer_needed(now).is_some());
    }

    #[test]
    fn a_burst_of_calls_starts_one_drainer_per_sixteen_not_one_each() {
        let now = Instant::now();
        let mut queue = Queue::new();
        let mut started = 0;
        for _ in 0..64 {
            queue.jobs.push_back(job());
            started += usize::from(queue.drainer_needed(now).is_some());
        }
        // The first call starts one; more start only as the queue outgrows the free ones.
        assert_eq!(started, 4);
        assert_eq!(queue.drainers.len(), 4);
    }

    #[test]
    fn calls_queued_behind_a_stalled_call_get_a_drainer_of_their_own() {
        let now = Instant::now();
        let mut queue = Queue::new();
        queue.jobs.push_back(job());
        let first = queue.drainer_needed(now).unwrap();
        assert!(
            queue.next_job(first, now).is_some(),
            "in its call since now"
        );
        queue.jobs.push_back(job());
        assert_eq!(
            queue.drainer_needed(now),
            None,
            "the drainer is busy but not stalled"
        );
        assert!(queue.drainer_needed(now + STALL).is_some());
        assert_eq!(
            queue.drainer_needed(now + STALL),
            None,
            "the new one is free"
        );
    }

    fn on_a_thread(drain: Box<dyn FnOnce() + Send + 'static>) {
        std::thread::spawn(drain);
    }

    #[test]
    fn a_hanging_call_does_not_hold_up_the_next_one() {
        static LANES: Lanes = Lanes::new();
        let (release, hang) = mpsc::channel::<()>();
        let (done_tx, done) = mpsc::channel();
        LANES.submit(
            Box::new(move || {
                let _ = hang.recv();
            }),
            &on_a_thread,
        );
        LANES.submit(Box::new(move || done_tx.send(()).unwrap()), &on_a_thread);
        // As a waiting caller does: kick every STALL until the call has run.
        let mut waited = Duration::ZERO;
        while done.recv_timeout(STALL).is_err() {
            waited += STALL;
            assert!(
                waited < Duration::from_secs(10),
                "the second call never ran"
            );
            LANES.kick(&on_a_thread);
        }
        release.send(()).unwrap();
    }

    #[test]
    fn a_call_that_panics_leaves_its_drainer_taking_the_next() {
        static LANES: Lanes = Lanes::new();
        let (done_tx, done) = mpsc::channel();
        LANES.submit(Box::new(|| panic!("a module bug")), &on_a_thread);
        LANES.submit(Box::new(move || done_tx.send(()).unwrap()), &on_a_thread);
        // No kick: only a drainer that survived the panic can take the second call.
        assert!(
            done.recv_timeout(Duration::from_secs(10)).is_ok(),
            "the call after the panic never ran"
        );
    }
}
