//! An in-memory host node that can hold one request back until the test
//! lets it go: puts a request in flight at a moment the test chooses.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Which request to hold.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// The first read.
    Read,
    /// The first write.
    Write,
}

/// The test's side of the gate.
#[derive(Default)]
pub struct Gate {
    /// (a request is being held, it has been released)
    state: Mutex<(bool, bool)>,
    cv: Condvar,
}

impl Gate {
    /// Wait until a request is held.
    pub fn wait_held(&self) {
        let mut g = self.state.lock().unwrap();
        while !g.0 {
            g = self.cv.wait(g).unwrap();
        }
    }

    /// Let it (and every later request) through.
    pub fn release(&self) {
        self.state.lock().unwrap().1 = true;
        self.cv.notify_all();
    }

    /// Hold the calling request until released, for `max` at most.
    fn hold(&self, max: Duration) {
        let mut g = self.state.lock().unwrap();
        if g.1 {
            return;
        }
        g.0 = true;
        self.cv.notify_all();
        let deadline = Instant::now() + max;
        while !g.1 && Instant::now() < deadline {
            g = self
                .cv
                .wait_timeout(g, Duration::from_millis(10))
                .unwrap()
                .0;
        }
        g.1 = true;
    }
}

/// Memory whose first read or write waits at the gate (a second at most).
pub struct GatedMemory {
    pub data: Mutex<Vec<u8>>,
    pub hold: Hold,
    pub gate: Arc<Gate>,
}

impl GatedMemory {
    /// `size` bytes of `fill`, holding the first `hold` request.
    pub fn new(size: usize, fill: u8, hold: Hold) -> (Self, Arc<Gate>) {
        let gate = Arc::new(Gate::default());
        (
            GatedMemory {
                data: Mutex::new(vec![fill; size]),
                hold,
                gate: gate.clone(),
            },
            gate,
        )
    }
}

impl blockjob::block::host::HostIo for GatedMemory {
    fn len(&self) -> Result<u64, i32> {
        Ok(self.data.lock().unwrap().len() as u64)
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), i32> {
        if self.hold == Hold::Read {
            self.gate.hold(Duration::from_secs(1));
        }
        let d = self.data.lock().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write(&self, offset: u64, buf: &[u8]) -> Result<(), i32> {
        if self.hold == Hold::Write {
            self.gate.hold(Duration::from_secs(1));
        }
        let mut d = self.data.lock().unwrap();
        d[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
}
