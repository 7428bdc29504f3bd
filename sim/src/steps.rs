//! The threads a run's steps are shared out over.
//!
//! A run is thousands of short steps (10,000 for 10 s of virtual time), each a barrier:
//! what a node sends in one step is delivered from the next on, and the run's own events
//! (traffic, faults, checks) happen between steps, on the calling thread. Run with rayon,
//! the workers fell asleep in that gap and were woken for the next step, and the caller
//! slept while they worked and was woken when they were done: about 6 context switches a
//! step (18,450 in a 3,000-step run, 315 without them), and 0.89 of the wall time once
//! they were gone (`docs/benchmarks.md`, "Speed").
//! rayon has no setting for how long its workers wait before they sleep, so this module
//! does that one thing: each helper waits for the next step by spinning for a bounded
//! number of iterations (about one gap between steps), then parks. The calling thread
//! hands a step out ([`Steps::start`]), may do serial work of its own while the helpers
//! start on it, then works on the step too and spins until the helpers are done
//! ([`Steps::finish`]).
//!
//! Only safe code: the items (the nodes) are moved to whichever thread takes them and
//! back, and the step's context is cloned to each helper (an `Arc`), so nothing borrowed
//! crosses threads. Which thread runs which item decides nothing but the time taken: the
//! caller gets every item back, in no particular order.

use std::any::Any;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{Scope, Thread};

/// Iterations of `spin_loop` a thread spends waiting before it parks (a helper) or
/// yields (the caller): about 120 µs on the 2-core x86-64 machine the figures come from,
/// about the serial work between two steps of a large run.
const SPIN: u32 = 1 << 13;

/// What the caller and the helpers share.
struct Board<C, T> {
    /// Raised by the caller for each step (after `job` holds it).
    generation: AtomicU64,
    /// Helpers done with the current step (each after dropping its context).
    finished: AtomicUsize,
    stop: AtomicBool,
    job: Mutex<Job<C, T>>,
}

struct Job<C, T> {
    context: Option<C>,
    /// Taken from the end: the caller puts the first item last.
    todo: Vec<T>,
    done: Vec<T>,
    /// The first panic of a helper in this step, resumed on the caller.
    panic: Option<Box<dyn Any + Send>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A helper's panic is caught and handed to the caller, which ends the run.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs `work` on the items of each step, on the calling thread and `helpers` more.
pub(crate) struct Steps<C, T> {
    board: Arc<Board<C, T>>,
    helpers: Vec<Thread>,
    work: fn(&C, &mut T),
}

impl<C: Clone + Send + Sync, T: Send> Steps<C, T> {
    /// Starts `helpers` threads in `scope` (none: every step runs on the caller alone).
    /// They end when this is dropped, which must happen within the scope.
    pub(crate) fn new<'scope, 'env>(scope: &'scope Scope<'scope, 'env>, helpers: usize, work: fn(&C, &mut T)) -> Self
    where
        C: 'scope,
        T: 'scope,
    {
        let board = Arc::new(Board {
            generation: AtomicU64::new(0),
            finished: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            job: Mutex::new(Job { context: None, todo: Vec::new(), done: Vec::new(), panic: None }),
        });
        // Made before the helpers, so that if starting one panics, dropping it stops those
        // already started and the scope does not wait on them forever.
        let mut steps = Self { board, helpers: Vec::with_capacity(helpers), work };
        for _ in 0..helpers {
            let board = Arc::clone(&steps.board);
            steps.helpers.push(scope.spawn(move || help(&board, work)).thread().clone());
        }
        steps
    }

    /// Whether steps run on more than the calling thread.
    pub(crate) fn parallel(&self) -> bool {
        !self.helpers.is_empty()
    }

    /// Hands out a step: `work(&context, item)` for every item, the first ones first. The
    /// helpers start on it at once; the caller may do work of its own before it joins in
    /// with [`finish`](Self::finish), which must follow before the next step.
    pub(crate) fn start(&self, context: &C, items: impl DoubleEndedIterator<Item = T>) {
        {
            let mut job = lock(&self.board.job);
            // Checked in release too: a second step before `finish` would mix the two.
            assert!(job.todo.is_empty() && job.context.is_none(), "a step under way");
            job.context = Some(context.clone());
            job.todo.extend(items.rev());
        }
        // Every helper finished the step before (the caller waited for it), so none
        // counts into this one before it sees the new generation.
        self.board.finished.store(0, Ordering::Relaxed);
        self.board.generation.fetch_add(1, Ordering::Release);
        for t in &self.helpers {
            t.unpark();
        }
    }

    /// Works on what is left of the step, waits for the helpers, and appends every item
    /// to `out` (in no particular order). A panic in `work` is resumed here.
    pub(crate) fn finish(&self, context: C, out: &mut Vec<T>) {
        drain(&self.board, &context, self.work);
        drop(context);
        let mut spins = 0u32;
        while self.board.finished.load(Ordering::Acquire) < self.helpers.len() {
            if spins < SPIN {
                spins += 1;
                std::hint::spin_loop();
            } else {
                // A helper was descheduled mid-step: leave it the core.
                std::thread::yield_now();
            }
        }
        let mut job = lock(&self.board.job);
        job.context = None;
        if let Some(panic) = job.panic.take() {
            drop(job);
            resume_unwind(panic);
        }
        out.append(&mut job.done);
    }
}

impl<C, T> Drop for Steps<C, T> {
    fn drop(&mut self) {
        self.board.stop.store(true, Ordering::Release);
        for t in &self.helpers {
            t.unpark();
        }
    }
}

/// Takes items until none is left.
fn drain<C, T>(board: &Board<C, T>, context: &C, work: fn(&C, &mut T)) {
    loop {
        // Its own statement: the lock is not held while the item is worked on.
        let next = lock(&board.job).todo.pop();
        let Some(mut item) = next else { return };
        work(context, &mut item);
        lock(&board.job).done.push(item);
    }
}

/// A helper: waits for each step, works on it, and counts itself finished.
fn help<C: Clone, T>(board: &Board<C, T>, work: fn(&C, &mut T)) {
    let mut seen = 0;
    loop {
        let mut spins = 0u32;
        loop {
            let generation = board.generation.load(Ordering::Acquire);
            if generation != seen {
                seen = generation;
                break;
            }
            if board.stop.load(Ordering::Acquire) {
                return;
            }
            if spins < SPIN {
                spins += 1;
                std::hint::spin_loop();
            } else {
                // `unpark` before this returns at once: no wake-up is lost.
                std::thread::park();
            }
        }
        let context = lock(&board.job).context.clone();
        if let Some(context) = context {
            if let Err(panic) = catch_unwind(AssertUnwindSafe(|| drain(board, &context, work))) {
                lock(&board.job).panic.get_or_insert(panic);
            }
        }
        board.finished.fetch_add(1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn double(by: &u64, item: &mut (usize, u64)) {
        item.1 *= by;
    }

    #[test]
    fn every_item_is_worked_on_once_and_given_back_at_every_step_with_any_number_of_helpers() {
        for helpers in [0, 1, 3] {
            std::thread::scope(|s| {
                let steps = Steps::new(s, helpers, double);
                assert_eq!(steps.parallel(), helpers > 0);
                let mut items: Vec<(usize, u64)> = (0..100).map(|i| (i, i as u64)).collect();
                for step in 1..=50u64 {
                    let mut out = Vec::new();
                    steps.start(&2, items.drain(..));
                    steps.finish(2, &mut out);
                    out.sort_unstable();
                    assert_eq!(out.len(), 100, "step {step}, {helpers} helpers");
                    for (i, &(at, v)) in out.iter().enumerate() {
                        assert_eq!((at, v), (i, (i as u64) << step), "step {step}, {helpers} helpers");
                    }
                    items = out;
                }
            });
        }
    }

    /// Waits, up to a minute, until `ready` holds of the step's job.
    fn wait_for<C, T>(steps: &Steps<C, T>, ready: impl Fn(&Job<C, T>) -> bool) {
        let until = Instant::now() + Duration::from_secs(60);
        while !ready(&lock(&steps.board.job)) {
            assert!(Instant::now() < until, "the helpers did not take the step");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn sign(_: &(), item: &mut (usize, Option<std::thread::ThreadId>)) {
        item.1 = Some(std::thread::current().id());
    }

    #[test]
    fn helpers_woken_from_parking_do_a_step_while_the_caller_is_busy() {
        std::thread::scope(|s| {
            let steps = Steps::new(s, 2, sign);
            let caller = std::thread::current().id();
            for step in 0..5 {
                // Longer than the helpers spin: they park, and the step must wake them.
                std::thread::sleep(Duration::from_millis(20));
                steps.start(&(), (0..50).map(|i| (i, None)));
                // The caller does other work until the helpers have done the whole step.
                wait_for(&steps, |job| job.done.len() == 50);
                let mut out = Vec::new();
                steps.finish((), &mut out);
                out.sort_unstable_by_key(|&(i, _)| i);
                assert_eq!(out.iter().map(|&(i, _)| i).collect::<Vec<_>>(), (0..50).collect::<Vec<_>>(), "step {step}");
                assert!(out.iter().all(|&(_, by)| by.is_some_and(|t| t != caller)), "step {step}: {out:?}");
            }
        });
    }

    #[test]
    fn a_second_step_before_the_first_is_finished_is_refused() {
        std::thread::scope(|s| {
            let steps = Steps::new(s, 1, double);
            steps.start(&2, [(0, 1)].into_iter());
            let again = catch_unwind(AssertUnwindSafe(|| steps.start(&3, [(1, 1)].into_iter())));
            assert!(again.is_err(), "a second step was taken");
            let mut out = Vec::new();
            steps.finish(2, &mut out);
            assert_eq!(out, [(0, 2)]);
        });
    }

    fn assert_item_7(panic: Box<dyn Any + Send>, helpers: usize) {
        let message = panic.downcast_ref::<String>().map(String::as_str).or(panic.downcast_ref::<&str>().copied());
        assert!(message.is_some_and(|m| m.contains("item 7")), "{helpers} helpers: {message:?}");
    }

    fn fail_on_7(_: &(), item: &mut u32) {
        assert_ne!(*item, 7, "item 7");
    }

    #[test]
    fn a_panic_on_a_helper_or_the_caller_reaches_the_caller_and_the_helpers_end() {
        for helpers in [0, 1, 2] {
            let caught = catch_unwind(|| {
                std::thread::scope(|s| {
                    let steps = Steps::new(s, helpers, fail_on_7);
                    for n in [5, 20] {
                        steps.start(&(), 0..n);
                        steps.finish((), &mut Vec::new());
                    }
                })
            });
            assert_item_7(caught.expect_err("item 7 panics"), helpers);
        }
    }

    #[test]
    fn a_panic_on_a_helper_while_the_caller_is_busy_reaches_the_caller_and_the_helpers_end() {
        for helpers in [1, 2] {
            let caught = catch_unwind(|| {
                std::thread::scope(|s| {
                    let steps = Steps::new(s, helpers, fail_on_7);
                    steps.start(&(), 0..20);
                    // Only a helper can have taken item 7: the caller has not joined in.
                    wait_for(&steps, |job| job.panic.is_some());
                    steps.finish((), &mut Vec::new());
                })
            });
            assert_item_7(caught.expect_err("item 7 panics"), helpers);
        }
    }
}
