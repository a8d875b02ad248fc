//! The two tables that define a job's life, as data: which status may
//! follow which (QEMU's `JobSTT`), and which verb is accepted in which
//! status (QEMU's `JobVerbTable`). They are the only source of truth; the
//! engine asks them and never encodes a rule of its own.
//!
//! Legend, in `JobStatus` order:
//! U undefined, C created, R running, P paused, Y ready, S standby,
//! W waiting, D pending, X aborting, E concluded, N null.

use crate::qapi::{JobStatus, JobVerb};

const NSTATUS: usize = 11;

/// `TRANSITIONS[from][to]`: 1 when `from -> to` is allowed.
#[rustfmt::skip]
const TRANSITIONS: [[u8; NSTATUS]; NSTATUS] = [
    /*           U  C  R  P  Y  S  W  D  X  E  N */
    /* U: */    [0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    /* C: */    [0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 1],
    /* R: */    [0, 0, 0, 1, 1, 0, 1, 0, 1, 0, 0],
    /* P: */    [0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0],
    /* Y: */    [0, 0, 0, 0, 0, 1, 1, 0, 1, 0, 0],
    /* S: */    [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0],
    /* W: */    [0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0],
    /* D: */    [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0],
    /* X: */    [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0],
    /* E: */    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
    /* N: */    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
];

/// `VERBS[verb][status]`: 1 when the verb is accepted in that status.
#[rustfmt::skip]
const VERBS: [[u8; NSTATUS]; 8] = [
    /*               U  C  R  P  Y  S  W  D  X  E  N */
    /* cancel:    */ [0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    /* pause:     */ [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
    /* resume:    */ [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
    /* set-speed: */ [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
    /* complete:  */ [0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0],
    /* dismiss:   */ [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
    /* finalize:  */ [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
    /* change:    */ [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
];

fn status_index(s: JobStatus) -> usize {
    match s {
        JobStatus::Undefined => 0,
        JobStatus::Created => 1,
        JobStatus::Running => 2,
        JobStatus::Paused => 3,
        JobStatus::Ready => 4,
        JobStatus::Standby => 5,
        JobStatus::Waiting => 6,
        JobStatus::Pending => 7,
        JobStatus::Aborting => 8,
        JobStatus::Concluded => 9,
        JobStatus::Null => 10,
    }
}

fn verb_index(v: JobVerb) -> usize {
    match v {
        JobVerb::Cancel => 0,
        JobVerb::Pause => 1,
        JobVerb::Resume => 2,
        JobVerb::SetSpeed => 3,
        JobVerb::Complete => 4,
        JobVerb::Dismiss => 5,
        JobVerb::Finalize => 6,
        JobVerb::Change => 7,
    }
}

/// May a job go from `from` to `to`?
pub fn transition_allowed(from: JobStatus, to: JobStatus) -> bool {
    TRANSITIONS[status_index(from)][status_index(to)] == 1
}

/// Is `verb` accepted in `status`?
pub fn verb_allowed(verb: JobVerb, status: JobStatus) -> bool {
    VERBS[verb_index(verb)][status_index(status)] == 1
}

/// `status` is `ready` or `standby` (QEMU's `job_is_ready`).
pub fn is_ready(status: JobStatus) -> bool {
    match status {
        JobStatus::Ready | JobStatus::Standby => true,
        JobStatus::Undefined
        | JobStatus::Created
        | JobStatus::Running
        | JobStatus::Paused
        | JobStatus::Waiting
        | JobStatus::Pending
        | JobStatus::Aborting
        | JobStatus::Concluded
        | JobStatus::Null => false,
    }
}

/// The job's `run` is over (QEMU's `job_is_completed`).
pub fn is_completed(status: JobStatus) -> bool {
    match status {
        JobStatus::Waiting
        | JobStatus::Pending
        | JobStatus::Aborting
        | JobStatus::Concluded
        | JobStatus::Null => true,
        JobStatus::Undefined
        | JobStatus::Created
        | JobStatus::Running
        | JobStatus::Paused
        | JobStatus::Ready
        | JobStatus::Standby => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use JobStatus::*;

    /// The spec's tables (../shared/spec/qemu-semantics.md §2), re-typed as
    /// lists of allowed pairs so a slip in the matrices above shows up.
    fn spec_transitions() -> Vec<(JobStatus, JobStatus)> {
        vec![
            (Undefined, Created),
            (Created, Running),
            (Created, Aborting),
            (Created, Null),
            (Running, Paused),
            (Running, Ready),
            (Running, Waiting),
            (Running, Aborting),
            (Paused, Running),
            (Ready, Standby),
            (Ready, Waiting),
            (Ready, Aborting),
            (Standby, Ready),
            (Waiting, Pending),
            (Waiting, Aborting),
            (Pending, Aborting),
            (Pending, Concluded),
            (Aborting, Aborting),
            (Aborting, Concluded),
            (Concluded, Null),
        ]
    }

    fn spec_verbs() -> Vec<(JobVerb, Vec<JobStatus>)> {
        let live = vec![Created, Running, Paused, Ready, Standby];
        vec![
            (
                JobVerb::Cancel,
                vec![Created, Running, Paused, Ready, Standby, Waiting, Pending],
            ),
            (JobVerb::Pause, live.clone()),
            (JobVerb::Resume, live.clone()),
            (JobVerb::SetSpeed, live.clone()),
            (JobVerb::Complete, vec![Ready, Standby]),
            (JobVerb::Dismiss, vec![Concluded]),
            (JobVerb::Finalize, vec![Pending]),
            (JobVerb::Change, live),
        ]
    }

    #[test]
    fn every_status_pair_matches_the_spec() {
        let allowed = spec_transitions();
        let mut count = 0;
        for &from in JobStatus::ALL {
            for &to in JobStatus::ALL {
                let want = allowed.contains(&(from, to));
                assert_eq!(transition_allowed(from, to), want, "{from} -> {to}");
                count += 1;
            }
        }
        assert_eq!(count, 121);
    }

    #[test]
    fn every_verb_in_every_status_matches_the_spec() {
        let table = spec_verbs();
        assert_eq!(table.len(), JobVerb::ALL.len());
        for &verb in JobVerb::ALL {
            let ok = &table.iter().find(|(v, _)| *v == verb).unwrap().1;
            for &status in JobStatus::ALL {
                assert_eq!(
                    verb_allowed(verb, status),
                    ok.contains(&status),
                    "{verb} in {status}"
                );
            }
        }
    }

    #[test]
    fn predicates() {
        let ready: Vec<_> = JobStatus::ALL
            .iter()
            .copied()
            .filter(|s| is_ready(*s))
            .collect();
        assert_eq!(ready, [Ready, Standby]);
        let done: Vec<_> = JobStatus::ALL
            .iter()
            .copied()
            .filter(|s| is_completed(*s))
            .collect();
        assert_eq!(done, [Waiting, Pending, Aborting, Concluded, Null]);
    }
}
