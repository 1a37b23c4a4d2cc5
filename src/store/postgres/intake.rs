//! PostgreSQL: queueing jobs ([`PgJobWriter`]) and reading the intake table.

use super::PgStore;
use crate::store::*;

/// One job being queued, inside one write transaction: all of it commits, or nothing.
pub struct PgJobWriter {
    store: PgStore,
    job_id: i64,
    accounts: JobAccounts,
}

impl PgStore {
    /// Starts queueing a job. `kind` is `file` or `intake`; for `intake` the one intake job is
    /// reused.
    pub async fn job_writer(&self, _kind: &str, _source: &str) -> Result<PgJobWriter, StoreError> {
        Err(self.todo("job_writer"))
    }

    pub async fn new_intake_rows(&self, _limit: i64) -> Result<Vec<IntakeRow>, StoreError> {
        Err(self.todo("new_intake_rows"))
    }
}

impl PgJobWriter {
    /// The job's id (valid once committed).
    pub fn job_id(&self) -> i64 {
        self.job_id
    }

    /// Lists an account with profile data (written at commit).
    pub fn add_account(&mut self, a: NewAccount) {
        self.accounts.profiles.push(a);
    }

    pub async fn push(&mut self, _msg: NewMessage) -> Result<u32, StoreError> {
        Err(self.store.todo("push"))
    }

    pub async fn push_returning_id(&mut self, _msg: NewMessage) -> Result<Pushed, StoreError> {
        Err(self.store.todo("push_returning_id"))
    }

    pub async fn take_conflicts(&mut self) -> Result<Vec<RandomConflict>, StoreError> {
        Err(self.store.todo("take_conflicts"))
    }

    pub async fn set_group_spec(&mut self, _group: &str, _spec: &str) -> Result<(), StoreError> {
        Err(self.store.todo("set_group_spec"))
    }

    pub async fn add_member(&mut self, _group: &str, _m: &NewMember) -> Result<(), StoreError> {
        Err(self.store.todo("add_member"))
    }

    pub async fn commit(self, _content_hash: Option<&str>) -> Result<JobOutcome, StoreError> {
        Err(self.store.todo("commit"))
    }

    pub async fn rollback(self) -> Result<(), StoreError> {
        Err(self.store.todo("rollback"))
    }

    pub async fn take_intake_row(&mut self, _row_id: i64) -> Result<bool, StoreError> {
        Err(self.store.todo("take_intake_row"))
    }

    pub async fn mark_intake_row(
        &mut self,
        _row_id: i64,
        _status: &str,
        _error: Option<&str>,
        _message_id: Option<i64>,
    ) -> Result<(), StoreError> {
        Err(self.store.todo("mark_intake_row"))
    }
}
