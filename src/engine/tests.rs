//! Engine tests with a Rust driver modelled on QEMU's test-blockjob.c jobs:
//! loop until completed or cancelled, optionally converge to READY.

use crate::locks::Mutex;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use super::*;
use crate::events::{EventBus, EventData, Subscription};
use crate::qapi::{BlockErrorAction, BlockdevOnError, JobStatus, JobType};

#[derive(Default)]
struct Flags {
    should_converge: AtomicBool,
    should_complete: AtomicBool,
    fail_run: AtomicBool,
    fail_prepare: AtomicBool,
    calls: Mutex<Vec<&'static str>>,
    iterations: AtomicU32,
}

struct TestJob(Arc<Flags>);

impl JobDriver for TestJob {
    fn job_type(&self) -> JobType {
        JobType::Backup
    }
    fn run(&self, job: &Arc<Job>) -> Result<()> {
        let f = &self.0;
        job.progress_set_remaining(100);
        while !f.should_complete.load(Ordering::SeqCst) {
            if job.is_cancelled() {
                return Ok(());
            }
            if f.fail_run.load(Ordering::SeqCst) {
                return Err(Error::from_errno(libc::EIO));
            }
            if f.should_converge.load(Ordering::SeqCst) && !job.is_ready() {
                job.progress_update(100);
                job.transition_to_ready()?;
            }
            f.iterations.fetch_add(1, Ordering::SeqCst);
            job.sleep_ns(100_000);
        }
        Ok(())
    }
    fn supports_complete(&self) -> bool {
        true
    }
    fn complete(&self, _job: &Job) -> Result<()> {
        self.0.should_complete.store(true, Ordering::SeqCst);
        Ok(())
    }
    fn prepare(&self, _job: &Job) -> Result<()> {
        self.0.calls.lock().push("prepare");
        if self.0.fail_prepare.load(Ordering::SeqCst) {
            return Err(Error::from_errno(libc::EPERM));
        }
        Ok(())
    }
    fn commit(&self, _job: &Job) {
        self.0.calls.lock().push("commit");
    }
    fn abort(&self, _job: &Job) {
        self.0.calls.lock().push("abort");
    }
    fn clean(&self, _job: &Job) {
        self.0.calls.lock().push("clean");
    }
}

struct Fixture {
    engine: Arc<Engine>,
    events: Subscription,
}

impl Fixture {
    fn new() -> Self {
        let bus = EventBus::new();
        let events = bus.subscribe();
        Fixture {
            engine: Engine::new(bus),
            events,
        }
    }

    fn job(&self, id: &str, flags: u32) -> (Arc<Job>, Arc<Flags>) {
        self.job_in(id, flags, None)
    }

    fn job_in(&self, id: &str, flags: u32, txn: Option<Arc<JobTxn>>) -> (Arc<Job>, Arc<Flags>) {
        let f = Arc::new(Flags::default());
        let job = self
            .engine
            .create(
                JobOptions {
                    id: Some(id.into()),
                    flags,
                    block: true,
                    speed: 0,
                    txn,
                },
                Box::new(TestJob(f.clone())),
            )
            .expect("create");
        (job, f)
    }

    /// Drained events in the spec's short form.
    fn summary(&self) -> Vec<String> {
        std::iter::from_fn(|| self.events.try_next())
            .map(|e| match &e.data {
                EventData::JobStatusChange { status, .. } => format!("JSC:{status}"),
                EventData::BlockJobError {
                    operation, action, ..
                } => format!("ERR({operation},{action})"),
                EventData::BlockJobReady(_) => "READY".into(),
                EventData::BlockJobPending { .. } => "PENDING".into(),
                EventData::BlockJobCompleted { error: None, .. } => "COMPLETED".into(),
                EventData::BlockJobCompleted { error: Some(e), .. } => format!("COMPLETED({e})"),
                EventData::BlockJobCancelled(_) => "CANCELLED".into(),
                other => other.name().into(),
            })
            .collect()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.engine.shutdown();
    }
}

const MANUAL: u32 = JOB_MANUAL_FINALIZE | JOB_MANUAL_DISMISS;
const T: Duration = Duration::from_secs(10);

fn wait(job: &Job, s: JobStatus) {
    assert_eq!(job.wait_status(T, |x| x == s), Some(s), "waiting for {s}");
}

#[test]
fn ids_follow_qemu_rules() {
    let fx = Fixture::new();
    for bad in ["0id", "", "   ", "123", "_id", "-id", ".id", "#id"] {
        let e = fx
            .engine
            .create(
                JobOptions {
                    id: Some(bad.into()),
                    block: true,
                    ..Default::default()
                },
                Box::new(TestJob(Default::default())),
            )
            .unwrap_err();
        assert_eq!(e.message(), format!("Invalid job ID '{bad}'"));
    }
    let (_a, _) = fx.job("id0", MANUAL);
    let e = fx
        .engine
        .create(
            JobOptions {
                id: Some("id0".into()),
                block: true,
                ..Default::default()
            },
            Box::new(TestJob(Default::default())),
        )
        .unwrap_err();
    assert_eq!(e.message(), "Job ID 'id0' already in use");
    let e = fx
        .engine
        .create(JobOptions::default(), Box::new(TestJob(Default::default())))
        .unwrap_err();
    assert_eq!(e.message(), "An explicit job ID is required");
    let e = fx
        .engine
        .create(
            JobOptions {
                id: Some("x".into()),
                flags: JOB_INTERNAL,
                ..Default::default()
            },
            Box::new(TestJob(Default::default())),
        )
        .unwrap_err();
    assert_eq!(e.message(), "Cannot specify job ID for internal job");
    let (_b, _) = fx.job("id_2", MANUAL);
}

#[test]
fn negative_speed_fails_early_with_created_and_null() {
    let fx = Fixture::new();
    let e = fx
        .engine
        .create(
            JobOptions {
                id: Some("j".into()),
                block: true,
                speed: -1,
                ..Default::default()
            },
            Box::new(TestJob(Default::default())),
        )
        .unwrap_err();
    assert_eq!(
        e.message(),
        "Parameter 'speed' expects a non-negative value"
    );
    assert_eq!(fx.summary(), ["JSC:created", "JSC:null"]);
    // The id is free again.
    let (_j, _) = fx.job("j", 0);
}

#[test]
fn cancel_created_goes_straight_to_null() {
    let fx = Fixture::new();
    let (job, f) = fx.job("Steve", MANUAL);
    assert_eq!(job.status(), JobStatus::Created);
    assert!(job.cancel_sync(true).is_err());
    assert_eq!(job.status(), JobStatus::Null);
    assert_eq!(
        fx.summary(),
        ["JSC:created", "JSC:aborting", "JSC:concluded", "JSC:null"]
    );
    assert_eq!(*f.calls.lock(), ["abort", "clean"]);
}

#[test]
fn cancel_running_then_dismiss() {
    let fx = Fixture::new();
    let (job, f) = fx.job("Steve", MANUAL);
    job.start().unwrap();
    wait(&job, JobStatus::Running);
    let err = job.cancel_sync(false).unwrap_err();
    assert_eq!(err.errno(), Some(libc::ECANCELED));
    assert_eq!(job.status(), JobStatus::Concluded);
    job.dismiss().unwrap();
    assert_eq!(job.status(), JobStatus::Null);
    assert_eq!(
        fx.summary(),
        [
            "JSC:created",
            "JSC:running",
            "JSC:aborting",
            "CANCELLED",
            "JSC:concluded",
            "JSC:null"
        ]
    );
    assert_eq!(*f.calls.lock(), ["abort", "clean"]);
}

#[test]
fn user_pause_counts_and_resume_rules() {
    let fx = Fixture::new();
    let (job, _f) = fx.job("Steve", MANUAL);
    let e = job.user_resume().unwrap_err();
    assert_eq!(e.message(), "Can't resume a job that was not paused");
    job.start().unwrap();
    job.user_pause().unwrap();
    wait(&job, JobStatus::Paused);
    let e = job.user_pause().unwrap_err();
    assert_eq!(e.message(), "Job is already paused");
    let info = job.query_block_job().unwrap();
    assert!(info.paused);
    assert!(!info.busy);
    // A drain-style internal pause on top: resume by the user is not enough.
    fx.engine.pause(&job);
    job.user_resume().unwrap();
    assert!(job.query_block_job().unwrap().paused);
    assert_eq!(job.status(), JobStatus::Paused);
    fx.engine.resume(&job);
    wait(&job, JobStatus::Running);
    assert!(!job.query_block_job().unwrap().paused);
    let e = job.block_job_cancel(false).map(|_| ());
    assert!(e.is_ok());
    job.wait_completed().unwrap_err();
}

#[test]
fn cancel_paused_resumes_it() {
    let fx = Fixture::new();
    let (job, _f) = fx.job("Steve", MANUAL);
    job.start().unwrap();
    job.user_pause().unwrap();
    wait(&job, JobStatus::Paused);
    let e = job.block_job_cancel(false).unwrap_err();
    assert_eq!(
        e.message(),
        "The block job for device 'Steve' is currently paused"
    );
    job.cancel_sync(false).unwrap_err();
    assert_eq!(job.status(), JobStatus::Concluded);
    job.dismiss().unwrap();
}

#[test]
fn ready_standby_complete_finalize_dismiss() {
    let fx = Fixture::new();
    let (job, f) = fx.job("Steve", MANUAL);
    f.should_converge.store(true, Ordering::SeqCst);
    job.start().unwrap();
    wait(&job, JobStatus::Ready);
    let e = job.finalize().unwrap_err();
    assert_eq!(
        e.message(),
        "Job 'Steve' in state 'ready' cannot accept command verb 'finalize'"
    );
    job.user_pause().unwrap();
    wait(&job, JobStatus::Standby);
    // complete is accepted in standby; the job completes after resume.
    job.complete().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(job.status(), JobStatus::Standby);
    job.user_resume().unwrap();
    wait(&job, JobStatus::Pending);
    let info = job.query_block_job().unwrap();
    assert!(!info.ready);
    job.finalize().unwrap();
    assert_eq!(job.status(), JobStatus::Concluded);
    job.dismiss().unwrap();
    assert_eq!(
        fx.summary(),
        [
            "JSC:created",
            "JSC:running",
            "JSC:ready",
            "READY",
            "JSC:standby",
            "JSC:ready",
            "JSC:waiting",
            "JSC:pending",
            "PENDING",
            "COMPLETED",
            "JSC:concluded",
            "JSC:null"
        ]
    );
    assert_eq!(*f.calls.lock(), ["prepare", "commit", "clean"]);
}

#[test]
fn cancel_in_pending_and_concluded() {
    let fx = Fixture::new();
    let (job, f) = fx.job("Steve", MANUAL);
    f.should_converge.store(true, Ordering::SeqCst);
    job.start().unwrap();
    wait(&job, JobStatus::Ready);
    job.complete().unwrap();
    wait(&job, JobStatus::Pending);
    job.user_cancel(false).unwrap();
    assert_eq!(job.status(), JobStatus::Concluded);
    let info = job.query_job().unwrap();
    assert_eq!(info.error.as_deref(), Some("Operation canceled"));
    // cancel_sync on a concluded job dismisses it (QEMU's job_cancel).
    let _ = job.cancel_sync(true);
    assert_eq!(job.status(), JobStatus::Null);
}

#[test]
fn auto_finalize_and_dismiss_run_to_null() {
    let fx = Fixture::new();
    let (job, f) = fx.job("j", 0);
    f.should_converge.store(true, Ordering::SeqCst);
    job.start().unwrap();
    wait(&job, JobStatus::Ready);
    job.complete().unwrap();
    wait(&job, JobStatus::Null);
    assert_eq!(
        fx.summary(),
        [
            "JSC:created",
            "JSC:running",
            "JSC:ready",
            "READY",
            "JSC:waiting",
            "JSC:pending",
            "COMPLETED",
            "JSC:concluded",
            "JSC:null"
        ]
    );
}

#[test]
fn failing_run_reports_error_and_skips_pending() {
    let fx = Fixture::new();
    let (job, f) = fx.job("j", JOB_MANUAL_FINALIZE);
    f.fail_run.store(true, Ordering::SeqCst);
    job.start().unwrap();
    wait(&job, JobStatus::Null);
    assert_eq!(
        fx.summary(),
        [
            "JSC:created",
            "JSC:running",
            "JSC:aborting",
            "COMPLETED(Input/output error)",
            "JSC:concluded",
            "JSC:null"
        ]
    );
}

#[test]
fn error_action_stop_pauses_and_resume_resets_iostatus() {
    let fx = Fixture::new();
    let (job, _f) = fx.job("j", MANUAL);
    job.start().unwrap();
    let a = job.error_action(BlockdevOnError::Enospc, false, libc::ENOSPC);
    assert_eq!(a, BlockErrorAction::Stop);
    wait(&job, JobStatus::Paused);
    let info = job.query_block_job().unwrap();
    assert_eq!(info.io_status.as_str(), "nospace");
    assert!(info.paused);
    // A second error while stopped neither adds a pause nor changes iostatus.
    job.error_action(BlockdevOnError::Stop, true, libc::EIO);
    assert_eq!(job.iostatus().as_str(), "nospace");
    assert_eq!(
        job.user_pause().unwrap_err().message(),
        "Job is already paused"
    );
    job.user_resume().unwrap();
    assert_eq!(job.iostatus().as_str(), "ok");
    wait(&job, JobStatus::Running);
    // report/ignore never touch iostatus.
    assert_eq!(
        job.error_action(BlockdevOnError::Report, true, libc::EIO),
        BlockErrorAction::Report
    );
    assert_eq!(
        job.error_action(BlockdevOnError::Auto, true, libc::EIO),
        BlockErrorAction::Report
    );
    assert_eq!(job.iostatus().as_str(), "ok");
    let s = fx.summary();
    assert_eq!(
        s,
        [
            "JSC:created",
            "JSC:running",
            "ERR(write,stop)",
            "JSC:paused",
            "ERR(read,stop)",
            "JSC:running",
            "ERR(read,report)",
            "ERR(read,report)"
        ]
    );
    job.cancel_sync(true).unwrap_err();
}

#[test]
fn txn_failure_cancels_the_others() {
    let fx = Fixture::new();
    let txn = JobTxn::new(&fx.engine);
    let (a, fa) = fx.job_in("a", 0, Some(txn.clone()));
    let (b, fb) = fx.job_in("b", 0, Some(txn.clone()));
    drop(txn);
    a.start().unwrap();
    b.start().unwrap();
    wait(&a, JobStatus::Running);
    fb.fail_run.store(true, Ordering::SeqCst);
    wait(&a, JobStatus::Null);
    wait(&b, JobStatus::Null);
    let s = fx.summary();
    assert!(
        s.contains(&"COMPLETED(Input/output error)".to_string()),
        "{s:?}"
    );
    assert!(s.contains(&"CANCELLED".to_string()), "{s:?}");
    assert_eq!(*fa.calls.lock(), ["abort", "clean"]);
    assert_eq!(*fb.calls.lock(), ["abort", "clean"]);
}

#[test]
fn txn_success_waits_for_all_then_prepares_and_commits() {
    let fx = Fixture::new();
    let txn = JobTxn::new(&fx.engine);
    let (a, fa) = fx.job_in("a", 0, Some(txn.clone()));
    let (b, fb) = fx.job_in("b", 0, Some(txn.clone()));
    a.start().unwrap();
    b.start().unwrap();
    fa.should_complete.store(true, Ordering::SeqCst);
    wait(&a, JobStatus::Waiting);
    assert_eq!(b.status(), JobStatus::Running);
    fb.should_complete.store(true, Ordering::SeqCst);
    wait(&a, JobStatus::Null);
    wait(&b, JobStatus::Null);
    assert_eq!(*fa.calls.lock(), ["prepare", "commit", "clean"]);
    assert_eq!(*fb.calls.lock(), ["prepare", "commit", "clean"]);
}

#[test]
fn txn_prepare_failure_aborts() {
    let fx = Fixture::new();
    let (a, fa) = fx.job("a", 0);
    fa.fail_prepare.store(true, Ordering::SeqCst);
    fa.should_complete.store(true, Ordering::SeqCst);
    a.start().unwrap();
    wait(&a, JobStatus::Null);
    assert_eq!(*fa.calls.lock(), ["prepare", "abort", "clean"]);
    let s = fx.summary();
    assert_eq!(
        s,
        [
            "JSC:created",
            "JSC:running",
            "JSC:waiting",
            "JSC:pending",
            "JSC:aborting",
            "COMPLETED(Operation not permitted)",
            "JSC:concluded",
            "JSC:null"
        ]
    );
}

#[test]
fn set_speed_rules() {
    let fx = Fixture::new();
    let (job, _f) = fx.job("j", MANUAL);
    job.set_speed(8 << 20).unwrap();
    assert_eq!(job.query_block_job().unwrap().speed, 8 << 20);
    let e = job.set_speed(-1).unwrap_err();
    assert_eq!(
        e.message(),
        "Parameter 'speed' expects a non-negative value"
    );
    job.cancel_sync(true).unwrap_err();
    let e = job.set_speed(1).unwrap_err();
    assert_eq!(
        e.message(),
        "Job 'j' in state 'null' cannot accept command verb 'set-speed'"
    );
}

#[test]
fn shutdown_cancels_everything_and_joins_threads() {
    let fx = Fixture::new();
    let mut jobs = Vec::new();
    for i in 0..8 {
        let (j, f) = fx.job(&format!("j{i}"), if i % 2 == 0 { MANUAL } else { 0 });
        if i % 3 == 0 {
            f.should_converge.store(true, Ordering::SeqCst);
        }
        j.start().unwrap();
        if i == 5 {
            j.user_pause().unwrap();
        }
        jobs.push(j);
    }
    fx.engine.shutdown();
    for j in &jobs {
        assert_eq!(j.status(), JobStatus::Null);
    }
    assert!(fx.engine.jobs().is_empty());
}

// ---- property test: random verb sequences against the tables ---------------

mod prop {
    use super::*;
    use crate::engine::tables::{transition_allowed, verb_allowed};
    use crate::qapi::JobVerb;
    use proptest::prelude::*;
    use std::sync::atomic::AtomicU8;

    /// A job whose thread only moves when told: it waits (yields) between
    /// commands, so after each step its status is stable.
    struct Puppet {
        cmd: AtomicU8,
        complete: AtomicBool,
    }

    const NONE: u8 = 0;
    const CONVERGE: u8 = 1;
    const FINISH: u8 = 2;
    const FAIL: u8 = 3;

    impl JobDriver for Puppet {
        fn job_type(&self) -> JobType {
            JobType::Commit
        }
        fn run(&self, job: &Arc<Job>) -> Result<()> {
            loop {
                if job.is_cancelled() || self.complete.load(Ordering::SeqCst) {
                    return Ok(());
                }
                match self.cmd.swap(NONE, Ordering::SeqCst) {
                    CONVERGE if !job.is_ready() => job.transition_to_ready()?,
                    FINISH => return Ok(()),
                    FAIL => return Err(Error::from_errno(libc::EIO)),
                    _ => {}
                }
                if job.cancel_requested() && job.is_ready() {
                    // Soft cancel of a ready job: finish without error.
                    return Ok(());
                }
                job.yield_now();
            }
        }
        fn supports_complete(&self) -> bool {
            true
        }
        fn complete(&self, _job: &Job) -> Result<()> {
            self.complete.store(true, Ordering::SeqCst);
            Ok(())
        }
        fn cancel(&self, job: &Job, force: bool) -> bool {
            force || !job.is_ready()
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Start,
        Pause,
        Resume,
        Cancel(bool),
        BlockCancel(bool),
        Complete,
        Finalize,
        Dismiss,
        SetSpeed(i64),
        Drive(u8),
        DrainPause,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            Just(Op::Start),
            Just(Op::Pause),
            Just(Op::Resume),
            any::<bool>().prop_map(Op::Cancel),
            any::<bool>().prop_map(Op::BlockCancel),
            Just(Op::Complete),
            Just(Op::Finalize),
            Just(Op::Dismiss),
            (-2i64..3).prop_map(Op::SetSpeed),
            (1u8..4).prop_map(Op::Drive),
            Just(Op::DrainPause),
        ]
    }

    fn verb_of(op: &Op) -> Option<JobVerb> {
        match op {
            Op::Pause | Op::DrainPause => Some(JobVerb::Pause),
            Op::Resume => Some(JobVerb::Resume),
            Op::Cancel(_) | Op::BlockCancel(_) => Some(JobVerb::Cancel),
            Op::Complete => Some(JobVerb::Complete),
            Op::Finalize => Some(JobVerb::Finalize),
            Op::Dismiss => Some(JobVerb::Dismiss),
            Op::SetSpeed(_) => Some(JobVerb::SetSpeed),
            Op::Start | Op::Drive(_) => None,
        }
    }

    fn check_sequence(ops: Vec<Op>, flags: u32) -> std::result::Result<(), TestCaseError> {
        let fx = Fixture::new();
        let puppet = Arc::new(Puppet {
            cmd: AtomicU8::new(NONE),
            complete: AtomicBool::new(false),
        });
        struct Shared(Arc<Puppet>);
        impl JobDriver for Shared {
            fn job_type(&self) -> JobType {
                self.0.job_type()
            }
            fn run(&self, job: &Arc<Job>) -> Result<()> {
                self.0.run(job)
            }
            fn supports_complete(&self) -> bool {
                true
            }
            fn complete(&self, job: &Job) -> Result<()> {
                self.0.complete(job)
            }
            fn cancel(&self, job: &Job, force: bool) -> bool {
                self.0.cancel(job, force)
            }
        }
        let job = fx
            .engine
            .create(
                JobOptions {
                    id: Some("p".into()),
                    flags,
                    block: true,
                    speed: 0,
                    txn: None,
                },
                Box::new(Shared(puppet.clone())),
            )
            .unwrap();
        let mut drain_pauses = 0;
        for op in &ops {
            fx.engine.settle(&job);
            let before = job.status();
            let res = match op {
                Op::Start => job.start(),
                Op::Pause => job.user_pause(),
                Op::Resume => job.user_resume(),
                Op::Cancel(f) => job.user_cancel(*f),
                Op::BlockCancel(f) => job.block_job_cancel(*f),
                Op::Complete => job.complete(),
                Op::Finalize => job.finalize(),
                Op::Dismiss => job.dismiss(),
                Op::SetSpeed(s) => job.set_speed(*s),
                Op::Drive(c) => {
                    puppet.cmd.store(*c, Ordering::SeqCst);
                    job.enter();
                    Ok(())
                }
                Op::DrainPause => {
                    fx.engine.pause(&job);
                    drain_pauses += 1;
                    Ok(())
                }
            };
            if let (Some(verb), Err(e)) = (verb_of(op), &res) {
                let table_msg =
                    format!("Job 'p' in state '{before}' cannot accept command verb '{verb}'");
                let allowed = verb_allowed(verb, before);
                if e.message() == table_msg {
                    prop_assert!(
                        !allowed,
                        "{op:?} refused in {before} though the table allows it"
                    );
                } else {
                    // Checks QEMU makes before the table: resume's "not
                    // paused", block-job-cancel's "currently paused".
                    let pre = matches!(op, Op::Resume | Op::BlockCancel(false));
                    prop_assert!(
                        allowed || pre,
                        "{op:?} in {before}: expected the verb error, got {}",
                        e.message()
                    );
                }
            } else if let Some(verb) = verb_of(op)
                && !matches!(op, Op::DrainPause)
            {
                prop_assert!(
                    verb_allowed(verb, before),
                    "{op:?} accepted in {before} though the table refuses it"
                );
            }
        }
        // Undo internal pauses, then end the job and wait for null.
        for _ in 0..drain_pauses {
            fx.engine.resume(&job);
        }
        let _ = job.cancel_sync(true);
        if job.status() == JobStatus::Concluded {
            job.dismiss().unwrap();
        }
        prop_assert_eq!(job.status(), JobStatus::Null);
        // Every status change the job announced is allowed by the table.
        let mut prev = JobStatus::Undefined;
        while let Some(ev) = fx.events.try_next() {
            if let EventData::JobStatusChange { status, .. } = ev.data {
                prop_assert!(
                    transition_allowed(prev, status),
                    "event transition {prev} -> {status}"
                );
                prev = status;
            }
        }
        prop_assert_eq!(prev, JobStatus::Null);
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn random_verbs_follow_the_tables(ops in proptest::collection::vec(op(), 1..40),
                                          manual in any::<bool>()) {
            let flags = if manual { MANUAL } else { 0 };
            check_sequence(ops, flags)?;
        }
    }
}

/// Sleeps (as a rate-limited job does) until cancelled.
struct Sleeper;

impl JobDriver for Sleeper {
    fn job_type(&self) -> JobType {
        JobType::Mirror
    }
    fn run(&self, job: &Arc<Job>) -> Result<()> {
        while !job.is_cancelled() {
            job.sleep_ns(10_000_000_000);
        }
        Ok(())
    }
}

/// `job-pause` of a job that sleeps returns with the job `paused` and its
/// event out, as QEMU's (which enters the job's coroutine from the
/// monitor): the next command already sees `paused` (a loaded CI run once
/// had `block-job-complete` right after the pause see `running`).
#[test]
fn pausing_a_sleeping_job_returns_paused() {
    let fx = Fixture::new();
    for round in 0..20 {
        let job = fx
            .engine
            .create(
                JobOptions {
                    id: Some(format!("s{round}")),
                    flags: 0,
                    block: true,
                    speed: 0,
                    txn: None,
                },
                Box::new(Sleeper),
            )
            .unwrap();
        job.start().unwrap();
        wait(&job, JobStatus::Running);
        while job.query_block_job().unwrap().busy {
            std::thread::sleep(Duration::from_millis(1));
        }
        job.user_pause().unwrap();
        assert_eq!(job.status(), JobStatus::Paused, "round {round}");
        let e = job.complete().unwrap_err();
        assert_eq!(
            e.message(),
            format!("Job 's{round}' in state 'paused' cannot accept command verb 'complete'")
        );
        job.user_resume().unwrap();
        job.user_cancel(true).unwrap();
        job.wait_completed().unwrap_err();
    }
}
