//! An in-memory access log: give a clone to a proxy's telemetry as its writer, then read the
//! JSON records it wrote.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone, Default)]
pub struct AccessLog(Arc<Mutex<Vec<u8>>>);

impl Write for AccessLog {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl AccessLog {
    /// The whole records written so far.
    ///
    /// # Panics
    /// If a record is not JSON: the proxy's log is broken.
    pub fn records(&self) -> Vec<serde_json::Value> {
        let bytes = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let text = String::from_utf8_lossy(&bytes);
        // Only whole lines: the proxy may be writing the last one while we read.
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        complete
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    /// The first record that `pred` accepts, waiting up to 5 s for it.
    ///
    /// # Panics
    /// If none comes, listing the records there are.
    pub async fn wait_for(&self, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        for _ in 0..200 {
            if let Some(r) = self.records().into_iter().find(&pred) {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("no matching access record in {:#?}", self.records());
    }

    /// [`Self::wait_for`] the first record whose reason satisfies `pred`.
    pub async fn wait_for_reason(&self, pred: impl Fn(&str) -> bool) -> serde_json::Value {
        self.wait_for(|r| r["reason"].as_str().is_some_and(&pred))
            .await
    }
}
